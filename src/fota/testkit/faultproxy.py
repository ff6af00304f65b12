"""A fault-injecting TCP proxy for tests and benchmarks (asyncio, loopback only).

Put it between devices and the broker: devices connect to the proxy's port, the proxy opens a
connection to the upstream (the broker) for each of them and forwards bytes both ways. Faults:

* **cut**: abort a connection (both sides) once it forwarded exactly K bytes: upstream-bound
  (``cut_after_up``), client-bound (``cut_after_down``) or both together (``cut_after``).
  Every new connection gets the same budget again, so "cut after every 3 KiB" is
  ``cut_after_down=3072``. A cut usually lands inside an MQTT packet.
* **stall**: stop forwarding in both directions for T seconds while the sockets stay open.
  ``stall(T)`` stalls every connection now; ``stall_after=K, stall_for=T`` stalls each
  connection once, when it has forwarded K bytes in ``stall_direction``. What arrives during a
  stall waits (in the proxy and the kernel's buffers) and is forwarded afterwards.
* **throttle**: at most N bytes per second per connection and direction (``throttle_up``,
  ``throttle_down``; ``throttle`` sets both), token bucket with a 100 ms burst.
* **cut on next**: ``cut_on_next(direction)`` aborts each connection open now when it next has
  bytes to forward that way, dropping them (a link dying just as the device sends a status).

Settings are attributes read on every forwarded piece, so a test may change them while
connections are open. Counters: ``bytes_up``/``bytes_down`` (forwarded), ``dropped`` (read but
discarded by a cut), ``connections``, ``cuts``, ``stalls``. ``tap``, if set, is called as
``tap(session, direction, data)`` with every piece forwarded (bench/e2e's wire breakdown).

Use it from asyncio (``await proxy.start()`` / ``await proxy.close()``) or from synchronous code
in its own thread (``proxy.start_thread()`` / ``proxy.stop_thread()``), or as a command:
``python -m fota.testkit.faultproxy 1883 --port 11883 --cut-after-down 3072``.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import socket
import threading
import time
from dataclasses import dataclass, field

UP = "up"      # client -> upstream (device -> broker)
DOWN = "down"  # upstream -> client (broker -> device)
READ_SIZE = 65536
BURST = 0.1    # seconds of throttled rate that may go out at once


def _loopback(host: str) -> str:
    """The numeric loopback address for host; ValueError for anything else."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve {host!r}: {exc}") from None
    for info in infos:
        addr = info[4][0]
        if ipaddress.ip_address(addr).is_loopback:
            return addr
    raise ValueError(f"the fault proxy works on loopback only, not {host!r}")


@dataclass
class Session:
    """One proxied connection: bytes forwarded per direction and how it ended."""
    number: int
    up: int = 0
    down: int = 0
    cut: str | None = None          # "up" / "down" / "total": the budget that cut it
    stalled: bool = False           # its stall_after stall happened
    closed: bool = False
    cut_on: str | None = None       # cut_on_next: the direction whose next bytes cut it
    stall_until: float = 0.0        # loop time
    tokens: dict = field(default_factory=dict)   # direction -> (tokens, at)
    writers: list = field(default_factory=list)

    def sent(self, direction: str) -> int:
        return self.up if direction == UP else self.down


class FaultProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1", *, host: str = "127.0.0.1",
                 port: int = 0, cut_after: int | None = None, cut_after_up: int | None = None,
                 cut_after_down: int | None = None, stall_after: int | None = None, stall_for: float = 0.0,
                 stall_direction: str = DOWN, throttle: int | None = None, throttle_up: int | None = None,
                 throttle_down: int | None = None):
        self.upstream_host = _loopback(upstream_host)
        self.upstream_port = upstream_port
        self.host = _loopback(host)
        self.port = port
        self.cut_after = cut_after
        self.cut_after_up = cut_after_up
        self.cut_after_down = cut_after_down
        self.stall_after = stall_after
        self.stall_for = stall_for
        if stall_direction not in (UP, DOWN):
            raise ValueError("stall_direction is 'up' or 'down'")
        self.stall_direction = stall_direction
        self.throttle_up = throttle_up if throttle_up is not None else throttle
        self.throttle_down = throttle_down if throttle_down is not None else throttle
        self.bytes_up = 0
        self.bytes_down = 0
        self.dropped = 0
        self.connections = 0
        self.cuts = 0
        self.stalls = 0
        self.sessions: list[Session] = []
        self._stall_until = 0.0
        self._server: asyncio.base_events.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task] = set()
        self.tap = None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> "FaultProxy":
        self._loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for session in self.sessions:
            self._abort(session)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def start_thread(self) -> "FaultProxy":
        """Run the proxy on its own event loop in a daemon thread (for synchronous callers)."""
        loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name="faultproxy", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.start(), loop).result(10)
        return self

    def stop_thread(self) -> None:
        loop = self._loop
        if loop is None or self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(self.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(10)
        self._thread = None

    def __enter__(self) -> "FaultProxy":
        return self.start_thread()

    def __exit__(self, *exc) -> None:
        self.stop_thread()

    # ------------------------------------------------------------ faults on demand

    def stall(self, seconds: float) -> None:
        """Stop forwarding on every open connection for `seconds` from now (thread-safe)."""
        def apply():
            self._stall_until = max(self._stall_until, self._loop.time() + seconds)
            self.stalls += 1
        if self._loop is None:
            raise RuntimeError("the proxy is not running")
        if self._thread is not None and threading.current_thread() is not self._thread:
            self._loop.call_soon_threadsafe(apply)
        else:
            apply()

    def unstall(self) -> None:
        """End a stall now (thread-safe): what waited is forwarded."""
        def apply():
            self._stall_until = 0.0
        if self._loop is None:
            raise RuntimeError("the proxy is not running")
        if self._thread is not None and threading.current_thread() is not self._thread:
            self._loop.call_soon_threadsafe(apply)
        else:
            apply()

    def cut_all(self) -> int:
        """Abort every open connection now (thread-safe); returns how many."""
        open_ = [s for s in self.sessions if not s.closed]

        def apply():
            for session in open_:
                if not session.closed:
                    session.cut = session.cut or "manual"
                    self.cuts += 1
                    self._abort(session)
        if self._thread is not None and threading.current_thread() is not self._thread:
            self._loop.call_soon_threadsafe(apply)
        else:
            apply()
        return len(open_)

    def cut_on_next(self, direction: str = UP) -> int:
        """Abort every connection open now when it next has bytes to forward in `direction`
        (dropped, not forwarded); connections opened later are left alone (thread-safe). Returns
        how many were armed."""
        if direction not in (UP, DOWN):
            raise ValueError("direction is 'up' or 'down'")
        open_ = [s for s in self.sessions if not s.closed]

        def apply():
            for session in open_:
                session.cut_on = direction
        if self._thread is not None and threading.current_thread() is not self._thread:
            self._loop.call_soon_threadsafe(apply)
        else:
            apply()
        return len(open_)

    @property
    def open_connections(self) -> int:
        return sum(1 for s in self.sessions if not s.closed)

    # ------------------------------------------------------------ forwarding

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        session = Session(self.connections)
        self.sessions.append(session)
        try:
            up_r, up_w = await asyncio.open_connection(self.upstream_host, self.upstream_port)
        except OSError:
            session.closed = True
            client_w.transport.abort()
            return
        session.writers = [client_w, up_w]
        pumps = [asyncio.ensure_future(self._pump(session, UP, client_r, up_w)),
                 asyncio.ensure_future(self._pump(session, DOWN, up_r, client_w))]
        self._tasks.update(pumps)
        try:
            await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            self._tasks.difference_update(pumps)
            self._abort(session)

    def _budget(self, session: Session, direction: str) -> tuple[int | None, str | None]:
        """Bytes this direction may still forward before a cut, and which budget limits it."""
        best, which = None, None
        own = self.cut_after_up if direction == UP else self.cut_after_down
        if own is not None:
            best, which = max(0, own - session.sent(direction)), direction
        if self.cut_after is not None:
            left = max(0, self.cut_after - session.up - session.down)
            if best is None or left < best:
                best, which = left, "total"
        return best, which

    def _rate(self, direction: str) -> int | None:
        rate = self.throttle_up if direction == UP else self.throttle_down
        return rate if rate and rate > 0 else None

    async def _gate(self, session: Session) -> None:
        # stalls (global or this connection's) hold the data already read
        loop = asyncio.get_running_loop()
        while True:
            wait = max(self._stall_until, session.stall_until) - loop.time()
            if wait <= 0:
                return
            await asyncio.sleep(wait)

    async def _throttle(self, session: Session, direction: str, n: int) -> None:
        rate = self._rate(direction)
        if rate is None:
            return
        loop = asyncio.get_running_loop()
        cap = max(1.0, rate * BURST)
        tokens, at = session.tokens.get(direction, (cap, loop.time()))
        now = loop.time()
        tokens = min(cap, tokens + (now - at) * rate)
        if tokens < n:
            await asyncio.sleep((n - tokens) / rate)
            now = loop.time()
            tokens = n
        session.tokens[direction] = (tokens - n, now)

    async def _pump(self, session: Session, direction: str, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        while not session.closed:
            budget, which = self._budget(session, direction)
            if budget == 0:
                return self._cut(session, which)
            n = READ_SIZE
            rate = self._rate(direction)
            if rate is not None:
                n = min(n, max(1, int(rate * BURST)))
            if self.stall_after is not None and direction == self.stall_direction and not session.stalled:
                # stop exactly at the stall point
                n = min(n, max(1, self.stall_after - session.sent(direction)))
            try:
                data = await reader.read(n)
            except (ConnectionError, OSError):
                data = b""
            if not data:
                return  # EOF or reset: _accept closes both sides
            if session.cut_on == direction:
                self.dropped += len(data)
                return self._cut(session, "next " + direction)
            await self._gate(session)
            budget, which = self._budget(session, direction)  # the other direction may have used it
            if budget is not None and budget < len(data):
                self.dropped += len(data) - budget
                data = data[:budget]
            if data:
                await self._throttle(session, direction, len(data))
                if session.closed:
                    self.dropped += len(data)
                    return
                writer.write(data)
                if self.tap is not None:
                    self.tap(session, direction, data)
                if direction == UP:
                    session.up += len(data)
                    self.bytes_up += len(data)
                else:
                    session.down += len(data)
                    self.bytes_down += len(data)
                try:
                    await writer.drain()
                except (ConnectionError, OSError):
                    return
            if budget is not None and budget <= len(data):
                return self._cut(session, which)
            if (self.stall_after is not None and direction == self.stall_direction and not session.stalled
                    and session.sent(direction) >= self.stall_after):
                session.stalled = True
                session.stall_until = loop.time() + self.stall_for
                self.stalls += 1

    def _cut(self, session: Session, which: str | None) -> None:
        if not session.closed:
            session.cut = which
            self.cuts += 1
        self._abort(session)

    def _abort(self, session: Session) -> None:
        session.closed = True
        for w in session.writers:
            w.transport.abort()  # no FIN handshake, pending bytes discarded: like a dead link


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fota.testkit.faultproxy",
                                description="Fault-injecting TCP proxy on loopback (cut, stall, throttle).")
    p.add_argument("upstream_port", type=int)
    p.add_argument("--upstream-host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="listen port (default: a free one, printed)")
    p.add_argument("--cut-after", type=int, help="cut each connection after this many bytes, both directions")
    p.add_argument("--cut-after-up", type=int, help="... after this many client->upstream bytes")
    p.add_argument("--cut-after-down", type=int, help="... after this many upstream->client bytes")
    p.add_argument("--stall-after", type=int, help="stall each connection once after this many bytes")
    p.add_argument("--stall-for", type=float, default=0.0, help="stall length in seconds")
    p.add_argument("--stall-direction", choices=(UP, DOWN), default=DOWN)
    p.add_argument("--throttle-up", type=int, help="bytes per second, client->upstream")
    p.add_argument("--throttle-down", type=int, help="bytes per second, upstream->client")
    a = p.parse_args(argv)

    async def run():
        proxy = FaultProxy(a.upstream_port, a.upstream_host, port=a.port, cut_after=a.cut_after,
                           cut_after_up=a.cut_after_up, cut_after_down=a.cut_after_down,
                           stall_after=a.stall_after, stall_for=a.stall_for, stall_direction=a.stall_direction,
                           throttle_up=a.throttle_up, throttle_down=a.throttle_down)
        await proxy.start()
        print(f"listening on {proxy.host}:{proxy.port} -> {proxy.upstream_host}:{proxy.upstream_port}", flush=True)
        t0 = time.monotonic()
        try:
            await asyncio.Event().wait()
        finally:
            print(f"{time.monotonic() - t0:.1f}s: {proxy.connections} connections, {proxy.cuts} cuts, "
                  f"{proxy.bytes_up} bytes up, {proxy.bytes_down} bytes down", flush=True)
            await proxy.close()
    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
