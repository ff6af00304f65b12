"""Benchmark: the dashboard's devices page and device page, answer times with a large fleet in the store.

For each database (SQLite file, fresh PostgreSQL database on 127.0.0.1:5432): N devices (three
hardware types, four versions, tags, half online, inventories with battery), one signed release,
a deployment with a job for every device (mixed states, a tenth failed with an error code), a
started campaign over all of them, and `--history` statuses per device (downloading steps,
confirmed or failed, health reports). Then the API app (fota.server.api.create_app, dashboard
included) is served by uvicorn on 127.0.0.1 and an HTTP client signs in through the sign-in form
and times whole answers (request sent to body received), `--requests` of each after `--warmup`:

    devices         /ui/devices: the first page (50 devices, sorted by id)
    devices deep    /ui/devices?after=...: a page from the middle of the fleet (keyset cursor)
    devices filter  /ui/devices?tag=...&online=1&sort=last_seen&desc=1
    device          /ui/devices/<a random device>: versions, health, job, timeline, audit
    campaign        /ui/campaigns/bench: the campaign over every device (waves, clocks, failures)

A row's verdict is `met` when both its median and 95th percentile are within --target-ms
(default 300). A run fails (exit 1) when a request does not answer 200 or the setup raises.

    ./run bench dashboard [--devices 10000] [--history 20] [--db sqlite|postgres|both]
"""
from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import httpx
from sqlalchemy import insert, select

from bench._report import print_table
from fota.device import protocol as P
from fota.examples import hello_files
from fota.server import audit
from fota.server.api import create_app
from fota.server.auth import create_token
from fota.server.campaigns import create_campaign, start_campaign
from fota.server.releases import create_release
from fota.server.store import Deployment, Device, Job, StatusEvent, Store, utcnow
from fota.testkit.appserver import AppServer
from fota.testkit.databases import fresh_database
from fota.tools.bundle import pack_files
from fota.tools.signing import generate_private_key

HARDWARE = ("esp32", "rp2040", "unix")
VERSIONS = ("1.0.0", "1.1.0", "1.2.0", "2.0.0")
FAIL_CODES = (P.E_HASH_MISMATCH, P.E_TIMEOUT, P.E_HEALTH, P.E_SPACE)
BATCH = 5000


def populate(store: Store, blobs: Path, n: int, history: int, seed: int = 7) -> None:
    rng = random.Random(seed)
    now = utcnow()
    ids = [f"dev-{i:06d}" for i in range(n)]
    with store.session() as s:
        for start in range(0, n, BATCH):
            s.execute(insert(Device), [{
                "id": d, "hardware": HARDWARE[i % 3], "version": VERSIONS[i % 4], "online": i % 2 == 0,
                "tags": ["fleet", f"site-{i % 10}"] + (["canary"] if i % 50 == 0 else []),
                "inventory": {"version": VERSIONS[i % 4], "active": "a", "slots": {"a": VERSIONS[i % 4], "b": "0.9.0"},
                              "battery": rng.randint(5, 100), "external": False, "state": "idle"},
                "created_at": now - timedelta(days=30), "last_seen": now - timedelta(seconds=rng.randint(0, 86400)),
            } for i, d in enumerate(ids[start:start + BATCH], start)])
    rel = create_release(store, blobs, generate_private_key(), pack_files(hello_files("3.0.0")), "3.0.0",
                         list(HARDWARE))
    with store.session() as s:
        dep = Deployment(release_id=rel.id, target={"devices": "all"}, state="active", created_at=now)
        s.add(dep)
        s.flush()
        dep_id = dep.id
        states = []
        for start in range(0, n, BATCH):
            rows = []
            for i, d in enumerate(ids[start:start + BATCH], start):
                failed = i % 10 == 0
                state = P.FAILED if failed else (P.CONFIRMED if i % 3 else P.DOWNLOADING)
                states.append((d, state))
                rows.append({"deployment_id": dep_id, "device_id": d, "kind": "update", "state": state,
                             "code": FAIL_CODES[i % 4] if failed else None,
                             "reason": "bench: a reason in the device's words" if failed else None,
                             "progress": 1.0 if state == P.CONFIRMED else 0.4, "created_at": now, "updated_at": now})
            s.execute(insert(Job), rows)
    audit.record(store, "ops-admin", "deployment.create", f"deployment:{dep_id}", {"release": "3.0.0"})
    create_campaign(store, "bench", "3.0.0", {"waves": [1, 100], "probation": 0})
    start_campaign(store, "bench")
    audit.record(store, "ops-admin", "campaign.start", "campaign:bench", {})
    with store.session() as s:
        job_ids = dict(s.execute(select(Job.device_id, Job.id).where(Job.deployment_id == dep_id)).all())
    rows = []
    for d, state in states:
        for k in range(history):
            last = k == history - 1
            st = state if last else (P.DOWNLOADING if k % 4 else "health")
            rows.append({"device_id": d, "job_id": None if st == "health" else job_ids[d], "state": st,
                         "code": None if st != P.FAILED else P.E_HASH_MISMATCH,
                         "progress": (k % 10) / 10 if st == P.DOWNLOADING else None, "version": "1.0.0",
                         "epoch": 1, "boot": 1, "seq": k + 1, "payload": {"ok": True} if st == "health" else {},
                         "received_at": now - timedelta(seconds=history - k)})
            if len(rows) >= BATCH:
                _insert_statuses(store, rows)
                rows = []
    if rows:
        _insert_statuses(store, rows)
    if store.engine.dialect.name == "postgresql":
        # planner statistics, as autovacuum keeps them on a live database (a table filled a moment
        # ago has none: PostgreSQL would scan where an index serves)
        with store.engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("ANALYZE")


def _insert_statuses(store: Store, rows: list[dict]) -> None:
    with store.session() as s:
        s.execute(insert(StatusEvent), rows)


def sign_in(client: httpx.Client, secret: str) -> None:
    page = client.get("/ui/login")
    nonce = re.search(r'name="login_nonce" value="([^"]+)"', page.text).group(1)
    r = client.post("/ui/login", data={"token": secret, "login_nonce": nonce})
    if r.status_code != 303:
        raise RuntimeError(f"sign-in answered {r.status_code}")


def timed(client: httpx.Client, paths: list[str], warmup: int) -> list[float]:
    for path in paths[:warmup]:
        client.get(path)
    times = []
    for path in paths:
        t = time.perf_counter()
        r = client.get(path)
        elapsed = time.perf_counter() - t
        if r.status_code != 200:
            raise RuntimeError(f"GET {path} answered {r.status_code}")
        times.append(elapsed * 1000)
    return times


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]


def run_db(kind: str, n: int, history: int, requests: int, warmup: int, target_ms: float) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="fota-bench-dash-") as tmp:
        url, drop = fresh_database(kind, Path(tmp) / "fota.db")
        store = Store(url)
        try:
            t0 = time.perf_counter()
            populate(store, Path(tmp) / "blobs", n, history)
            fill_s = time.perf_counter() - t0
            _, secret = create_token(store, "bench-reader", "read")
            app = create_app(store, Path(tmp) / "blobs", generate_private_key)
            rng = random.Random(1)
            with AppServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
                sign_in(client, secret)
                first = client.get("/ui/devices").text
                cursor = _cursor_at(client, n // 2)
                cases = {
                    "devices": ["/ui/devices"] * requests,
                    "devices deep": [f"/ui/devices?after={cursor}"] * requests,
                    "devices filter": ["/ui/devices?tag=site-4&online=1&sort=last_seen&desc=1"] * requests,
                    "device": [f"/ui/devices/dev-{rng.randrange(n):06d}" for _ in range(requests)],
                    "campaign": ["/ui/campaigns/bench"] * requests,
                }
                shown = len(re.findall(r'<tr><td><a href="/ui/devices/dev-', first))
                if shown != min(n, 50):
                    raise RuntimeError(f"the devices page lists {shown} devices, not {min(n, 50)}")
                if "E_" not in client.get("/ui/devices/dev-000000").text:  # device 0 failed: its code shows
                    raise RuntimeError("the device page shows no error code for a failed device")
                rows = []
                for name, paths in cases.items():
                    times = timed(client, paths, warmup)
                    median, high = statistics.median(times), p95(times)
                    rows.append({"db": kind, "page": name, "devices": n, "history": history, "requests": len(times),
                                 "median_ms": round(median, 1), "p95_ms": round(high, 1),
                                 "max_ms": round(max(times), 1), "fill_s": round(fill_s, 1),
                                 "verdict": "met" if median <= target_ms and high <= target_ms else "MISSED"})
            return rows
        finally:
            store.dispose()
            drop()


def _cursor_at(client: httpx.Client, index: int) -> str:
    """The keyset cursor of the page that starts after device `index` (by id)."""
    from fota.server.dashboard.queries import encode_cursor
    device_id = f"dev-{index:06d}"
    return encode_cursor(device_id, device_id)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=10000, help="devices in the store (default 10000)")
    ap.add_argument("--history", type=int, default=20, help="statuses stored per device (default 20)")
    ap.add_argument("--db", choices=("sqlite", "postgres", "both"), default="both",
                    help="database(s) to measure (default both)")
    ap.add_argument("--requests", type=int, default=100, help="timed requests per page (default 100)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed requests first (default 5)")
    ap.add_argument("--target-ms", type=float, default=300.0, help="median and p95 target (default 300)")
    ap.add_argument("--out", default="bench/results/dashboard.json")
    args = ap.parse_args(argv)
    kinds = ("sqlite", "postgres") if args.db == "both" else (args.db,)
    results, failures = [], []
    for kind in kinds:
        try:
            results += run_db(kind, args.devices, args.history, args.requests, args.warmup, args.target_ms)
        except Exception as exc:
            failures.append(f"{kind}: {type(exc).__name__}: {exc}")
    print_table(f"dashboard answer times: {args.devices} devices, {args.history} statuses each "
                f"(target: median and p95 <= {args.target_ms:g} ms)",
                ["db", "page", "requests", "median ms", "p95 ms", "max ms", "store filled s", "result"],
                [[r["db"], r["page"], r["requests"], r["median_ms"], r["p95_ms"], r["max_ms"], r["fill_s"],
                  r["verdict"]] for r in results],
                notes=[f"FAILED: {f}" for f in failures], left=("db", "page", "result"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results, "failures": failures}, indent=1))
    print(f"JSON: {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
