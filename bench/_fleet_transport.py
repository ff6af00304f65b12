"""bench/fleet.py, part "transports": one image deployed over `mqtt` against `http` to the same
simulated fleet (issue 16, "Benchmarks").

One rig: a fresh Mosquitto (bench.fleet.Broker), a fresh database (--deploy-db), --transport-devices
simulated devices (fota.sim.run, one process per --transport-sim-devices, declaring transports
mqtt and http), the
ControlCenter in this process with transport http's setting pointing at the center's blob route,
and that route served by the API app on uvicorn in a process of its own (as `fota api`; its CPU is
measured apart). Then, in --transports order, one deployment per transport of a fresh
--transport-image-kib KiB image to every device, each to all confirmed (the devices reboot into
it and reconnect before the next). Per deployment, from its creation to every job final:

* wall time; bytes through the broker (Mosquitto's reads + writes on its sockets, from
  /proc/<pid>/io: every client's traffic both ways, the center's included) per update and as a
  percentage of the image (target with http: under TARGET_PERCENT %);
* CPU seconds of the center (this process), Mosquitto, the blob server and the simulator;
* chunks the center published, and those beyond one per chunk a device needs (re-sent, mqtt);
* http: GETs, bytes the devices read from the blob server, fetch (re)starts, failed attempts;
  the blob server's requests per second of the deployment's wall time and CPU per request.

    ./run bench fleet --skip-deploy --skip-ingest --workers '' [--transports mqtt,http]
                      [--transport-devices 10000] [--transport-image-kib 64]
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from bench._report import print_table
from fota.server.broker import free_port
from fota.server.deployments import create_deployment
from fota.server.kek import Kek
from fota.server.payloadurls import HttpPayloads, StaticPayloads
from fota.server.releases import create_release
from fota.server.store import Store
from fota.sim.fleet import device_ids, provision
from fota.testkit.center import CenterThread
from fota.testkit.databases import fresh_database
from fota.tools.gctune import tuned
from fota.tools.keyring import Keyring
from fota.tools.waiting import wait_until

TARGET_PERCENT = 2.0   # broker bytes per update with http, % of the image (issue 16)
TRANSPORTS = ("mqtt", "http", "static")  # static: transport http from a static server (StaticPayloads)
STATIC = "/fw"


def add_arguments(ap) -> None:
    ap.add_argument("--transports", default="mqtt,http,static",
                    help="part 4: transports to deploy over, in this order, to one simulated fleet ('' skips): mqtt; "
                         "http (the center's blob route); static (http from Starlette's StaticFiles in front of "
                         "the blob directory, on the same uvicorn process)")
    ap.add_argument("--skip-transports", action="store_true", help="skip part 4")
    ap.add_argument("--transport-devices", type=int, default=10000, help="part 4: simulated devices")
    ap.add_argument("--transport-image-kib", type=int, default=64, help="part 4: image size")
    ap.add_argument("--transport-sim-devices", type=int, default=5000,
                    help="part 4: devices per simulator process (each device holds an MQTT and an HTTP "
                         "socket: 10,000 in one process would pass a 20,000 open-files limit)")


def wanted(args) -> list[str]:
    if args.skip_transports:
        return []
    out = [t for t in args.transports.split(",") if t]
    unknown = [t for t in out if t not in TRANSPORTS]
    if unknown:
        raise SystemExit(f"--transports: unknown {', '.join(unknown)} (known: {', '.join(TRANSPORTS)})")
    return out


def io_bytes(pid: int) -> int:
    """Bytes a process read and wrote through read()/write()-like calls (/proc/<pid>/io rchar +
    wchar): for Mosquitto without persistence, its sockets' traffic (and a few log lines)."""
    fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(fields["rchar"]) + int(fields["wchar"])


# ---- the blob server: the API app (its /v1/blobs route) on uvicorn, in a process of its own -----

def blob_server(config_path: str) -> None:
    """`python -m bench._fleet_transport _blobserver CONFIG`: serve until stdin ends."""
    import logging
    import sys

    from fota.server.api import create_app
    from fota.testkit.appserver import AppServer

    logging.basicConfig(level=logging.WARNING)
    import resource
    try:  # a connection and an open blob file per device: past the 20,000 the bench gets here
        resource.setrlimit(resource.RLIMIT_NOFILE, (65536, 65536))
    except (ValueError, OSError):
        pass
    cfg = json.loads(Path(config_path).read_text())
    store = Store(cfg["db"])
    app = create_app(store, cfg["blobs"], lambda: None, url_key=bytes.fromhex(cfg["key"]))
    from starlette.staticfiles import StaticFiles
    Path(cfg["blobs"]).mkdir(parents=True, exist_ok=True)
    app.mount(STATIC, StaticFiles(directory=cfg["blobs"]))  # any static server in front of the blobs
    server = AppServer(app, port=cfg["port"]).start()
    print(json.dumps({"event": "ready", "url": server.url,
                      "fd_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}), flush=True)
    for line in sys.stdin:
        if line.strip() == "stop":
            break
    server.stop()
    print(json.dumps({"event": "summary", "cpu_s": time.process_time()}), flush=True)
    store.dispose()


# ---- the run --------------------------------------------------------------------------------------

def _sim_report(sims) -> dict:
    """The simulators' counters, added up (http_first_chunk_s: the slowest process's quantiles)."""
    for sim in sims:
        sim.proc.stdin.write("summary\n")
        sim.proc.stdin.flush()
    reports = [sim.read_event(120) for sim in sims]
    out = {k: sum(r.get(k) or 0 for r in reports) for k in SIM_KEYS}
    waits = [r["http_first_chunk_s"] for r in reports if r.get("http_first_chunk_s")]
    kinds = {}
    for r in reports:
        for k, v in (r.get("http_failure_kinds") or {}).items():
            kinds[k] = kinds.get(k, 0) + v
    out["http_failure_kinds"] = kinds
    out["http_first_chunk_s"] = ({"n": sum(w["n"] for w in waits),
                                  **{q: max(w[q] for w in waits) for q in ("p50", "p95", "max")}}
                                 if waits else None)
    return out


def _delta(after: dict, before: dict, keys) -> dict:
    return {k: (after.get(k) or 0) - (before.get(k) or 0) for k in keys}


SIM_KEYS = ("chunks", "stale_chunks", "timeouts", "http_chunks", "http_bytes_received", "http_requests",
            "http_connections", "http_fetch_starts", "http_failures", "cpu_s")


def transport_runs(args, tmp: Path, log) -> list[dict]:
    """One rig, one deployment per transport of wanted(args); a result per deployment (an "error"
    in each if the rig failed)."""
    order = wanted(args)
    if not order:
        return []
    try:
        with tuned():  # the control center runs in this process, set up as `fota serve` is
            return _runs(order, args, tmp, log)
    except Exception as e:
        return [{"transport": t, "devices": args.transport_devices, "error": f"{type(e).__name__}: {e}"}
                for t in order]


def _runs(order, args, tmp: Path, log) -> list[dict]:
    from bench.fleet import Broker, Child, _count, _online, _wait_all_done, _children_cpu

    n = args.transport_devices
    base = tmp / "transports"
    base.mkdir(parents=True, exist_ok=True)
    blobs = base / "blobs"
    broker = Broker(base / "mosquitto")
    url, drop = fresh_database(args.deploy_db, base / "fleet.db")
    store = Store(url)
    keyring = Keyring(base / "keys")
    keyring.init()
    signer = keyring.signer()
    key = Kek.generate().url_key
    port = free_port()
    center = server = None
    sims = []
    results = []
    try:
        ids = device_ids(n, "tr")
        passwords = provision(store, ids)
        broker.add_users(passwords)
        cfg = base / "blobserver.json"
        cfg.write_text(json.dumps({"db": url, "blobs": str(blobs), "key": key.hex(), "port": port}))
        server = Child(["-m", "bench._fleet_transport", "_blobserver", str(cfg)], base / "blobserver.log")
        server_fd_limit = server.read_event(60).get("fd_limit")
        route = HttpPayloads(f"http://127.0.0.1:{port}", key, 3600)
        static = StaticPayloads(f"http://127.0.0.1:{port}{STATIC}", 3600)
        center = CenterThread(store, broker.server_url, blobs, chunk=args.chunk, window=args.window,
                              signer=signer, keys_update=keyring.keys_update(), http=route).start()
        config = {"host": broker.host, "port": broker.port, "root": keyring.root_public().hex(),
                  "trust": keyring.trust(), "passwords": passwords, "verify": args.verify,
                  "device": {"backend": "hash", "capacity": max(args.transport_image_kib * 1024, 64 * 1024),
                             "keepalive": 300, "transports": ["mqtt", "http"]}}
        per = max(1, args.transport_sim_devices)
        for k, first in enumerate(range(0, n, per)):
            part = {**config, "passwords": {i: passwords[i] for i in ids[first:first + per]}}
            (base / f"sim{k}.json").write_text(json.dumps(part))
            sims.append(Child(["-m", "fota.sim.run", str(base / f"sim{k}.json")], base / f"sim{k}.log"))
        ready = {"connect_s": max(sim.read_event(args.timeout)["connect_s"] for sim in sims)}
        wait_until(lambda: _online(store) == n, timeout=args.timeout, interval=0.2,
                   what=f"{n} devices online in the store")
        log(f"transports: {n} simulated devices ({len(sims)} process(es)) connected in {ready['connect_s']:.1f}s")
        c = center.center
        size = args.transport_image_kib * 1024
        for i, transport in enumerate(order):
            version = f"{i + 2}.0.0"
            image = os.urandom(size)
            rel = create_release(store, blobs, signer.key, image, version, ["sim"], kind="image")
            time.sleep(2)  # the last reconnects' statuses are in
            sim0 = _sim_report(sims)
            c0 = (c.statuses, c.commands, c.chunks, c.bytes_published)
            cpu0, broker_cpu0, server_cpu0 = time.process_time(), broker.cpu_s(), _children_cpu([server.proc])
            io0 = io_bytes(broker.mosquitto.proc.pid)
            t0 = time.monotonic()
            c.http = static if transport == "static" else route
            dep = create_deployment(store, rel, device_ids=ids, transport="mqtt" if transport == "mqtt" else "http")
            marks = _wait_all_done(store, dep.id, n, t0, args.timeout)
            wall = marks.get("done")
            io1 = io_bytes(broker.mosquitto.proc.pid)
            r = {"transport": transport, "devices": n, "sim_processes": len(sims), "blob_server_fd_limit": server_fd_limit, "image_bytes": size, "wall_s": wall,
                 "started_s": marks.get("started"), "confirmed": _count(store, dep.id, ("confirmed",)),
                 "center": {"statuses": c.statuses - c0[0], "commands": c.commands - c0[1],
                            "chunks": c.chunks - c0[2], "bytes_published": c.bytes_published - c0[3],
                            "cpu_s": time.process_time() - cpu0},
                 "broker_cpu_s": broker.cpu_s() - broker_cpu0,
                 "blob_server_cpu_s": _children_cpu([server.proc]) - server_cpu0,
                 "broker_bytes": io1 - io0}
            report = _sim_report(sims)
            r["sim"] = _delta(report, sim0, SIM_KEYS)
            r["sim"]["http_first_chunk_s"] = report.get("http_first_chunk_s")
            r["sim"]["http_failure_kinds"] = {k: v - sim0["http_failure_kinds"].get(k, 0)
                                              for k, v in report["http_failure_kinds"].items()
                                              if v - sim0["http_failure_kinds"].get(k, 0)}
            needed = n * -(-size // args.chunk)
            r["broker_bytes_per_update"] = r["broker_bytes"] / n
            r["broker_percent_of_image"] = 100.0 * r["broker_bytes"] / n / size
            # chunks the center published beyond one per chunk the mqtt devices needed
            mqtt_needed = needed if transport == "mqtt" else 0
            r["chunks_resent"] = r["center"]["chunks"] - mqtt_needed
            r["resent_pct"] = 100.0 * r["chunks_resent"] / mqtt_needed if mqtt_needed else None
            gets = r["sim"]["http_requests"]
            r["blob_requests_per_s"] = gets / wall if wall and gets else None
            r["blob_server_cpu_ms_per_request"] = 1000 * r["blob_server_cpu_s"] / gets if gets else None
            if wall is None:
                r["error"] = f"not all confirmed within {args.timeout}s ({r['confirmed']}/{n})"
            log("transport", json.dumps(r))
            results.append(r)
            if wall is None:
                break
            wait_until(lambda: _online(store) == n, timeout=args.timeout, interval=0.5,
                       what=f"{n} devices online again after the {transport} update")
    finally:
        for sim in sims:
            sim.stop()
        if center is not None:
            center.stop()
        if server is not None:
            server.stop()
        store.dispose()
        drop()
        broker.stop()
    return results


def render(results: list[dict], args) -> None:
    from bench.fleet import _fmt

    if not results:
        return
    rows = []
    for r in results:
        center, sim = r.get("center") or {}, r.get("sim") or {}
        pct = r.get("broker_percent_of_image")
        if r["transport"] != "mqtt" and pct is not None:
            pct = f"{pct:.2f} ({'met' if pct < TARGET_PERCENT else 'MISSED'})"
        wait = sim.get("http_first_chunk_s") or {}
        rows.append([r["transport"], r.get("wall_s"), r.get("confirmed"), r.get("broker_bytes_per_update"), pct,
                     center.get("chunks"), r.get("resent_pct"), sim.get("timeouts"), sim.get("http_requests"),
                     sim.get("http_fetch_starts"), sim.get("http_failures"),
                     "/".join(_fmt(wait.get(q)) for q in ("p50", "p95")) if wait else None,
                     center.get("cpu_s"), r.get("broker_cpu_s"), r.get("blob_server_cpu_s"),
                     r.get("blob_requests_per_s"), r.get("blob_server_cpu_ms_per_request"), sim.get("cpu_s"),
                     r.get("error")])
    first = results[0]
    print_table(f"one {args.transport_image_kib} KiB image over mqtt and http to {first['devices']} simulated devices "
                f"({first.get('sim_processes', 1)} simulator process(es)), {args.deploy_db} store "
                f"(target: broker bytes with http < {TARGET_PERCENT} % of the image)",
                ["transport", "wall s", "confirmed", "broker B/update", "% of image", "chunks published", "re-sent %",
                 "chunk timeouts", "http GETs", "fetch starts", "http failures", "1st chunk s p50/p95",
                 "center CPU s", "broker CPU s", "blob server CPU s", "blob GETs/s", "blob CPU ms/GET",
                 "sim CPU s", "note"],
                [[v if isinstance(v, str) else _fmt(v) for v in row] for row in rows],
                notes=["broker bytes: Mosquitto's socket reads + writes (/proc/<pid>/io), all clients both ways, "
                       "from the deployment's creation to every job final (reboots and reconnects included)",
                       "blob GETs/s: GETs over the deployment's wall time (not the server's peak)",
                       "1st chunk s: from a job's first fetch start to its first chunk (the slowest process's "
                       "quantiles)"], left=("transport", "note"))


def failures(results: list[dict]) -> list[str]:
    out = []
    for r in results:
        if r.get("error"):
            out.append(f"transport {r['transport']} N={r['devices']}: {r['error']}")
        elif r.get("confirmed") != r["devices"]:
            out.append(f"transport {r['transport']} N={r['devices']}: {r.get('confirmed')}/{r['devices']} confirmed")
    return out


if __name__ == "__main__":
    import sys
    if sys.argv[1:2] == ["_blobserver"]:
        blob_server(sys.argv[2])
