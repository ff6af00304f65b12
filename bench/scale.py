"""Scale: the capacity model (docs/operations.md §4b, bench/capacity.py) checked at scale, the
simulated fleet split over several processes, most devices asleep (a persistent session, no
connection), a share awake and idle, a share updating.

    ./run bench scale [--broker mosquitto|nats] [--devices 100000] [--awake-pct 10] [--wakers 100]
                      [--processes 8] [--updating-pct 2] [--image-kib 64] [--db postgres]
                      [--statuses 5000] [--idle-s 10] [--connect-rate 200] [--persistence]
                      [--timeout 1800] [--out bench/results/scale.json]

One run, real parts: the broker (--broker mosquitto: fota's authenticated Mosquitto, one account
per device, sessions in memory, or saved to disk every 2 s with --persistence as `fota serve`'s
managed broker does; --broker nats: a 3-node NATS cluster, fota.server.natscluster, JetStream
and its MQTT listener), the control center in this process on a fresh --db store, and --devices
simulated devices (fota.sim) in `fota.sim.run` children, each device with one MQTT 3.1.1
persistent session (clean_session false, its cmd subscription at QoS 1, keepalive 300 s). The
fleet comes in three groups, each in simulator processes of its own (a NATS node per process,
i mod 3):

- sleepers (all but the awake share and the wakers): each connects once, creating its session,
  then naps for good (fota.sim's FailurePlan.sleepy: right after its first connection, as a board
  before its deep sleep, its retained `online 0` and a clean DISCONNECT; the broker keeps the
  session, the center shows it offline and would hold its jobs);
- awake (--awake-pct % of --devices): connected and idle, --updating-pct % of the fleet among them;
- wakers (--wakers, taken from the sleeping share): asleep when the deployment starts, in it, and
  awake --wake-s seconds after their nap: the center held their job until their `online 1` was
  back, and sent it then (the broker queued nothing for them).

Connections are paced at --connect-rate a second in all (a NATS session creates a replicated
JetStream consumer; unpaced, creations time out; a sleeper's connect and disconnect churn
ephemeral ports through TIME_WAIT).

First the run checks what bounds the count on this machine and stops, saying why, when --devices
cannot fit: the open-files limit of one process (the broker holds the awake devices' sockets, a
NATS node a third of them, a simulator process its slice's), ephemeral ports to one port (the
awake connections, plus a minute of sleepers' connections in TIME_WAIT), and memory
(--session-kib, the broker's resident memory per session measured by an earlier run, times
--devices, against MemAvailable).

1. Sessions: the broker's VmRSS (NATS: summed over the nodes) before the device accounts, with
   them, with every sleeper's session (no connection), and with the awake share connected -> KiB
   per account, per sleeping session, per connected session; broker and center CPU per session
   created (connect, subscribe, online and inventory, online 0, disconnect); then --idle-s seconds of the
   fleet as it is -> broker and center CPU per 1,000 awake (connected, idle) devices per second.
2. Updates: one deployment of an --image-kib image to --updating-pct % of the devices (awake,
   spread over the awake processes) and the wakers: per device-update, center CPU (its threads),
   broker CPU, statuses, chunks, database rows and bytes; the wakers' confirmations.
3. Ingestion under load: --statuses QoS 1 statuses (one pipelined paho publisher in this
   process, the server account) for open jobs of 1,000 extra offline devices: stored per second
   next to the publisher's offered rate, center and broker CPU per status, who was busy over the
   wall (bench/_ingest_probe.py); then (unless --no-drain) as many queued in the stopped center's
   session and drained by a new center: its rate with no publisher beside it.
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

from sqlalchemy import func, select

from bench import fleet
from bench._fleet_cluster import BROKERS, add_nats_mqtt_argument, make_broker
from bench._ingest_probe import IngestProbe, print_split
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


def group_sizes(args) -> dict[str, int]:
    """Devices per group: sleepers, wakers (asleep at the deployment, awake --wake-s seconds
    after their nap), awake (connected all along)."""
    a = min(args.devices, round(args.devices * args.awake_pct / 100))
    w = min(args.wakers, args.devices - a)
    return {"sleepers": args.devices - a - w, "wakers": w, "awake": a}


def groups(args) -> dict[str, list[str]]:
    """The fleet's ids by group (group_sizes)."""
    ids, out, i = device_ids(args.devices), {}, 0
    for name, size in group_sizes(args).items():
        out[name], i = ids[i:i + size], i + size
    return out


def processes(args, sizes: dict[str, int]) -> dict[str, int]:
    """Simulator processes per group: the awake devices' share of --processes (at least one), the
    rest for the sleepers, one for the wakers."""
    awake = max(1, round(args.processes * sizes["awake"] / args.devices)) if sizes["awake"] else 0
    sleepers = max(1, args.processes - awake) if sizes["sleepers"] else 0
    return {"sleepers": sleepers, "wakers": 1 if sizes["wakers"] else 0, "awake": awake}


def limits(args) -> dict:
    """What bounds the count here (see the module's docstring)."""
    fd = raise_fd_limit()
    lo, hi = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    mem_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemAvailable:"))
    g = group_sizes(args)
    procs = processes(args, g)
    nodes = 3 if args.broker == "nats" else 1
    connected = g["awake"] + g["wakers"]   # at once, once the sleepers sleep
    per_node = -(-connected // nodes)
    # sockets a simulator process holds: its awake devices' (a sleeper's only while it connects)
    per_sim = max(-(-g[k] // procs[k]) if procs[k] else 0 for k in ("awake", "wakers"))
    ports = hi - lo + 1
    # a minute of sleepers' closed connections (TIME_WAIT is 60 s); none when every device stays
    time_wait = int(args.connect_rate * 60) if g["sleepers"] or g["wakers"] else 0
    out = {"fd_limit": fd, "fd_hard": resource.getrlimit(resource.RLIMIT_NOFILE)[1], "ports": ports,
           "mem_available_mib": mem_kib // 1024, "connected": connected, "per_node": per_node,
           "per_sim_process": per_sim, "sim_processes": procs,
           "max_connected_by_fd": nodes * (fd - FD_RESERVE), "max_connected_by_ports": nodes * ports - time_wait,
           "max_by_memory": int(mem_kib * 0.8 / args.session_kib) if args.session_kib else None}
    why = []
    if per_node > fd - FD_RESERVE:
        why.append(f"{per_node} connections per broker process > open-files limit {fd} - {FD_RESERVE} "
                   f"(hard limit {out['fd_hard']}: not raisable without CAP_SYS_RESOURCE)")
    if per_sim > fd - FD_RESERVE:
        why.append(f"{per_sim} devices per simulator process > open-files limit {fd} - {FD_RESERVE}: more --processes")
    if per_node + time_wait > ports:
        why.append(f"{per_node} connections to one port + {time_wait} in TIME_WAIT (a minute at --connect-rate) "
                   f"> {ports} ephemeral ports")
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


def _heard(store: Store) -> int:
    """Devices whose first connection reached the store (its inventory; a sleeper shows offline
    once its nap's `online 0` came, so the online flag does not count them)."""
    with store.session() as s:
        return s.scalar(select(func.count()).select_from(Device).where(Device.version.is_not(None)))


class Sims:
    """The simulator processes, started group by group (fota.sim.run children; the n-th process
    started connects to NATS node n mod 3)."""

    def __init__(self, broker, keyring: Keyring, passwords: dict[str, str], args, tmp: Path):
        self.broker, self.keyring, self.passwords, self.args, self.tmp = broker, keyring, passwords, args, tmp
        self.children: dict[str, list] = {}
        self.readies: dict[str, list] = {}

    def start(self, group: str, ids: list[str], nprocs: int, plan: dict | None = None) -> None:
        """nprocs processes for these ids, connecting at --connect-rate a second in all; returns
        once each has reported every device connected once."""
        args, broker = self.args, self.broker
        per_rate = args.connect_rate / nprocs
        batch = 5
        ports = broker.port if isinstance(broker.port, list) else [broker.port]
        started = []
        for i in range(nprocs):
            k = sum(len(c) for c in self.children.values()) + i
            config = {"host": broker.host, "port": ports[k % len(ports)], "root": self.keyring.root_public().hex(),
                      "trust": self.keyring.trust(), "passwords": {d: self.passwords[d] for d in ids[i::nprocs]},
                      "verify": args.verify, "plan": plan or {},
                      "device": {"backend": "hash", "capacity": max(args.image_kib * 1024, 64 * 1024),
                                 "keepalive": 300},
                      "connect_batch": batch, "connect_pause": batch / per_rate, "connect_timeout": args.timeout}
            base = self.tmp / f"sim-{group}-{i}"
            base.with_suffix(".json").write_text(json.dumps(config))
            started.append(fleet.Child(["-m", "fota.sim.run", str(base.with_suffix(".json"))], base.with_suffix(".log")))
        self.children[group] = started
        self.readies[group] = [sim.read_event(args.timeout) for sim in started]

    def reports(self, group: str) -> list[dict]:
        """Each process's counters now (fota.sim.run's 'summary' line)."""
        out = []
        for sim in self.children.get(group, []):
            sim.proc.stdin.write("summary\n")
            sim.proc.stdin.flush()
            out.append(sim.read_event(60))
        return out

    def wait_asleep(self, group: str) -> float:
        """Until no device of the group holds a connection (each napped after its first); seconds."""
        t0 = time.monotonic()
        wait_until(lambda: all(r["connected"] == 0 for r in self.reports(group)), timeout=self.args.timeout,
                   interval=1.0, what=f"every {group} device asleep")
        return time.monotonic() - t0

    def rss_mib(self) -> float:
        return sum(r.get("rss_mib", 0) for rs in self.readies.values() for r in rs)

    def stop(self) -> list[dict]:
        summaries = [s.stop() for c in self.children.values() for s in c]
        self.children = {}
        return summaries


# A sleeper naps right after its first connection (sleep_at 0), for longer than any run.
SLEEP_FOR_GOOD = 10 ** 7
STALL_S = 60.0  # s without a device more heard in the store: the rest will not come


def _settled(broker, store: Store, n: int, args) -> int:
    """Until n devices were heard in the store (_heard: their first connection's online and
    inventory stored) or the count stopped growing for STALL_S, and on NATS as many sessions'
    consumers exist; how many are missing (a device whose connection dropped before its inventory
    was acknowledged naps with it unsent, as a board keeps it for its next connection)."""
    t0, last, since = time.monotonic(), -1, time.monotonic()
    while (online := _heard(store)) < n:
        now = time.monotonic()
        if online != last:
            last, since = online, now
        elif now - since > STALL_S or now - t0 > args.timeout:
            fleet.log(f"{n - online} of {n} devices never heard in the store (online and inventory)")
            break
        time.sleep(1.0)
    if args.broker == "nats":
        broker.wait_sessions(min(online, n), args.timeout)
    time.sleep(2.0)
    return max(0, n - online)


def run(args, tmp: Path) -> dict:
    n = args.devices
    g = groups(args)
    procs = processes(args, group_sizes(args))
    out: dict = {"devices": n, "broker": args.broker, "groups": {k: len(v) for k, v in g.items()},
                 "sim_processes": procs}
    broker = make_broker(args.broker, tmp / args.broker, args.nats_mqtt, persistence=args.persistence)
    url, drop = fresh_database(args.db, tmp / "scale.db")
    store = Store(url)
    center, sims = None, None
    try:
        with tuned():
            rss = {"before": broker.rss_kib_now()}
            t = time.monotonic()
            ids = device_ids(n)
            passwords = provision_bulk(store, ids)
            out["provision_s"] = time.monotonic() - t
            t = time.monotonic()
            broker.add_users(passwords)
            out["accounts_s"] = time.monotonic() - t
            time.sleep(2.0)
            rss["accounts"] = broker.rss_kib_now()
            keyring = Keyring(tmp / "keys")
            keyring.init()
            signer = keyring.signer()
            center = CenterThread(store, broker.server_url, tmp / "blobs", chunk=args.chunk, window=args.window,
                                  signer=signer, keys_update=keyring.keys_update()).start()
            sims = Sims(broker, keyring, passwords, args, tmp)
            sleep = {"sleepy": 1.0, "sleep_at": 0.0, "sleep_for": SLEEP_FOR_GOOD}
            missing = out["never_online"] = {}  # per group: devices whose online and inventory never reached the store
            # 1. sessions: the sleepers connect once and nap, then the awake share connects
            if g["sleepers"]:
                cpu0, b0, t = fleet.threads_cpu(), broker.cpu_s(), time.monotonic()
                sims.start("sleepers", g["sleepers"], procs["sleepers"], sleep)
                out["sleepers_connect_s"] = time.monotonic() - t
                fleet.log(f"{len(g['sleepers'])} sleepers connected once in {out['sleepers_connect_s']:.0f}s")
                out["sleepers_asleep_wait_s"] = sims.wait_asleep("sleepers")
                missing["sleepers"] = _settled(broker, store, len(g["sleepers"]), args)
                out["created"] = {"sessions": len(g["sleepers"]), "center_cpu_s": fleet.threads_cpu_since(cpu0),
                                  "broker_cpu_s": broker.cpu_s() - b0, "wall_s": time.monotonic() - t}
                rss["sleeping"] = broker.rss_kib_now()
            if g["awake"]:
                t = time.monotonic()
                sims.start("awake", g["awake"], procs["awake"])
                out["awake_connect_s"] = time.monotonic() - t
                fleet.log(f"{len(g['awake'])} awake devices connected in {out['awake_connect_s']:.0f}s")
                missing["awake"] = _settled(broker, store, len(g["sleepers"]) + len(g["awake"]), args) - sum(
                    missing.values())
                rss["connected"] = broker.rss_kib_now()
            out["broker_rss_kib"] = rss
            # the fleet as it is (sleepers asleep, the awake share idle)
            cpu0, b0 = fleet.threads_cpu(), broker.cpu_s()
            time.sleep(args.idle_s)
            out["idle"] = {"seconds": args.idle_s, "connected": len(g["awake"]), "sessions": n - len(g["wakers"]),
                           "center_cpu_s": fleet.threads_cpu_since(cpu0), "broker_cpu_s": broker.cpu_s() - b0}
            # the wakers: connect once, nap --wake-s seconds (asleep when the deployment starts)
            if g["wakers"]:
                sims.start("wakers", g["wakers"], 1, {**sleep, "sleep_for": args.wake_s})
                sims.wait_asleep("wakers")
                missing["wakers"] = _settled(broker, store, n, args) - sum(missing.values())
            # 2. a share updating: every k-th awake device (each awake process has some), and the wakers
            m = min(len(g["awake"]), round(n * args.updating_pct / 100))
            updating = g["awake"][::max(1, len(g["awake"]) // m)][:m] if m else []
            rel = create_release(store, tmp / "blobs", signer.key, os.urandom(args.image_kib * 1024), "2.0.0",
                                 ["sim"], kind="image")
            c = center.center
            rows0, bytes0 = db_usage(store, tmp / "scale.db")
            c0 = (c.statuses, c.commands, c.chunks)
            cpu0, b0 = fleet.threads_cpu(), broker.cpu_s()
            t0 = time.monotonic()
            targets = updating + g["wakers"]
            dep = create_deployment(store, rel, device_ids=targets)
            marks = fleet._wait_all_done(store, dep.id, len(targets), t0, args.timeout)
            center_cpu, broker_cpu = fleet.threads_cpu_since(cpu0), broker.cpu_s() - b0
            time.sleep(1.0)
            rows1, bytes1 = db_usage(store, tmp / "scale.db")
            out["update"] = {"devices": len(targets), "awake": len(updating), "wakers": len(g["wakers"]),
                             "image_kib": args.image_kib, "wall_s": marks.get("done"),
                             "confirmed": fleet._count(store, dep.id, ("confirmed",)),
                             "center_cpu_s": center_cpu, "broker_cpu_s": broker_cpu,
                             "statuses": c.statuses - c0[0], "commands": c.commands - c0[1],
                             "chunks": c.chunks - c0[2], "db_rows": rows1 - rows0, "db_bytes": bytes1 - bytes0}
            if g["wakers"]:
                woke = sims.reports("wakers")
                out["update"]["wakers_confirmed"] = sum(r["confirmed"] for r in woke)
            if out["update"]["confirmed"] != len(targets):
                out["update"]["error"] = f"{out['update']['confirmed']}/{len(targets)} confirmed"
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
                probe = IngestProbe(c, store, broker)
                pub = fleet._publish_statuses(broker, messages)
                wait_until(lambda: c.statuses - base >= len(messages), timeout=args.timeout, interval=0.05,
                           what=f"{len(messages)} statuses stored")
                wall = time.monotonic() - pub.t0
                out["ingest"] = {"statuses": len(messages), "wall_s": wall, "rate": len(messages) / wall,
                                 "center_cpu_s": fleet.threads_cpu_since(cpu0), "broker_cpu_s": broker.cpu_s() - b0,
                                 "publisher": pub.summary(), "split": probe.stop()}
                if args.drain:  # the center's own ceiling: the same count queued in its session, then drained
                    def restart(client_id: str) -> CenterThread:
                        return CenterThread(store, broker.server_url, tmp / "blobs", chunk=args.chunk,
                                            window=args.window, signer=signer, keys_update=keyring.keys_update(),
                                            client_id=client_id)

                    before, center = center, None
                    center, out["drain"] = fleet._drain_statuses(
                        before, restart, store, broker,
                        [(t, p.replace(b'"boot": 1', b'"boot": 2')) for t, p in messages], args.timeout)
            out["sim_rss_mib"] = sims.rss_mib()
            summaries = sims.stop()
            out["sim"] = {"cpu_s": sum((x or {}).get("cpu_s", 0) for x in summaries),
                          "confirmed": sum((x or {}).get("confirmed", 0) for x in summaries),
                          "timeouts": sum((x or {}).get("timeouts", 0) for x in summaries),
                          "refused_subscriptions": sum((x or {}).get("refused_subscriptions", 0) for x in summaries),
                          "errors": [e for x in summaries for e in (x or {}).get("errors", [])][:5]}
            out["broker_peak_rss_mib"] = broker.rss_mib()
            return out
    finally:
        if sims is not None:
            sims.stop()
        if center is not None:
            center.stop()
        store.dispose()
        drop()
        broker.stop()


def unit_costs(r: dict, db: str) -> dict:
    u: dict = {}
    n, grp = r["devices"], r.get("groups") or {}
    rss = r.get("broker_rss_kib") or {}
    if "accounts" in rss:
        u["broker_rss_kib_per_account"] = (rss["accounts"] - rss["before"]) / n
    if "sleeping" in rss and grp.get("sleepers"):
        u["broker_rss_kib_per_sleeping_session"] = (rss["sleeping"] - rss["accounts"]) / grp["sleepers"]
        u["broker_rss_kib_per_sleeping_session_with_account"] = (u["broker_rss_kib_per_sleeping_session"]
                                                                 + u["broker_rss_kib_per_account"])
    if "connected" in rss and grp.get("awake"):
        u["broker_rss_kib_per_session"] = (rss["connected"] - rss.get("sleeping", rss["accounts"])) / grp["awake"]
        u["broker_rss_kib_per_session_with_account"] = u["broker_rss_kib_per_session"] + u["broker_rss_kib_per_account"]
    created = r.get("created")
    if created:
        u["broker_cpu_ms_per_session_created"] = 1000 * created["broker_cpu_s"] / created["sessions"]
        u["center_cpu_ms_per_session_created"] = 1000 * created["center_cpu_s"] / created["sessions"]
    idle = r.get("idle")
    if idle and idle.get("connected"):
        per = idle["seconds"] * idle["connected"] / 1000
        u["broker_cpu_ms_per_1000_sessions_s"] = 1000 * idle["broker_cpu_s"] / per
        u["center_cpu_ms_per_1000_sessions_s"] = 1000 * idle["center_cpu_s"] / per
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
        if (ing.get("publisher") or {}).get("offered_rate"):
            u["statuses_per_second_offered"] = ing["publisher"]["offered_rate"]
    drain = r.get("drain")
    if drain:
        u["statuses_per_second_drain"] = drain["rate"]
        threads = drain["split"]["center_threads"]
        u["center_cpu_ms_per_status_drain"] = 1000 * sum(t["cpu_s"] for t in threads.values()) / drain["statuses"]
    return u


ROWS = [  # key, label, format
    ("broker_rss_kib_per_session_with_account", "broker RSS per connected session, account included", "{:.1f} KiB"),
    ("broker_rss_kib_per_account", "  of which the account (password and ACL entries)", "{:.1f} KiB"),
    ("broker_rss_kib_per_session", "  of which the session and connection", "{:.1f} KiB"),
    ("broker_rss_kib_per_sleeping_session_with_account", "broker RSS per sleeping session (no connection), account included",
     "{:.1f} KiB"),
    ("broker_rss_kib_per_sleeping_session", "  of which the session", "{:.1f} KiB"),
    ("broker_cpu_ms_per_session_created", "broker CPU per session created (connect, subscribe, 2 statuses, online 0, disconnect)",
     "{:.2f} ms"),
    ("center_cpu_ms_per_session_created", "center CPU per session created (its online, inventory, online 0)", "{:.2f} ms"),
    ("broker_cpu_ms_per_1000_sessions_s", "broker CPU per 1,000 idle connected devices, per second", "{:.2f} ms"),
    ("center_cpu_ms_per_1000_sessions_s", "center CPU per 1,000 idle connected devices, per second", "{:.2f} ms"),
    ("center_cpu_ms_per_status", "center CPU per status stored (ingestion under load)", "{:.3f} ms"),
    ("broker_cpu_ms_per_status", "broker CPU per status stored", "{:.3f} ms"),
    ("statuses_per_second", "statuses stored per second, one center", "{:,.0f}"),
    ("statuses_per_second_offered", "  offered: the publisher's rate (first publish to the broker's last PUBACK)",
     "{:,.0f}"),
    ("statuses_per_second_drain", "statuses stored per second draining a backlog, no publisher beside the center",
     "{:,.0f}"),
    ("center_cpu_ms_per_status_drain", "  center CPU per status stored, draining", "{:.3f} ms"),
    ("center_cpu_ms_per_update", "center CPU per device-update (whole)", "{:.2f} ms"),
    ("broker_cpu_ms_per_update", "broker CPU per device-update", "{:.2f} ms"),
    ("statuses_per_update", "statuses per device-update", "{:.1f}"),
    ("chunks_per_update", "chunks per device-update", "{:.1f}"),
    ("db_rows_per_update", "database rows per device-update", "{:.1f}"),
    ("db_bytes_per_update_postgres", "database bytes per device-update (PostgreSQL)", "{:,.0f}"),
    ("db_bytes_per_update_sqlite", "database bytes per device-update (SQLite)", "{:,.0f}"),
]


def comparison(units: dict) -> list[dict]:
    """Each measured unit with the model's range (None where the model has no figure) and the
    ratio measured / the range's midpoint. The session rows with their account are what the model's
    "broker memory per connected session" means (Mosquitto's, account and ACL entry included)."""
    model_of = {"broker_rss_kib_per_session_with_account": "broker_rss_kib_per_session",
                "broker_rss_kib_per_sleeping_session_with_account": "broker_rss_kib_per_session",
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


BROKER_NAMES = {"mosquitto": "one Mosquitto", "nats": "a 3-node NATS cluster (RSS and CPU summed over the nodes)"}


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
    grp = r.get("groups") or {}
    if rows:
        print_table(f"unit costs at {cfg['devices']:,} devices on {BROKER_NAMES[cfg['broker']]} "
                    f"({grp.get('sleepers', 0):,} asleep, {grp.get('awake', 0):,} awake, {grp.get('wakers', 0)} waking; "
                    f"{up.get('devices', '-')} updating a {cfg['image_kib']} KiB image; {cfg['db']}, "
                    f"{result['env']['date']}) against the model (one Mosquitto, docs/operations.md §4b)",
                    ["unit", "measured", "model", "ratio"], rows, left=("unit",))
    for key, what in (("ingest", "published while the center stores"), ("drain", "queued, then drained")):
        ing = r.get(key)
        if ing:
            print_split(f"ingestion under load, {ing['statuses']:,} QoS 1 statuses {what}", ing)
    lim = result.get("limits") or {}
    print(f"  limits: open files {lim.get('fd_limit')} per process (hard {lim.get('fd_hard')}), "
          f"{lim.get('ports')} ephemeral ports per destination, {lim.get('mem_available_mib')} MiB available; "
          f"connections at once by open files {lim.get('max_connected_by_fd')}, by ports "
          f"{lim.get('max_connected_by_ports')}; sessions by memory {lim.get('max_by_memory')}")
    if r:
        print(f"  sleepers connected once in {r.get('sleepers_connect_s', 0):.0f} s, awake in "
              f"{r.get('awake_connect_s', 0):.0f} s; broker RSS {r.get('broker_rss_kib')} KiB, peak "
              f"{r.get('broker_peak_rss_mib', 0):.0f} MiB; simulators {r.get('sim_rss_mib', 0):.0f} MiB; "
              f"update wall {up.get('wall_s')} s, {up.get('confirmed')}/{up.get('devices')} confirmed "
              f"({up.get('wakers_confirmed', 0)}/{up.get('wakers', 0)} wakers)")


def failures(result: dict) -> list[str]:
    out = [f"does not fit: {w}" for w in (result.get("limits") or {}).get("refused", [])]
    r = result.get("run") or {}
    if r.get("error"):
        out.append(r["error"])
    if (r.get("update") or {}).get("error"):
        out.append(f"update: {r['update']['error']}")
    for group, k in (r.get("never_online") or {}).items():
        if k:
            out.append(f"{k} {group} connected but never heard in the store (their online and inventory were lost)")
    up = r.get("update") or {}
    if up.get("wakers") and up.get("wakers_confirmed") != up["wakers"]:
        out.append(f"wakers: {up.get('wakers_confirmed')}/{up['wakers']} confirmed their update (held until they woke)")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="./run bench scale", description=__doc__.split("\n")[0])
    ap.add_argument("--broker", default="mosquitto", choices=BROKERS)
    ap.add_argument("--devices", type=int, default=100000)
    ap.add_argument("--awake-pct", type=float, default=10.0,
                    help="share of the fleet connected all along, %% (the rest sleep after a first connection)")
    ap.add_argument("--wakers", type=int, default=100,
                    help="sleeping devices in the deployment, awake --wake-s s after their nap")
    ap.add_argument("--wake-s", type=float, default=20.0)
    ap.add_argument("--persistence", action="store_true", help="Mosquitto saves its sessions to disk (every 2 s)")
    ap.add_argument("--processes", type=int, default=8, help="simulator processes (each a slice of the fleet)")
    ap.add_argument("--updating-pct", type=float, default=2.0, help="share of the fleet in the deployment, %%")
    ap.add_argument("--image-kib", type=int, default=64)
    ap.add_argument("--db", default="postgres", choices=("sqlite", "postgres"))
    ap.add_argument("--statuses", type=int, default=5000, help="statuses of the ingestion run (0 skips it)")
    ap.add_argument("--no-drain", dest="drain", action="store_false",
                    help="skip the drain run of part 3 (the statuses queued in the stopped center's session, "
                         "then stored by a new center)")
    ap.add_argument("--idle-s", type=float, default=10.0)
    ap.add_argument("--connect-rate", type=float, default=200.0,
                    help="device connections a second, all processes (NATS: 20-50)")
    ap.add_argument("--session-kib", type=float, default=0.0,
                    help="broker RSS per session from an earlier run, for the memory check (0: no check)")
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
