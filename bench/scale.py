"""Scale: the capacity model (docs/operations.md §4b, bench/capacity.py) checked on a 3-node NATS
cluster, the simulated fleet split over several processes.

    ./run bench scale [--devices 100000] [--processes 8] [--updating-pct 2] [--image-kib 64]
                      [--db postgres] [--statuses 5000] [--idle-s 10] [--connect-rate 50]
                      [--timeout 1800] [--out bench/results/scale.json]

One run, real parts: a 3-node NATS cluster (fota.server.natscluster: JetStream, MQTT listener, one
account per device), the control center in this process (fota.server.center.natsconn) on a fresh
--db store, --devices simulated devices in --processes `fota.sim.run` children (process i connects
its slice to node i mod 3, so the nodes hold equal shares; one MQTT 3.1.1 connection and one
persistent session per device, keepalive 300 s), connecting at --connect-rate a second in all
(each session creates a replicated JetStream consumer; unpaced, creations time out).

First the run checks what bounds the count on this machine and stops, saying why, when --devices
cannot fit: the open-files limit of one process (a node holds the sockets of its third of the
devices; a simulator those of its slice), ephemeral ports to one node's MQTT port
(net.ipv4.ip_local_port_range), and memory (--session-kib, the cluster's resident memory per
session measured by an earlier run, times --devices, against MemAvailable).

1. Sessions: the nodes' VmRSS (summed) before the device accounts, with them, and with every device
   connected -> KiB per account and per connected session; --idle-s seconds of the idle fleet ->
   broker and center CPU per 1,000 held sessions per second.
2. Updates: one deployment of an --image-kib image to --updating-pct % of the devices (spread over
   every simulator process), the rest connected and idle: per device-update, center CPU (its
   threads), broker CPU (the 3 nodes), statuses, chunks, database rows and bytes.
3. Ingestion under load: --statuses QoS 1 statuses (one pipelined paho publisher on node 1, the
   server account) for open jobs of 1,000 extra offline devices: stored per second, center and
   broker CPU per status.
Prints the unit costs next to the model's (docs/operations.md §4b: its measured ranges on one
Mosquitto) with the ratio measured / model (range midpoint), writes JSON, exits 1 when the fleet
does not fit, does not connect, or a deployment is not confirmed.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import select

from bench import fleet
from bench._fleet_cluster import ClusterBroker, add_nats_mqtt_argument
from bench._report import print_table, write_and_judge
from bench.capacity import db_usage
from fota.server import credentials
from fota.server.deployments import create_deployment
from fota.server.releases import create_release
from fota.server.store import Device, Job, Store
from fota.sim.fleet import HARDWARE, device_ids
from fota.sim.run import raise_fd_limit
from fota.testkit.center import CenterThread
from fota.testkit.databases import fresh_database
from fota.tools.gctune import tuned
from fota.tools.keyring import Keyring
from fota.tools.waiting import wait_until

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "scale.json"
FD_RESERVE = 200          # a process's descriptors besides its device sockets (files, routes, listeners)

# The model's unit costs: docs/operations.md §4b, measured by `bench capacity` on one Mosquitto
# (2026-12-05, 2,000 devices, 64 KiB image): (low, high); None where the model has no figure.
MODEL = {
    "broker_rss_kib_per_session": (4.8, 5.1),
    "broker_cpu_ms_per_1000_sessions_s": (0.0, 0.0),
    "center_cpu_ms_per_1000_sessions_s": None,
    "center_cpu_ms_per_status": (0.16, 0.22),
    "broker_cpu_ms_per_status": None,
    "statuses_per_second": (5200, 5200),
    "center_cpu_ms_per_update": (2.0, 2.6),
    "broker_cpu_ms_per_update": (1.4, 1.7),
    "statuses_per_update": (9.3, 10.0),
    "chunks_per_update": (32, 32),
    "db_rows_per_update": (10.3, 11.0),
    "db_bytes_per_update_postgres": (6400, 7000),
    "db_bytes_per_update_sqlite": (2200, 2300),
}


def limits(args) -> dict:
    """What bounds the connection count here (see the module's docstring)."""
    fd = raise_fd_limit()
    lo, hi = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    mem_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemAvailable:"))
    per_node = -(-args.devices // 3)
    per_sim = -(-args.devices // args.processes)
    out = {"fd_limit": fd, "fd_hard": resource.getrlimit(resource.RLIMIT_NOFILE)[1], "ports": hi - lo + 1,
           "mem_available_mib": mem_kib // 1024, "per_node": per_node, "per_sim_process": per_sim,
           "max_by_fd": 3 * (fd - FD_RESERVE), "max_by_ports": 3 * (hi - lo + 1),
           "max_by_memory": int(mem_kib * 0.8 / args.session_kib) if args.session_kib else None}
    why = []
    if per_node > fd - FD_RESERVE:
        why.append(f"{per_node} connections per node > open-files limit {fd} - {FD_RESERVE} "
                   f"(hard limit {out['fd_hard']}: not raisable without CAP_SYS_RESOURCE)")
    if per_sim > fd - FD_RESERVE:
        why.append(f"{per_sim} devices per simulator process > open-files limit {fd} - {FD_RESERVE}: more --processes")
    if per_node > out["ports"]:
        why.append(f"{per_node} connections to one node's port > {out['ports']} ephemeral ports")
    if out["max_by_memory"] is not None and args.devices > out["max_by_memory"]:
        why.append(f"{args.devices} sessions x {args.session_kib} KiB > 80% of {out['mem_available_mib']} MiB available")
    out["refused"] = why
    return out


def provision_bulk(store: Store, ids: list[str]) -> dict[str, str]:
    """fota.sim.provision's rows (fota.server.fleet.provision_device: a Device with its broker
    password's Mosquitto hash, tag sim), inserted 5,000 per transaction instead of one each."""
    passwords = {}
    for i in range(0, len(ids), 5000):
        rows = []
        for dev in ids[i:i + 5000]:
            pw = credentials.new_password()
            passwords[dev] = pw
            rows.append(Device(id=dev, hardware=HARDWARE, tags=["sim"], password_hash=credentials.mosquitto_hash(pw),
                               inventory={}, enc_key=None))
        with store.session() as s:
            s.add_all(rows)
    return passwords


def _online(store: Store) -> int:
    return fleet._online(store)


def start_sims(broker: ClusterBroker, keyring: Keyring, passwords: dict[str, str], args, tmp: Path) -> list:
    """--processes fota.sim.run children, process i on node i mod 3, each pacing its connections
    at --connect-rate / --processes a second; their 'ready' events."""
    ids = list(passwords)
    sims, readies = [], []
    per_rate = args.connect_rate / args.processes
    for i in range(args.processes):
        part = {d: passwords[d] for d in ids[i::args.processes]}
        config = {"host": broker.host, "port": broker.port[i % 3], "root": keyring.root_public().hex(),
                  "trust": keyring.trust(), "passwords": part, "verify": args.verify,
                  "device": {"backend": "hash", "capacity": max(args.image_kib * 1024, 64 * 1024), "keepalive": 300},
                  "connect_batch": 5, "connect_pause": 5 / per_rate, "connect_timeout": args.timeout}
        base = tmp / f"sim-{i}"
        base.with_suffix(".json").write_text(json.dumps(config))
        sims.append(fleet.Child(["-m", "fota.sim.run", str(base.with_suffix(".json"))], base.with_suffix(".log")))
    try:
        for sim in sims:
            readies.append(sim.read_event(args.timeout))
    except BaseException:  # not connected in time: no simulator left running
        for sim in sims:
            sim.stop(timeout=10)
        raise
    return sims, readies


def run(args, tmp: Path) -> dict:
    n = args.devices
    out: dict = {"devices": n, "processes": args.processes}
    broker = ClusterBroker(tmp / "nats", connect_rate=args.connect_rate, mqtt_options=args.nats_mqtt)
    url, drop = fresh_database(args.db, tmp / "scale.db")
    store = Store(url)
    center, sims = None, []
    try:
        with tuned():
            rss0 = broker.rss_kib_now()
            t = time.monotonic()
            ids = device_ids(n)
            passwords = provision_bulk(store, ids)
            out["provision_s"] = time.monotonic() - t
            t = time.monotonic()
            broker.add_users(passwords)
            out["accounts_s"] = time.monotonic() - t
            time.sleep(2.0)
            rss1 = broker.rss_kib_now()
            keyring = Keyring(tmp / "keys")
            keyring.init()
            signer = keyring.signer()
            center = CenterThread(store, broker.server_url, tmp / "blobs", chunk=args.chunk, window=args.window,
                                  signer=signer, keys_update=keyring.keys_update()).start()
            t = time.monotonic()
            sims, readies = start_sims(broker, keyring, passwords, args, tmp)
            out["connect_s"] = time.monotonic() - t
            fleet.log(f"{n} devices connected in {out['connect_s']:.0f}s")
            wait_until(lambda: _online(store) == n, timeout=args.timeout, interval=1.0, what=f"{n} devices online")
            out["sessions_wait_s"] = broker.wait_sessions(n, args.timeout)
            out["online_s"] = time.monotonic() - t
            time.sleep(2.0)
            rss2 = broker.rss_kib_now()
            out["broker_rss_kib"] = {"before": rss0, "accounts": rss1, "connected": rss2}
            out["sim_rss_mib"] = sum(r.get("rss_mib", 0) for r in readies)
            # 1. the idle, connected fleet
            cpu0, b0 = fleet.threads_cpu(), broker.cpu_s()
            time.sleep(args.idle_s)
            out["idle"] = {"seconds": args.idle_s, "center_cpu_s": fleet.threads_cpu_since(cpu0),
                           "broker_cpu_s": broker.cpu_s() - b0}
            # 2. a share updating (every k-th device: each simulator process has some)
            k = max(1, round(100 / args.updating_pct))
            updating = ids[::k]
            rel = create_release(store, tmp / "blobs", signer.key, os.urandom(args.image_kib * 1024), "2.0.0",
                                 ["sim"], kind="image")
            c = center.center
            rows0, bytes0 = db_usage(store, tmp / "scale.db")
            c0 = (c.statuses, c.commands, c.chunks)
            cpu0, b0 = fleet.threads_cpu(), broker.cpu_s()
            t0 = time.monotonic()
            dep = create_deployment(store, rel, device_ids=updating)
            marks = fleet._wait_all_done(store, dep.id, len(updating), t0, args.timeout)
            center_cpu, broker_cpu = fleet.threads_cpu_since(cpu0), broker.cpu_s() - b0
            time.sleep(1.0)
            rows1, bytes1 = db_usage(store, tmp / "scale.db")
            out["update"] = {"devices": len(updating), "image_kib": args.image_kib, "wall_s": marks.get("done"),
                             "confirmed": fleet._count(store, dep.id, ("confirmed",)),
                             "center_cpu_s": center_cpu, "broker_cpu_s": broker_cpu,
                             "statuses": c.statuses - c0[0], "commands": c.commands - c0[1],
                             "chunks": c.chunks - c0[2], "db_rows": rows1 - rows0, "db_bytes": bytes1 - bytes0}
            if out["update"]["confirmed"] != len(updating):
                out["update"]["error"] = f"{out['update']['confirmed']}/{len(updating)} confirmed"
            # 3. ingestion under load: open jobs of offline devices, statuses from a paho publisher
            if args.statuses:
                ing = device_ids(1000, "ing")
                provision_bulk(store, ing)
                dep2 = create_deployment(store, rel, device_ids=ing)
                with store.session() as s:
                    jobs = list(s.execute(select(Job.id, Job.device_id).where(Job.deployment_id == dep2.id)))
                messages = fleet._status_messages(jobs, args.statuses, rel.size)
                base = c.statuses
                cpu0, b0 = fleet.threads_cpu(), broker.cpu_s()
                t1 = fleet._publish_statuses(broker, messages)
                wait_until(lambda: c.statuses - base >= len(messages), timeout=args.timeout, interval=0.05,
                           what=f"{len(messages)} statuses stored")
                wall = time.monotonic() - t1
                out["ingest"] = {"statuses": len(messages), "wall_s": wall, "rate": len(messages) / wall,
                                 "center_cpu_s": fleet.threads_cpu_since(cpu0), "broker_cpu_s": broker.cpu_s() - b0}
            summaries = [s.stop() for s in sims]
            sims = []
            out["sim"] = {"cpu_s": sum((x or {}).get("cpu_s", 0) for x in summaries),
                          "confirmed": sum((x or {}).get("confirmed", 0) for x in summaries),
                          "timeouts": sum((x or {}).get("timeouts", 0) for x in summaries),
                          "refused_subscriptions": sum((x or {}).get("refused_subscriptions", 0) for x in summaries),
                          "errors": [e for x in summaries for e in (x or {}).get("errors", [])][:5]}
            out["broker_peak_rss_mib"] = broker.rss_mib()
            return out
    finally:
        for s in sims:
            s.stop()
        if center is not None:
            center.stop()
        store.dispose()
        drop()
        broker.stop()


def unit_costs(r: dict, db: str) -> dict:
    u: dict = {}
    n = r["devices"]
    rss = r.get("broker_rss_kib") or {}
    if rss:
        u["broker_rss_kib_per_account"] = (rss["accounts"] - rss["before"]) / n
        u["broker_rss_kib_per_session"] = (rss["connected"] - rss["accounts"]) / n
        u["broker_rss_kib_per_session_with_account"] = (rss["connected"] - rss["before"]) / n
    idle = r.get("idle")
    if idle:
        u["broker_cpu_ms_per_1000_sessions_s"] = 1000 * idle["broker_cpu_s"] / idle["seconds"] / (n / 1000)
        u["center_cpu_ms_per_1000_sessions_s"] = 1000 * idle["center_cpu_s"] / idle["seconds"] / (n / 1000)
    up = r.get("update")
    if up and up.get("devices"):
        m = up["devices"]
        u["center_cpu_ms_per_update"] = 1000 * up["center_cpu_s"] / m
        u["broker_cpu_ms_per_update"] = 1000 * up["broker_cpu_s"] / m
        u["statuses_per_update"] = up["statuses"] / m
        u["chunks_per_update"] = up["chunks"] / m
        u["db_rows_per_update"] = up["db_rows"] / m
        u[f"db_bytes_per_update_{db}"] = up["db_bytes"] / m
    ing = r.get("ingest")
    if ing:
        u["center_cpu_ms_per_status"] = 1000 * ing["center_cpu_s"] / ing["statuses"]
        u["broker_cpu_ms_per_status"] = 1000 * ing["broker_cpu_s"] / ing["statuses"]
        u["statuses_per_second"] = ing["rate"]
    return u


ROWS = [  # key, label, format
    ("broker_rss_kib_per_session_with_account", "broker RSS per connected session, account included (3 nodes)", "{:.1f} KiB"),
    ("broker_rss_kib_per_account", "  of which the account (config entry, 3 nodes)", "{:.1f} KiB"),
    ("broker_rss_kib_per_session", "  of which the session and connection", "{:.1f} KiB"),
    ("broker_cpu_ms_per_1000_sessions_s", "broker CPU per 1,000 idle sessions, per second", "{:.2f} ms"),
    ("center_cpu_ms_per_1000_sessions_s", "center CPU per 1,000 idle sessions, per second", "{:.2f} ms"),
    ("center_cpu_ms_per_status", "center CPU per status stored (ingestion under load)", "{:.3f} ms"),
    ("broker_cpu_ms_per_status", "broker CPU per status stored", "{:.3f} ms"),
    ("statuses_per_second", "statuses stored per second, one center", "{:,.0f}"),
    ("center_cpu_ms_per_update", "center CPU per device-update (whole)", "{:.2f} ms"),
    ("broker_cpu_ms_per_update", "broker CPU per device-update (3 nodes)", "{:.2f} ms"),
    ("statuses_per_update", "statuses per device-update", "{:.1f}"),
    ("chunks_per_update", "chunks per device-update", "{:.1f}"),
    ("db_rows_per_update", "database rows per device-update", "{:.1f}"),
    ("db_bytes_per_update_postgres", "database bytes per device-update (PostgreSQL)", "{:,.0f}"),
    ("db_bytes_per_update_sqlite", "database bytes per device-update (SQLite)", "{:,.0f}"),
]


def comparison(units: dict) -> list[dict]:
    """Each measured unit with the model's range (None where the model has no figure) and the
    ratio measured / the range's midpoint. The session row with its account is the one the model's
    "broker memory per connected session" means (Mosquitto's, account and ACL entry included)."""
    model_of = {"broker_rss_kib_per_session_with_account": "broker_rss_kib_per_session",
                "broker_rss_kib_per_session": None}
    out = []
    for key, label, fmt in ROWS:
        if key not in units:
            continue
        mk = model_of.get(key, key)
        model = MODEL.get(mk) if mk else None
        mid = (model[0] + model[1]) / 2 if model else None
        out.append({"key": key, "label": label, "measured": units[key], "model": model,
                    "ratio": units[key] / mid if mid else None, "fmt": fmt})
    return out


def render(result: dict) -> None:
    cfg, r = result["config"], result.get("run") or {}
    rows = []
    for c in result.get("comparison", []):
        model = c["model"]
        m = "-" if model is None else (c["fmt"].format(model[0]) if model[0] == model[1]
                                        else f"{c['fmt'].format(model[0])} – {c['fmt'].format(model[1])}")
        rows.append([c["label"], c["fmt"].format(c["measured"]), m,
                     "-" if c["ratio"] is None else f"{c['ratio']:.1f}"])
    up = r.get("update") or {}
    if rows:
        print_table(f"unit costs at {cfg['devices']:,} devices on a 3-node NATS cluster ({cfg['processes']} simulator "
                    f"processes, {up.get('devices', '-')} updating a {cfg['image_kib']} KiB image, {cfg['db']}, "
                    f"{result['env']['date']}) against the model (one Mosquitto, docs/operations.md §4b)",
                    ["unit", "measured", "model", "ratio"], rows, left=("unit",))
    lim = result.get("limits") or {}
    print(f"  limits: open files {lim.get('fd_limit')} per process (hard {lim.get('fd_hard')}), "
          f"{lim.get('ports')} ephemeral ports per destination, {lim.get('mem_available_mib')} MiB available; "
          f"max connections by open files {lim.get('max_by_fd')}, by ports {lim.get('max_by_ports')}, "
          f"by memory {lim.get('max_by_memory')}")
    if r:
        print(f"  connect {r.get('connect_s', 0):.0f} s, all sessions {r.get('online_s', 0):.0f} s; broker RSS "
              f"{r.get('broker_rss_kib')} KiB (before / accounts / connected), peak {r.get('broker_peak_rss_mib', 0):.0f} MiB; "
              f"simulators {r.get('sim_rss_mib', 0):.0f} MiB; update wall {up.get('wall_s')} s, "
              f"{up.get('confirmed')}/{up.get('devices')} confirmed")


def failures(result: dict) -> list[str]:
    out = [f"does not fit: {w}" for w in (result.get("limits") or {}).get("refused", [])]
    r = result.get("run") or {}
    if r.get("error"):
        out.append(r["error"])
    if (r.get("update") or {}).get("error"):
        out.append(f"update: {r['update']['error']}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="./run bench scale", description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=100000)
    ap.add_argument("--processes", type=int, default=8, help="simulator processes (each a slice of the fleet)")
    ap.add_argument("--updating-pct", type=float, default=2.0, help="share of the fleet in the deployment, %%")
    ap.add_argument("--image-kib", type=int, default=64)
    ap.add_argument("--db", default="postgres", choices=("sqlite", "postgres"))
    ap.add_argument("--statuses", type=int, default=5000, help="statuses of the ingestion run (0 skips it)")
    ap.add_argument("--idle-s", type=float, default=10.0)
    ap.add_argument("--connect-rate", type=float, default=50.0, help="device connections a second, all processes")
    ap.add_argument("--session-kib", type=float, default=0.0,
                    help="cluster RSS per session from an earlier run, for the memory check (0: no check)")
    add_nats_mqtt_argument(ap)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--verify", default="cryptography", choices=("cryptography", "pure"))
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    result = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "env": {"python": platform.python_version(), "cpus": os.cpu_count(),
                      "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}}
    result["limits"] = limits(args)
    if not result["limits"]["refused"]:
        with tempfile.TemporaryDirectory(prefix="fota-bench-scale-") as name:
            try:
                result["run"] = run(args, Path(name))
            except Exception as e:
                result["run"] = {"error": f"{type(e).__name__}: {e}"}
        units = unit_costs(result["run"], args.db) if not result["run"].get("error") else {}
        result["units"] = units
        result["comparison"] = comparison(units)
    return write_and_judge(result, args.out, render, failures)


if __name__ == "__main__":
    sys.exit(main())
