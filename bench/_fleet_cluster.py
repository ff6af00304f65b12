"""bench/fleet.py, part 5: the clustered broker (a 3-node NATS cluster, fota.server.natscluster)
against single Mosquitto, with the same simulated fleet, center and deployment.

    ./run bench fleet --brokers mosquitto,nats [--brokers-devices 1000,10000]   ('' skips the part)

Per broker and fleet size: one deployment of an --image-kib release to every device (SQLite
store, --deploy-db), wall time until all are confirmed, CPU of the center's threads, broker CPU
(Mosquitto's process, or the sum over the 3 nats-server processes), statuses the center stored,
chunks published against the chunks needed (re-sent %), and the brokers' resident memory; then
a status ingestion run on the same broker: --brokers-statuses QoS 1 statuses from one pipelined
paho publisher (MQTT 3.1.1, the server account) for open jobs, persisted per second, with center
and broker CPU per status. Ratios: NATS / Mosquitto of the same run.
On NATS the devices connect over MQTT 3.1.1 to a node picked at random per connection; the center
speaks NATS to every node (fota.server.center.natsconn).
"""
from __future__ import annotations

import json
import os
import secrets
import sys
import time
import urllib.request
from pathlib import Path

from sqlalchemy import select

from bench import fleet
from bench._report import print_table
from fota.server.broker import SERVER_USER
from fota.server.deployments import create_deployment
from fota.server.natscluster import NatsCluster, mqtt_ping
from fota.server.releases import create_release
from fota.server.store import Job, Store
from fota.sim.fleet import device_ids, provision
from fota.testkit.center import CenterThread
from fota.testkit.databases import fresh_database
from fota.tools.gctune import tuned
from fota.tools.keyring import Keyring
from fota.tools.waiting import wait_until

BROKERS = ("mosquitto", "nats")


def _proc_cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _proc_kib(pid: int, key: str = "VmRSS") -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class ClusterBroker:
    """A started 3-node NatsCluster with the interface bench/fleet.py's rig uses of its Broker:
    host, port (every node's MQTT port: a simulated device picks one at random per connection),
    server_url, add_users, stop; plus CPU and memory summed over the node processes."""

    kind = "nats"

    def __init__(self, directory: Path, size: int = 3, connect_rate: float = 50.0, mqtt_options: dict | None = None):
        self.cluster = NatsCluster(directory, size, server_password=secrets.token_urlsafe(12), mqtt_options=mqtt_options)
        self.cluster.start(timeout=60)
        # Each device's persistent session gets a replicated JetStream consumer for its QoS 1
        # subscription: the simulator paces its connections (batches of 25) at connect_rate a
        # second. Measured unpaced (1,000 devices in 0.1 s): consumer creations timed out after
        # 5 s, those devices' `cmd` subscriptions failed and their commands never arrived.
        self.sim_settings = {"connect_batch": 25, "connect_pause": 25 / connect_rate}
        self.host = self.cluster.host
        self.users = {SERVER_USER: self.cluster.server_password}

    @property
    def port(self) -> list[int]:
        return self.cluster.mqtt_ports

    @property
    def service_port(self) -> int:  # the server account's MQTT port for the status publisher
        return self.cluster.mqtt_ports[0]

    @property
    def server_url(self) -> str:
        return self.cluster.server_url

    @property
    def pids(self) -> list[int]:
        return [n.proc.pid for n in self.cluster.nodes if n.running]

    def add_users(self, passwords: dict[str, str]) -> None:
        self.cluster.add_devices(passwords)
        # a reload of thousands of accounts takes the nodes a while: wait until the last device can log in
        last, pw = next(reversed(passwords.items()))
        for node in self.cluster.nodes:
            wait_until(lambda: _accepts(self.host, node.ports.mqtt, last, pw), timeout=300, interval=0.5,
                       what=f"{node.name} accepting the new accounts")

    def cpu_s(self) -> float:
        return sum(_proc_cpu_s(p) for p in self.pids)

    def session_consumers(self) -> int:
        """Consumers on the MQTT layer's $MQTT_msgs stream, as the first answering node reports
        them: one per persistent session's QoS 1 subscription, plus the center's."""
        for st in self._streams():
            if st.get("name") == "$MQTT_msgs":
                return int((st.get("state") or {}).get("consumer_count", 0))
        return 0

    def _streams(self) -> list[dict]:
        """The streams' details as the first node that answers its monitoring port reports them."""
        for node in self.cluster.nodes:
            try:
                with urllib.request.urlopen(f"http://{self.host}:{node.ports.monitor}/jsz?accounts=true&streams=true",
                                            timeout=5) as r:
                    data = json.load(r)
            except OSError:
                continue
            return [st for acc in data.get("account_details") or [] for st in acc.get("stream_detail") or []]
        return []

    def wait_sessions(self, n: int, timeout: float) -> float:
        """Wait until n device sessions (+ the center's consumer) exist; seconds it took."""
        t0 = time.monotonic()
        wait_until(lambda: self.session_consumers() >= n + 1, timeout=timeout, interval=1.0,
                   what=f"{n} device sessions' consumers on $MQTT_msgs (a failed subscription never gets one)")
        return time.monotonic() - t0

    def rss_mib(self) -> float:
        """Peak resident memory (VmHWM), summed over the nodes."""
        return sum(_proc_kib(p, "VmHWM") for p in self.pids) / 1024

    def rss_kib_now(self) -> int:
        return sum(_proc_kib(p) for p in self.pids)

    def state(self) -> dict:
        """What the cluster holds now (a failed run's diagnostics): sessions in $MQTT_sess,
        consumers on $MQTT_msgs, messages waiting there, resident MiB and CPU s of the nodes."""
        out = {"rss_mib": self.rss_kib_now() / 1024, "cpu_s": self.cpu_s()}
        for st in self._streams():
            state = st.get("state") or {}
            if st.get("name") == "$MQTT_sess":
                out["sessions"] = state.get("messages")
            elif st.get("name") == "$MQTT_msgs":
                out["consumers"], out["msgs_waiting"] = state.get("consumer_count"), state.get("messages")
        return out

    def stop(self) -> None:
        try:
            self.last_state = self.state()
        except Exception:
            self.last_state = {}
        self.cluster.stop()


def _accepts(host: str, port: int, user: str, password: str) -> bool:
    """The node accepts an MQTT login of this account (clean session: nothing stays behind)."""
    try:
        mqtt_ping(host, port, user, password, timeout=5)
        return True
    except Exception:
        return False


def make_broker(kind: str, directory: Path, nats_mqtt: dict | None = None, *, persistence: bool = False):
    """persistence: Mosquitto's (sessions saved to disk, as the managed broker of `fota serve`)."""
    if kind == "mosquitto":
        broker = fleet.Broker(directory, persistence=persistence)
        broker.kind = "mosquitto"
        broker.rss_kib_now = lambda: _proc_kib(broker.mosquitto.proc.pid)
        return broker
    if kind == "nats":
        return ClusterBroker(directory, mqtt_options=nats_mqtt)
    raise ValueError(f"unknown broker {kind!r} (known: {', '.join(BROKERS)})")


def deploy_on(kind: str, n: int, args, tmp: Path) -> dict:
    """One deployment of a fresh --image-kib image to n simulated devices on broker `kind`; when
    it raises, the error with what the broker held when it was stopped (NATS: sessions, consumers)."""
    broker = make_broker(kind, tmp / f"{kind}-deploy-{n}", args.nats_mqtt)
    try:
        return _deploy_on(broker, kind, n, args, tmp)
    except Exception as e:
        return {"broker": kind, "devices": n, "error": f"{type(e).__name__}: {e}",
                "broker_state": getattr(broker, "last_state", None)}


def _deploy_on(broker, kind: str, n: int, args, tmp: Path) -> dict:
    with tuned(), fleet.deploy_rig(broker, args.deploy_db, tmp / f"{kind}-{n}.db", tmp / f"keys-{kind}-{n}",
                                   tmp / f"sim-{kind}-{n}", tmp, device_ids(n), args) as rig:
        fleet.log(f"{kind}: {n} simulated devices connected in {rig.ready['connect_s']:.1f}s")
        sessions_s = broker.wait_sessions(n, args.timeout) if kind == "nats" else 0.0
        store = rig.store
        image = os.urandom(args.image_kib * 1024)
        rel = create_release(store, tmp / "blobs", rig.signer.key, image, "2.0.0", ["sim"], kind="image")
        c = rig.center.center
        c0 = (c.statuses, c.commands, c.chunks, c.bytes_published)
        rss_connected = broker.rss_kib_now()
        cpu0, broker0 = fleet.threads_cpu(), broker.cpu_s()
        t0 = time.monotonic()
        dep = create_deployment(store, rel, device_ids=rig.ids)
        marks = fleet._wait_all_done(store, dep.id, n, t0, args.timeout)
        center_cpu, broker_cpu = fleet.threads_cpu_since(cpu0), broker.cpu_s() - broker0
        needed = n * -(-len(image) // args.chunk)
        result = {"broker": kind, "devices": n, "connect_s": rig.ready["connect_s"], "sessions_wait_s": sessions_s, "wall_s": marks.get("done"),
                  "started_s": marks.get("started"), "confirmed": fleet._count(store, dep.id, ("confirmed",)),
                  "statuses": c.statuses - c0[0], "commands": c.commands - c0[1], "chunks": c.chunks - c0[2],
                  "chunks_needed": needed, "bytes_published": c.bytes_published - c0[3],
                  "center_cpu_s": center_cpu, "broker_cpu_s": broker_cpu,
                  "broker_rss_connected_mib": rss_connected / 1024}
        result["resent_pct"] = 100.0 * (result["chunks"] - needed) / needed
        result["sim"] = rig.stop_sim()
        result["broker_peak_rss_mib"] = broker.rss_mib()
        if result["wall_s"] is None:
            result["error"] = f"not all confirmed within {args.timeout:.0f}s ({result['confirmed']}/{n})"
        return result


def ingest_on(kind: str, args, tmp: Path, statuses: int | None = None, devices: int | None = None) -> dict:
    """--brokers-statuses QoS 1 statuses for open jobs, published by one pipelined paho client
    (MQTT 3.1.1, the server account, to node 1 on NATS), stored by the center: rate and CPU."""
    statuses = statuses or args.brokers_statuses
    n = devices or args.ingest_devices
    broker = make_broker(kind, tmp / f"{kind}-ingest", args.nats_mqtt)
    url, drop = fresh_database(args.deploy_db, tmp / f"ingest-{kind}.db")
    store = Store(url)
    center = None
    try:
        with tuned():
            ids = device_ids(n, "ing")
            provision(store, ids)
            keyring = Keyring(tmp / f"keys-ingest-{kind}")
            keyring.init()
            signer = keyring.signer()
            rel = create_release(store, tmp / "blobs", signer.key, os.urandom(64 * 1024), "2.0.0", ["sim"],
                                 kind="image")
            dep = create_deployment(store, rel, device_ids=ids)  # devices offline: jobs stay pending
            with store.session() as s:
                jobs = [(j, d) for j, d in s.execute(select(Job.id, Job.device_id).where(Job.deployment_id == dep.id))]
            messages = fleet._status_messages(jobs, statuses, rel.size)
            # the center first: on NATS its durable consumer must exist before statuses arrive
            center = CenterThread(store, broker.server_url, tmp / "blobs", signer=signer).start()
            c = center.center
            base = c.statuses
            cpu0, broker0 = fleet.threads_cpu(), broker.cpu_s()
            pub = fleet._publish_statuses(broker, messages)
            t1 = pub.t0
            wait_until(lambda: c.statuses - base >= len(messages), timeout=args.timeout, interval=0.02,
                       what=f"{len(messages)} statuses stored")
            wall = time.monotonic() - t1
            center_cpu, broker_cpu = fleet.threads_cpu_since(cpu0), broker.cpu_s() - broker0
            return {"broker": kind, "statuses": len(messages), "devices": n, "wall_s": wall,
                    "rate": len(messages) / wall, "center_cpu_s": center_cpu, "broker_cpu_s": broker_cpu,
                    "center_ms_per_status": 1000 * center_cpu / len(messages),
                    "broker_ms_per_status": 1000 * broker_cpu / len(messages), "duplicates": c.duplicates,
                    "publisher": pub.summary()}
    finally:
        if center is not None:
            center.stop()
        store.dispose()
        drop()
        broker.stop()


def run(args, tmp: Path, results: dict) -> None:
    """Part 4 of bench/fleet.py: fills results["brokers"] = {"deploy": [...], "ingest": [...]}."""
    kinds = [k for k in args.brokers.split(",") if k]
    unknown = [k for k in kinds if k not in BROKERS]
    if unknown:
        raise SystemExit(f"--brokers: unknown {', '.join(unknown)} (known: {', '.join(BROKERS)})")
    out = results.setdefault("brokers", {"deploy": [], "ingest": []})
    if not kinds:
        return
    for n in [int(x) for x in args.brokers_devices.split(",") if x]:
        for kind in kinds:
            fleet.log(f"brokers: deployment over {n} simulated devices on {kind}")
            r = fleet._guarded(deploy_on, kind, n, args, tmp, record={"broker": kind, "devices": n})
            fleet.log("brokers", json.dumps({k: v for k, v in r.items() if k != "sim"}))
            out["deploy"].append(r)
    if args.brokers_statuses:
        for kind in kinds:
            fleet.log(f"brokers: status ingestion on {kind}")
            r = fleet._guarded(ingest_on, kind, args, tmp, record={"broker": kind})
            fleet.log("brokers", json.dumps(r))
            out["ingest"].append(r)


def _ratio(rows: list[dict], key: str, match: dict) -> float | None:
    by = {r["broker"]: r.get(key) for r in rows if all(r.get(k) == v for k, v in match.items())}
    a, b = by.get("nats"), by.get("mosquitto")
    return a / b if a is not None and b else None


def report(args, results: dict) -> None:
    part = results.get("brokers") or {}
    f = fleet._fmt
    rows = []
    for r in part.get("deploy", []):
        sim = r.get("sim") or {}
        rows.append([r["broker"], r["devices"], r.get("connect_s"), r.get("wall_s"),
                     _ratio(part["deploy"], "wall_s", {"devices": r["devices"]}) if r["broker"] == "nats" else None,
                     r.get("confirmed"), r.get("statuses"), r.get("chunks"), r.get("chunks_needed"),
                     r.get("resent_pct"), sim.get("timeouts"), r.get("center_cpu_s"), r.get("broker_cpu_s"),
                     _ratio(part["deploy"], "broker_cpu_s", {"devices": r["devices"]}) if r["broker"] == "nats" else None,
                     sim.get("cpu_s"), r.get("broker_rss_connected_mib"), (r.get("error") or "")[:40] or None])
    if rows:
        print_table(f"clustered broker (3 nats-server) against one Mosquitto: deployment of a {args.image_kib} KiB "
                    f"image, {args.deploy_db} store", ["broker", "devices", "connect s", "wall s", "wall nats/mosq",
                                                      "confirmed", "statuses", "chunks", "needed", "re-sent %",
                                                      "timeouts", "center CPU s", "broker CPU s", "broker CPU nats/mosq",
                                                      "sim CPU s", "broker RSS MiB", "note"],
                    [[f(v) for v in r] for r in rows], left=("broker", "note"))
    rows = [[r["broker"], r.get("statuses"), r.get("rate"),
             _ratio(part["ingest"], "rate", {}) if r["broker"] == "nats" else None,
             r.get("center_ms_per_status"), r.get("broker_ms_per_status"), r.get("error")]
            for r in part.get("ingest", [])]
    if rows:
        print_table("status ingestion by broker (QoS 1, one paho publisher, the center persisting)",
                    ["broker", "statuses", "stored/s", "rate nats/mosq", "center ms/status", "broker ms/status",
                     "note"], [[f(v) for v in r] for r in rows], left=("broker", "note"))


def failures(results: dict) -> list[str]:
    part = results.get("brokers") or {}
    out = [f"brokers {r['broker']} N={r['devices']}: {r['error']}"
           + (f" (the cluster then: {r['broker_state']})" if r.get("broker_state") else "")
           for r in part.get("deploy", []) if r.get("error")]
    out += [f"brokers {r['broker']} N={r['devices']}: {r.get('confirmed')}/{r['devices']} confirmed"
            for r in part.get("deploy", []) if not r.get("error") and r.get("confirmed") != r["devices"]]
    out += [f"brokers ingest {r['broker']}: {r['error']}" for r in part.get("ingest", []) if r.get("error")]
    return out


def add_arguments(ap) -> None:
    ap.add_argument("--brokers", default="mosquitto,nats",
                    help="part 5: brokers compared (mosquitto: one Mosquitto; nats: 3-node NATS cluster); '' skips")
    ap.add_argument("--brokers-devices", default="1000", help="part 5: fleet sizes, comma-separated (10000 does not complete on NATS on 2 cores: docs/operations.md §4a)")
    ap.add_argument("--brokers-statuses", type=int, default=10000,
                    help="part 5: statuses of the ingestion run per broker (0 skips it)")
    add_nats_mqtt_argument(ap)


def add_nats_mqtt_argument(ap) -> None:
    ap.add_argument("--nats-mqtt", type=json.loads, default=None, metavar="JSON",
                    help="extra settings of the NATS nodes' mqtt {} block (NatsCluster mqtt_options), e.g. "
                         "'{\"consumer_memory_storage\": true}' (docs/operations.md §4a)")


if __name__ == "__main__":
    sys.exit("run it through bench/fleet.py: ./run bench fleet --brokers mosquitto,nats")
