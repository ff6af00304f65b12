"""Schemathesis against the HTTP API's own OpenAPI schema, every check, on SQLite and PostgreSQL.

    ./run bench api_fuzz [--examples 200] [--backends sqlite,postgres] [--seed N] [--out FILE]

For each backend: a fresh database (an SQLite file; a throwaway PostgreSQL database on
127.0.0.1:5432), the API seeded and served, and ``schemathesis run`` with every check and
``--examples`` test cases per operation in each phase (fota.testkit.apifuzz says what is seeded
and the one rule that is the project's).

Prints a table per backend and the failures (schemathesis's own output is in
``<out>.<backend>.log``), writes JSON (``--out``); exits 1 if any check failed or
schemathesis could not run. tests/test_api_schema.py runs it sampled.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from bench._report import print_table
from fota.testkit.apifuzz import fuzz
from fota.testkit.databases import fresh_database


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=200, help="test cases per operation and phase")
    ap.add_argument("--backends", default="sqlite,postgres", help="sqlite and/or postgres")
    ap.add_argument("--seed", type=int, default=None, help="schemathesis's seed (default: random, reported)")
    ap.add_argument("--out", default="bench/results/api_fuzz.json")
    args = ap.parse_args(argv)
    out = Path(args.out)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends.split(","):
            url, drop = fresh_database(backend, Path(tmp) / f"{backend}.db")
            try:
                result = fuzz(url, Path(tmp) / backend, args.examples, args.seed,
                              log=out.with_suffix(f".{backend}.log"))
            finally:
                drop()
            results.append({"backend": backend, **result})
    rows = [[r["backend"], r["examples"], r.get("operations", "?"), r.get("generated", "?"),
             r.get("failing_cases", "?"), r.get("server_errors", "?"), len(r.get("failures", ())),
             len(r.get("errors", ())), r["seconds"], "ok" if r["ok"] else "FAILED"] for r in results]
    print_table("schemathesis, every check, against the API's OpenAPI schema",
                ["backend", "examples/op", "operations", "test cases", "failing cases", "server errors",
                 "failure kinds", "errors", "seconds", "result"], rows, left=("backend", "result"))
    failure_rows = [[r["backend"], f["code"], f["title"], f["count"], ", ".join(f["operations"])]
                    for r in results for f in r.get("failures", ())]
    if failure_rows:
        print_table("failures", ["backend", "code", "check", "count", "operations"], failure_rows,
                    left=("backend", "code", "check", "operations"))
    for r in results:
        if not r["ok"]:
            log = out.with_suffix(f".{r['backend']}.log")
            print(f"\n--- {r['backend']}: schemathesis output (tail; whole log {log}) ---\n{r['output_tail']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"results": results}, indent=1, default=str))
    return 0 if results and all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
