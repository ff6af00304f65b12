"""Network-fault benchmark: what cuts and throttling cost an update, in bytes and time.

    ./run bench netfaults [--devices 2] [--image-kib 64] [--cuts none,3072,8192,32768]
                          [--direction down] [--throttle 16000] [--chunk 2048] [--window 8]
                          [--timeout 180] [--out bench/results/netfaults.json]

A fresh Mosquitto and control center (fota.testkit.fleet); the devices connect through
fota.testkit.faultproxy. For each case a new release goes to every device: "none" (no fault, the
baseline of this run), each cut budget (every connection aborted after that many bytes in
--direction, or in both directions together with --direction total) and a throttled link. Every
job must end `confirmed` with the installed slot identical to the release. See bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from bench._report import print_table
from fota.device import protocol as P
from fota.examples import hello_files
from fota.server.deployments import create_deployment
from fota.testkit.faultproxy import FaultProxy
from fota.testkit.faults import device_outcome, files_manifest, status_gaps
from fota.testkit.fleet import Fleet, bundle_of_size
from fota.tools.waiting import TimedOut, wait_until
from fota.tools.supervisor import DEFAULT_HEAP

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "netfaults.json"


def log(*args) -> None:
    print("[netfaults]", *args, file=sys.stderr, flush=True)


def _devices(fleet: Fleet, proxy: FaultProxy, ids: list[str]) -> None:
    """Provision devices whose broker address is the proxy, and start them."""
    fleet.add_devices(ids, port=proxy.port, backoff_ms=100, max_restarts=1_000_000)


def _case(fleet: Fleet, proxy: FaultProxy, ids: list[str], name: str, number: int, args,
          manifests: dict[str, dict]) -> dict:
    version = f"1.{number}.0"
    image = bundle_of_size(version, args.image_kib * 1024)
    rel = fleet.release(image, version)
    manifests[version] = json.loads(rel.manifest)
    up0, down0, cuts0, conns0 = proxy.bytes_up, proxy.bytes_down, proxy.cuts, proxy.connections
    t0 = time.monotonic()
    dep = create_deployment(fleet.store, rel, device_ids=ids)
    jobs = [j.id for j in dep.jobs]
    try:
        wait_until(lambda: all(s in P.TERMINAL_STATES for s, _, _ in fleet.job_states(jobs).values()),
                   timeout=args.timeout, interval=0.05, what=f"{name}: every job terminal")
        finished = True
    except TimedOut as exc:
        log(exc)
        finished = False
    wall = time.monotonic() - t0
    states = fleet.job_states(jobs)
    with fleet.store.session() as s:
        from fota.server.store import Job
        served = sum(s.get(Job, j).bytes_served or 0 for j in jobs)
    total = rel.size * len(ids)
    return {"case": name, "version": version, "devices": len(ids), "image": rel.size, "finished": finished,
            "confirmed": sum(1 for st, _, _ in states.values() if st == P.CONFIRMED),
            "codes": sorted({c for _, c, _ in states.values() if c}),
            "cuts": proxy.cuts - cuts0, "connections": proxy.connections - conns0,
            "down": proxy.bytes_down - down0, "up": proxy.bytes_up - up0, "served": served,
            "down_x": round((proxy.bytes_down - down0) / total, 3), "up_x": round((proxy.bytes_up - up0) / total, 3),
            "served_x": round(served / total, 3), "resent": max(0, served - total), "wall_s": round(wall, 3)}


def run(tmp: Path, args) -> list[dict]:
    fleet = Fleet.standalone(tmp, chunk=args.chunk, window=args.window, heap=args.heap)
    fleet.center.center.delta_wbits = None  # full images: the bytes re-sent are against the image
    proxy = FaultProxy(fleet.broker.port).start_thread()
    ids = [f"net-{i:02d}" for i in range(args.devices)]
    manifests = {"1.0.0": files_manifest(hello_files("1.0.0"))}  # what the devices are provisioned with
    gaps_so_far: set = set()
    results = []
    try:
        _devices(fleet, proxy, ids)
        fleet.wait_online(*ids, timeout=60)
        cases = [c.strip() for c in args.cuts.split(",") if c.strip()]
        if args.throttle:
            cases.append(f"throttle {args.throttle}")
        for number, case in enumerate(cases, start=1):
            proxy.cut_after = proxy.cut_after_down = proxy.cut_after_up = None
            proxy.throttle_up = proxy.throttle_down = None
            if case.startswith("throttle"):
                proxy.throttle_up = proxy.throttle_down = args.throttle
                name = f"throttle {args.throttle} B/s"
            elif case == "none":
                name = "no fault"
            else:
                budget = int(case)
                attr = {"down": "cut_after_down", "up": "cut_after_up", "total": "cut_after"}[args.direction]
                setattr(proxy, attr, budget)
                name = f"cut every {budget} B ({args.direction})"
            r = _case(fleet, proxy, ids, name, number, args, manifests)
            proxy.cut_after = proxy.cut_after_down = proxy.cut_after_up = None
            proxy.throttle_up = proxy.throttle_down = None
            # With the link whole again: bricked = not back online on a verified image.
            outcome = {d: device_outcome(fleet, d, manifests) for d in ids}
            gaps = {kind: [k for k in keys if k not in gaps_so_far] for kind, keys in status_gaps(fleet, ids).items()}
            gaps_so_far.update(gaps["lost"], gaps["superseded"])  # a gap counts in the case it appeared in
            r.update(verified=sum(1 for o in outcome.values() if o["verified"] and o["running"] == r["version"]),
                     bricked=sum(1 for o in outcome.values() if o["bricked"]), lost_statuses=len(gaps["lost"]),
                     lost=[list(k) for k in gaps["lost"]], superseded_health=len(gaps["superseded"]),
                     outcome=outcome)
            log(f"{name}: {r['confirmed']}/{r['devices']} confirmed, {r['bricked']} bricked, "
                f"{r['lost_statuses']} lost statuses ({r['superseded_health']} health reports superseded), {r['cuts']} cuts, "
                f"down {r['down_x']}x, served {r['served_x']}x, {r['wall_s']} s")
            results.append(r)
    finally:
        proxy.stop_thread()
        fleet.close()
    base = next((r["wall_s"] for r in results if r["case"] == "no fault"), None)
    for r in results:
        r["wall_x"] = round(r["wall_s"] / base, 2) if base else None
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="./run bench netfaults", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--image-kib", type=int, default=64, help="release size in KiB (a bundle)")
    p.add_argument("--cuts", default="none,3072,8192,32768",
                   help="cases: 'none' and cut budgets in bytes, comma-separated")
    p.add_argument("--direction", choices=("down", "up", "total"), default="down",
                   help="which bytes count towards a cut budget")
    p.add_argument("--throttle", type=int, default=16000, help="bytes/s each way for the throttle case (0: skip)")
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--heap", default=DEFAULT_HEAP)
    p.add_argument("--timeout", type=float, default=180, help="seconds allowed per case")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p


def _table(results: list[dict], args) -> None:
    cols = ("case", "confirmed", "verified", "bricked", "lost statuses", "superseded health", "cuts", "proxy→dev ×image",
            "dev→proxy ×image", "center served ×image", "re-sent KiB", "wall s", "× no fault")
    rows = [[r["case"], f"{r['confirmed']}/{r['devices']}", f"{r['verified']}/{r['devices']}", r["bricked"],
             r["lost_statuses"], r["superseded_health"], r["cuts"],
             f"{r['down_x']:.2f}", f"{r['up_x']:.2f}", f"{r['served_x']:.2f}", f"{r['resent'] / 1024:.0f}",
             f"{r['wall_s']:.2f}", "" if r["wall_x"] is None else f"{r['wall_x']:.1f}"] for r in results]
    print_table(f"network faults: {args.devices} devices, {args.image_kib} KiB image, chunk {args.chunk}, "
                f"window {args.window}", cols, rows, left=("case",))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="fota-netfaults-") as tmp:
        results = run(Path(tmp), args)
    _table(results, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                                    "environment": {"python": platform.python_version(), "cpus": os.cpu_count()},
                                    "results": results}, indent=1))
    return 0 if passed(results) else 1


def passed(results: list[dict]) -> bool:
    """The run passed: every case ran, and in each every job was confirmed, every device runs the
    release from a verified slot, none is bricked and no status was lost."""
    return bool(results) and all(r["confirmed"] == r["devices"] == r["verified"] and not r["bricked"]
                                 and not r["lost_statuses"] for r in results)


if __name__ == "__main__":
    sys.exit(main())
