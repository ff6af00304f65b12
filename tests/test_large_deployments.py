"""A deployment to 40,000 devices, on SQLite and PostgreSQL: created correctly, and the control
center's bookkeeping of that many live jobs works (mark sent, cache refresh, a status batch,
the deployment's timeout).

Every statement of these paths once took one bound parameter per job or device (an IN-list),
and a statement's parameters are capped: SQLite's default build at 32,766 (set below: Debian's
SQLite allows 250,000), PostgreSQL's protocol at 65,535. No broker: the center's database
methods are called directly, as its DB thread calls them.
"""
from __future__ import annotations

import asyncio
import os
import sqlite3
from datetime import timedelta

import pytest
from sqlalchemy import event, func, insert, select, update
from sqlalchemy.exc import OperationalError

from fota.device import protocol as P
from fota.server.deployments import DONE, PENDING, SENT, create_deployment
from fota.server.ingest import Incoming
from fota.server.releases import create_release
from fota.server.center import ControlCenter
from fota.server.center.jobs import JobInfo
from fota.server.store import Deployment, Device, Job, StatusEvent, Store, utcnow
from fota.tools.keyring import Signer
from fota.tools.signing import generate_private_key

N = 40_000
SQLITE_DEFAULT_MAX_VARIABLES = 32_766  # SQLITE_MAX_VARIABLE_NUMBER of SQLite's own build


@pytest.fixture
def big(tmp_path, db_url):
    """(store, release, device ids, center): N online devices of hardware 'unix', inserted in bulk."""
    store = Store(db_url)
    if store.engine.dialect.name == "sqlite":
        @event.listens_for(store.engine, "connect")
        def _stock_sqlite_cap(dbapi_connection, _record):
            dbapi_connection.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, SQLITE_DEFAULT_MAX_VARIABLES)
        store.engine.dispose()  # pooled connections were opened before the listener
    ids = [f"big-{i:05d}" for i in range(N)]
    now = utcnow()
    with store.session() as s:
        s.execute(insert(Device), [{"id": i, "hardware": "unix", "version": "1.0.0", "online": True,
                                    "inventory": {}, "tags": [], "created_at": now} for i in ids])
    key = generate_private_key()
    release = create_release(store, tmp_path / "blobs", key, os.urandom(3000), "2.0.0", ["unix"])
    center = ControlCenter(store, "mqtt://127.0.0.1:1", tmp_path / "blobs", signer=Signer(key),
                           campaign_interval=None)
    yield store, release, ids, center
    center.db.shutdown()
    store.dispose()


def test_a_deployment_to_40000_devices_is_created_sent_refreshed_ingested_and_timed_out(big):
    store, release, ids, center = big
    if store.engine.dialect.name == "sqlite":  # the cap is in force: one IN-list of every device fails
        with pytest.raises(OperationalError, match="too many SQL variables"), store.session() as s:
            s.execute(select(Device.id).where(Device.id.in_(ids)))

    # create_deployment: one pending job per device, of this release, in the devices' order
    dep = create_deployment(store, release, device_ids=ids, timeout=3600)
    assert [j.device_id for j in dep.jobs] == ids
    assert all(j.state == PENDING and j.bytes_total == release.size and j.deployment_id == dep.id
               for j in dep.jobs)
    job_ids = [j.id for j in dep.jobs]
    with store.session() as s:
        assert s.get(Deployment, dep.id).release_id == release.id
        per_device = dict(s.execute(select(Job.device_id, func.count()).group_by(Job.device_id)).all())
        assert per_device == dict.fromkeys(ids, 1)
        assert s.execute(select(Job.state, Job.kind, Job.bytes_total, func.count())
                         .group_by(Job.state, Job.kind, Job.bytes_total)).all() == [
            (PENDING, "update", release.size, N)]

    # the sender marks them sent (the chunk server caches each job as it is sent)
    center.sender.mark_sent(job_ids)
    with store.session() as s:
        assert s.execute(select(Job.state, func.count(), func.count(Job.sent_at))
                         .where(Job.deployment_id == dep.id).group_by(Job.state)).all() == [(SENT, N, N)]
    for j in dep.jobs:
        center.jobs.add(j.id, JobInfo(j.device_id, SENT, b"image"))

    # the cache refresh picks up states changed outside this process (another worker)
    changed = {job_id: (P.DOWNLOADING if n % 2 else P.CANCELLED) for n, job_id in enumerate(job_ids[::7])}
    with store.session() as s:
        s.execute(update(Job), [{"id": job_id, "state": state} for job_id, state in changed.items()])
    asyncio.run(center.jobs.refresh())
    for job_id, info in center.jobs:
        assert info.state == changed.get(job_id, SENT)
        assert (info.blob is None) == (info.state == P.CANCELLED)

    # one status batch and the served-byte counters of every job
    live = [(job_id, device_id) for job_id, device_id in zip(job_ids, ids)
            if changed.get(job_id) != P.CANCELLED]
    now = utcnow()
    batch = [Incoming(P.STATUS, device_id, {"state": P.FAILED if n % 5 == 0 else P.DOWNLOADING, "job": job_id,
                                            "boot": 1, "seq": 1, "progress": 0.5, "code": None}, now)
             for n, (job_id, device_id) in enumerate(live)]
    result = center.intake.write_batch(batch, dict.fromkeys(job_ids, 512))
    assert result.stored == len(live) and result.finished == {dep.id}
    assert result.job_states == {job_id: P.FAILED if n % 5 == 0 else P.DOWNLOADING
                                 for n, (job_id, _) in enumerate(live)}
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(StatusEvent)) == len(live)
        assert s.execute(select(Job.bytes_served, func.count()).where(Job.deployment_id == dep.id)
                         .group_by(Job.bytes_served)).all() == [(512, N)]
        assert s.get(Deployment, dep.id).state == "active"  # jobs still downloading

    # the deployment's timeout passes: its open jobs time out (one UPDATE) and it is done
    with store.session() as s:
        s.get(Deployment, dep.id).created_at -= timedelta(hours=2)
    assert sorted(center.sender.expire()) == sorted(job_id for job_id, state in result.job_states.items()
                                              if state == P.DOWNLOADING)
    with store.session() as s:
        assert s.get(Deployment, dep.id).state == DONE
        assert s.scalar(select(Job.reason).where(Job.id == live[1][0])) == \
            "no final status within 3600 s of the deployment's start (last state: downloading)"
