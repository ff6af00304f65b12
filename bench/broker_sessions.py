"""What a persistent MQTT session costs each broker engine (Mosquitto, NATS and RabbitMQ clusters).

One Mosquitto, a 3-node NATS cluster (JetStream + MQTT), a 3-node RabbitMQ cluster (MQTT plugin,
quorum queues).

    ./run bench broker_sessions [--brokers mosquitto,nats,rabbitmq] [--sessions 500,1000,2000]
                                [--idle-s 10] [--kill | --no-kill] [--timeout 300]
                                [--out bench/results/broker_sessions.json]

For each broker and each session count N, a fresh broker (Mosquitto: fota.testkit.broker's
ManagedBroker, password file + per-device ACL; NATS: fota.server.natscluster.NatsCluster, 3 nodes;
RabbitMQ: fota.testkit.rabbitcluster.RabbitCluster, 3 nodes) gets N device accounts limited to
their own fota/v1/<id>/... topics, then:

1. idle CPU of the broker with no session (--idle-s), the baseline;
2. N devices connect as fota's do: MQTT 3.1.1, client id = username = device id, clean_session
   false, keepalive 30 s, SUBSCRIBE fota/v1/<id>/cmd at QoS 1 (a refused SUBACK is a failed
   connection, retried after 1 s); on a cluster device i connects to node i mod 3. At most
   --connect-concurrency connections are in flight (each waits for its SUBACK): the broker's own
   pace, no fixed rate. `connect s`: until the last SUBACK;
3. idle period (--idle-s) with all N connected: broker CPU, then resident memory (RSS summed
   over the broker's processes: 1 Mosquitto, 3 nats-server, 3 Erlang VMs and their helpers);
   `KiB/session` = (RSS now − RSS before connecting) / N; `core/1k idle` = (CPU in the idle period
   − CPU in the baseline period) / idle-s / N × 1,000;
4. one QoS 1 message per device on its cmd topic from the server account (pipelined, 200 in
   flight; on a cluster connected to the last node): `deliver s` from the first PUBLISH until
   every device got it;
5. (clusters, --kill) node 1 (a third of the devices on it) is SIGKILLed; then one QoS 1 message per
   device is published at once (the publisher is on node 3); each device whose connection
   dropped reconnects to the next node with the same persistent session and subscribes again.
   `kill: got` counts the devices that got that message within --timeout; `reconnect s` is
   until every dropped device is subscribed again.

Clients: one asyncio process speaking MQTT 3.1.1 on raw sockets (this file), not the fleet
simulator: the broker's cost is what is measured, not a device's. Exit 1 if a run fails: not
every device connected, a message not delivered, a broker not starting (a kill case in which a
device misses its message is a failure too).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import secrets
import shutil
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench._report import print_table, write_and_judge
from fota.server.broker import SERVER_USER

DEFAULT_OUT = Path(__file__).parent / "results" / "broker_sessions.json"
BROKERS = ("mosquitto", "nats", "rabbitmq")
KEEPALIVE = 30


# ---------------------------------------------------------------- MQTT 3.1.1, just enough

def _varlen(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


class MqttError(Exception):
    pass


class Client:
    """One MQTT 3.1.1 connection: CONNECT, SUBSCRIBE, QoS 1 PUBLISH both ways, PINGREQ."""

    def __init__(self, client_id: str, user: str, password: str, on_message=None):
        self.client_id, self.user, self.password = client_id, user, password
        self.on_message = on_message
        self.reader = self.writer = None
        self.pending: dict[int, asyncio.Future] = {}
        self.connack: asyncio.Future | None = None
        self.next_id = 0
        self.tasks: list[asyncio.Task] = []
        self.closed: asyncio.Event = asyncio.Event()

    def _pid(self) -> int:
        self.next_id = self.next_id % 65535 + 1
        return self.next_id

    async def connect(self, host: str, port: int, clean: bool = False, timeout: float = 30.0) -> None:
        self.closed = asyncio.Event()
        self.reader, self.writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        flags = 0xC0 | (0x02 if clean else 0)
        body = (_str("MQTT") + bytes([4, flags]) + struct.pack("!H", KEEPALIVE) + _str(self.client_id)
                + _str(self.user) + _str(self.password))
        self.connack = asyncio.get_running_loop().create_future()
        self.writer.write(b"\x10" + _varlen(len(body)) + body)
        self.tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._ping())]
        try:
            rc = await asyncio.wait_for(self.connack, timeout)
        except BaseException:
            self.close()
            raise
        if rc != 0:
            self.close()
            raise MqttError(f"CONNACK {rc}")

    async def subscribe(self, topic: str, qos: int = 1, timeout: float = 30.0) -> None:
        pid = self._pid()
        fut = self.pending[pid] = asyncio.get_running_loop().create_future()
        body = struct.pack("!H", pid) + _str(topic) + bytes([qos])
        self.writer.write(b"\x82" + _varlen(len(body)) + body)
        try:
            codes = await asyncio.wait_for(fut, timeout)
        finally:
            self.pending.pop(pid, None)
        if not codes or codes[0] == 0x80:
            raise MqttError(f"SUBACK refused {codes!r}")

    def publish(self, topic: str, payload: bytes) -> asyncio.Future:
        """QoS 1; the future completes at the PUBACK."""
        pid = self._pid()
        fut = self.pending[pid] = asyncio.get_running_loop().create_future()
        body = _str(topic) + struct.pack("!H", pid) + payload
        self.writer.write(b"\x32" + _varlen(len(body)) + body)
        return fut

    async def _read(self) -> None:
        r = self.reader
        try:
            while True:
                head = await r.readexactly(1)
                n, mult = 0, 1
                while True:
                    b = (await r.readexactly(1))[0]
                    n += (b & 0x7F) * mult
                    mult *= 128
                    if not b & 0x80:
                        break
                body = await r.readexactly(n) if n else b""
                kind = head[0] >> 4
                if kind == 2:  # CONNACK
                    if not self.connack.done():
                        self.connack.set_result(body[1])
                elif kind == 3:  # PUBLISH
                    qos = (head[0] >> 1) & 3
                    tl = struct.unpack("!H", body[:2])[0]
                    topic = body[2:2 + tl].decode()
                    rest = body[2 + tl:]
                    if qos:
                        pid, rest = rest[:2], rest[2:]
                        self.writer.write(b"\x40\x02" + pid)
                    if self.on_message:
                        self.on_message(topic, rest)
                elif kind in (4, 9):  # PUBACK, SUBACK
                    pid = struct.unpack("!H", body[:2])[0]
                    fut = self.pending.pop(pid, None)
                    if fut and not fut.done():
                        fut.set_result(body[2:] if kind == 9 else None)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            self.closed.set()
            for fut in list(self.pending.values()) + [self.connack]:
                if fut is not None and not fut.done():
                    fut.set_exception(MqttError("connection closed"))
            self.pending.clear()

    async def _ping(self) -> None:
        try:
            while not self.closed.is_set():
                await asyncio.sleep(KEEPALIVE * 0.7)
                if self.closed.is_set() or self.writer.is_closing():
                    return
                self.writer.write(b"\xc0\x00")
        except (ConnectionError, OSError, RuntimeError):
            pass

    def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        if self.writer is not None:
            self.writer.close()


class Device:
    """A device holding its persistent session: connects to its node, subscribes to its cmd
    topic at QoS 1, and (once `follow` is set) reconnects to the next node when its connection drops."""

    def __init__(self, device_id: str, password: str, host: str, ports: list[int], index: int, fleet: "Fleet"):
        self.id, self.password, self.host, self.ports = device_id, password, host, ports
        self.node = index % len(ports)
        self.fleet = fleet
        self.got: dict[bytes, float] = {}
        self.client: Client | None = None
        self.subscribed_at = 0.0
        self.drops = 0
        self.dropped_at = 0.0
        self.refusals = 0

    def _message(self, topic: str, payload: bytes) -> None:
        if payload not in self.got:
            self.got[payload] = time.monotonic()
            self.fleet.received[payload] = self.fleet.received.get(payload, 0) + 1

    async def session(self, deadline: float) -> None:
        """Connect and subscribe (retried after a refusal or a timeout) until the deadline."""
        while True:
            async with self.fleet.gate:
                client = Client(self.id, self.id, self.password, self._message)
                try:
                    await client.connect(self.host, self.ports[self.node])
                    await client.subscribe(f"fota/v1/{self.id}/cmd", 1)
                    self.client = client
                    self.subscribed_at = time.monotonic()
                    return
                except (MqttError, OSError, asyncio.TimeoutError) as e:
                    client.close()
                    self.refusals += 1
                    self.fleet.last_error = f"{self.id}: {type(e).__name__}: {e}"
            if time.monotonic() > deadline:
                raise MqttError(f"{self.id} not connected: {self.fleet.last_error}")
            if self.fleet.follow:
                self.node = (self.node + 1) % len(self.ports)
            await asyncio.sleep(1.0 + random.random())

    async def keep(self, deadline: float) -> None:
        """Hold the session; after a drop (when following) reconnect to the next node."""
        while True:
            await self.client.closed.wait()
            if self.fleet.stopping:
                return
            self.drops += 1
            self.dropped_at = time.monotonic()
            self.fleet.dropped.add(self.id)
            if not self.fleet.follow:
                return
            self.node = (self.node + 1) % len(self.ports)
            await self.session(deadline)


class Fleet:
    def __init__(self, host: str, ports: list[int], passwords: dict[str, str], concurrency: int):
        self.gate = asyncio.Semaphore(concurrency)
        self.received: dict[bytes, int] = {}
        self.follow = False
        self.stopping = False
        self.dropped: set[str] = set()
        self.last_error = ""
        self.devices = [Device(d, pw, host, ports, i, self) for i, (d, pw) in enumerate(passwords.items())]
        self.keepers: list[asyncio.Task] = []

    async def connect_all(self, timeout: float) -> float:
        t0 = time.monotonic()
        deadline = t0 + timeout
        await asyncio.gather(*(d.session(deadline) for d in self.devices))
        took = time.monotonic() - t0
        self.keepers = [asyncio.create_task(d.keep(deadline + 3600)) for d in self.devices]
        return took

    async def wait_received(self, payload: bytes, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.received.get(payload, 0) < len(self.devices):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def close(self) -> None:
        self.stopping = True
        for t in self.keepers:
            t.cancel()
        for d in self.devices:
            if d.client:
                d.client.close()


async def publish_all(pub: Client, ids: list[str], payload: bytes, window: int = 200,
                      timeout: float = 120.0) -> None:
    inflight: set[asyncio.Future] = set()
    deadline = time.monotonic() + timeout
    for dev in ids:
        while len(inflight) >= window:
            done, inflight = await asyncio.wait(inflight, timeout=max(0.1, deadline - time.monotonic()),
                                                return_when=asyncio.FIRST_COMPLETED)
            for f in done:
                f.result()
            if time.monotonic() > deadline:
                raise MqttError("publisher: PUBACKs not in time")
        inflight.add(pub.publish(f"fota/v1/{dev}/cmd", payload))
    if inflight:
        done, pending = await asyncio.wait(inflight, timeout=max(0.1, deadline - time.monotonic()))
        for f in done:
            f.result()
        if pending:
            raise MqttError(f"publisher: {len(pending)} PUBACKs not in time")


# ---------------------------------------------------------------- brokers

def _cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total


def _rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


class Rig:
    """One started broker: host, device ports (one per node), publisher port and account, pids,
    add_devices, kill_first_node, stop."""

    nodes = 1

    def pids(self) -> list[int]:
        raise NotImplementedError


class MosquittoRig(Rig):
    name = "mosquitto"

    def __init__(self, directory: Path, timeout: float):
        from fota.testkit.broker import ManagedBroker
        self.broker = ManagedBroker(directory)
        self.host = self.broker.host
        self.ports = [self.broker.port]
        self.pub = (self.broker.service_port, SERVER_USER, self.broker.users[SERVER_USER])

    def add_devices(self, passwords: dict[str, str]) -> None:
        self.broker.add_users(passwords)
        time.sleep(0.5)

    def pids(self) -> list[int]:
        p = self.broker.mosquitto.proc
        return [p.pid] if p and p.poll() is None else []

    def stop(self) -> None:
        self.broker.stop()


class NatsRig(Rig):
    name = "nats"
    nodes = 3

    def __init__(self, directory: Path, timeout: float):
        from fota.server.natscluster import NatsCluster
        self.cluster = NatsCluster(directory, 3, server_password=secrets.token_urlsafe(12))
        self.cluster.start(timeout=min(timeout, 120))
        self.host = self.cluster.host
        self.ports = self.cluster.mqtt_ports
        self.pub = (self.ports[-1], SERVER_USER, self.cluster.server_password)

    def add_devices(self, passwords: dict[str, str]) -> None:
        from fota.server.broker import BrokerError
        from fota.server.natscluster import mqtt_ping
        self.cluster.add_devices(passwords)
        last, pw = next(reversed(passwords.items()))
        for node in self.cluster.nodes:  # a reload of many accounts takes a while
            deadline = time.monotonic() + 300
            while True:
                try:
                    mqtt_ping(self.host, node.ports.mqtt, last, pw, 5)
                    break
                except (BrokerError, OSError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)

    def pids(self) -> list[int]:
        return [n.proc.pid for n in self.cluster.nodes if n.running]

    def kill_first_node(self) -> None:
        self.cluster.kill_node(0)

    def stop(self) -> None:
        self.cluster.stop()


class RabbitRig(Rig):
    name = "rabbitmq"
    nodes = 3

    def __init__(self, directory: Path, timeout: float, queue_type: str = "quorum"):
        from fota.testkit.rabbitcluster import RabbitCluster
        self.cluster = RabbitCluster(directory, 3, queue_type=queue_type)
        self.cluster.start(timeout=min(timeout, 180))
        self.host = self.cluster.host
        self.ports = self.cluster.mqtt_ports
        self.pub = (self.ports[-1], SERVER_USER, self.cluster.server_password)

    def add_devices(self, passwords: dict[str, str]) -> None:
        self.cluster.add_devices(passwords)

    def pids(self) -> list[int]:
        return self.cluster.pids()

    def kill_first_node(self) -> None:
        self.cluster.kill_node(0)

    def stop(self) -> None:
        self.cluster.stop()


class RabbitClassicRig(RabbitRig):
    """The same cluster with classic session queues (mqtt.durable_queue_type = classic): a queue
    lives on one node and dies with it; only to show what the quorum queues cost."""
    name = "rabbitmq-classic"

    def __init__(self, directory: Path, timeout: float):
        super().__init__(directory, timeout, queue_type="classic")


RIGS = {"mosquitto": MosquittoRig, "nats": NatsRig, "rabbitmq": RabbitRig, "rabbitmq-classic": RabbitClassicRig}


# ---------------------------------------------------------------- one run

async def _sessions(rig: Rig, passwords: dict[str, str], args, row: dict) -> None:
    ids = list(passwords)
    n = len(ids)
    # 1. baseline: accounts, no session
    pids = rig.pids()
    cpu0, t0 = _cpu_s(pids), time.monotonic()
    await asyncio.sleep(args.idle_s)
    row["idle_cpu_s_no_sessions"] = round(_cpu_s(rig.pids()) - cpu0, 3)
    base_idle = time.monotonic() - t0
    row["rss_kib_before"] = _rss_kib(rig.pids())

    fleet = Fleet(rig.host, rig.ports, passwords, args.connect_concurrency)
    pub = None
    try:
        # 2. connect
        cpu_c = _cpu_s(rig.pids())
        row["connect_s"] = round(await fleet.connect_all(args.timeout), 3)
        row["connect_cpu_s"] = round(_cpu_s(rig.pids()) - cpu_c, 2)
        row["connect_retries"] = sum(d.refusals for d in fleet.devices)
        row["connected"] = n
        # 3. idle with N sessions
        cpu1, t1 = _cpu_s(rig.pids()), time.monotonic()
        await asyncio.sleep(args.idle_s)
        idle_cpu = _cpu_s(rig.pids()) - cpu1
        idle = time.monotonic() - t1
        row["idle_cpu_s_sessions"] = round(idle_cpu, 3)
        row["rss_kib_connected"] = _rss_kib(rig.pids())
        row["kib_per_session"] = round((row["rss_kib_connected"] - row["rss_kib_before"]) / n, 2)
        net = idle_cpu / idle - row["idle_cpu_s_no_sessions"] / base_idle
        row["core_per_1k_idle"] = round(net / n * 1000, 4)
        row["core_idle_total"] = round(idle_cpu / idle, 3)
        row["unexpected_drops"] = len(fleet.dropped)
        # 4. one QoS 1 message per device
        pub = Client(f"fota:bench:{secrets.token_hex(3)}", rig.pub[1], rig.pub[2])
        await pub.connect(rig.host, rig.pub[0], clean=True)
        t2 = time.monotonic()
        cpu2 = _cpu_s(rig.pids())
        await publish_all(pub, ids, b"m1", timeout=args.timeout)
        row["publish_s"] = round(time.monotonic() - t2, 2)
        ok = await fleet.wait_received(b"m1", args.timeout)
        row["delivered"] = fleet.received.get(b"m1", 0)
        if ok:
            row["deliver_s"] = round(max(d.got[b"m1"] for d in fleet.devices) - t2, 3)
            row["deliver_cpu_s"] = round(_cpu_s(rig.pids()) - cpu2, 2)
        else:
            row.setdefault("errors", []).append(f"QoS 1 delivery: {row['delivered']}/{n} within {args.timeout}s")
        # 5. a node SIGKILLed
        if args.kill and rig.nodes > 1:
            await _kill_case(rig, fleet, pub, ids, args, row)
    finally:
        fleet.close()
        if pub:
            pub.close()


async def _kill_case(rig: Rig, fleet: Fleet, pub: Client, ids: list[str], args, row: dict) -> None:
    kill: dict = {}
    row["kill"] = kill
    fleet.follow = True
    fleet.dropped.clear()
    on_first = [d for d in fleet.devices if d.node == 0]
    t0 = time.monotonic()
    rig.kill_first_node()
    kill["devices_on_killed_node"] = len(on_first)
    # the publisher's node lives, but a cluster may close connections while it re-elects
    # leaders: then the publisher reconnects (to a live node) and publishes again (a device
    # counts a message once)
    live = [p for p in rig.ports[1:]][::-1]
    for attempt in range(4):
        try:
            if attempt:
                pub = Client(f"fota:bench:{secrets.token_hex(3)}", rig.pub[1], rig.pub[2])
                await pub.connect(rig.host, live[attempt % len(live)], clean=True)
            await publish_all(pub, ids, b"m2", timeout=args.timeout)
            kill["publish_s"] = round(time.monotonic() - t0, 2)
            kill.pop("publish_error", None)
            break
        except (MqttError, OSError, asyncio.TimeoutError) as e:
            kill["publish_error"] = f"{type(e).__name__}: {e}"
            kill.setdefault("publish_errors", []).append(kill["publish_error"])
            pub.close()
            await asyncio.sleep(1)
    got = await fleet.wait_received(b"m2", args.timeout)
    kill["got"] = fleet.received.get(b"m2", 0)

    def back() -> list[float]:  # every dropped device subscribed again since its last drop
        return [d.subscribed_at for d in fleet.devices if d.id in fleet.dropped and d.subscribed_at > d.dropped_at]
    deadline = time.monotonic() + args.timeout
    while len(back()) < len(fleet.dropped) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    kill["dropped"] = len(fleet.dropped)  # on the killed node, and any other the cluster closed
    kill["reconnected"] = len(back())
    if back():
        kill["reconnect_s"] = round(max(back()) - t0, 2)
    if kill["reconnected"] < kill["dropped"]:
        row.setdefault("errors", []).append(
            f"node kill: {kill['dropped'] - kill['reconnected']} dropped devices not subscribed again within {args.timeout}s")
    if got:
        kill["deliver_s"] = round(max(d.got[b"m2"] for d in fleet.devices) - t0, 2)
    else:
        missing = [d.id for d in fleet.devices if b"m2" not in d.got]
        kill["missing"] = missing[:20]
        row.setdefault("errors", []).append(
            f"node kill: {kill['got']}/{len(ids)} got the message published after the kill within {args.timeout}s")
    if "publish_error" in kill:
        row.setdefault("errors", []).append(f"node kill: publisher: {kill['publish_error']}")


def run_one(broker: str, n: int, args, workdir: Path) -> dict:
    row: dict = {"broker": broker, "sessions": n}
    directory = workdir / f"{broker}-{n}"
    directory.mkdir(parents=True)
    rig = None
    t0 = time.monotonic()
    try:
        rig = RIGS[broker](directory, args.timeout)
        row["start_s"] = round(time.monotonic() - t0, 1)
        row["nodes"] = rig.nodes
        passwords = {f"bs{i:06d}": secrets.token_urlsafe(9) for i in range(n)}
        t1 = time.monotonic()
        rig.add_devices(passwords)
        row["accounts_s"] = round(time.monotonic() - t1, 1)
        asyncio.run(_sessions(rig, passwords, args, row))
    except Exception as e:  # the run failed; the next one still runs
        row.setdefault("errors", []).append(f"{type(e).__name__}: {e}")
        traceback.print_exc()
    finally:
        if rig is not None:
            rig.stop()
    return row


def _fmt(v, unit: str = "") -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.4g}{unit}"
    return f"{v:,}{unit}" if isinstance(v, int) else f"{v}{unit}"


def render(result: dict) -> None:
    rows = []
    base = {r["sessions"]: r for r in result["runs"] if r["broker"] == "mosquitto" and "kib_per_session" in r}
    for r in result["runs"]:
        b = base.get(r["sessions"])
        ratio = (f"{r['kib_per_session'] / b['kib_per_session']:.0f}×" if b and r is not b and "kib_per_session" in r
                 and b["kib_per_session"] > 0 else "")
        k = r.get("kill") or {}
        rows.append([r["broker"] + (f" ({r['nodes']} nodes)" if r.get("nodes", 1) > 1 else ""), _fmt(r["sessions"]),
                     _fmt(r.get("start_s")), _fmt(r.get("connect_s")), _fmt(r.get("connect_cpu_s")),
                     _fmt(r.get("rss_kib_connected", 0) // 1024 if "rss_kib_connected" in r else None),
                     _fmt(r.get("kib_per_session")) + (f" ({ratio})" if ratio else ""),
                     _fmt(r.get("core_idle_total")), _fmt(r.get("core_per_1k_idle")),
                     _fmt(r.get("deliver_s")),
                     (f"{k.get('got', 0)}/{r['sessions']}, {_fmt(k.get('deliver_s'))} s" if k else "–"),
                     "; ".join(r.get("errors", []))[:120] or "ok"])
    print_table("Persistent MQTT sessions per broker engine",
                ["broker", "sessions", "start s", "connect s", "connect CPU s", "RSS MiB", "KiB/session",
                 "idle cores", "core/1k idle", "deliver s", "kill: got, s", "result"], rows,
                notes=[f"idle period {result['args']['idle_s']} s; KiB/session: (RSS connected − RSS before) / N, "
                       "ratio against Mosquitto at the same N; core/1k idle: net of the broker's idle CPU with no "
                       "session; deliver s: one QoS 1 message to every device's cmd topic"])


def failures(result: dict) -> list[str]:
    return [f"{r['broker']} {r['sessions']}: {e}" for r in result["runs"] for e in r.get("errors", [])]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="./run bench broker_sessions", description=__doc__.split("\n")[0])
    ap.add_argument("--brokers", default=",".join(BROKERS),
                    help="comma-separated: " + ", ".join(RIGS) + " (rabbitmq-classic: classic session queues, "
                         "not durable across a node's death; for comparison)")
    ap.add_argument("--sessions", default="500,1000,2000", help="comma-separated session counts")
    ap.add_argument("--idle-s", type=float, default=10.0, help="idle period for the CPU measurements, s")
    ap.add_argument("--connect-concurrency", type=int, default=25, help="connections in flight at once")
    ap.add_argument("--kill", action=argparse.BooleanOptionalAction, default=True,
                    help="clusters: SIGKILL a node with the sessions connected (default: on)")
    ap.add_argument("--timeout", type=float, default=300.0, help="per phase, s")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    brokers = [b.strip() for b in args.brokers.split(",") if b.strip()]
    counts = [int(c) for c in args.sessions.split(",") if c.strip()]
    result: dict = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": []}
    bad = [b for b in brokers if b not in RIGS]
    if bad or not counts:
        result["runs"].append({"broker": ",".join(bad) or "-", "sessions": 0,
                               "errors": [f"unknown broker(s) {bad}" if bad else "no session count"]})
        return write_and_judge(result, args.out, render, failures)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = max(counts) + 1000
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, need), hard))
    workdir = Path(tempfile.mkdtemp(prefix="fota-bench-sessions-"))
    try:
        for broker in brokers:
            for n in counts:
                print(f"{broker}: {n} sessions ...", flush=True)
                row = run_one(broker, n, args, workdir)
                print(json.dumps(row), flush=True)
                result["runs"].append(row)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["load_avg"] = os.getloadavg()
    return write_and_judge(result, args.out, render, failures)


if __name__ == "__main__":
    sys.exit(main())
