"""Property-based fuzzing (hypothesis) of every parser on the device side.

    ./run bench fuzz_device [--examples 10000] [--seed 1] [--only chunk,mqtt] [--jobs 2]
                            [--out bench/results/fuzz_device.json]

Each parser gets --examples generated inputs (random, structurally valid but wrong, validly signed
with random field values, and mutated valid ones). Every input must either parse or give a clean
error (a status `rejected`/`failed` with a code of protocol.ERROR_CODES, or a clean MQTTError /
BundleError / TrustError for the lower layers), never an uncaught exception, and an input that is
refused must change nothing (state, last_job, time, trust document, slot). A crash is any other
exception or a broken invariant; the run exits non-zero if there is one. See bench/README.md.

The targets are fota.testkit.fuzzing's; tests/test_fuzz_device.py runs them (a few hundred examples
each) in the test suite.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed

from bench._report import print_table
from fota.device import protocol as P
from fota.testkit.fuzzing import PARSERS

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "fuzz_device.json"
DEFAULT_EXAMPLES = 10_000


def outcome_kind(label: str) -> str:
    """'error' for a clean refusal, 'parsed' otherwise."""
    if label.startswith(("MQTTError", "BundleError")) or label in P.ERROR_CODES:
        return "error"
    if "," in label or label.startswith("E_"):
        return "error"
    return "parsed"


def run_parser(name: str, examples: int, seed: int) -> dict:
    """Runs one target with hypothesis (generation only: a crash is recorded, not shrunk)."""
    strategy, check, _ = PARSERS[name]
    outcomes: dict = {}
    crashes: list = []
    count = [0]

    @hypothesis_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), derandomize=False)
    @given(strategy)
    def run(x):
        count[0] += 1
        try:
            label = check(x)
        except Exception as e:  # noqa: BLE001  - every exception is a finding
            label = "CRASH"
            if len(crashes) < 5:
                crashes.append({"input": repr(x)[:600], "error": f"{type(e).__name__}: {e}"[:400],
                                "traceback": traceback.format_exc()[-2000:]})
            else:
                crashes.append(None)
        outcomes[label] = outcomes.get(label, 0) + 1

    t0 = time.monotonic()
    run()
    n_crash = outcomes.get("CRASH", 0)
    codes = set()
    for label in outcomes:
        if label != "CRASH" and outcome_kind(label) == "error":
            codes.update(label.split(",") if label.startswith("E_") else [label])
    return {"parser": name, "target": PARSERS[name][2], "inputs": count[0], "seconds": round(time.monotonic() - t0, 1),
            "parsed": sum(v for k, v in outcomes.items() if k != "CRASH" and outcome_kind(k) == "parsed"),
            "errors": sum(v for k, v in outcomes.items() if k != "CRASH" and outcome_kind(k) == "error"),
            "error_codes": sorted(codes), "crashes": n_crash,
            "crash_samples": [c for c in crashes if c], "outcomes": dict(sorted(outcomes.items()))}


def codes_text(codes) -> str:
    """Protocol codes without their E_; exception messages grouped under their class."""
    plain = [c[2:] for c in codes if c.startswith("E_")]
    groups: dict = {}
    for c in codes:
        if ": " in c:
            cls, msg = c.split(": ", 1)
            groups.setdefault(cls, []).append(msg)
    return " ".join(plain + [f"{cls}: " + "; ".join(msgs) for cls, msgs in groups.items()])


def render(results: dict) -> None:
    rows = [(r["parser"], f"{r['inputs']:,}", f"{r['parsed']:,}", f"{r['errors']:,}", len(r["error_codes"]),
             codes_text(r["error_codes"]), r["crashes"], f"{r['seconds']:.0f}")
            for r in results["parsers"]]
    rows.append(("total", f"{results['total_inputs']:,}", "", "", "", "", results["total_crashes"],
                 f"{results['elapsed_s']:.0f}"))
    columns = ("parser", "inputs", "parsed", "refused", "codes", "distinct error codes seen", "crashes", "s")
    print_table(f"device parser fuzzing (seed {results['seed']}, {results['examples']:,} examples per parser)",
                columns, rows, left=("parser", "distinct error codes seen"))
    for r in results["parsers"]:
        for c in r["crash_samples"]:
            print(f"\nCRASH in {r['parser']}: {c['error']}\n  input: {c['input']}\n{c['traceback']}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="./run bench fuzz_device", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--examples", type=int, default=DEFAULT_EXAMPLES, help="generated inputs per parser")
    p.add_argument("--seed", type=int, default=1, help="hypothesis seed (parser i uses seed + i)")
    p.add_argument("--only", default="", help="comma-separated parsers (default: all): " + ",".join(PARSERS))
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parsers run in parallel processes")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    args = p.parse_args(argv)
    args.only = [x.strip() for x in args.only.split(",") if x.strip()] or list(PARSERS)
    unknown = [x for x in args.only if x not in PARSERS]
    if unknown:
        p.error(f"unknown parser(s) {', '.join(unknown)}; known: {', '.join(PARSERS)}")
    if args.examples < 1 or args.jobs < 1:
        p.error("--examples and --jobs must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    tasks = [(name, args.examples, args.seed + list(PARSERS).index(name)) for name in args.only]
    if args.jobs > 1 and len(tasks) > 1:
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(min(args.jobs, len(tasks))) as pool:
            futures = [pool.submit(run_parser, *t) for t in tasks]
            parsers = [f.result() for f in futures]
    else:
        parsers = [run_parser(*t) for t in tasks]
    results = {"seed": args.seed, "examples": args.examples, "jobs": args.jobs,
               "python": platform.python_version(), "parsers": parsers,
               "total_inputs": sum(r["inputs"] for r in parsers),
               "total_crashes": sum(r["crashes"] for r in parsers),
               "elapsed_s": round(time.monotonic() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    render(results)
    print(f"\nJSON: {args.out}   ({results['elapsed_s']:.0f} s)")
    return 1 if results["total_crashes"] else 0


if __name__ == "__main__":
    sys.exit(main())
