"""Restart sweep: the broker or the control center restarts at chosen points of a deployment.

    ./run bench restarts [--faults none,broker,broker-kill,center] [--cuts 0.1,0.5,0.9,install]
                         [--devices 3] [--image-kib 64] [--chunk 1024] [--window 4] [--down 1.0]
                         [--repeat 1] [--timeout 120] [--out bench/results/restarts.json]

Each case is a fresh fleet on 127.0.0.1 (Mosquitto with persistence, SQLite, a control center,
MicroPython unix-port devices running the agent as .mpy), one deployment to every device, and
one fault at one point. Counted per case: devices updated, bricked, installed twice, statuses
lost, chunk bytes re-sent. The `none` case is the baseline measured in the same run.
See bench/README.md for what each number means.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from sqlalchemy import select

from bench._report import print_table
from fota.device import protocol as P
from fota.examples import hello_files
from fota.server.deployments import create_deployment
from fota.server.store import Job, StatusEvent
from fota.testkit.brokerspy import BrokerSpy
from fota.testkit.center import CenterThread
from fota.testkit.faults import device_outcome, files_manifest, status_gaps, status_key, stored_keys
from fota.testkit.fleet import Fleet, bundle_of_size
from fota.tools.waiting import TimedOut, wait_until

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "restarts.json"
FAULTS = ("none", "broker", "broker-kill", "center")
REBOOT_DELAY = 0.5   # seconds a device takes to "reboot": an `install` cut lands inside it


def log(*args) -> None:
    print("[bench]", *args, file=sys.stderr, flush=True)


class Spy(BrokerSpy):
    """Every status over the broker, on a persistent session that re-subscribes on reconnect."""

    def __init__(self, broker):
        self.keys: set[tuple[str, int, int, int]] = set()
        self.by_key: dict[tuple[str, int, int, int], str] = {}
        self.states: list[tuple[str, int | None, str]] = []
        self.lock = threading.Lock()
        super().__init__(broker, name="bspy", persistent=True, reconnect_delay=0.1)

    def _on_message(self, client, userdata, msg):
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        device = msg.topic.split("/")[2]
        if not isinstance(body, dict):
            return
        key = status_key(device, body)
        with self.lock:
            self.keys.add(key)
            self.by_key[key] = body.get("state")
            self.states.append((device, body.get("job"), body.get("state")))

    def seen(self) -> set[tuple[str, int, int, int]]:
        with self.lock:
            return set(self.keys)

    def state_of(self, key) -> str | None:
        with self.lock:
            return self.by_key.get(key)

    def saw_all(self, devices, states) -> bool:
        with self.lock:
            return all(any(d == dev and s in states for d, _, s in self.states) for dev in devices)


def _apply_fault(fault: str, fleet: Fleet, args) -> Fleet:
    if fault in ("broker", "broker-kill"):
        m = fleet.broker.mosquitto
        if fault == "broker":
            m.stop()  # SIGTERM: Mosquitto writes its persistence file on the way out
        else:
            m.proc.kill()  # SIGKILL: whatever it had not saved is gone
            m.proc.wait()
            m.proc = None
        time.sleep(args.down)
        m.start()
    elif fault == "center":
        old = fleet.center.center
        fleet.center.stop()
        time.sleep(args.down)
        fleet.center = CenterThread(fleet.store, fleet.broker.server_url, fleet.blobs, chunk=args.chunk,
                                    window=args.window, client_id=old.client_id, signer=old.signer,
                                    keys_update=old.keys_update).start()
    return fleet


def _progress(fleet: Fleet, job_ids: list[int]) -> dict[int, tuple[str, float]]:
    with fleet.store.session() as s:
        return {j: (st, p or 0.0) for j, st, p in s.execute(select(Job.id, Job.state, Job.progress)
                                                            .where(Job.id.in_(job_ids)))}


def run_case(fault: str, cut: str, args, tmp: Path) -> dict:
    fleet = Fleet.standalone(tmp, chunk=args.chunk, window=args.window, persistence=True)
    spy = None
    try:
        ids = [f"rs-{i}" for i in range(args.devices)]
        fleet.add_devices(ids)
        for proc in fleet.devices.values():
            proc.restart_delay = REBOOT_DELAY
        fleet.wait_online(*ids, timeout=60)
        spy = Spy(fleet.broker)
        # As `fota serve` does once the center subscribed: its session (and the spy's) on disk now.
        fleet.broker.mosquitto.save()
        time.sleep(0.2)
        image = bundle_of_size("1.1.0", args.image_kib * 1024)
        rel = fleet.release(image, "1.1.0")
        t0 = time.monotonic()
        dep = create_deployment(fleet.store, rel, device_ids=ids)
        jobs = [j.id for j in dep.jobs]
        cut_at = None
        if fault != "none":
            if cut == "install":
                wait_until(lambda: spy.saw_all(ids, ("rebooting",)), timeout=args.timeout, interval=0.01,
                           what="every device rebooting")
            else:
                f = float(cut)
                wait_until(lambda: all(st not in ("pending", "sent") and (st != "downloading" or p >= f)
                                       for st, p in _progress(fleet, jobs).values()),
                           timeout=args.timeout, interval=0.01, what=f"{f:.0%} downloaded")
            cut_at = _progress(fleet, jobs)
            fleet = _apply_fault(fault, fleet, args)
        try:
            wait_until(lambda: all(st in P.TERMINAL_STATES for st, _ in _progress(fleet, jobs).values()),
                       timeout=args.timeout, interval=0.05, what="every job final")
            finished = True
        except TimedOut:
            finished = False
        wall = time.monotonic() - t0
        # Statuses still on their way to the database (e.g. just after a restart).
        try:
            wait_until(lambda: not (spy.seen() - stored_keys(fleet.store, ids)), timeout=15, interval=0.1,
                       what="statuses stored")
        except TimedOut:
            pass
        return _score(fleet, spy, ids, jobs, rel, fault, cut, cut_at, wall, finished)
    finally:
        if spy is not None:
            spy.close()
        fleet.close()


def _score(fleet, spy, ids, jobs, rel, fault, cut, cut_at, wall, finished) -> dict:
    with fleet.store.session() as s:
        events = s.execute(select(StatusEvent.device_id, StatusEvent.job_id, StatusEvent.state)
                           .where(StatusEvent.device_id.in_(ids))).all()
        rows = {j.id: j for j in s.scalars(select(Job).where(Job.id.in_(jobs)))}
        job_rows = {j: (rows[j].device_id, rows[j].state, rows[j].bytes_served) for j in jobs}
    # Lost: (epoch, boot, seq) gaps in the table, and statuses the spy saw on the broker but never stored.
    gaps = status_gaps(fleet, ids, seen_on_broker=spy.seen())
    manifests = {"1.0.0": files_manifest(hello_files("1.0.0")), "1.1.0": json.loads(rel.manifest)}
    updated = bricked = twice = 0
    for dev in ids:
        installs = sum(1 for d, j, st in events if d == dev and st == "rebooting" and j in jobs)
        twice += installs > 1
        outcome = device_outcome(fleet, dev, manifests)
        updated += outcome["running"] == "1.1.0" and outcome["verified"]
        bricked += outcome["bricked"]
    served = sum(b for _, _, b in job_rows.values())
    return {
        "fault": fault, "cut": cut, "devices": len(ids), "finished": finished,
        "confirmed": sum(1 for _, st, _ in job_rows.values() if st == P.CONFIRMED),
        "updated": updated, "bricked": bricked, "installed_twice": twice, "lost_statuses": len(gaps["lost"]),
        "superseded_health": len(gaps["superseded"]),
        "missing": [list(k) + [spy.state_of(k)] for k in gaps["lost"]],
        "statuses_stored": len(stored_keys(fleet.store, ids)), "statuses_seen": len(spy.seen()),
        "bytes_resent": served - len(ids) * rel.size, "image_bytes": rel.size, "wall_s": round(wall, 2),
        "progress_at_cut": {str(j): list(v) for j, v in cut_at.items()} if cut_at else None,
    }


def render(results: dict) -> None:
    cfg = results["config"]
    rows = [(r["fault"], r["cut"], r["cases"], r["passed"], r["bricked"], r["installed_twice"], r["lost_statuses"],
             r["superseded_health"], f"{r['bytes_resent'] / 1024:.1f}", f"{r['wall_s']:.1f}", f"{r['ratio']:.2f}" if r["ratio"] else "-")
            for r in results["summary"]]
    print_table(f"restarts: {cfg['devices']} device(s), {cfg['image_kib']} KiB, chunk {cfg['chunk']}",
                ("fault", "at", "cases", "passed", "bricked", "twice", "lost", "superseded health", "re-sent KiB",
                 "wall s", "x base"),
                rows, left=("fault", "at"))


def case_passed(case: dict) -> bool:
    """Every job confirmed, every device on the release from a verified slot, none bricked or
    installed twice, no status lost."""
    return (case["finished"] and case["confirmed"] == case["devices"] == case["updated"] and not case["bricked"]
            and not case["lost_statuses"] and not case["installed_twice"])


def summarize(cases: list[dict]) -> list[dict]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for c in cases:
        groups.setdefault((c["fault"], c["cut"]), []).append(c)
    base = statistics.median(c["wall_s"] for c in groups.get(("none", "-"), [])) if ("none", "-") in groups else None
    out = []
    for (fault, cut), cs in groups.items():
        wall = statistics.median(c["wall_s"] for c in cs)
        out.append({
            "fault": fault, "cut": cut, "cases": len(cs),
            "passed": sum(case_passed(c) for c in cs),
            "bricked": sum(c["bricked"] for c in cs), "installed_twice": sum(c["installed_twice"] for c in cs),
            "lost_statuses": sum(c["lost_statuses"] for c in cs),
            "superseded_health": sum(c["superseded_health"] for c in cs), "bytes_resent": sum(c["bytes_resent"] for c in cs),
            "wall_s": wall, "ratio": wall / base if base else None,
        })
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="./run bench restarts", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated, of {', '.join(FAULTS)}")
    p.add_argument("--cuts", default="0.1,0.5,0.9,install",
                   help="where the fault lands: fractions of the download, or 'install' (devices rebooting)")
    p.add_argument("--devices", type=int, default=3, help="devices per case")
    p.add_argument("--image-kib", type=int, default=64, help="release (bundle) size in KiB")
    p.add_argument("--chunk", type=int, default=1024, help="chunk size in bytes")
    p.add_argument("--window", type=int, default=4, help="chunks a device has in flight")
    p.add_argument("--down", type=float, default=1.0, help="seconds the broker / center stays down")
    p.add_argument("--repeat", type=int, default=1, help="cases per fault and cut")
    p.add_argument("--timeout", type=float, default=120, help="seconds allowed per case")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    args = p.parse_args(argv)
    args.faults = [f for f in args.faults.split(",") if f]
    unknown = set(args.faults) - set(FAULTS)
    if unknown:
        p.error(f"unknown fault(s): {', '.join(sorted(unknown))}")
    args.cuts = [c for c in args.cuts.split(",") if c]
    for c in args.cuts:
        if c != "install" and not 0 < float(c) < 1:
            p.error(f"cut {c!r}: a fraction in (0, 1) or 'install'")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    t_begin = time.monotonic()
    cases = []
    with tempfile.TemporaryDirectory(prefix="fota-bench-restarts-") as tmp:
        n = 0
        for fault in args.faults:
            for cut in (["-"] if fault == "none" else args.cuts):
                for r in range(args.repeat):
                    n += 1
                    log(f"case {n}: {fault} at {cut} ({r + 1}/{args.repeat})")
                    case = run_case(fault, cut, args, Path(tmp) / f"case-{n}")
                    log("  ", {k: case[k] for k in ("confirmed", "bricked", "lost_statuses", "bytes_resent", "wall_s")})
                    cases.append(case)
    results = {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "environment": {"python": platform.python_version(), "machine": platform.machine()},
        "summary": summarize(cases), "cases": cases,
        "elapsed_s": round(time.monotonic() - t_begin, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=str))
    render(results)
    print(f"\nJSON: {args.out}   ({results['elapsed_s']:.0f} s)")
    failed = [c for c in cases if not case_passed(c)]
    if failed:
        print(f"FAILED: {len(failed)} of {len(cases)} case(s): "
              + ", ".join(f"{c['fault']} at {c['cut']}" for c in failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
