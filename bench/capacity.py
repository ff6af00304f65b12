"""Capacity: the per-unit costs a fleet of a million devices is sized from, measured on this machine.

    ./run bench capacity [--devices 2000] [--image-kib 64] [--db sqlite|postgres] [--statuses 10000]
                         [--ranges 2000] [--range-kib 64] [--idle-s 5] [--chunk 2048] [--window 8] [--timeout 600]
                         [--out bench/results/capacity.json]

One run, real parts (bench/fleet.py's rig: an authenticated Mosquitto, the ControlCenter in this
process on a fresh --db store, --devices simulated devices in a child process):

1. Sessions: Mosquitto's VmRSS before the fleet's accounts and connections and once every device
   is online -> KiB per connected session (account and ACL entry included); then --idle-s seconds
   of the connected, idle fleet -> broker and center CPU per 1,000 held sessions per second.
2. Updates: after a warm-up deployment (not counted), two deployments to every device, an image of --image-kib / 4 then one of --image-kib:
   per device-update, center CPU (its threads), broker CPU, statuses, chunks, bytes published,
   database rows and bytes (SQLite: the file after a WAL checkpoint; PostgreSQL: the tables'
   pg_total_relation_size). The difference between the two deployments gives the marginal cost
   of 1,000 chunks (center and broker CPU; the center's part net of its extra statuses).
3. Ingestion: bench/fleet.py's ingestion run (--statuses QoS 1 statuses, same --db): center CPU
   per 1,000 statuses stored.
4. Transport http: the blob route (fota.server.blobhttp) on uvicorn, --ranges GETs of --range-kib
   for open jobs: server CPU per GET and per MiB.

Prints the unit costs, writes JSON, exits 1 when a deployment is not confirmed or a step raises.
The model built on these figures: docs/operations.md (capacity model).
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import inspect, text

from bench import fleet
from bench._report import print_table, write_and_judge
from fota.server.deployments import create_deployment
from fota.server.releases import create_release
from fota.sim.fleet import device_ids
from fota.sim.run import raise_fd_limit
from fota.tools.gctune import tuned

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "capacity.json"


def vm_rss_kib(pid: int) -> int:
    """Resident memory of a process now (VmRSS), KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def db_usage(store, sqlite_file: Path) -> tuple[int, int]:
    """(rows in all tables, bytes the database takes): SQLite's file after a WAL checkpoint, or the
    sum of PostgreSQL's pg_total_relation_size (indexes and TOAST included) over the tables."""
    tables = inspect(store.engine).get_table_names()
    with store.engine.begin() as conn:
        rows = sum(conn.execute(text(f'SELECT count(*) FROM "{t}"')).scalar() for t in tables)
        if store.engine.dialect.name == "sqlite":
            conn.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
            return rows, sqlite_file.stat().st_size
        size = sum(conn.execute(text("SELECT pg_total_relation_size(:t)"), {"t": t}).scalar() for t in tables)
    return rows, size


def deploy_once(rig, kib: int, version: str, tmp: Path, sqlite_file: Path, args) -> dict:
    """One deployment of a fresh kib-KiB image to the rig's fleet; its costs."""
    n = len(rig.ids)
    rel = create_release(rig.store, tmp / "blobs", rig.signer.key, os.urandom(kib * 1024), version, ["sim"],
                         kind="image")
    c = rig.center.center
    rows0, bytes0 = db_usage(rig.store, sqlite_file)
    c0 = (c.statuses, c.commands, c.chunks, c.bytes_published)
    cpu0, broker0 = fleet.threads_cpu(), rig.broker.cpu_s()
    t0 = time.monotonic()
    dep = create_deployment(rig.store, rel, device_ids=rig.ids)
    marks = fleet._wait_all_done(rig.store, dep.id, n, t0, args.timeout)
    center_cpu, broker_cpu = fleet.threads_cpu_since(cpu0), rig.broker.cpu_s() - broker0
    time.sleep(1.0)  # the last statuses' writes
    rows1, bytes1 = db_usage(rig.store, sqlite_file)
    out = {"image_kib": kib, "wall_s": marks.get("done"), "confirmed": fleet._count(rig.store, dep.id, ("confirmed",)),
           "center_cpu_s": center_cpu, "broker_cpu_s": broker_cpu,
           "statuses": c.statuses - c0[0], "commands": c.commands - c0[1], "chunks": c.chunks - c0[2],
           "bytes_published": c.bytes_published - c0[3], "db_rows": rows1 - rows0, "db_bytes": bytes1 - bytes0}
    if out["confirmed"] != n:
        out["error"] = f"{out['confirmed']}/{n} confirmed within {args.timeout:.0f}s"
    return out


def sessions_and_updates(args, tmp: Path) -> dict:
    broker = fleet.Broker(tmp / "mosquitto")
    rss0 = vm_rss_kib(broker.mosquitto.proc.pid)
    n = args.devices
    sqlite_file = tmp / "capacity.db"
    with tuned(), fleet.deploy_rig(broker, args.db, sqlite_file, tmp / "keys", tmp / "sim", tmp, device_ids(n),
                                   args) as rig:
        rss1 = vm_rss_kib(broker.mosquitto.proc.pid)
        cpu0, broker0 = fleet.threads_cpu(), broker.cpu_s()
        time.sleep(args.idle_s)
        idle = {"seconds": args.idle_s, "center_cpu_s": fleet.threads_cpu_since(cpu0),
                "broker_cpu_s": broker.cpu_s() - broker0}
        # a first deployment warms the center up (caches, first-use costs); not counted
        warm = deploy_once(rig, 4, "1.9.0", tmp, sqlite_file, args)
        small = deploy_once(rig, max(4, args.image_kib // 4), "2.0.0", tmp, sqlite_file, args)
        full = deploy_once(rig, args.image_kib, "2.1.0", tmp, sqlite_file, args)
        sim = rig.stop_sim()
    return {"devices": n, "broker_rss_kib": {"before": rss0, "connected": rss1}, "idle": idle,
            "connect_s": rig.ready.get("connect_s"), "sim_ready_rss_mib": rig.ready.get("rss_mib"),
            "sim_cpu_s": (sim or {}).get("cpu_s"), "warmup": warm, "deploy": [small, full]}


def http_ranges(args, tmp: Path) -> dict:
    """The control center's blob route (transport http) on uvicorn in this process: --ranges ranged
    GETs of --range-kib (the device's segment) over keep-alive, from this process's main thread
    (not counted), for open jobs of 20 devices; the CPU of the server's threads."""
    import httpx
    from fastapi import FastAPI

    from fota.server import blobhttp
    from fota.server.payloadurls import sign_url
    from fota.sim.fleet import provision
    from fota.testkit.appserver import AppServer
    from fota.testkit.databases import fresh_database
    from fota.server.store import Store
    from fota.tools.signing import generate_private_key

    url, drop = fresh_database(args.db, tmp / "http.db")
    store = Store(url)
    server = None
    try:
        ids = device_ids(20, "http")
        provision(store, ids)
        size = args.image_kib * 1024
        rel = create_release(store, tmp / "blobs", generate_private_key(), os.urandom(size), "2.0.0", ["sim"],
                             kind="image")
        dep = create_deployment(store, rel, device_ids=ids)  # the devices stay offline: the jobs stay open
        key = os.urandom(32)
        app = FastAPI()
        blobhttp.mount(app, store, tmp / "blobs", key)
        server = AppServer(app).start()
        exp = int(time.time()) + 3600
        urls = [sign_url(server.url, key, j.device_id, j.id, rel.sha256, exp) for j in dep.jobs]
        seg = min(args.range_kib * 1024, size)
        starts = list(range(0, size, seg))
        with httpx.Client(timeout=30) as client:
            client.get(urls[0], headers={"Range": "bytes=0-0"}).raise_for_status()  # connection, first-use costs
            cpu0, t0 = fleet.threads_cpu(), time.monotonic()
            served = 0
            for i in range(args.ranges):
                first = starts[i % len(starts)]
                r = client.get(urls[i % len(urls)], headers={"Range": f"bytes={first}-{first + seg - 1}"})
                if r.status_code != 206:
                    raise RuntimeError(f"blob route answered {r.status_code}: {r.text[:100]}")
                served += len(r.content)
            cpu, wall = fleet.threads_cpu_since(cpu0), time.monotonic() - t0
        return {"ranges": args.ranges, "range_bytes": seg, "bytes": served, "server_cpu_s": cpu, "wall_s": wall}
    finally:
        if server is not None:
            server.stop()
        store.dispose()
        drop()


def unit_costs(r: dict) -> dict:
    """The per-unit figures from a run's raw measurements (None where a part failed)."""
    s, ing = r.get("sessions") or {}, r.get("ingest") or {}
    u: dict = {}
    if ing.get("center_cpu_s") is not None and ing.get("statuses"):
        u["center_cpu_ms_per_status"] = 1000 * ing["center_cpu_s"] / ing["statuses"]
    h = r.get("http") or {}
    if h.get("server_cpu_s") is not None:
        u["http_cpu_ms_per_range"] = 1000 * h["server_cpu_s"] / h["ranges"]
        u["http_cpu_ms_per_mib"] = 1000 * h["server_cpu_s"] / (h["bytes"] / 2**20)
    if s:
        n = s["devices"]
        u["broker_rss_kib_per_session"] = (s["broker_rss_kib"]["connected"] - s["broker_rss_kib"]["before"]) / n
        idle = s["idle"]
        u["broker_cpu_ms_per_1000_sessions_s"] = 1000 * idle["broker_cpu_s"] / idle["seconds"] / (n / 1000)
        u["center_cpu_ms_per_1000_sessions_s"] = 1000 * idle["center_cpu_s"] / idle["seconds"] / (n / 1000)
        small, full = s["deploy"]
        for key in ("statuses", "commands", "chunks", "bytes_published", "db_rows", "db_bytes", "center_cpu_s",
                    "broker_cpu_s"):
            u[f"{key}_per_update"] = full[key] / n
        u["per_update_image_kib"] = full["image_kib"]
        d_chunks = full["chunks"] - small["chunks"]
        if d_chunks > 0:
            d_status = full["statuses"] - small["statuses"]
            status_ms = u.get("center_cpu_ms_per_status", 0.0)
            u["center_cpu_ms_per_1000_chunks"] = (1000 * (full["center_cpu_s"] - small["center_cpu_s"])
                                                  - d_status * status_ms) / d_chunks * 1000
            u["broker_cpu_ms_per_1000_chunks"] = 1000 * (full["broker_cpu_s"] - small["broker_cpu_s"]) / d_chunks * 1000
        # what a device-update costs the center apart from its chunks: command (signing), claims, statuses
        if "center_cpu_ms_per_1000_chunks" in u:
            u["center_cpu_ms_per_update_besides_chunks"] = (1000 * u["center_cpu_s_per_update"]
                                                            - u["chunks_per_update"] * u["center_cpu_ms_per_1000_chunks"] / 1000)
    return u


ROWS = [  # (key, label, format)
    ("center_cpu_ms_per_status", "center CPU per status stored (ingestion run)", "{:.3f} ms"),
    ("center_cpu_ms_per_1000_chunks", "center CPU per 1,000 chunks served (marginal)", "{:.0f} ms"),
    ("broker_cpu_ms_per_1000_chunks", "broker CPU per 1,000 chunks (marginal)", "{:.0f} ms"),
    ("http_cpu_ms_per_range", "blob route CPU per ranged GET (transport http)", "{:.2f} ms"),
    ("http_cpu_ms_per_mib", "blob route CPU per MiB served", "{:.2f} ms"),
    ("center_cpu_s_per_update", "center CPU per device-update (whole)", "{:.4f} s"),
    ("center_cpu_ms_per_update_besides_chunks", "  of which besides chunks (command, claims, statuses)", "{:.2f} ms"),
    ("broker_cpu_s_per_update", "broker CPU per device-update", "{:.4f} s"),
    ("statuses_per_update", "statuses per device-update", "{:.1f}"),
    ("chunks_per_update", "chunks per device-update", "{:.1f}"),
    ("bytes_published_per_update", "bytes published by the center per device-update", "{:,.0f}"),
    ("db_rows_per_update", "database rows per device-update", "{:.1f}"),
    ("db_bytes_per_update", "database bytes per device-update", "{:,.0f}"),
    ("broker_rss_kib_per_session", "broker RSS per connected session", "{:.1f} KiB"),
    ("broker_cpu_ms_per_1000_sessions_s", "broker CPU per 1,000 idle sessions, per second", "{:.2f} ms"),
    ("center_cpu_ms_per_1000_sessions_s", "center CPU per 1,000 idle sessions, per second", "{:.2f} ms"),
]


def render(result: dict) -> None:
    u = result["units"]
    cfg = result["config"]
    print_table(f"unit costs ({cfg['devices']} simulated devices, {cfg['image_kib']} KiB image, {cfg['db']}, "
                f"{result['env']['date']})", ["unit", "value"],
                [[label, fmt.format(u[key]) if u.get(key) is not None else "-"] for key, label, fmt in ROWS],
                left=("unit",))
    for d in (result.get("sessions") or {}).get("deploy", []):
        print(f"  deployment {d['image_kib']} KiB: wall {d['wall_s']} s, {d['confirmed']} confirmed, "
              f"center CPU {d['center_cpu_s']:.2f} s, broker CPU {d['broker_cpu_s']:.2f} s, "
              f"{d['chunks']} chunks, {d['statuses']} statuses, +{d['db_rows']} rows, +{d['db_bytes']:,} bytes")


def failures(result: dict) -> list[str]:
    out = [f"{part}: {result[part]['error']}" for part in ("sessions", "ingest", "http") if (result.get(part) or {}).get("error")]
    s = result.get("sessions") or {}
    for d in [s["warmup"]] * ("warmup" in s) + s.get("deploy", []):
        if d.get("error"):
            out.append(f"deployment {d['image_kib']} KiB: {d['error']}")
    if not out:
        out += [f"unit not measured: {key}" for key, _, _ in ROWS if result["units"].get(key) is None]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="./run bench capacity", description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=2000, help="simulated devices (sessions, deployments)")
    ap.add_argument("--image-kib", type=int, default=64, help="the larger deployment's image; the smaller is 1/4")
    ap.add_argument("--db", default="sqlite", choices=("sqlite", "postgres"))
    ap.add_argument("--statuses", type=int, default=10000, help="statuses of the ingestion run")
    ap.add_argument("--ingest-devices", type=int, default=1000)
    ap.add_argument("--ranges", type=int, default=2000, help="ranged GETs to the blob route")
    ap.add_argument("--range-kib", type=int, default=64, help="bytes per GET (the device's segment, 64 KiB)")
    ap.add_argument("--idle-s", type=float, default=5.0, help="seconds the connected fleet is left idle")
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--verify", default="cryptography", choices=("cryptography", "pure"))
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    raise_fd_limit()
    result = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "env": {"python": platform.python_version(), "cpus": os.cpu_count(),
                      "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}}
    with tempfile.TemporaryDirectory(prefix="fota-bench-capacity-") as name:
        tmp = Path(name)
        try:
            result["sessions"] = sessions_and_updates(args, tmp)
        except Exception as e:  # one failed part does not end the run
            result["sessions"] = {"error": f"{type(e).__name__}: {e}"}
        result["ingest"] = fleet._guarded(fleet.ingest_run, args.db, args, tmp, record={"db": args.db})
        result["http"] = fleet._guarded(http_ranges, args, tmp, record={})
    result["units"] = unit_costs(result) if not (result["sessions"].get("error")) else {}
    return write_and_judge(result, args.out, render, failures)


if __name__ == "__main__":
    sys.exit(main())
