"""Storage layer: migrations vs models, ids, dedup, JSON and datetime round-trips (SQLite + PostgreSQL)."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import IntegrityError

from fota.server.store import (
    Base,
    Delta,
    Deployment,
    Device,
    Job,
    Release,
    StatusEvent,
    Store,
    default_url,
    migrate,
    normalize_url,
    utcnow,
)
from fota.server.store.inlists import chunks, id_ranges, in_ranges

TABLES = {"releases", "devices", "deployments", "jobs", "status_events", "api_tokens", "audit_events",
          "dashboard_sessions"}
HEAD = "0022"


def _release(version: str = "1.0.0", **kw) -> Release:
    values = dict(version=version, hardware=["esp32", "esp32s3"], kind="bundle", size=1234,
                  sha256="ab" * 32, manifest='{"version":"%s"}' % version, signature="cd" * 64,
                  key_id="0123456789abcdef", blob_path=f"/blobs/{version}.bin")
    values.update(kw)
    return Release(**values)


def _diff(engine) -> list:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        return compare_metadata(ctx, Base.metadata)


def _revision(engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def test_migration_matches_models(db_url):
    migrate(db_url)
    store = Store(db_url, migrate=False)
    try:
        assert TABLES <= set(inspect(store.engine).get_table_names())
        assert _diff(store.engine) == []
        assert _revision(store.engine) == HEAD
    finally:
        store.dispose()


def test_migrate_twice_is_noop(db_url):
    migrate(db_url)
    store = Store(db_url)  # migrates again
    try:
        with store.session() as s:
            s.add(Device(id="dev-1"))
        migrate(db_url)
        assert _revision(store.engine) == HEAD
        assert _diff(store.engine) == []
        with store.session() as s:
            assert s.scalars(select(Device.id)).all() == ["dev-1"]
    finally:
        store.dispose()


def test_release_device_deployment_jobs(store):
    with store.session() as s:
        release = _release()
        device = Device(id="dev-1", hardware="esp32", version="0.9.0")
        deployment = Deployment(release=release, target={"devices": ["dev-1"]})
        first = Job(deployment=deployment, device=device, bytes_total=1234)
        s.add_all([release, device, deployment, first])
        s.flush()
        second = Job(deployment=deployment, device=device)
        s.add(second)
        s.flush()
        assert isinstance(first.id, int) and isinstance(second.id, int)
        assert second.id > first.id
        ids = (first.id, second.id)

    with store.session() as s:
        deployment = s.scalars(select(Deployment)).one()
        assert deployment.state == "active"
        assert deployment.release.version == "1.0.0"
        assert [j.id for j in deployment.jobs] == list(ids)
        job = deployment.jobs[0]
        assert job.device.id == "dev-1"
        assert (job.state, job.progress, job.bytes_total, job.bytes_served) == ("pending", 0.0, 1234, 0)
        assert job.code is None and job.reason is None and job.sent_at is None
        device = s.get(Device, "dev-1")
        assert device.online is False and device.inventory == {} and device.tags == []
        assert device.last_seen is None and device.password_hash is None


def test_job_ids_never_reused(store):
    """Job ids go on the wire: deleting the newest job must not make its id come back."""
    with store.session() as s:
        deployment = Deployment(release=_release(), target=["dev-1"])
        s.add_all([Device(id="dev-1"), deployment])
        s.flush()
        job = Job(deployment=deployment, device_id="dev-1")
        s.add(job)
        s.flush()
        first = job.id
        s.delete(job)
    with store.session() as s:
        deployment = s.scalars(select(Deployment)).one()
        job = Job(deployment=deployment, device_id="dev-1")
        s.add(job)
        s.flush()
        assert job.id > first


def test_unique_release_version(store):
    with store.session() as s:
        s.add(_release("2.0.0"))
    with pytest.raises(IntegrityError):
        with store.session() as s:
            s.add(_release("2.0.0"))


def test_foreign_keys_enforced(store):
    with pytest.raises(IntegrityError):
        with store.session() as s:
            s.add(Job(deployment_id=12345, device_id="nobody"))


def test_status_event_duplicate_rejected(store):
    def event(seq: int, state: str = "downloading") -> StatusEvent:
        return StatusEvent(device_id="dev-1", job_id=7, state=state, progress=0.5, boot=3, seq=seq,
                           payload={"state": state, "seq": seq})

    with store.session() as s:
        s.add(event(1))
        s.add(event(2))
    with pytest.raises(IntegrityError):
        with store.session() as s:
            s.add(event(1, state="installing"))
    # the rolled-back session left the first two untouched; other boots are separate
    with store.session() as s:
        s.add(StatusEvent(device_id="dev-1", state="idle", boot=4, seq=1, payload={}))
        s.add(StatusEvent(device_id="dev-2", state="idle", boot=3, seq=1, payload={}))
    with store.session() as s:
        rows = s.execute(select(StatusEvent.device_id, StatusEvent.boot, StatusEvent.seq, StatusEvent.state)
                         .order_by(StatusEvent.id)).all()
        assert rows == [("dev-1", 3, 1, "downloading"), ("dev-1", 3, 2, "downloading"),
                        ("dev-1", 4, 1, "idle"), ("dev-2", 3, 1, "idle")]
        ids = s.scalars(select(StatusEvent.id).order_by(StatusEvent.id)).all()
        assert ids == sorted(set(ids))


def test_json_round_trip(store):
    inventory = {"files": {"main.py": "ab" * 32}, "free": 123456, "nested": [1, {"a": None}], "ok": True,
                 "text": "é ✓"}
    target = {"tags": ["lab", "floor-2"], "hardware": ["esp32"]}
    payload = {"state": "error", "code": "E_SHA", "extra": [1.5, "x", False]}
    with store.session() as s:
        release = _release(hardware=["esp32", "rp2040"])
        s.add_all([
            release,
            Device(id="dev-1", inventory=inventory, tags=["lab", "floor-2"]),
            Deployment(release=release, target=target),
            StatusEvent(device_id="dev-1", state="error", boot=1, seq=1, payload=payload),
        ])
    with store.session() as s:
        assert s.scalars(select(Release.hardware)).one() == ["esp32", "rp2040"]
        device = s.get(Device, "dev-1")
        assert device.inventory == inventory
        assert device.tags == ["lab", "floor-2"]
        assert s.scalars(select(Deployment.target)).one() == target
        assert s.scalars(select(StatusEvent.payload)).one() == payload
        # in-place changes of the mutable columns are persisted
        device.tags.append("new")
        device.inventory["free"] = 1
    with store.session() as s:
        device = s.get(Device, "dev-1")
        assert device.tags == ["lab", "floor-2", "new"]
        assert device.inventory["free"] == 1


def test_aware_datetimes_round_trip(store):
    seen = datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=timezone.utc)
    elsewhere = datetime(2024, 3, 1, 1, 59, 58, 123456, tzinfo=timezone(timedelta(hours=2)))  # == seen
    before = utcnow()
    with store.session() as s:
        s.add(Device(id="dev-1", last_seen=seen))
        s.add(Device(id="dev-2", last_seen=elsewhere))
    with store.session() as s:
        one, two = s.get(Device, "dev-1"), s.get(Device, "dev-2")
        for value in (one.last_seen, two.last_seen, one.created_at):
            assert value.tzinfo is not None and value.utcoffset() == timedelta(0)
        assert one.last_seen == seen and two.last_seen == seen
        assert before - timedelta(seconds=5) <= one.created_at <= utcnow() + timedelta(seconds=5)
        # comparisons in SQL work with aware values too
        assert s.scalars(select(Device.id).where(Device.last_seen >= seen).order_by(Device.id)).all() == \
            ["dev-1", "dev-2"]


def test_naive_datetime_refused(sqlite_url):
    store = Store(sqlite_url)
    try:
        with pytest.raises(Exception, match="naive"):
            with store.session() as s:
                s.add(Device(id="dev-1", last_seen=datetime(2024, 1, 1)))
    finally:
        store.dispose()


def test_session_rolls_back_on_error(sqlite_url):
    store = Store(sqlite_url)
    try:
        with pytest.raises(RuntimeError):
            with store.session() as s:
                s.add(Device(id="dev-1"))
                s.flush()
                raise RuntimeError("boom")
        with store.session() as s:
            assert s.get(Device, "dev-1") is None
    finally:
        store.dispose()


def test_sqlite_pragmas(sqlite_url):
    store = Store(sqlite_url)
    try:
        with store.engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 5000
            assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
    finally:
        store.dispose()


def test_a_second_store_in_a_process_keeps_the_first_seeing_other_processes_writes(db_url):
    """`fota serve` opens a second Store while its first is open (Home.kek() before keys/kek
    exists). On SQLite that once dropped the first one's lock on the database file: the next
    process to close its last connection deleted the -wal and -shm files the first still read,
    and the first never saw another process's writes again (its control center ignored the
    devices `fota simulate` provisioned as unprovisioned)."""
    import subprocess
    import sys

    first = Store(db_url)
    try:
        with first.session() as s:
            assert s.get(Device, "dev-other") is None  # its connection open, reading the WAL
        Store(db_url).dispose()  # a second store in this process
        run = [sys.executable, "-c"]
        # a short-lived process (`fota devices`): its connection is the last one it closes
        subprocess.run(run + [f"from fota.server.store import Store; Store({db_url!r}).dispose()"], check=True,
                       timeout=60)
        # a process that writes and stays open (`fota simulate` provisioning)
        writer = subprocess.Popen(run + [
            "import sys\n"
            "from fota.server.store import Device, Store\n"
            f"store = Store({db_url!r})\n"
            "with store.session() as s:\n"
            "    s.add(Device(id='dev-other', hardware='sim', tags=[], inventory={}))\n"
            "print('written', flush=True)\n"
            "sys.stdin.readline()\n"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert writer.stdout.readline().strip() == "written"
            with first.session() as s:
                assert s.get(Device, "dev-other") is not None
        finally:
            writer.communicate("\n", timeout=60)
    finally:
        first.dispose()


def test_processes_opening_a_new_database_at_once_all_migrate_it(db_url):
    """`fota serve` and `fota simulate` (or any two commands) started together on a new home both
    migrate its database: one runs the migrations, the others wait and find it current (they
    failed with "table ... already exists" when both created the tables)."""
    import subprocess
    import sys

    code = (f"from fota.server.store import Store\n"
            f"Store({db_url!r}).dispose()\n")
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True) for _ in range(4)]
    errors = [proc.communicate(timeout=120)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 4, "\n".join(errors)
    store = Store(db_url, migrate=False)
    try:
        assert _revision(store.engine) == HEAD
    finally:
        store.dispose()


def test_urls(tmp_path):
    assert default_url(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'fota.db'}"
    assert normalize_url("postgres://u:p@h:5432/db") == "postgresql+psycopg://u:p@h:5432/db"
    assert normalize_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("sqlite:///x.db") == "sqlite:///x.db"


def test_default_url_creates_directory(tmp_path):
    store = Store(default_url(tmp_path / "data" / "deeper"))
    try:
        assert (tmp_path / "data" / "deeper" / "fota.db").exists()
    finally:
        store.dispose()


def test_memory_sqlite():
    store = Store("sqlite://")
    try:
        with store.session() as s:
            s.add(Device(id="dev-1"))
        with store.session() as s:
            assert s.get(Device, "dev-1").id == "dev-1"
    finally:
        store.dispose()


def test_id_lists_are_sliced_and_id_ranges_cover_exactly_what_is_asked(store):
    assert [len(part) for part in chunks(range(2500))] == [1000, 1000, 500]
    assert list(chunks(set())) == []
    assert id_ranges([9, 1, 2, 3, 3, 200, 80]) == [(1, 9), (80, 80), (200, 200)]  # 80 - 9 >= RANGE_GAP
    assert id_ranges([1, 40], gap=40) == [(1, 40)] and id_ranges([1, 41], gap=40) == [(1, 1), (41, 41)]
    with store.session() as s:
        s.add_all([Device(id=f"r-{i}", hardware="esp32") for i in range(3)])
        s.add(Deployment(release=_release(), target={}))
        s.flush()
        dep = s.scalar(select(Deployment.id))
        s.add_all([Job(deployment_id=dep, device_id=f"r-{i % 3}") for i in range(300)])
    with store.session() as s:
        ids = sorted(s.scalars(select(Job.id)))
        wanted = ids[5:60] + ids[150:151] + ids[180:181] + ids[250:]
        ranges = id_ranges(wanted)
        rows = set(s.scalars(select(Job.id).where(in_ranges(Job.id, ranges))))
    # 150 and 180 are closer than RANGE_GAP: one range, which also reads the 29 jobs between
    assert ranges == [(ids[5], ids[59]), (ids[150], ids[180]), (ids[250], ids[299])]
    assert rows == set(ids[5:60] + ids[150:181] + ids[250:])


@contextmanager
def _schema_at(db_url: str, revision: str) -> Iterator[Store]:
    """A store on a database migrated only up to ``revision`` (write rows of that time through
    store.engine, then migrate(db_url) the rest of the way), disposed after."""
    migrate(db_url, revision)
    store = Store(db_url, migrate=False)
    try:
        yield store
    finally:
        store.dispose()


def test_delta_rows_with_the_format_folded_into_the_window_are_split_by_migration_0016(db_url):
    # Before 0016 a format-2 patch's row held window + 16 in `wbits`; after it, the window and
    # the format have a column each, and both formats of one pair and window can be cached.
    with _schema_at(db_url, "0015") as store:
        with store.engine.begin() as conn:
            for wbits in (12, 12 + 16):
                conn.execute(text("INSERT INTO deltas (base_sha256, base_size, target_sha256, wbits, size, sha256,"
                                  " blob_path, created_at) VALUES (:b, 1, :t, :w, 2, :s, '/p', :now)"),
                             {"b": "aa" * 32, "t": "bb" * 32, "w": wbits, "s": f"{wbits:02d}" * 32,
                              "now": datetime(2026, 12, 5, tzinfo=timezone.utc)})
        migrate(db_url)
        with store.session() as s:
            rows = sorted((d.wbits, d.format, d.sha256[:2]) for d in s.scalars(select(Delta)))
        assert rows == [(12, 1, "12"), (12, 2, "28")]
        assert _diff(store.engine) == []
        with pytest.raises(IntegrityError):  # still one row per base, target, window and format
            with store.session() as s:
                s.add(Delta(base_sha256="aa" * 32, base_size=1, target_sha256="bb" * 32, wbits=12, format=2,
                            size=2, sha256="cc" * 32, blob_path="/q"))


def _old_deployment(conn, now) -> None:
    """A release and an active deployment of it, inserted as plain SQL (an older schema)."""
    conn.execute(text("INSERT INTO releases (version, hardware, kind, size, sha256, manifest,"
                      " key_id, signature, blob_path, created_at) VALUES ('1.0.0', '[\"unix\"]', 'bundle',"
                      " 1, :s, '{}', 'k', 's', '/p', :now)"), {"s": "aa" * 32, "now": now})
    conn.execute(text("INSERT INTO deployments (release_id, target, state, created_at) VALUES"
                      " ((SELECT id FROM releases), '{}', 'active', :now)"), {"now": now})


def test_deployments_made_before_migration_0017_keep_transport_mqtt(db_url):
    # 0017 adds deployments.transport: existing deployments are 'mqtt' (what they were sent with).
    with _schema_at(db_url, "0016") as store:
        now = datetime(2026, 12, 5, tzinfo=timezone.utc)
        with store.engine.begin() as conn:
            _old_deployment(conn, now)
        migrate(db_url)
        with store.session() as s:
            assert [d.transport for d in s.scalars(select(Deployment))] == ["mqtt"]
        assert _diff(store.engine) == []


def test_devices_provisioned_before_migration_0018_have_no_nats_user_until_rekeyed(db_url):
    # 0018 adds devices.password_bcrypt (the NATS users file's hash): a device provisioned before
    # has only its Mosquitto hash, the plain password is gone, so it is listed as missing until
    # its credentials are rotated; a revoked device is neither a user nor missing.
    from fota.server.fleet import nats_password_hashes, provision_device, rekey_device, revoke_device
    with _schema_at(db_url, "0017") as store:
        with store.engine.begin() as conn:
            conn.execute(text("INSERT INTO devices (id, hardware, online, inventory, tags, password_hash, created_at)"
                              " VALUES ('old', 'unix', false, '{}', '[]', '$7$101$x$y', :now)"),
                         {"now": datetime(2026, 12, 5, tzinfo=timezone.utc)})
        migrate(db_url)
        assert _diff(store.engine) == []
        provision_device(store, "new", "unix")
        provision_device(store, "gone", "unix")
        revoke_device(store, "gone")
        hashes, missing = nats_password_hashes(store)
        assert list(hashes) == ["new"] and hashes["new"].startswith("$2b$") and missing == ["old"]
        rekey_device(store, "old")
        hashes, missing = nats_password_hashes(store)
        assert sorted(hashes) == ["new", "old"] and missing == []


def test_jobs_sent_before_migration_0019_count_one_send(db_url):
    # 0019 adds jobs.sends and last_sent_at (fota.server.unanswered): a job already sent was sent
    # once, at sent_at; a pending one not yet.
    with _schema_at(db_url, "0018") as store:
        now = datetime(2026, 12, 5, tzinfo=timezone.utc)
        with store.engine.begin() as conn:
            _old_deployment(conn, now)
            conn.execute(text("INSERT INTO devices (id, hardware, inventory, tags, created_at)"
                              " VALUES ('d1', 'unix', '{}', '[]', :now)"), {"now": now})
            for state, sent in (("sent", now), ("pending", None)):
                conn.execute(text("INSERT INTO jobs (deployment_id, device_id, state, created_at, updated_at, sent_at)"
                                  " VALUES ((SELECT id FROM deployments), 'd1', :state, :now, :now, :sent)"),
                             {"state": state, "now": now, "sent": sent})
        migrate(db_url)
        with store.session() as s:
            rows = s.execute(select(Job.state, Job.sends, Job.last_sent_at).order_by(Job.id)).all()
        assert rows == [("sent", 1, now), ("pending", 0, None)]
        assert _diff(store.engine) == []
