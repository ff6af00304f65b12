"""Benchmark: a deployment to a large fleet, on SQLite and PostgreSQL.

For each backend and fleet size N: N devices are inserted (bulk, not timed) and a release
created; then timed:

* ``create_deployment`` to the N devices by explicit ids (timeout 60 s), and (a second
  release) by tag;
* the control center's bookkeeping of N live jobs, without a broker: marking them sent
  (``sender.mark_sent``), re-reading their states (``jobs.states_by_id``, the cache refresh), and
  timing them out once the deployment's timeout passed (``expire_jobs``).

SQLite runs with the bound-parameter cap of its stock build (32,766; Debian's allows 250,000)
unless --sqlite-max-variables says otherwise. A step that fails (e.g. "too many SQL variables"
with one IN-list of every job) is reported as such, not as a time.

    ./run bench deployments [--devices 10000,40000] [--backends sqlite,postgres]
"""
from __future__ import annotations

import argparse
import json
import secrets
import sqlite3
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import event, func, insert, select

from bench._report import print_table
from fota.examples import hello_files
from fota.server.deployments import create_deployment, expire_jobs
from fota.server.releases import create_release
from fota.server.center import ControlCenter
from fota.server.store import Device, Job, Store, utcnow
from fota.testkit.databases import fresh_database
from fota.tools.bundle import pack_files
from fota.tools.keyring import Signer
from fota.tools.signing import generate_private_key


def _fleet(store: Store, n: int) -> list[str]:
    ids = [f"dev-{i:06d}" for i in range(n)]
    now = utcnow()
    with store.session() as s:
        s.execute(insert(Device), [{"id": i, "hardware": "unix", "version": "1.0.0", "online": True,
                                    "inventory": {}, "tags": ["bench"], "created_at": now} for i in ids])
    return ids


def _timed(fn):
    """(seconds, result) of fn(), or (error text, None) if it raised."""
    t0 = time.perf_counter()
    try:
        result = fn()
    except Exception as exc:  # a step that cannot run at this size is a result too
        return str(getattr(exc, "orig", None) or exc).splitlines()[0][:60], None
    return time.perf_counter() - t0, result


def run(url: str, n: int, sqlite_max_variables: int = 0) -> dict:
    store = Store(url)
    if sqlite_max_variables and store.engine.dialect.name == "sqlite":
        @event.listens_for(store.engine, "connect")
        def _cap(dbapi_connection, _record):
            dbapi_connection.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, sqlite_max_variables)
        store.engine.dispose()  # connections opened before the listener
    key = generate_private_key()
    try:
        ids = _fleet(store, n)
        with tempfile.TemporaryDirectory() as blobs:
            rels = [create_release(store, blobs, key, pack_files(hello_files(v)), v, ["unix"])
                    for v in ("2.0.0", "2.0.1")]
            by_ids, dep = _timed(lambda: create_deployment(store, rels[0], device_ids=ids, timeout=60))
            by_tag, _ = _timed(lambda: create_deployment(store, rels[1], tag="bench"))
            mark_sent = refresh = expire = states = expired = None  # not run without the deployment
            if dep is not None:
                center = ControlCenter(store, "mqtt://127.0.0.1:1", blobs, signer=Signer(key),
                                       campaign_interval=None)
                try:
                    job_ids = [j.id for j in dep.jobs]
                    mark_sent, _ = _timed(lambda: center.sender.mark_sent(job_ids))
                    refresh, states = _timed(lambda: center.jobs.states_by_id(job_ids))
                finally:
                    center.db.shutdown()
                expire, expired = _timed(lambda: _expire(store, dep))
        with store.session() as s:
            jobs = s.scalar(select(func.count()).select_from(Job).where(Job.kind == "update"))
            # every job was marked sent: the timeout queued a cancel behind each
            cancels = s.scalar(select(func.count()).select_from(Job).where(Job.kind == "cancel"))
        ok = (dep is not None and len(dep.jobs) == n and jobs == 2 * n and states is not None and len(states) == n
              and expired == n and cancels == n)
        return {"create_ids": by_ids, "create_tag": by_tag, "mark_sent": mark_sent, "refresh": refresh,
                "expire": expire, "jobs": jobs, "ok": ok}
    finally:
        store.dispose()


def _expire(store: Store, dep) -> int:
    """Time out the deployment's jobs (its timeout passed); how many were timed out."""
    with store.session() as s:
        expired = expire_jobs(s, dep.created_at + timedelta(seconds=61))
    return len(expired.get(dep.id, ()))


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else f"fails: {value}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", default="10000,40000", help="fleet sizes, comma-separated")
    ap.add_argument("--backends", default="sqlite,postgres", help="sqlite and/or postgres")
    ap.add_argument("--sqlite-max-variables", type=int, default=32766,
                    help="SQLite's bound-parameter cap (its stock build's; 0: the library's own)")
    ap.add_argument("--out", default="bench/results/deployments.json")
    args = ap.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends.split(","):
            for n in (int(x) for x in args.devices.split(",")):
                url, drop = fresh_database(backend, Path(tmp) / f"bench-{secrets.token_hex(4)}.db")
                try:
                    results.append({"backend": backend, "devices": n, **run(url, n, args.sqlite_max_variables)})
                finally:
                    drop()
                print(f"{backend} N={n}: {results[-1]}", file=sys.stderr)
    rows = [[r["backend"], f"{r['devices']:,}", _cell(r["create_ids"]), _cell(r["create_tag"]),
             _cell(r["mark_sent"]), _cell(r["refresh"]), _cell(r["expire"]), "ok" if r["ok"] else "FAILED"]
            for r in results]
    print_table("a deployment to N devices: seconds per step",
                ["backend", "devices", "create (ids) s", "create (tag) s", "mark sent s", "refresh s", "expire s",
                 "result"],
                rows, left=("backend", "result"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"results": results}, indent=1, default=str))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
