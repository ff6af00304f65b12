"""Power-cut sweep: cut power before, and in the middle of, every persistent operation of an update.

    ./run bench powercut [--backends sim,esp32,files] [--scenarios update,revert,second,delta]
                         [--image-kib 64] [--sector 4096] [--align 4] [--erased 0xff] [--chunk 1000]
                         [--window 3] [--seed 1] [--chained 100] [--depth 2] [--fs auto]
                         [--eager-ack] [--interpreter cpython|64|32-frozen]
                         [--out bench/results/powercut.json]

Each scenario (fota.powercut.scenario) is one update of a device on one slot backend, driven
without a network by fota.powercut.harness through the real runner and core: `sim` (a NOR flash),
`esp32` (the OTA partitions of the emulated `esp32` module of fota.testkit.boards, whose bootloader runs
at every power-on) or `files` (app bundles in slot directories, on a LittleFS model of the
filesystem). The clean run counts the update's persistent operations N (flash erases and writes,
partition writes, set_boot and mark_app_valid, file operations); then for every i in 1..N the
update is replayed with power cut before operation i, and again with operation i torn in the
middle; then `--chained` runs per scenario with `--depth` cuts each (the next cut at a random point
of the recovery from the previous one). See bench/README.md and docs/reliability.md for the flash
and filesystem models, the cut model and the checks.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench._report import print_table
from fota.powercut import harness as H
from fota.powercut.scenario import BACKENDS, FILE_MODELS, SCENARIOS, build
from fota.testkit.faults import seq_gaps

ROOT = Path(__file__).resolve().parent.parent
BOARDS = ROOT / "src" / "fota" / "testkit" / "boards"  # the emulated `esp32` module the esp32 backend runs on
DEFAULT_OUT = ROOT / "bench" / "results" / "powercut.json"
FAULTS = ("power cut before an operation", "power cut in the middle of an operation",
          "chained power cuts (random, during recovery)")
PHASE_NAMES = {"download": "download", "install": "verify+install", "trial": "trial boot+confirm"}


def log(*args) -> None:
    print("[bench]", *args, file=sys.stderr, flush=True)


def _phase(scenario: str, label: str) -> str:
    if label == "trial" and scenario == "revert":
        return "trial boots+revert"
    return PHASE_NAMES.get(label, label)


class Row:
    def __init__(self, backend: str, scenario: str, phase: str, n_ops: int | None):
        self.backend, self.scenario, self.phase, self.n_ops = backend, scenario, phase, n_ops
        self.cases = self.passed = self.bricked = self.lost = self.resent = 0
        self.max_resent = 0
        self.seconds = 0.0
        self.failures: list[dict] = []

    def add(self, case: dict, out: dict, seconds: float) -> None:
        # Lost: the terminal status never reached the center (the harness's check), plus every
        # (epoch, boot, seq) gap in what it received.
        gaps = seq_gaps(("device", epoch, boot, seq) for epoch, boot, seq in out["statuses"])
        ok = out["ok"] and not gaps
        self.cases += 1
        self.seconds += seconds
        self.passed += bool(ok)
        self.bricked += bool(out["bricked"])
        self.lost += out["lost"] + len(gaps)
        self.resent += out["resent"]
        self.max_resent = max(self.max_resent, out["resent"])
        if not ok:
            out = {k: v for k, v in out.items() if k != "statuses"}
            self.failures.append(dict(case, **out, gaps=[[e, b, q] for _, e, b, q in gaps]))

    def as_dict(self) -> dict:
        return {"backend": self.backend, "scenario": self.scenario, "phase": self.phase, "n_ops": self.n_ops, "cases": self.cases,
                "passed": self.passed, "bricked": self.bricked, "lost_statuses": self.lost,
                "bytes_resent": self.resent, "max_resent": self.max_resent, "seconds": round(self.seconds, 2),
                "failures": self.failures[:20]}


def sweep(args, directory: Path) -> dict:
    rows: list[Row] = []
    faults = {}  # (backend, fault) -> Row: the same cases, by kind of fault
    clean = {}
    for backend in args.backends:
        # Not named after the backend: a directory `esp32` on the import path would shadow the module.
        dirs = build(directory / ("backend-" + backend), backend=backend, image_size=args.image_kib * 1024,
                     sector=args.sector, erased=args.erased, align=args.align, chunk=args.chunk,
                     window=args.window, seed=args.seed, max_trial_boots=args.max_trial_boots,
                     scenarios=args.scenarios, fs=None if args.fs == "auto" else args.fs)
        for m in FAULTS:
            faults[(backend, m)] = Row(backend, "all", m, None)
        work = str(directory / "device")
        for name in args.scenarios:
            sweep_scenario(args, backend, name, H.Scenario(str(dirs[name])), work, rows, faults, clean)
    return {"clean": clean, "rows": rows, "faults": list(faults.values())}


def sweep_scenario(args, backend, name, scenario, work, rows, faults, clean) -> None:
    t0 = time.perf_counter()
    out, oplog = H.clean_run(scenario, work)
    clean_s = time.perf_counter() - t0
    if not out["ok"]:
        raise SystemExit(f"the clean run of {backend}/{name} fails: {out['problems']}")
    n = out["ops"]
    phases = [_phase(name, label) for _, label in oplog]
    clean[f"{backend}/{name}"] = {
        "ops": n, "boots": out["boots"], "seconds": round(clean_s, 4), "served_bytes": scenario.size,
        "kinds": dict(Counter(kind.split()[0] for kind, _ in oplog)),
        "phases": dict(Counter(phases)), "log": [[k, p] for (k, _), p in zip(oplog, phases)]}
    c = clean[f"{backend}/{name}"]
    log(f"{backend}/{name}: N = {n} persistent operations ({c['kinds']}), {out['boots']} boots")
    by_phase = {}
    for p in phases:
        if p not in by_phase:
            by_phase[p] = Row(backend, name, p, phases.count(p))
            rows.append(by_phase[p])
    known = {}
    for mid in (False, True):
        for i in range(1, n + 1):
            t0 = time.perf_counter()
            r = H.run_case(scenario, work, (i,), mid, eager_ack=args.eager_ack)
            known[((i,), (i,) if mid else ())] = r["ops"]
            case, seconds = {"cut_at": [i], "torn_at": [i] if mid else []}, time.perf_counter() - t0
            by_phase[phases[i - 1]].add(case, r, seconds)
            faults[(backend, FAULTS[1] if mid else FAULTS[0])].add(case, r, seconds)
    if args.chained:
        row = Row(backend, name, f"chained, {args.depth} cuts", None)
        rows.append(row)
        t0 = time.perf_counter()
        cases = H.chained_cases(scenario, work, args.seed, args.chained, args.depth, known)
        per = (time.perf_counter() - t0) / max(1, len(cases))
        for cuts, torn, r in cases:
            row.add({"cut_at": list(cuts), "torn_at": list(torn)}, r, per)
            faults[(backend, FAULTS[2])].add({"cut_at": list(cuts), "torn_at": list(torn)}, r, per)
    log(f"{backend}/{name}: {sum(r.cases for r in rows if r.scenario == name and r.backend == backend)} cases")


def show(results: dict, args) -> None:
    rows = results["rows"]
    size = args.image_kib * 1024
    table = [[r.backend, r.scenario, r.phase, "" if r.n_ops is None else r.n_ops, r.cases, r.passed, r.bricked,
              r.lost, f"{r.resent / 1024:.1f}", f"{r.max_resent / size:.2f}",
              f"{1000 * r.seconds / max(1, r.cases):.0f}"]
             for r in rows]
    total = sum(r.cases for r in rows)
    table.append(["all", "", "", "", total, sum(r.passed for r in rows), sum(r.bricked for r in rows),
                  sum(r.lost for r in rows), f"{sum(r.resent for r in rows) / 1024:.1f}",
                  f"{max((r.max_resent for r in rows), default=0) / size:.2f}", ""])
    print_table(f"power cuts: {args.image_kib} KiB image, sector {args.sector}, align {args.align}, "
                f"erased 0x{args.erased:02X}, chunk {args.chunk} x window {args.window}"
                + (", EAGER ACK" if args.eager_ack else ""),
                ["backend", "scenario", "phase", "N ops", "cases", "passed", "bricked", "lost statuses",
                 "re-sent KiB", "max re-sent / image", "ms/case"], table, left=("backend", "scenario", "phase"))
    notes = [f"{name}: N = {c['ops']} persistent operations in the clean update "
             f"({', '.join(f'{v} {k}' for k, v in c['kinds'].items())}); {c['served_bytes']} bytes served; "
             f"clean run {1000 * c['seconds']:.0f} ms"
             for name, c in results["clean"].items()]
    notes.append(f"cases run: {total}, passed: {sum(r.passed for r in rows)}, "
                 f"bricked: {sum(r.bricked for r in rows)}")
    for r in rows:
        for f in r.failures[:3]:
            notes.append(f"FAIL {r.backend} / {r.scenario} / {r.phase}: cut at {f['cut_at']} torn {f['torn_at']}: "
                         f"{f['bricked'] or ''} {'; '.join(f['problems'])}"
                         + (f" (epoch, boot, seq) gaps {f['gaps']}" if f["gaps"] else ""))
    print_table("by backend and fault (the rows of docs/reliability.md)",
                ["backend", "fault", "cases run", "passed", "bricked", "lost statuses", "bytes re-sent", "max per case"],
                [[r.backend, r.phase, r.cases, r.passed, r.bricked, r.lost, r.resent, r.max_resent]
                 for r in results["faults"] if r.cases], notes, left=("backend", "fault"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="./run bench powercut", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help="comma-separated slot backends: " + ", ".join(BACKENDS))
    p.add_argument("--image-kib", type=int, default=64, help="size of the new image, KiB")
    p.add_argument("--sector", type=int, default=4096, help="sim flash sector (erase unit), bytes (esp32: 4096)")
    p.add_argument("--align", type=int, default=4, help="sim flash write alignment, bytes")
    p.add_argument("--erased", type=lambda v: int(v, 0), default=0xFF,
                   help="sim flash erased byte value (0xff or 0x00)")
    p.add_argument("--fs", default="auto", choices=("auto", "replace", "littlefs"),
                   help="model of the device's files: auto = " + ", ".join(f"{b} {m}" for b, m in FILE_MODELS.items()))
    p.add_argument("--chunk", type=int, default=1000,
                   help="chunk size; not a divisor of the sector, so checkpoints fall inside sectors")
    p.add_argument("--window", type=int, default=3, help="chunks per checkpoint (and in flight)")
    p.add_argument("--seed", type=int, default=1, help="images and chained cut points")
    p.add_argument("--chained", type=int, default=100, help="random chained cases per scenario (0: none)")
    p.add_argument("--depth", type=int, default=2, help="cuts per chained case")
    p.add_argument("--max-trial-boots", type=int, default=3, help="trial boots before a revert")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help="comma-separated: " + ", ".join(SCENARIOS) + " (delta: the update as a delta patch)")
    p.add_argument("--eager-ack", action="store_true",
                   help="diagnostic: the device acknowledges a command when it arrives, before it is persisted "
                        "(the MQTT client's behaviour before manual_ack)")
    p.add_argument("--interpreter", choices=("cpython", "64", "32-frozen"), default="cpython",
                   help="where the harness runs: this CPython process, or a MicroPython process (64: PyPI, "
                        "32-frozen: 32-bit with the agent frozen in; fota.testkit.mpharness)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    args = p.parse_args(argv)
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    for s in args.scenarios:
        if s not in SCENARIOS:
            p.error(f"unknown scenario {s!r}")
    args.backends = [b for b in args.backends.split(",") if b]
    for b in args.backends:
        if b not in BACKENDS:
            p.error(f"unknown backend {b!r} (one of {', '.join(BACKENDS)})")
    if not args.backends or not args.scenarios:
        p.error("no backend or no scenario to run")
    if args.erased not in (0x00, 0xFF):
        p.error("--erased must be 0xff or 0x00")
    return args


def main(argv=None) -> int:
    global H
    args = parse_args(argv)
    t0 = time.perf_counter()
    lend = "esp32" in args.backends and str(BOARDS) not in sys.path
    if lend:
        sys.path.insert(0, str(BOARDS))  # the agent never imports the test kit: the bench lends it the emulation
    # The device collects its heap before a delta (a board's heap is small); on CPython each
    # collection walks every object of this process: the ones made so far are frozen.
    gc.freeze()
    if args.interpreter != "cpython":  # the same calls, answered by the harness in MicroPython
        from fota.testkit.mpharness import MicroPythonHarness
        H = MicroPythonHarness(args.interpreter, extra_path=str(BOARDS))
    try:
        with tempfile.TemporaryDirectory(prefix="fota-powercut-") as tmp:
            results = sweep(args, Path(tmp))
    finally:
        gc.unfreeze()
        if lend:
            sys.path.remove(str(BOARDS))
        if args.interpreter != "cpython":
            H.close()
    show(results, args)
    rows = results["rows"]
    doc = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": {"python": platform.python_version(), "platform": platform.platform()},
        "seconds": round(time.perf_counter() - t0, 1),
        "clean": results["clean"],
        "rows": [r.as_dict() for r in rows],
        "faults": [r.as_dict() for r in results["faults"]],
        "totals": {"cases": sum(r.cases for r in rows), "passed": sum(r.passed for r in rows),
                   "bricked": sum(r.bricked for r in rows), "lost_statuses": sum(r.lost for r in rows),
                   "bytes_resent": sum(r.resent for r in rows)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(f"JSON: {args.out} ({doc['seconds']} s)")
    return 0 if doc["totals"]["passed"] == doc["totals"]["cases"] else 1


if __name__ == "__main__":
    sys.exit(main())
