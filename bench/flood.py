"""Flood benchmark: one hostile device floods statuses while a simulated fleet updates.

    ./run bench flood [--devices 1000] [--hostile-statuses 20000] [--reason-kib 60] [--small-every 10]
                      [--image-kib 16] [--db sqlite] [--max-packet 16384,131072] [--timeout 900]
                      [--repeat 3] [--skip-baseline] [--out bench/results/flood.json]

Runs (--repeat times each, interleaved; the table shows medians), each on a fresh Mosquitto, database and control center (in this process): a deployment of
an --image-kib release to --devices simulated devices (fota.sim, one child process), once alone
("baseline") and then, for each --max-packet, while a hostile device (its own broker account; a
raw MQTT connection in a child process) publishes --hostile-statuses QoS 1 statuses as fast as
the broker reads them: every one with a --reason-kib reason except every --small-every-th, a
valid small status (those meet the device's rate limit). Reported per run: database growth
(file + WAL on SQLite, pg_database_size on PostgreSQL) from before the deployment to the end, the
control center's RSS (this process) at its peak and what a run left behind (after - before), its
CPU time and Mosquitto's, the other devices' ingestion rate (their statuses stored per second of the deployment), the deployment's wall time,
and what became of the hostile device's statuses: not sent to the center (the broker discarded
them: over the center's MQTT 5 Maximum Packet Size, 16 KiB, or over the broker's own limit, which
also closes the connection), refused at parsing, rate-limited, stored.

--max-packet is the broker's max_packet_size: 16384 is `fota serve`'s managed broker
(fota.server.broker.MANAGED_MAX_PACKET: the flooder is disconnected at each oversize packet);
131072 an external broker that takes the 60 KB statuses and routes them.

Targets: the hostile device adds under 5 MB to the database (flood growth - baseline growth),
and the other devices' ingestion rate stays within 20 % of the baseline. A run whose jobs are
not all confirmed exits 1; a missed target is a verdict (printed, and in the JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from sqlalchemy import func, select, text

from bench._report import print_table
from bench.fleet import Broker, Child, _count, _mqtt_string, _remaining, _wait_all_done, deploy_rig, log
from fota.device import protocol as P
from fota.server.broker import MANAGED_MAX_PACKET
from fota.server.deployments import create_deployment
from fota.server.fleet import provision_device
from fota.server.releases import create_release
from fota.server.store import StatusEvent, Store
from fota.sim.fleet import device_ids
from fota.sim.run import raise_fd_limit
from fota.tools.gctune import tuned

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "flood.json"
HOSTILE = "hostile-1"
TARGET_GROWTH_MB = 5.0      # database growth from the hostile device
TARGET_RATE = 0.8           # the others' ingestion rate >= 0.8x the baseline's


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class RssSampler:
    """This process's RSS every 0.2 s: the peak."""

    def __init__(self):
        self.peak = rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, rss_mib())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def db_bytes(store: Store, url: str) -> int:
    if url.startswith("sqlite"):
        path = Path(store.engine.url.database)
        return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())
    with store.session() as s:
        return int(s.scalar(text("SELECT pg_database_size(current_database())")))


def _statuses(store: Store, hostile: bool) -> int:
    with store.session() as s:
        where = StatusEvent.device_id == HOSTILE if hostile else StatusEvent.device_id != HOSTILE
        return s.scalar(select(func.count()).select_from(StatusEvent).where(where)) or 0


def _settle(read, quiet: float = 1.0, timeout: float = 120.0) -> None:
    """Wait until read() stays the same for `quiet` seconds (the center caught up)."""
    last, since, deadline = read(), time.monotonic(), time.monotonic() + timeout
    while time.monotonic() < deadline and time.monotonic() - since < quiet:
        time.sleep(0.1)
        now = read()
        if now != last:
            last, since = now, time.monotonic()


def _hostile_bytes(store: Store) -> int:
    """Text the hostile device's stored statuses hold (reason and payload): its share of the
    database without the noise of file and WAL sizes."""
    with store.session() as s:
        return int(s.scalar(text("SELECT COALESCE(SUM(LENGTH(COALESCE(reason, '')) + LENGTH(CAST(payload AS TEXT))), 0) "
                                 "FROM status_events WHERE device_id = :d"), {"d": HOSTILE}) or 0)


# ------------------------------------------------------------------------ the hostile device

class _RawDevice:
    """An MQTT 3.1.1 connection on a plain socket: QoS 1 PUBLISHes written without waiting for
    their PUBACKs (TCP is the flow control), PUBACKs counted by a reader thread. A flooder does
    not need a client library's care, and a broker that closes the connection (a packet over its
    max_packet_size) just gets a new one."""

    def __init__(self, host: str, port: int, password: str):
        self.address, self.password = (host, port), password
        self.acked = self.connects = 0
        self.sock = None

    def connect(self) -> None:
        import socket
        sock = socket.create_connection(self.address, timeout=10)
        var = _mqtt_string(b"MQTT") + bytes([4, 0xC2]) + (0).to_bytes(2, "big")  # no keepalive
        body = _mqtt_string(HOSTILE.encode()) + _mqtt_string(HOSTILE.encode()) + _mqtt_string(self.password.encode())
        sock.sendall(b"\x10" + _remaining(len(var) + len(body)) + var + body)
        connack = sock.recv(4)
        if len(connack) != 4 or connack[3] != 0:
            raise RuntimeError(f"hostile device refused: CONNACK {connack!r}")
        sock.settimeout(None)
        self.sock = sock
        self.connects += 1
        threading.Thread(target=self._read, args=(sock,), daemon=True).start()

    def _read(self, sock) -> None:
        pending = b""
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            pending += data
            while len(pending) >= 2 and len(pending) >= 2 + pending[1]:  # PUBACK: 40 02 id id
                self.acked += pending[0] == 0x40
                pending = pending[2 + pending[1]:]

    def publish(self, topic: bytes, payload: bytes, mid: int) -> None:
        """Send a QoS 1 PUBLISH; a connection the broker closed is replaced (the message is lost)."""
        packet = _mqtt_string(topic) + mid.to_bytes(2, "big") + payload
        try:
            self.sock.sendall(b"\x32" + _remaining(len(packet)) + packet)
        except OSError:
            self.sock.close()
            self.connect()

    def close(self) -> None:
        try:
            self.sock.sendall(b"\xe0\x00")
            self.sock.close()
        except OSError:
            pass


def hostile(config_path: str) -> None:
    """(child process) publish the flood as one device; print {"event": "done", ...}."""
    cfg = json.loads(Path(config_path).read_text())
    big = "x" * (cfg["reason_kib"] * 1024)
    device = _RawDevice(cfg["host"], cfg["port"], cfg["password"])
    device.connect()
    print(json.dumps({"event": "ready"}), flush=True)
    sys.stdin.readline()  # "go"
    t0 = time.monotonic()
    topic = P.topic(HOSTILE, P.STATUS).encode()
    # encoded once: the attacker's CPU is the bench machine's too
    head = {reason: json.dumps({"job": None, "state": P.HEALTH, "ok": True, "reason": reason, "uptime": 1,
                                "version": "1.0.0", "boot": 1})[:-1].encode() + b', "seq": '
            for reason in ("flood", big)}
    for seq in range(1, cfg["statuses"] + 1):
        small = cfg["small_every"] and seq % cfg["small_every"] == 0
        device.publish(topic, head["flood" if small else big] + str(seq).encode() + b"}", seq % 65535 + 1)
    sent_s = time.monotonic() - t0
    # the PUBACKs of what the broker took (it acknowledges on receipt, before routing)
    last, deadline = -1, time.monotonic() + 10
    while device.acked != last and time.monotonic() < deadline:
        last = device.acked
        time.sleep(0.5)
    device.close()
    print(json.dumps({"event": "done", "sent": cfg["statuses"], "acked": device.acked,
                      "connections": device.connects, "wall_s": sent_s}), flush=True)


# ------------------------------------------------------------------------------------- a run

def run(mode: str, args, tmp: Path, max_packet: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"{mode}-{max_packet}-", dir=tmp))  # a directory per run
    broker = Broker(tmp / "mosquitto", max_packet_size=max_packet)
    n = args.devices
    attacker = None
    with deploy_rig(broker, args.db, tmp / "fota.db", tmp / "keys", tmp / "sim", tmp, device_ids(n, "fld"),
                    args) as rig:
        store = rig.store
        try:
            log(f"{mode}: {n} simulated devices connected in {rig.ready['connect_s']:.1f}s")
            if mode == "flood":
                _, password = provision_device(store, HOSTILE, "sim")
                broker.add_users({HOSTILE: password})
                cfg = tmp / "hostile.json"
                cfg.write_text(json.dumps({"host": broker.host, "port": broker.port, "password": password,
                                           "statuses": args.hostile_statuses, "reason_kib": args.reason_kib,
                                           "small_every": args.small_every}))
                attacker = Child(["-m", "bench.flood", "_hostile", str(cfg)], tmp / "hostile.log")
                attacker.read_event(60)
            rel = create_release(store, tmp / "blobs", rig.signer.key, os.urandom(args.image_kib * 1024), "2.0.0",
                                 ["sim"], kind="image")
            c = rig.center.center
            time.sleep(1.0)  # the health reports of the connects stored
            size0, others0, rss0 = db_bytes(store, rig.url), _statuses(store, False), rss_mib()
            c0 = (c.refused, c.rate_limited)
            cpu0, broker_cpu0 = time.process_time(), broker.cpu_s()
            with RssSampler() as rss:
                t0 = time.monotonic()
                if attacker is not None:
                    attacker.proc.stdin.write("go\n")
                    attacker.proc.stdin.flush()
                dep = create_deployment(store, rel, device_ids=rig.ids)
                marks = _wait_all_done(store, dep.id, n, t0, args.timeout)
                wall = marks.get("done")
                flood = attacker.read_event(args.timeout) if attacker is not None else None
                if flood is not None:
                    _settle(lambda: (c.refused, c.rate_limited, _statuses(store, True)))
            cpu, broker_cpu = time.process_time() - cpu0, broker.cpu_s() - broker_cpu0
            others = _statuses(store, False) - others0
            confirmed = _count(store, dep.id, ("confirmed",))
            result = {
                "mode": mode, "max_packet": max_packet, "devices": n, "db": args.db, "wall_s": wall,
                "confirmed": confirmed,
                "others_statuses": others, "others_rate": others / wall if wall else None,
                "db_growth_mb": (db_bytes(store, rig.url) - size0) / 1e6,
                "rss_mib": {"before": rss0, "peak": rss.peak, "after": rss_mib()},
                "center_cpu_s": cpu, "broker_cpu_s": broker_cpu,
                "hostile": None,
            }
            if flood is not None:
                hostile = {**{k: v for k, v in flood.items() if k != "event"},
                           "stored": _statuses(store, True), "stored_bytes": _hostile_bytes(store),
                           "refused": c.refused - c0[0],
                           "rate_limited": c.rate_limited - c0[1]}
                # discarded by the broker: over the center's MQTT 5 Maximum Packet Size (or the broker's)
                hostile["discarded"] = hostile["sent"] - hostile["stored"] - hostile["refused"] - hostile["rate_limited"]
                result["hostile"] = hostile
            result["sim"] = rig.stop_sim()
            if wall is None:
                result["error"] = f"not all confirmed within {args.timeout}s ({confirmed}/{n})"
            return result
        finally:
            if attacker is not None:
                attacker.stop(5)


def _median(values):
    values = sorted(v for v in values if v is not None)
    return statistics.median(values) if values else None


def summarize(results: list[dict]) -> list[dict]:
    """One row per (mode, max_packet): medians over the repeats; the flood rows with their verdict
    against the baseline's medians."""
    rows = []
    for key in dict.fromkeys((r["mode"], r["max_packet"]) for r in results):
        runs = [r for r in results if (r["mode"], r["max_packet"]) == key]
        row = {"mode": key[0], "max_packet": key[1], "repeats": len(runs),
               "confirmed": min(r["confirmed"] for r in runs), "devices": runs[0]["devices"],
               "rss_peak_mib": max(r["rss_mib"]["peak"] for r in runs),
               # what a run left behind in the center: RSS after it - before it (the largest)
               "rss_kept_mib": max(r["rss_mib"]["after"] - r["rss_mib"]["before"] for r in runs)}
        for name in ("wall_s", "others_rate", "db_growth_mb", "center_cpu_s", "broker_cpu_s"):
            row[name] = _median(r[name] for r in runs)
        if runs[0]["hostile"] is not None:
            row["hostile"] = {name: _median(r["hostile"][name] for r in runs)
                              for name in ("sent", "discarded", "refused", "rate_limited", "stored", "stored_bytes")}
        rows.append(row)
    base = next((row for row in rows if row["mode"] == "baseline"), None)
    for row in rows:
        if row["mode"] == "flood" and base is not None:
            growth = row["db_growth_mb"] - base["db_growth_mb"]
            ratio = row["others_rate"] / base["others_rate"] if base["others_rate"] and row["others_rate"] else None
            row["verdict"] = {"hostile_growth_mb": growth, "growth_ok": growth < TARGET_GROWTH_MB,
                              "rate_ratio": ratio, "rate_ok": ratio is not None and ratio >= TARGET_RATE}
    return rows


def _f(value, fmt="{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def report(rows: list[dict]) -> None:
    table, notes = [], []
    for r in rows:
        h = r.get("hostile")
        table.append([r["mode"] if r["mode"] == "baseline" else f"flood@{r['max_packet'] // 1024}KiB",
                      f"{r['confirmed']}/{r['devices']}", _f(r["wall_s"]), _f(r["others_rate"], "{:.0f}"),
                      _f(r["db_growth_mb"], "{:.2f}"), f"{r['rss_peak_mib']:.0f} / {r['rss_kept_mib']:+.0f}",
                      _f(r["center_cpu_s"]),
                      _f(r["broker_cpu_s"]),
                      "-" if h is None else "{sent:.0f}: {discarded:.0f}/{refused:.0f}/{rate_limited:.0f}/{stored:.0f}"
                      .format(**h)])
        verdict = r.get("verdict")
        if verdict is not None:
            notes.append(f"broker max {r['max_packet'] // 1024} KiB: hostile device's database growth "
                         f"{verdict['hostile_growth_mb']:.2f} MB (target < {TARGET_GROWTH_MB:g} MB): "
                         f"{'ok' if verdict['growth_ok'] else 'MISSED'}; other devices' ingestion rate "
                         f"{_f(verdict['rate_ratio'], '{:.2f}')}x the baseline (target >= {TARGET_RATE:g}x): "
                         f"{'ok' if verdict['rate_ok'] else 'MISSED'}")
    repeats = max(r["repeats"] for r in rows)
    print_table(f"status flood: one hostile device while a fleet updates (medians of {repeats} run(s))",
                ["run", "confirmed", "wall s", "others' statuses/s", "DB growth MB", "center RSS MiB: peak / kept",
                 "center CPU s", "broker CPU s", "hostile sent: not sent to center/refused/rate-limited/stored"],
                table, notes, left=("run",))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_hostile"]:
        hostile(argv[1])
        return 0
    ap = argparse.ArgumentParser(prog="./run bench flood", description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=1000, help="simulated devices updating")
    ap.add_argument("--hostile-statuses", type=int, default=20000, help="statuses the hostile device publishes")
    ap.add_argument("--reason-kib", type=int, default=60, help="size of the hostile statuses' reasons")
    ap.add_argument("--small-every", type=int, default=10,
                    help="every Nth hostile status is a valid small one (0: none)")
    ap.add_argument("--image-kib", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--db", default="sqlite", choices=("sqlite", "postgres"))
    ap.add_argument("--max-packet", default=f"{MANAGED_MAX_PACKET},{128 * 1024}",
                    help="the broker's max_packet_size, one flood run each (comma-separated)")
    ap.add_argument("--verify", default="cryptography", choices=("cryptography", "pure"))
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--skip-baseline", action="store_true", help="only the run with the hostile device")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each kind, interleaved (medians shown)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    raise_fd_limit()
    packets = [int(v) for v in args.max_packet.split(",") if v]
    runs = (([] if args.skip_baseline else [("baseline", packets[0])]) + [("flood", p) for p in packets]) * args.repeat
    results = []
    with tuned(), tempfile.TemporaryDirectory(prefix="fota-flood-") as tmp:
        for mode, max_packet in runs:
            results.append(run(mode, args, Path(tmp), max_packet))
            log(f"{mode}: {json.dumps({k: v for k, v in results[-1].items() if k != 'sim'})}")
    summary = summarize(results)
    report(summary)
    out = {"host": platform.node(), "python": platform.python_version(), "args": {k: str(v) for k, v in vars(args).items()},
           "summary": summary, "runs": results, "ok": not any("error" in r for r in results)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"JSON: {args.out}")
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
