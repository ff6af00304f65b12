"""Fleet benchmark: a deployment over thousands of simulated devices, and status ingestion.

    ./run bench fleet [--devices 1000,10000] [--image-kib 64] [--db sqlite,postgres] [--chunk 2048]
                      [--window 8] [--statuses 20000] [--verify cryptography] [--timeout 900]
                      [--skip-deploy] [--skip-ingest] [--workers 1,2] [--workers-devices 1000]
                      [--transports mqtt,http] [--transport-devices 10000] [--transport-image-kib 64]
                      [--skip-transports] [--out bench/results/fleet.json]

1. Deployment: a fresh Mosquitto (password file + per-device ACL, raised connection limits),
   N simulated devices (fota.sim, one process, one connection and broker account each), the
   ControlCenter in this process on a store (--deploy-db, default SQLite), one deployment of an --image-kib
   release to all N; wall time until every job is confirmed in the database. Floor: the same
   bytes (N x image, in --chunk pieces at QoS 0) pushed through the same kind of broker to N
   bare gmqtt subscribers (one process, device accounts) by one raw-socket publisher.
2. Ingestion: --statuses status messages (QoS 1, valid, for real jobs) published as fast as a
   pipelined paho publisher can; statuses persisted per second by the ControlCenter (SQLite,
   PostgreSQL) against the rate one bare paho subscriber receives the same messages; the
   publisher's offered rate and who was busy over the wall (bench/_ingest_probe.py); then
   (unless --skip-drain) as many queued in the stopped center's session and drained by a new
   center: its rate with no publisher beside it.
3. Workers: the same deployment (--workers-devices simulated devices, PostgreSQL) driven by 1,
   then 2, ... control-center worker processes (`fota worker`: MQTT v5 shared subscriptions,
   jobs claimed in the database); wall time to all confirmed, and how the work was shared.
4. Transports: one image over `mqtt`, then over `http` (the center's blob route in a process of
   its own), to the same --transport-devices simulated devices: wall time, bytes through the
   broker per update, center, broker and blob server CPU, chunks re-sent (bench/_fleet_transport.py).
5. Brokers (--brokers mosquitto,nats; '' skips): the deployment and a status ingestion run on one
   Mosquitto and on a 3-node NATS cluster, side by side (bench/_fleet_cluster.py).
See bench/README.md.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
from sqlalchemy import func, select

from bench import _fleet_cluster, _fleet_transport, _paho_floor
from bench._ingest_probe import IngestProbe, print_split
from bench._report import print_table
from fota.device import protocol as P
from fota.server.broker import SERVER_USER
from fota.server.deployments import create_deployment
from fota.server.releases import create_release
from fota.server.store import Device, Job, Store
from fota.sim.fleet import device_ids, provision
from fota.sim.run import raise_fd_limit
from fota.testkit.broker import ManagedBroker
from fota.testkit.brokerspy import BrokerSpy
from fota.testkit.center import CenterThread
from fota.testkit.databases import create_postgres_database, fresh_database
from fota.tools.waiting import wait_until
from fota.tools.gctune import tuned
from fota.tools.keyring import Keyring, Signer

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "fleet.json"

TARGET_RATIO = 1.5          # deployment wall <= 1.5x the floor at 10,000 devices
TARGET_INGEST = 0.5         # persisted statuses/s >= 0.5x one bare paho subscriber's receive rate


def log(*args) -> None:
    print("[bench]", *args, file=sys.stderr, flush=True)


class Broker(ManagedBroker):
    """fota.testkit's authenticated Mosquitto (fota's generated config: Mosquitto's connection cap
    is unlimited by default, max_connections -1; the open-files limit, raised by main(), is what
    bounds it), plus its CPU time and peak memory."""

    def cpu_s(self) -> float:
        """CPU seconds Mosquitto used so far."""
        return _children_cpu([self.mosquitto.proc])

    def rss_mib(self) -> float:
        try:
            for line in Path(f"/proc/{self.mosquitto.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0


def _child_env() -> dict:
    """This environment, with this checkout's src/ and bench/ first on a child's import path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")])
    return env


class Child:
    """A helper process speaking JSON lines on stdout; stdin's end (or 'stop') ends it."""

    def __init__(self, argv: list[str], log_path: Path):
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env=_child_env())

    def read_event(self, timeout: float) -> dict:
        result: list = []
        t = threading.Thread(target=lambda: result.append(self.proc.stdout.readline()), daemon=True)
        t.start()
        t.join(timeout)
        if not result or not result[0]:
            raise RuntimeError(f"helper gave no answer within {timeout:.0f}s (see {self.log.name})")
        return json.loads(result[0])

    def stop(self, timeout: float = 120) -> dict | None:
        try:
            self.proc.stdin.write("stop\n")
            self.proc.stdin.close()
            return self.read_event(timeout)
        except (OSError, RuntimeError, ValueError):
            return None
        finally:
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.log.close()


# ----------------------------------------------------------------------------------- deployment

def _count(store: Store, deployment_id: int, states) -> int:
    with store.session() as s:
        return s.scalar(select(func.count()).select_from(Job).where(Job.deployment_id == deployment_id,
                                                                   Job.state.in_(states)))


def _online(store: Store) -> int:
    with store.session() as s:
        return s.scalar(select(func.count()).select_from(Device).where(Device.online.is_(True)))


def _start_sim(base: Path, broker: Broker, keyring: Keyring, passwords: dict[str, str], store: Store,
               args) -> tuple[Child, dict]:
    """fota.sim.run in a child process for these device accounts (its config in base.json, its
    log in base.log); returns it and its 'ready' event once every device is online in the store."""
    config = {"host": broker.host, "port": broker.port, "root": keyring.root_public().hex(),
              "trust": keyring.trust(), "passwords": passwords, "verify": args.verify,
              "device": {"backend": "hash", "capacity": max(args.image_kib * 1024, 64 * 1024),
                         "keepalive": 300}}
    config.update(getattr(broker, "sim_settings", {}))  # a NATS cluster's connection pacing (_fleet_cluster)
    base.with_suffix(".json").write_text(json.dumps(config))
    sim = Child(["-m", "fota.sim.run", str(base.with_suffix(".json"))], base.with_suffix(".log"))
    try:
        ready = sim.read_event(args.timeout)
        n = len(passwords)
        wait_until(lambda: _online(store) == n, timeout=args.timeout, interval=0.2,
                   what=f"{n} devices online in the store")
    except BaseException:  # the caller never gets it to stop: a fleet that did not connect is not left running
        sim.stop(timeout=10)
        raise
    return sim, ready


def _wait_all_done(store: Store, deployment_id: int, n: int, t0: float, timeout: float) -> dict[str, float]:
    """Poll the deployment's n jobs until all are final; seconds since t0 at which all had
    started ('started') and all were final ('done'), each missing if it did not happen in time."""
    marks: dict[str, float] = {}
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        started = _count(store, deployment_id, ("downloading", "verifying", "installing", "rebooting", "trial",
                                                "confirmed", "failed", "reverted"))
        done = _count(store, deployment_id, ("confirmed", "failed", "reverted", "cancelled"))
        now = time.monotonic() - t0
        if started == n:
            marks.setdefault("started", now)
        if done == n:
            marks["done"] = now
            break
        time.sleep(0.2)
    return marks


@dataclass
class DeployRig:
    """What a deployment bench runs on: a broker, a database, a keyring, n provisioned devices, a
    control center and the simulated fleet (connected, every device online in the store)."""
    broker: Broker
    store: Store
    url: str
    keyring: Keyring
    signer: Signer
    ids: list[str]
    passwords: dict[str, str] = field(default_factory=dict)
    provision_s: float = 0.0
    center: CenterThread | None = None
    sim: Child | None = None
    ready: dict = field(default_factory=dict)

    def stop_sim(self) -> dict | None:
        """Stop the simulated fleet; its final report."""
        sim, self.sim = self.sim, None
        return sim.stop()


@contextlib.contextmanager
def deploy_rig(broker: Broker, db: str, db_file: Path, keys: Path, sim_base: Path, tmp: Path, ids: list[str],
               args):
    """A DeployRig on `broker` and a fresh `db` database; everything stopped (the database dropped)
    on exit."""
    url, drop = fresh_database(db, db_file)
    store = Store(url)
    keyring = Keyring(keys)
    keyring.init()
    rig = DeployRig(broker, store, url, keyring, keyring.signer(), ids)
    try:
        t = time.monotonic()
        rig.passwords = provision(store, ids)
        broker.add_users(rig.passwords)
        rig.provision_s = time.monotonic() - t
        rig.center = CenterThread(store, broker.server_url, tmp / "blobs", chunk=args.chunk, window=args.window,
                                  signer=rig.signer, keys_update=keyring.keys_update()).start()
        rig.sim, rig.ready = _start_sim(sim_base, broker, keyring, rig.passwords, store, args)
        yield rig
    finally:
        if rig.sim is not None:
            rig.sim.stop()
        if rig.center is not None:
            rig.center.stop()
        store.dispose()
        drop()
        broker.stop()


def deploy_run(n: int, args, tmp: Path) -> dict:
    """fota: one deployment of a fresh image to n simulated devices; time to all confirmed."""
    broker = Broker(tmp / f"mosquitto-fota-{n}")
    with deploy_rig(broker, args.deploy_db, tmp / f"fleet-{n}.db", tmp / f"keys-{n}", tmp / f"sim-{n}", tmp,
                    device_ids(n), args) as rig:
        store = rig.store
        log(f"{n} simulated devices connected in {rig.ready['connect_s']:.1f}s")
        image = os.urandom(args.image_kib * 1024)
        rel = create_release(store, tmp / "blobs", rig.signer.key, image, "2.0.0", ["sim"], kind="image")
        c = rig.center.center
        c0 = (c.statuses, c.commands, c.chunks, c.bytes_published)
        cpu0, broker_cpu0 = time.process_time(), broker.cpu_s()
        t0 = time.monotonic()
        dep = create_deployment(store, rel, device_ids=rig.ids)
        marks = _wait_all_done(store, dep.id, n, t0, args.timeout)
        wall = marks.get("done")
        confirmed = _count(store, dep.id, ("confirmed",))
        result = {
            "devices": n, "db": args.deploy_db, "provision_s": rig.provision_s, "connect_s": rig.ready["connect_s"],
            "wall_s": wall, "started_s": marks.get("started"), "confirmed": confirmed,
            "center": {"statuses": c.statuses - c0[0], "commands": c.commands - c0[1],
                       "chunks": c.chunks - c0[2], "bytes_published": c.bytes_published - c0[3],
                       "cpu_s": time.process_time() - cpu0},
            "broker_cpu_s": broker.cpu_s() - broker_cpu0,
        }
        # Chunks published beyond one of each per device: sent twice (chunk timeouts, losses).
        needed = n * -(-len(image) // args.chunk)
        result["resent_pct"] = 100.0 * (result["center"]["chunks"] - needed) / needed
        result["sim"] = rig.stop_sim()
        # The work done, whatever the number of cores: center + simulator + broker CPU seconds.
        result["cpu_s"] = result["center"]["cpu_s"] + (result["sim"] or {}).get("cpu_s", 0) + result["broker_cpu_s"]
        result["broker_rss_mib"] = broker.rss_mib()
        if wall is None:
            result["error"] = f"not all confirmed within {args.timeout}s ({confirmed}/{n})"
        return result


# ---- floor: bare receivers (gmqtt, one process) and a raw-socket QoS 0 publisher ----------

def _mqtt_string(s: bytes) -> bytes:
    return len(s).to_bytes(2, "big") + s


def _remaining(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


async def _raw_publish(host, port, user, password, messages) -> None:
    """MQTT 3.1.1 CONNECT + QoS 0 PUBLISHes on a plain asyncio stream, with drain() for flow control."""
    reader, writer = await asyncio.open_connection(host, port)
    var = _mqtt_string(b"MQTT") + bytes([4, 0xC2]) + (60).to_bytes(2, "big")
    payload = _mqtt_string(b"floor-pub-" + secrets.token_hex(4).encode()) + _mqtt_string(user.encode()) \
        + _mqtt_string(password.encode())
    writer.write(bytes([0x10]) + _remaining(len(var) + len(payload)) + var + payload)
    connack = await reader.readexactly(4)
    if connack[3] != 0:
        raise RuntimeError(f"floor publisher refused: CONNACK {connack[3]}")
    for topic, data in messages:
        t = _mqtt_string(topic)
        writer.write(b"\x30" + _remaining(len(t) + len(data)) + t)
        writer.write(data)
        if writer.transport.get_write_buffer_size() > 1 << 20:
            await writer.drain()
    await writer.drain()
    writer.write(b"\xe0\x00")
    await writer.drain()
    writer.close()


def floor_receivers(config_path: str) -> None:
    """(child process) n gmqtt subscribers on device accounts; prints the time the last byte came."""
    from gmqtt import Client, Subscription
    from gmqtt.mqtt.constants import MQTTv311
    raise_fd_limit()
    config = json.loads(Path(config_path).read_text())
    want = config["bytes"]
    got: dict[str, int] = {}
    complete = 0
    last = [0.0]
    done = asyncio.Event()

    async def main():
        clients = []

        def on_message(client, topic, payload, qos, properties):
            nonlocal complete
            dev = client._client_id
            got[dev] = got.get(dev, 0) + len(payload)
            if got[dev] >= want and got[dev] - len(payload) < want:
                complete += 1
                if complete == len(config["passwords"]):
                    last[0] = time.time()
                    done.set()
            return 0

        async def connect(dev, pw):
            c = Client(dev, clean_session=True)
            c.set_auth_credentials(dev, pw)
            c.on_message = on_message
            await c.connect(config["host"], config["port"], keepalive=300, version=MQTTv311)
            c.subscribe(Subscription(P.topic(dev, P.DATA), qos=0))
            clients.append(c)

        t0 = time.monotonic()
        items = list(config["passwords"].items())
        for i in range(0, len(items), 500):
            await asyncio.gather(*(connect(d, p) for d, p in items[i:i + 500]))
        await asyncio.sleep(1.0)  # the last SUBACKs
        print(json.dumps({"event": "ready", "connect_s": time.monotonic() - t0}), flush=True)
        cpu0 = time.process_time()
        await done.wait()
        print(json.dumps({"event": "done", "last_byte": last[0], "cpu_s": time.process_time() - cpu0}), flush=True)
        await asyncio.gather(*(c.disconnect() for c in clients), return_exceptions=True)

    asyncio.run(main())


# The floors' receiver processes: paho (issue 6's floor, bare paho clients) and raw (a stricter
# one: gmqtt receivers, fed by a raw-socket publisher); see README.
FLOOR_RECEIVERS = {"paho": ["-m", "bench._paho_floor"], "raw": ["-m", "bench.fleet", "_floor"]}


def floor_run(n: int, args, tmp: Path, kind: str = "paho") -> dict:
    """The same bytes through a fresh broker of the same kind to n bare subscribers: `paho`
    (paho publisher and subscribers) or `raw` (raw-socket publisher, gmqtt subscribers)."""
    broker = Broker(tmp / f"mosquitto-floor-{kind}-{n}")
    recv = None
    try:
        ids = device_ids(n, "floor")
        passwords = {i: secrets.token_urlsafe(12) for i in ids}
        broker.add_users(passwords)
        image = os.urandom(args.image_kib * 1024)
        pieces = [image[i:i + args.chunk] for i in range(0, len(image), args.chunk)]
        per_device = sum(len(p) + P.CHUNK_HEADER_SIZE for p in pieces)
        cfg = tmp / f"floor-{kind}-{n}.json"
        cfg.write_text(json.dumps({"host": broker.host, "port": broker.port, "passwords": passwords,
                                   "bytes": per_device}))
        recv = Child([*FLOOR_RECEIVERS[kind], str(cfg)], tmp / f"floor-{kind}-{n}.log")
        ready = recv.read_event(args.timeout)

        # interleaved across devices, like many downloads at once; same 8-byte header as fota
        def messages():
            import struct
            for index, piece in enumerate(pieces):
                for dev in ids:
                    yield P.topic(dev, P.DATA).encode(), struct.pack(P.CHUNK_HEADER, 1, index) + piece

        t0 = time.time()
        cpu0, broker_cpu0 = time.process_time(), broker.cpu_s()
        if kind == "paho":
            _paho_floor.publish(broker.host, broker.service_port, SERVER_USER, broker.users[SERVER_USER],
                                ((topic.decode(), data) for topic, data in messages()))
        else:
            asyncio.run(_raw_publish(broker.host, broker.service_port, SERVER_USER, broker.users[SERVER_USER], messages()))
        publish_s = time.time() - t0
        publisher_cpu = time.process_time() - cpu0
        done = recv.read_event(args.timeout)
        broker_cpu = broker.cpu_s() - broker_cpu0
        return {"devices": n, "kind": kind, "connect_s": ready["connect_s"], "wall_s": done["last_byte"] - t0,
                "publish_s": publish_s, "bytes": per_device * n, "publisher_cpu_s": publisher_cpu,
                "receivers_cpu_s": done["cpu_s"], "broker_cpu_s": broker_cpu,
                "cpu_s": publisher_cpu + done["cpu_s"] + broker_cpu}
    finally:
        if recv is not None:
            try:
                recv.proc.stdin.close()
            except OSError:
                pass
            try:
                recv.proc.wait(30)
            except subprocess.TimeoutExpired:
                recv.proc.kill()
            recv.log.close()
        broker.stop()


# ----------------------------------------------------------------------------------- workers

def workers_run(n: int, w: int, args, tmp: Path) -> dict:
    """One deployment to n simulated devices driven by w `fota worker` processes (PostgreSQL)."""
    from fota.server.home import Home
    from fota.server.workers import live_workers
    broker = Broker(tmp / f"mosquitto-workers-{w}")
    url, drop = create_postgres_database("fota_bench")
    store = Store(url)
    home = Home(tmp / f"home-workers-{w}")
    home.save_config({"database_url": url, "broker_url": broker.server_url, "broker_port": broker.port,
                      "server_password": broker.users[SERVER_USER]})
    keyring = home.keyring
    keyring.init()
    procs: list[subprocess.Popen] = []
    sim = None
    env = _child_env()
    try:
        ids = device_ids(n, "wrk")
        passwords = provision(store, ids)
        broker.add_users(passwords)
        for i in range(w):
            procs.append(subprocess.Popen([sys.executable, "-m", "fota.cli", "worker", "--home", str(home.path)],
                                          env=env, stdout=subprocess.DEVNULL,
                                          stderr=open(tmp / f"worker-{w}-{i}.log", "w")))
        wait_until(lambda: len(live_workers(store)) == w, timeout=args.timeout, what=f"{w} workers registered")
        sim, ready = _start_sim(tmp / f"sim-w{w}", broker, keyring, passwords, store, args)
        rel = create_release(store, home.blobs, keyring.signer().key, os.urandom(args.image_kib * 1024), "2.0.0",
                             ["sim"], kind="image")
        cpu0 = _children_cpu(procs)
        t0 = time.monotonic()
        dep = create_deployment(store, rel, device_ids=ids)
        marks = _wait_all_done(store, dep.id, n, t0, args.timeout)
        cpu = _children_cpu(procs) - cpu0
        with store.session() as s:
            shares = sorted(s.execute(select(func.count()).select_from(Job).where(Job.deployment_id == dep.id)
                                      .group_by(Job.worker)).scalars().all(), reverse=True)
        result = {"workers": w, "devices": n, "connect_s": ready["connect_s"], "started_s": marks.get("started"),
                  "wall_s": marks.get("done"), "confirmed": _count(store, dep.id, ("confirmed",)),
                  "jobs_per_worker": shares, "workers_cpu_s": cpu}
        result["sim"] = sim.stop()
        sim = None
        logs = "".join((tmp / f"worker-{w}-{i}.log").read_text() for i in range(w))
        result["worker_log_errors"] = sum(1 for line in logs.splitlines() if " ERROR " in line)
        result["deadlock_retries"] = logs.count("deadlock")
        if "done" not in marks:
            result["error"] = f"not all confirmed within {args.timeout}s ({result['confirmed']}/{n})"
        return result
    finally:
        if sim is not None:
            sim.stop()
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        store.dispose()
        drop()
        broker.stop()


def _children_cpu(procs: list[subprocess.Popen]) -> float:
    """CPU seconds (user + system) these processes used so far, from /proc."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for p in procs:
        try:
            fields = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


def threads_cpu() -> dict[int, float]:
    """CPU seconds (user + system) of each live thread of this process but the main one, by
    thread id (/proc/self/task): the control center's threads when it runs in this process."""
    tick = os.sysconf("SC_CLK_TCK")
    main = threading.main_thread().native_id
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            tid = int(task.name)
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            if tid != main:
                out[tid] = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return out


def threads_cpu_since(before: dict[int, float]) -> float:
    """CPU seconds the threads alive now (but the main one) used since `before` (threads_cpu());
    a thread that ended in between is not counted (the benches' short-lived client threads)."""
    return sum(cpu - before.get(tid, 0.0) for tid, cpu in threads_cpu().items())


# ----------------------------------------------------------------------------------- ingestion

class PahoCounter(BrokerSpy):
    """One bare paho subscriber on fota/v1/+/status (QoS 1), counting messages."""

    def __init__(self, broker: Broker, expect: int):
        self.expect = expect
        self.count = 0
        self.last = 0.0
        self.done = threading.Event()
        super().__init__(broker, name="floor-sub", settle=0.5)

    def _on_message(self, client, userdata, msg):
        self.count += 1
        if self.count == self.expect:
            self.last = time.monotonic()
            self.done.set()


@dataclass
class Published:
    """The publisher's own timeline and CPU (_publish_statuses)."""
    t0: float           # monotonic time of the first publish (connected before)
    messages: int
    handed_s: float     # t0 until every message was handed to paho (publish() returned)
    acked_s: float      # t0 until the broker acknowledged the last one (PUBACK)
    cpu_s: float        # CPU of the publishing thread (handing) and of paho's network thread
    runqueue_s: float   # time paho's network thread waited for a CPU (runnable, not running)

    def summary(self) -> dict:
        """For a result's JSON: the timeline, the CPU, and the rate the broker took them at."""
        return {"handed_s": self.handed_s, "acked_s": self.acked_s, "cpu_s": self.cpu_s,
                "runqueue_s": self.runqueue_s, "offered_rate": self.messages / self.acked_s if self.acked_s else None}


def _task_schedstat(tid: int) -> tuple[float, float]:
    """(CPU s, run-queue wait s) of one thread of this process."""
    cpu, wait, _ = (int(x) for x in Path(f"/proc/self/task/{tid}/schedstat").read_text().split())
    return cpu / 1e9, wait / 1e9


def _publish_statuses(broker: Broker, messages: list[tuple[str, bytes]]) -> Published:
    """Publish at QoS 1, pipelined (paho, 1000 in flight); its timeline (Published.t0: the start).
    The broker acknowledges a message once it took it, not once a subscriber did: acked_s is when
    the last one left the publisher, not when it was stored."""
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"status-pub-{secrets.token_hex(4)}")
    pub.username_pw_set(SERVER_USER, broker.users[SERVER_USER])
    pub.max_inflight_messages_set(1000)
    pub.max_queued_messages_set(0)
    n, acks, last = len(messages), [0], [0.0]

    def on_publish(client, userdata, mid, reason_code, properties):
        acks[0] += 1
        if acks[0] == n:
            last[0] = time.monotonic()

    pub.on_publish = on_publish
    pub.connect(broker.host, broker.service_port)
    pub.loop_start()
    net = pub._thread.native_id  # paho's network thread (loop_start)
    net0 = _task_schedstat(net)
    t0, cpu0 = time.monotonic(), time.thread_time()
    infos = [pub.publish(topic, payload, qos=1) for topic, payload in messages]
    handed, hand_cpu = time.monotonic() - t0, time.thread_time() - cpu0
    infos[-1].wait_for_publish(300)
    acked = (last[0] or time.monotonic()) - t0
    net1 = _task_schedstat(net)
    pub.disconnect()
    pub.loop_stop()
    return Published(t0, n, handed, acked, hand_cpu + net1[0] - net0[0], net1[1] - net0[1])


def _drain_statuses(center: CenterThread, new_center, store: Store, broker, messages: list[tuple[str, bytes]],
                    timeout: float) -> tuple[CenterThread, dict]:
    """The center's own ceiling, no publisher beside it: the center stops (its persistent session
    stays), the messages are published into that session (the broker queues them), a new center
    (new_center(client_id): a CenterThread not started) takes the session over and stores the
    backlog. Returns the new center and the run: wall from its start() until all are stored, the
    publishing (alone) before it, who was busy over the wall (IngestProbe)."""
    client_id = center.center.client_id
    center.stop()
    pub = _publish_statuses(broker, messages)
    after = new_center(client_id)
    c = after.center
    try:
        probe = IngestProbe(c, store, broker)
        t0 = time.monotonic()
        after.start()
        started = time.monotonic() - t0
        wait_until(lambda: c.statuses >= len(messages), timeout=timeout, interval=0.02,
                   what=f"{len(messages)} queued statuses stored")
        wall = time.monotonic() - t0
    except BaseException:
        with contextlib.suppress(Exception):
            after.stop()
        raise
    return after, {"statuses": len(messages), "wall_s": wall, "rate": len(messages) / wall, "start_s": started,
                   "publisher": pub.summary(), "split": probe.stop(), "duplicates": c.duplicates}


def _status_messages(jobs: list[tuple[int, str]], count: int, size: int) -> list[tuple[str, bytes]]:
    out = []
    per = -(-count // len(jobs))
    for seq in range(1, per + 1):
        for job_id, dev in jobs:
            if len(out) == count:
                return out
            done = min(size, seq * 2048)
            msg = {"job": job_id, "state": "downloading", "code": None, "reason": None,
                   "progress": done / size, "bytes": done, "total": size, "version": "1.0.0",
                   "boot": 1, "seq": seq}
            out.append((P.topic(dev, P.STATUS), json.dumps(msg).encode()))
    return out


def ingest_run(db: str, args, tmp: Path) -> dict:
    # This process hosts the control center as `fota serve` does, garbage-collector settings
    # included (set before the floor too: both are measured in the same process); restored after.
    with tuned():
        return _ingest_run(db, args, tmp)


def _ingest_run(db: str, args, tmp: Path) -> dict:
    broker = Broker(tmp / f"mosquitto-ingest-{db}")
    url, drop = fresh_database(db, tmp / "ingest.db")
    store = Store(url)
    center = None
    try:
        n = args.ingest_devices
        ids = device_ids(n, "ing")
        provision(store, ids)
        keyring = Keyring(tmp / f"keys-ingest-{db}")
        keyring.init()
        signer = keyring.signer()
        rel = create_release(store, tmp / "blobs", signer.key, os.urandom(64 * 1024), "2.0.0", ["sim"], kind="image")
        dep = create_deployment(store, rel, device_ids=ids)  # devices stay offline: jobs stay pending
        with store.session() as s:
            jobs = [(j, d) for j, d in s.execute(select(Job.id, Job.device_id).where(Job.deployment_id == dep.id))]
        messages = _status_messages(jobs, args.statuses, rel.size)

        # floor: one bare paho subscriber, same messages, same publisher
        sub = PahoCounter(broker, len(messages))
        t0 = _publish_statuses(broker, messages).t0
        got = sub.done.wait(args.timeout)
        sub.close()
        floor_s = (sub.last - t0) if got else None

        center = CenterThread(store, broker.server_url, tmp / "blobs", signer=signer)
        center.start()
        c = center.center
        base = c.statuses
        cpu0 = threads_cpu()
        probe = IngestProbe(c, store, broker)
        pub = _publish_statuses(broker, [(t, p.replace(b'"boot": 1', b'"boot": 2')) for t, p in messages])
        wait_until(lambda: c.statuses - base >= len(messages), timeout=args.timeout, interval=0.02,
                   what=f"{len(messages)} statuses stored")
        fota_s = time.monotonic() - pub.t0
        center_cpu = threads_cpu_since(cpu0)  # the center's threads (the publisher's ended)
        split = probe.stop()
        drain = None
        # the center's own ceiling: the same count queued in its session, then drained (not for
        # bench capacity, whose options have no --skip-drain)
        if not getattr(args, "skip_drain", True):
            before, center = center, None
            center, drain = _drain_statuses(
                before, lambda client_id: CenterThread(store, broker.server_url, tmp / "blobs", signer=signer,
                                                       client_id=client_id),
                store, broker, [(t, p.replace(b'"boot": 1', b'"boot": 3')) for t, p in messages], args.timeout)
        with store.session() as s:
            states = dict(s.execute(select(Job.state, func.count()).where(Job.deployment_id == dep.id)
                                    .group_by(Job.state)).all())
        return {"db": db, "statuses": len(messages), "devices": n, "drain": drain,
                "floor_s": floor_s, "floor_rate": len(messages) / floor_s if floor_s else None,
                "fota_s": fota_s, "fota_rate": len(messages) / fota_s,
                "ratio": (len(messages) / fota_s) / (len(messages) / floor_s) if floor_s else None,
                "job_states": states, "duplicates": c.duplicates, "center_cpu_s": center_cpu,
                "publisher": pub.summary(), "split": split}
    finally:
        if center is not None:
            center.stop()
        store.dispose()
        drop()
        broker.stop()


# ----------------------------------------------------------------------------------- main

def _div(a, b):
    return a / b if a is not None and b else None


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)


def _tuned_deploy_run(n: int, args, tmp: Path) -> dict:
    with tuned():  # the control center runs in this process, set up as `fota serve` is
        return deploy_run(n, args, tmp)


def _guarded(run, *run_args, record: dict) -> dict:
    """run(*run_args)'s result; if it raises, `record` with the error instead: one failed run does
    not end the benchmark."""
    try:
        return run(*run_args)
    except Exception as e:
        return {**record, "error": f"{type(e).__name__}: {e}"}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_floor"]:
        floor_receivers(argv[1])
        return 0
    ap = argparse.ArgumentParser(prog="./run bench fleet", description=__doc__.split("\n")[0])
    ap.add_argument("--devices", default="1000,10000", help="fleet sizes, comma-separated")
    ap.add_argument("--image-kib", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--db", default="sqlite,postgres", help="ingestion databases: sqlite,postgres")
    ap.add_argument("--deploy-db", default="sqlite", choices=("sqlite", "postgres"), help="store of part 1")
    ap.add_argument("--statuses", type=int, default=20000, help="status messages per ingestion run")
    ap.add_argument("--ingest-devices", type=int, default=1000)
    ap.add_argument("--verify", default="cryptography", choices=("cryptography", "pure"))
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--skip-deploy", action="store_true")
    ap.add_argument("--skip-floor", action="store_true")
    ap.add_argument("--floors", default="paho,raw",
                    help="floors of part 1: paho (the target's: bare paho clients), raw (raw-socket publisher, "
                         "gmqtt subscribers)")
    ap.add_argument("--skip-ingest", action="store_true")
    ap.add_argument("--skip-drain", action="store_true",
                    help="part 2: skip the drain run (the statuses queued in the stopped center's session, "
                         "then stored by a new center)")
    ap.add_argument("--workers", default="1,2", help="part 3: worker counts, comma-separated ('' skips)")
    ap.add_argument("--workers-devices", type=int, default=1000, help="part 3: simulated devices")
    _fleet_transport.add_arguments(ap)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    _fleet_cluster.add_arguments(ap)  # part 5: the clustered broker against one Mosquitto
    args = ap.parse_args(argv)
    _fleet_transport.wanted(args)  # unknown transports: an error before anything runs
    unknown = [k for k in args.floors.split(",") if k and k not in FLOOR_RECEIVERS]
    if unknown:
        ap.error(f"--floors: unknown {', '.join(unknown)} (known: {', '.join(FLOOR_RECEIVERS)})")
    logging.basicConfig(level=logging.WARNING)
    fd_limit = raise_fd_limit()
    sizes = [int(x) for x in args.devices.split(",") if x]
    results = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "targets": {"ratio_at_10000": TARGET_RATIO, "ingest_ratio": TARGET_INGEST},
               "env": {"python": platform.python_version(), "cpus": os.cpu_count(), "fd_limit": fd_limit},
               "deploy": [], "ingest": [], "workers": [], "transports": []}
    with tempfile.TemporaryDirectory(prefix="fota-bench-fleet-") as tmp_name:
        tmp = Path(tmp_name)
        if not args.skip_deploy:
            for n in sizes:
                log(f"deployment over {n} simulated devices")
                fota = _guarded(_tuned_deploy_run, n, args, tmp, record={"devices": n})
                log("fota", json.dumps({k: v for k, v in fota.items() if k != "sim"}))
                floors, ratios = {}, {}
                for kind in ([] if args.skip_floor else [k for k in args.floors.split(",") if k]):
                    log(f"{kind} floor over {n} bare subscribers")
                    floors[kind] = _guarded(floor_run, n, args, tmp, kind, record={"devices": n, "kind": kind})
                    log("floor", json.dumps(floors[kind]))
                    wall = floors[kind].get("wall_s")
                    ratios[kind] = fota["wall_s"] / wall if fota.get("wall_s") and wall else None
                results["deploy"].append({"devices": n, "fota": fota, "floors": floors, "ratios": ratios})
        if not args.skip_ingest:
            for db in [x for x in args.db.split(",") if x]:
                log(f"status ingestion on {db}")
                r = _guarded(ingest_run, db, args, tmp, record={"db": db})
                log("ingest", json.dumps(r))
                results["ingest"].append(r)
        for w in [int(x) for x in args.workers.split(",") if x]:
            log(f"deployment over {args.workers_devices} simulated devices with {w} worker(s), PostgreSQL")
            r = _guarded(workers_run, args.workers_devices, w, args, tmp,
                         record={"workers": w, "devices": args.workers_devices})
            log("workers", json.dumps({k: v for k, v in r.items() if k != "sim"}))
            results["workers"].append(r)
        results["transports"] = _fleet_transport.transport_runs(args, tmp, log)
        _fleet_cluster.run(args, tmp, results)
    base = next((r.get("wall_s") for r in results["workers"] if r.get("workers") == 1), None)
    for r in results["workers"]:
        r["speedup"] = base / r["wall_s"] if base and r.get("wall_s") else None
    rows = []
    for d in results["deploy"]:
        f, fl, ra = d["fota"], d["floors"], d["ratios"]
        sim = f.get("sim") or {}
        errors = [f.get("error")] + [x.get("error") for x in fl.values()]
        rows.append((d["devices"], f.get("connect_s"), f.get("started_s"), f.get("wall_s"),
                     (fl.get("paho") or {}).get("wall_s"), ra.get("paho"), (fl.get("raw") or {}).get("wall_s"),
                     ra.get("raw"), f.get("confirmed"), (f.get("center") or {}).get("statuses"),
                     (f.get("center") or {}).get("chunks"), f.get("resent_pct"), sim.get("timeouts"),
                     (f.get("center") or {}).get("cpu_s"), sim.get("cpu_s"), f.get("broker_cpu_s"),
                     _div(f.get("cpu_s"), (fl.get("paho") or {}).get("cpu_s")),
                     _div(f.get("cpu_s"), (fl.get("raw") or {}).get("cpu_s")), sim.get("rss_mib"),
                     f.get("broker_rss_mib"), "; ".join(e for e in errors if e) or None))
    if rows:
        print_table(f"deployment of a {args.image_kib} KiB image, {args.deploy_db} store "
                    f"(target: paho ratio <= {TARGET_RATIO} at 10,000)",
                    ["devices", "connect s", "started s", "fota wall s", "paho floor s", "ratio", "raw floor s",
                     "ratio raw", "confirmed", "statuses", "chunks", "re-sent %", "timeouts", "center CPU s", "sim CPU s", "broker CPU s",
                     "CPU ratio", "CPU ratio raw", "sim RSS MiB", "broker RSS MiB", "note"],
                    [[_fmt(v) for v in r] for r in rows])
    rows = [(r["db"], r.get("statuses"), r.get("floor_rate"), r.get("fota_rate"), r.get("ratio"),
             (r.get("publisher") or {}).get("offered_rate"), (r.get("drain") or {}).get("rate"), r.get("error"))
            for r in results["ingest"]]
    if rows:
        print_table(f"status ingestion (target: ratio >= {TARGET_INGEST})",
               ["db", "statuses", "paho subscriber msg/s", "fota persisted/s", "ratio", "offered/s",
                "fota drain/s", "note"],
                    [[_fmt(v) for v in r] for r in rows])
        for r in results["ingest"]:
            if r.get("split"):
                print_split(f"status ingestion on {r['db']}, published while the center stores",
                            {**r, "wall_s": r["fota_s"]})
            if r.get("drain"):
                print_split(f"status ingestion on {r['db']}, queued then drained", r["drain"])
    rows = [(r["workers"], r["devices"], r.get("started_s"), r.get("wall_s"), r.get("speedup"), r.get("confirmed"),
             "/".join(str(x) for x in r.get("jobs_per_worker") or []), r.get("workers_cpu_s"), r.get("error"))
            for r in results["workers"]]
    if rows:
        print_table(f"deployment of a {args.image_kib} KiB image with several workers (PostgreSQL)",
                    ["workers", "devices", "started s", "wall s", "speedup vs 1", "confirmed", "jobs per worker",
                     "workers CPU s", "note"], [[_fmt(v) for v in r] for r in rows])
    _fleet_transport.render(results["transports"], args)
    _fleet_cluster.report(args, results)
    results["failures"] = failures(results) + _fleet_cluster.failures(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=str))
    log(f"results in {args.out}")
    for problem in results["failures"]:
        print("FAILED:", problem)
    return 1 if results["failures"] else 0


def failures(results: dict) -> list[str]:
    """Why the run failed (empty: it did; the targets are verdicts, not failures): a measurement
    that raised or timed out (its "error"), or a deployment with a job not confirmed."""
    out = []
    for d in results["deploy"]:
        runs = [("fota", d["fota"])] + [(f"{kind} floor", f) for kind, f in d["floors"].items()]
        out += [f"deploy N={d['devices']}, {name}: {r['error']}" for name, r in runs if r.get("error")]
        if not d["fota"].get("error") and d["fota"].get("confirmed") != d["devices"]:
            out.append(f"deploy N={d['devices']}: {d['fota'].get('confirmed')}/{d['devices']} confirmed")
    out += [f"ingest {r['db']}: {r['error']}" for r in results["ingest"] if r.get("error")]
    for r in results["workers"]:
        if r.get("error"):
            out.append(f"{r['workers']} worker(s): {r['error']}")
        elif r.get("confirmed") != r["devices"]:
            out.append(f"{r['workers']} worker(s): {r.get('confirmed')}/{r['devices']} confirmed")
    out += _fleet_transport.failures(results.get("transports", []))
    return out


if __name__ == "__main__":
    sys.exit(main())
