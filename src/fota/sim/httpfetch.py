"""Transport http for simulated devices: the device's own HTTP client driven by asyncio.

The download is the shipped `fota.device.http.Fetch` (ranged keep-alive GETs, range and size
checks, redirects, resume from the next chunk after a cut, back-off), so what the simulator
exercises is what boards run; only its two blocking spots are replaced, as asyncio needs:

* the connect: `AsyncFetch.connect()` opens the TCP connection with the event loop (thousands
  of devices connect at once; a blocking connect would stall all of them) and `_connect`, which
  Fetch's request calls, adopts that socket;
* the waits: Fetch is stepped with `step(0)` (never waits) and the device's task awaits the
  socket's readability between steps (`readable()`), instead of Fetch's select.poll.

The chunks it yields go to the core's `fetched()` and its refusals to `fetch_failed()`, as in
the MicroPython runner (fota.device.runner). Plain `http` only: an `https` URL ends the job
`E_HTTP_TLS` (the simulator does not hold an HTTP CA).
"""
from __future__ import annotations

import asyncio
import errno
import socket

from fota.device import protocol as P
from fota.device.http import Fetch, HttpError, parse_url
from fota.device.mqtt import nonblocking_io

__all__ = ["AsyncFetch", "HttpError"]


class AsyncFetch(Fetch):
    """fota.device.http.Fetch whose connections are opened by asyncio (see the module's text)."""

    def __init__(self, timeout_s: float = 10):
        super().__init__(None, timeout_s)
        self._ready: tuple | None = None   # ((scheme, host, port), connected socket) for _connect
        self._waiter: tuple | None = None  # (fd, future) while readable() waits

    def needs_connect(self) -> bool:
        """Whether the next step sends a request on a connection that is not open yet."""
        if self.done or self.phase != 0 or self.url is None:
            return False
        scheme, host, port, _ = parse_url(self.url)
        return self.sock is None or self.origin != (scheme, host, port)

    async def connect(self) -> None:
        """Open the connection the next request needs (raises OSError, TimeoutError, HttpError)."""
        scheme, host, port, _ = parse_url(self.url)
        if scheme != "http":
            raise HttpError(P.E_HTTP_TLS, "the simulator fetches plain http only, not %s" % scheme)
        loop = asyncio.get_running_loop()
        family, _, proto, _, addr = (await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM))[0]
        s = socket.socket(family, socket.SOCK_STREAM, proto)
        s.setblocking(False)
        try:
            async with asyncio.timeout(self.timeout_s):
                await loop.sock_connect(s, addr)
        except BaseException:
            s.close()
            raise
        if self._ready is not None:
            self._ready[1].close()
        self._ready = ((scheme, host, port), s)

    def _connect(self, scheme, host, port):
        # Fetch's request needs a connection: the one connect() opened for this origin.
        ready, self._ready = self._ready, None
        if ready is None or ready[0] != (scheme, host, port):
            if ready is not None:
                ready[1].close()
            raise OSError(errno.ENOTCONN, "no connection to %s:%d" % (host, port))
        self.close()
        s = ready[1]
        self.sock = s
        self._rd, self._wr, self._poll = nonblocking_io(s)
        self.origin = (scheme, host, port)
        self.connections += 1

    async def readable(self, timeout: float) -> bool:
        """Wait until the connection has bytes to read (or is closed); False after `timeout` s."""
        loop = asyncio.get_running_loop()
        fd = self.sock.fileno()
        fut = loop.create_future()
        loop.add_reader(fd, _resolve, fut)
        self._waiter = (fd, fut)
        try:
            async with asyncio.timeout(timeout):
                await fut
            return True
        except TimeoutError:
            return False
        finally:
            self.unwait(fut)

    def unwait(self, fut=None) -> None:
        """Stop waiting for the socket (before it is closed: its fd must leave the selector first)."""
        waiter = self._waiter
        if waiter is None or (fut is not None and waiter[1] is not fut):
            return
        self._waiter = None
        asyncio.get_running_loop().remove_reader(waiter[0])
        _resolve(waiter[1])

    def close(self):
        if self._waiter is not None:
            self.unwait()
        super().close()

    def discard(self) -> None:
        """Drop everything (a reboot, the simulator's stop)."""
        self.close()
        if self._ready is not None:
            self._ready[1].close()
            self._ready = None


def _resolve(fut) -> None:
    if not fut.done():
        fut.set_result(None)
