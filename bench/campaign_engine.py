"""Benchmark: the campaign engine's own cost, per device, on SQLite and PostgreSQL.

A campaign of a release to N devices (waves 1/10/50/100 %, probation 0, no pacing limits) is
stepped until done. Between steps, a "fleet" writes what ingestion would write for every device
in flight: its job `confirmed`, the `confirmed` status and a `health` report (bulk statements,
not timed). Timed: the engine's steps only (`CampaignEngine.tick`), plus `start_campaign`
(targeting and wave assignment).

Floor, same run and database: the least SQL that records the same outcome with no decisions —
one bulk INSERT of N campaign rows, one bulk INSERT of N jobs, one bulk UPDATE of N rows to
in flight and one to succeeded. ratio = engine / floor.

    ./run bench campaign_engine [--devices 1000,10000] [--backends sqlite,postgres]
"""
from __future__ import annotations

import argparse
import json
import secrets
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import insert, select, text, update

from bench._report import print_table
from fota.device import protocol as P
from fota.examples import hello_files
from fota.server.campaigns import CampaignEngine, create_campaign, start_campaign
from fota.server.campaigns import states as S
from fota.server.releases import create_release
from fota.server.store import Campaign, CampaignDevice, Deployment, Device, Job, StatusEvent, Store, utcnow
from fota.testkit.databases import fresh_database
from fota.tools.bundle import pack_files
from fota.tools.signing import generate_private_key

def _fleet(store: Store, n: int) -> None:
    now = utcnow()
    with store.session() as s:
        s.execute(insert(Device), [{"id": f"dev-{i:06d}", "hardware": "unix", "version": "1.0.0", "online": True,
                                    "inventory": {}, "tags": [], "created_at": now} for i in range(n)])


def _report_confirmations(store: Store, seq: list[int]) -> int:
    """What ingestion writes for every device in flight: job confirmed, confirmed + health statuses."""
    now = utcnow()
    with store.session() as s:
        jobs = s.execute(select(Job.id, Job.device_id).where(Job.kind == "update", Job.state == "pending")).all()
        if not jobs:
            return 0
        s.execute(update(Job).where(Job.id.in_([j for j, _ in jobs])).values(state=P.CONFIRMED, progress=1.0))
        rows = []
        for job_id, device_id in jobs:
            seq[0] += 2
            rows.append({"device_id": device_id, "job_id": job_id, "state": P.CONFIRMED, "version": "2.0.0",
                         "boot": 2, "seq": seq[0], "payload": {}, "received_at": now})
            rows.append({"device_id": device_id, "job_id": None, "state": "health", "version": "2.0.0",
                         "boot": 2, "seq": seq[0] + 1, "payload": {"ok": True}, "received_at": now})
        s.execute(insert(StatusEvent), rows)
    return len(jobs)


def run_engine(url: str, n: int) -> dict:
    store = Store(url)
    try:
        _fleet(store, n)
        with tempfile.TemporaryDirectory() as blobs:
            create_release(store, blobs, generate_private_key(), pack_files(hello_files("2.0.0")), "2.0.0", ["unix"])
        create_campaign(store, "bench", "2.0.0", {"waves": [1, 10, 50, 100], "max_in_flight": n, "probation": 0})
        engine = CampaignEngine(store)
        now = utcnow()
        t0 = time.perf_counter()
        start_campaign(store, "bench", now=now)
        start_s = time.perf_counter() - t0
        engine_s, ticks, worst, seq = 0.0, 0, 0.0, [0]
        while True:
            t = time.perf_counter()
            engine.tick(now)
            dt = time.perf_counter() - t
            engine_s += dt
            worst = max(worst, dt)
            ticks += 1
            with store.session() as s:
                state = s.scalar(select(Campaign.state).where(Campaign.name == "bench"))
            if state == S.DONE or ticks > 100:
                break
            _report_confirmations(store, seq)
            now += timedelta(seconds=1)
        with store.session() as s:
            succeeded = s.scalar(select(text("count(*)")).select_from(CampaignDevice)
                                 .where(CampaignDevice.state == S.SUCCEEDED))
        return {"state": state, "ticks": ticks, "start_s": start_s, "engine_s": engine_s, "worst_tick_s": worst,
                "succeeded": succeeded}
    finally:
        store.dispose()


def run_floor(url: str, n: int) -> float:
    """Bulk statements recording the same outcome, no decisions (same schema, fresh database)."""
    store = Store(url)
    try:
        _fleet(store, n)
        with tempfile.TemporaryDirectory() as blobs:
            rel = create_release(store, blobs, generate_private_key(), pack_files(hello_files("2.0.0")), "2.0.0",
                                 ["unix"])
        now = utcnow()
        t0 = time.perf_counter()
        with store.session() as s:
            dep = Deployment(release_id=rel.id, target={}, state="active")
            s.add(dep)
            s.flush()
            c = Campaign(name="floor", release_id=rel.id, deployment_id=dep.id, spec={}, state="running",
                         wave=0, accepted={})
            s.add(c)
            s.flush()
            s.execute(insert(CampaignDevice), [{"campaign_id": c.id, "device_id": f"dev-{i:06d}", "wave": 0,
                                                "state": S.QUEUED, "updated_at": now} for i in range(n)])
        with store.session() as s:
            s.execute(insert(Job), [{"deployment_id": dep.id, "device_id": f"dev-{i:06d}", "kind": "update",
                                     "state": "pending", "created_at": now, "updated_at": now} for i in range(n)])
            s.execute(update(CampaignDevice).where(CampaignDevice.campaign_id == c.id)
                      .values(state=S.IN_FLIGHT, attempts=1, step="download", step_at=now))
        with store.session() as s:
            s.execute(update(CampaignDevice).where(CampaignDevice.campaign_id == c.id)
                      .values(state=S.SUCCEEDED, confirmed_at=now))
        return time.perf_counter() - t0
    finally:
        store.dispose()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", default="1000,10000", help="fleet sizes, comma-separated")
    ap.add_argument("--backends", default="sqlite,postgres", help="sqlite and/or postgres")
    ap.add_argument("--out", default="bench/results/campaign_engine.json")
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.devices.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends.split(","):
            for n in sizes:
                url, drop = fresh_database(backend, Path(tmp) / f"bench-{secrets.token_hex(4)}.db")
                try:
                    engine = run_engine(url, n)
                finally:
                    drop()
                url, drop = fresh_database(backend, Path(tmp) / f"bench-{secrets.token_hex(4)}.db")
                try:
                    floor = run_floor(url, n)
                finally:
                    drop()
                total = engine["start_s"] + engine["engine_s"]
                results.append({"backend": backend, "devices": n, **engine, "floor_s": floor,
                                "ratio": total / floor if floor else None,
                                "us_per_device": total / n * 1e6})
                print(f"{backend} N={n}: {engine['ticks']} steps, {total:.2f} s", file=sys.stderr)
    rows = [[r["backend"], r["devices"], r["state"], r["ticks"], f"{r['start_s']:.2f}", f"{r['engine_s']:.2f}",
             f"{r['worst_tick_s'] * 1000:.0f}", f"{r['floor_s']:.2f}", f"{r['ratio']:.1f}x",
             f"{r['us_per_device']:.0f}"] for r in results]
    print_table("campaign engine: waves 1/10/50/100 %, every device confirms at once",
                ["backend", "devices", "result", "steps", "start s", "steps s", "worst step ms", "floor s",
                 "ratio", "µs/device"], rows, left=("backend", "result"),
                notes=["ratio = (start + steps) / floor (bulk SQL recording the same outcome, no decisions)"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"results": results}, indent=1, default=str))
    return 0 if all(r["state"] == S.DONE and r["succeeded"] == r["devices"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
