"""Flood benchmark: one hostile device floods statuses while a simulated fleet updates.

    ./run bench flood [--devices 1000] [--hostile-statuses 20000] [--reason-kib 60] [--small-every 10]
                      [--image-kib 16] [--db sqlite] [--max-packet 131072] [--timeout 900]
                      [--out bench/results/flood.json]

Two runs, each on a fresh Mosquitto, database and control center (in this process): a deployment
of an --image-kib release to --devices simulated devices (fota.sim, one child process), once
alone ("baseline") and once while a hostile device (its own broker account, a paho client in a
child process) publishes --hostile-statuses QoS 1 statuses as fast as the broker takes them:
every one with a --reason-kib reason except every --small-every-th, a valid small status (those
meet the device's rate limit). Reported per run: database growth (file + WAL on SQLite,
pg_database_size on PostgreSQL) from before the deployment to the end, the control center's RSS
(this process) before, peak and after, the other devices' ingestion rate (their statuses stored
per second of the deployment), the deployment's wall time, this process's CPU time (the center),
and what became of the hostile device's statuses: not sent to the center by the broker (over the
center's MQTT 5 Maximum Packet Size, 16 KiB), refused at parsing, rate-limited, stored.

The broker takes packets up to --max-packet bytes (default 128 KiB: an external broker that
lets the 60 KB statuses through, so the center's own limits are what is measured; `fota serve`'s
managed broker takes 16 KiB, fota.server.broker.MANAGED_MAX_PACKET, and disconnects the flooder).

Targets: the hostile device adds under 5 MB to the database (flood growth - baseline growth),
and the other devices' ingestion rate stays within 20 % of the baseline. A run whose jobs are
not all confirmed exits 1; a missed target is a verdict (printed, and in the JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

from sqlalchemy import func, select, text

from bench._fleet import CenterThread
from bench._report import print_table
from bench.fleet import Broker, Child, _count, _database, _start_sim, _wait_all_done, log
from fota.device import protocol as P
from fota.server.deployments import create_deployment
from fota.server.fleet import provision_device
from fota.server.releases import create_release
from fota.server.store import StatusEvent, Store
from fota.sim.fleet import device_ids, provision
from fota.sim.run import raise_fd_limit
from fota.tools.gctune import tuned
from fota.tools.keyring import Keyring

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


# ------------------------------------------------------------------------ the hostile device

def hostile(config_path: str) -> None:
    """(child process) publish the flood as one device; print {"event": "done", ...}."""
    import paho.mqtt.client as mqtt
    cfg = json.loads(Path(config_path).read_text())
    big = "x" * (cfg["reason_kib"] * 1024)
    acked = disconnects = 0
    connected = threading.Event()

    def on_connect(client, userdata, flags, reason_code, properties):
        if not reason_code.is_failure:
            connected.set()

    def on_disconnect(client, userdata, flags, reason_code, properties):
        nonlocal disconnects
        disconnects += 1
        connected.clear()

    def on_publish(client, userdata, mid, reason_code, properties):
        nonlocal acked
        acked += 1

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=HOSTILE)
    client.username_pw_set(HOSTILE, cfg["password"])
    client.max_inflight_messages_set(cfg["inflight"])
    client.max_queued_messages_set(cfg["inflight"])
    client.on_connect, client.on_disconnect, client.on_publish = on_connect, on_disconnect, on_publish
    client.reconnect_delay_set(0.05, 0.5)
    client.connect(cfg["host"], cfg["port"], keepalive=60)
    client.loop_start()
    connected.wait(10)
    print(json.dumps({"event": "ready"}), flush=True)
    sys.stdin.readline()  # "go"
    t0 = time.monotonic()
    sent = 0
    topic = P.topic(HOSTILE, P.STATUS)
    # encoded once: the attacker's CPU is the bench machine's too
    head = {reason: json.dumps({"job": None, "state": P.HEALTH, "ok": True, "reason": reason, "uptime": 1,
                                "version": "1.0.0", "boot": 1})[:-1].encode() + b', "seq": '
            for reason in ("flood", big)}
    for seq in range(1, cfg["statuses"] + 1):
        small = cfg["small_every"] and seq % cfg["small_every"] == 0
        payload = head["flood" if small else big] + str(seq).encode() + b"}"
        while True:
            connected.wait()
            info = client.publish(topic, payload, qos=1)
            if info.rc == mqtt.MQTT_ERR_SUCCESS:
                sent += 1
                break
            time.sleep(0.001)  # queue full (in flight) or disconnected: wait for PUBACKs
    deadline = time.monotonic() + cfg["drain_s"]
    while acked < sent and time.monotonic() < deadline:
        time.sleep(0.05)
    wall = time.monotonic() - t0
    client.disconnect()
    client.loop_stop()
    print(json.dumps({"event": "done", "sent": sent, "acked": acked, "disconnects": disconnects,
                      "wall_s": wall}), flush=True)


# ------------------------------------------------------------------------------------- a run

def run(mode: str, args, tmp: Path) -> dict:
    broker = Broker(tmp / f"mosquitto-{mode}", max_packet_size=args.max_packet)
    url, drop = _database(args.db, tmp / f"{mode}.db")
    store = Store(url)
    keyring = Keyring(tmp / f"keys-{mode}")
    keyring.init()
    signer = keyring.signer()
    center = sim = attacker = None
    try:
        n = args.devices
        ids = device_ids(n, "fld")
        passwords = provision(store, ids)
        broker.add_users(passwords)
        center = CenterThread(store, broker.server_url, tmp / "blobs", chunk=args.chunk, window=args.window,
                              signer=signer, keys_update=keyring.keys_update()).start()
        sim, ready = _start_sim(tmp / f"sim-{mode}", broker, keyring, passwords, store, args)
        log(f"{mode}: {n} simulated devices connected in {ready['connect_s']:.1f}s")
        if mode == "flood":
            _, password = provision_device(store, HOSTILE, "sim")
            broker.add_users({HOSTILE: password})
            cfg = tmp / "hostile.json"
            cfg.write_text(json.dumps({"host": broker.host, "port": broker.port, "password": password,
                                       "statuses": args.hostile_statuses, "reason_kib": args.reason_kib,
                                       "small_every": args.small_every, "inflight": 100,
                                       "drain_s": args.timeout}))
            attacker = Child(["-m", "bench.flood", "_hostile", str(cfg)], tmp / "hostile.log")
            attacker.read_event(60)
        rel = create_release(store, tmp / "blobs", signer.key, os.urandom(args.image_kib * 1024), "2.0.0",
                             ["sim"], kind="image")
        c = center.center
        time.sleep(1.0)  # the health reports of the connects stored
        size0, others0, rss0 = db_bytes(store, url), _statuses(store, False), rss_mib()
        c0 = (c.refused, c.rate_limited)
        cpu0 = time.process_time()
        with RssSampler() as rss:
            t0 = time.monotonic()
            if attacker is not None:
                attacker.proc.stdin.write("go\n")
                attacker.proc.stdin.flush()
            dep = create_deployment(store, rel, device_ids=ids)
            marks = _wait_all_done(store, dep.id, n, t0, args.timeout)
            wall = marks.get("done")
            flood = attacker.read_event(args.timeout) if attacker is not None else None
            if flood is not None:
                _settle(lambda: (c.refused, c.rate_limited, _statuses(store, True)))
        cpu = time.process_time() - cpu0
        others = _statuses(store, False) - others0
        confirmed = _count(store, dep.id, ("confirmed",))
        result = {
            "mode": mode, "devices": n, "db": args.db, "wall_s": wall, "confirmed": confirmed,
            "others_statuses": others, "others_rate": others / wall if wall else None,
            "db_growth_mb": (db_bytes(store, url) - size0) / 1e6,
            "rss_mib": {"before": rss0, "peak": rss.peak, "after": rss_mib()},
            "center_cpu_s": cpu,
            "hostile": None,
        }
        if flood is not None:
            hostile = {**{k: v for k, v in flood.items() if k != "event"},
                       "stored": _statuses(store, True), "refused": c.refused - c0[0],
                       "rate_limited": c.rate_limited - c0[1]}
            # discarded by the broker: over the center's MQTT 5 Maximum Packet Size (or the broker's)
            hostile["discarded"] = hostile["sent"] - hostile["stored"] - hostile["refused"] - hostile["rate_limited"]
            result["hostile"] = hostile
        result["sim"] = sim.stop()
        sim = None
        if wall is None:
            result["error"] = f"not all confirmed within {args.timeout}s ({confirmed}/{n})"
        return result
    finally:
        if attacker is not None:
            attacker.stop(5)
        if sim is not None:
            sim.stop()
        if center is not None:
            center.stop()
        store.dispose()
        drop()
        broker.stop()


def verdicts(base: dict, flood: dict) -> dict:
    growth = flood["db_growth_mb"] - base["db_growth_mb"]
    ratio = (flood["others_rate"] / base["others_rate"]) if base.get("others_rate") and flood.get("others_rate") \
        else None
    return {"hostile_growth_mb": growth, "growth_ok": growth < TARGET_GROWTH_MB,
            "rate_ratio": ratio, "rate_ok": ratio is not None and ratio >= TARGET_RATE}


def _f(value, fmt="{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def report(results: list[dict], verdict: dict | None) -> None:
    rows = []
    for r in results:
        h = r.get("hostile") or {}
        rows.append([r["mode"], r["devices"], f"{r['confirmed']}/{r['devices']}", _f(r["wall_s"]),
                     _f(r["others_rate"], "{:.0f}"), _f(r["db_growth_mb"], "{:.2f}"),
                     f"{r['rss_mib']['before']:.0f} / {r['rss_mib']['peak']:.0f} / {r['rss_mib']['after']:.0f}",
                     _f(r["center_cpu_s"]), h.get("sent", "-"), h.get("discarded", "-"), h.get("refused", "-"),
                     h.get("rate_limited", "-"), h.get("stored", "-")])
    notes = []
    if verdict is not None:
        notes.append(f"hostile device's database growth: {verdict['hostile_growth_mb']:.2f} MB "
                     f"(target < {TARGET_GROWTH_MB:g} MB): {'ok' if verdict['growth_ok'] else 'MISSED'}")
        notes.append(f"other devices' ingestion rate: {_f(verdict['rate_ratio'], '{:.2f}')}x the baseline "
                     f"(target >= {TARGET_RATE:g}x): {'ok' if verdict['rate_ok'] else 'MISSED'}")
    print_table("status flood: one hostile device while a fleet updates",
                ["run", "devices", "confirmed", "wall s", "others' statuses/s", "DB growth MB",
                 "center RSS MiB (before/peak/after)", "center CPU s", "hostile sent", "not sent to center",
                 "refused", "rate-limited", "stored"],
                rows, notes, left=("run",))


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
    ap.add_argument("--max-packet", type=int, default=128 * 1024, help="the broker's max_packet_size")
    ap.add_argument("--verify", default="cryptography", choices=("cryptography", "pure"))
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--skip-baseline", action="store_true", help="only the run with the hostile device")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    raise_fd_limit()
    results = []
    with tuned(), tempfile.TemporaryDirectory(prefix="fota-flood-") as tmp:
        for mode in (("flood",) if args.skip_baseline else ("baseline", "flood")):
            results.append(run(mode, args, Path(tmp)))
            log(f"{mode}: {json.dumps({k: v for k, v in results[-1].items() if k != 'sim'})}")
    base = next((r for r in results if r["mode"] == "baseline"), None)
    verdict = verdicts(base, results[-1]) if base is not None else None
    report(results, verdict)
    out = {"host": platform.node(), "python": platform.python_version(), "args": {k: str(v) for k, v in vars(args).items()},
           "runs": results, "verdict": verdict, "ok": not any("error" in r for r in results)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"JSON: {args.out}")
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
