"""The control center's hot paths at fleet scale, on SQLite and PostgreSQL: status ingestion
(fota.server.ingest.write_batch: the rules of applying device messages one by one, kept by the
set-based batch writer; no broker needed), the command sender (real Mosquitto) and the chunk
server's packets."""
from __future__ import annotations

import asyncio
import json
import os
from datetime import timedelta

import pytest
from sqlalchemy import event, select, update

from fota.device import protocol
from fota.server.deployments import create_deployment, device_history
from fota.server.fleet import provision_device
from fota.server.ingest import Incoming, write_batch
from fota.server.releases import create_release
from fota.server.center import ControlCenter, parse_status
from fota.server.center.sender import SEND_BATCH
from fota.server.store import Device, Job, StatusEvent, Store, utcnow
from fota.tools.waiting import wait_until
from fota.tools.keyring import Signer
from fota.tools.signing import generate_private_key

KEY = generate_private_key()
T0 = utcnow()


class Fleet:
    """Two provisioned devices, one deployment with a job each; messages built as the center does."""

    def __init__(self, url: str, blobs):
        self.store = Store(url)
        for device_id in ("d1", "d2"):
            provision_device(self.store, device_id, "unix")
        release = create_release(self.store, blobs, KEY, os.urandom(1000), "2.0.0", ["unix"])
        self.deployment = create_deployment(self.store, release, device_ids=["d1", "d2"])
        self.job = {j.device_id: j.id for j in self.deployment.jobs}
        self.clock = 0

    def _item(self, kind: str, device_id: str, data) -> Incoming:
        self.clock += 1
        return Incoming(kind, device_id, data, T0 + timedelta(seconds=self.clock))

    def status(self, device_id: str, job, state: str, seq: int, boot: int = 1, **fields) -> Incoming:
        msg = {"job": job, "state": state, "code": None, "reason": None, "progress": None,
               "version": "1.0.0", "boot": boot, "seq": seq, **fields}
        return self._item(protocol.STATUS, device_id, parse_status(json.dumps(msg).encode()))

    def inventory(self, device_id: str, **fields) -> Incoming:
        return self._item(protocol.INVENTORY, device_id, {"device": device_id, "hardware": "unix", **fields})

    def online(self, device_id: str, flag: bool) -> Incoming:
        return self._item(protocol.ONLINE, device_id, flag)

    def write(self, items, served=None):
        with self.store.session() as s:
            return write_batch(s, list(items), served or {})

    def job_row(self, device_id: str) -> Job:
        with self.store.session() as s:
            return s.get(Job, self.job[device_id])

    def device(self, device_id: str) -> Device:
        with self.store.session() as s:
            return s.get(Device, device_id)


@pytest.fixture
def fleet(db_url, tmp_path):
    f = Fleet(db_url, tmp_path / "blobs")
    yield f
    f.store.dispose()


def test_statuses_of_a_batch_apply_in_arrival_order(fleet):
    """Several statuses of one job in one batch: the last state, code and reason win; progress
    and total come from the last status that has them; every status is stored in order."""
    job = fleet.job["d1"]
    batch = [fleet.status("d1", job, "downloading", 1, progress=0.1, total=1000),
             fleet.status("d1", job, "downloading", 2, progress=0.5),
             fleet.status("d1", job, "verifying", 3, version="1.0.1")]
    result = fleet.write(batch)
    assert (result.stored, result.duplicates, result.ignored) == (3, 0, 0)
    assert result.job_states == {job: "verifying"} and result.finished == set()
    row = fleet.job_row("d1")
    assert (row.state, row.progress, row.bytes_total, row.code, row.reason) == ("verifying", 0.5, 1000, None, None)
    assert row.updated_at >= T0
    assert [(e.state, e.seq, e.progress) for e in device_history(fleet.store, "d1")] == [
        ("downloading", 1, 0.1), ("downloading", 2, 0.5), ("verifying", 3, None)]
    device = fleet.device("d1")
    assert (device.version, device.last_seen) == ("1.0.1", batch[-1].received_at)
    assert fleet.job_row("d2").state == "pending"  # untouched

    # next batch: a status without progress keeps the stored progress and total
    fleet.write([fleet.status("d1", job, "installing", 4)])
    row = fleet.job_row("d1")
    assert (row.state, row.progress, row.bytes_total) == ("installing", 0.5, 1000)


def test_terminal_state_is_never_overwritten(fleet):
    """Within a batch and across batches; the deployment of a job that ended is reported."""
    job = fleet.job["d1"]
    result = fleet.write([fleet.status("d1", job, "downloading", 1, progress=0.2),
                          fleet.status("d1", job, "failed", 2, code=protocol.E_TIMEOUT, reason="stalled"),
                          fleet.status("d1", job, "downloading", 3, progress=0.9)])
    assert result.stored == 3 and result.job_states == {job: "failed"}
    assert result.finished == {fleet.deployment.id}
    result = fleet.write([fleet.status("d1", job, "confirmed", 4, progress=1.0)])
    assert result.stored == 1 and result.job_states == {} and result.finished == set()
    row = fleet.job_row("d1")
    assert (row.state, row.code, row.reason, row.progress) == ("failed", protocol.E_TIMEOUT, "stalled", 0.2)
    # The history shows what took effect; the late statuses are kept, marked.
    assert [e.state for e in device_history(fleet.store, "d1")] == ["downloading", "failed"]
    assert [(e.state, e.ignored) for e in device_history(fleet.store, "d1", include_ignored=True)] == [
        ("downloading", None), ("failed", None), ("downloading", "job_ended"), ("confirmed", "job_ended")]
    # Delivered out of order (two workers): a status older than the one that ended the job
    # happened before the end, and is shown as such.
    other = fleet.job["d2"]
    fleet.write([fleet.status("d2", other, "confirmed", 5, version="2.0.0")])
    assert fleet.write([fleet.status("d2", other, "trial", 4, version="2.0.0")]).job_states == {}
    assert [(e.state, e.ignored) for e in device_history(fleet.store, "d2", include_ignored=True)] == [
        ("confirmed", None), ("trial", None)]
    assert fleet.job_row("d2").state == "confirmed"


def test_a_job_ended_by_another_writer_is_not_overwritten(fleet):
    """A job made terminal outside the batch (an operator, a deployment timeout) stays so: read
    before the batch, and also when it ends between the batch's read and its UPDATE."""
    job, other = fleet.job["d1"], fleet.job["d2"]
    with fleet.store.session() as s:
        s.execute(update(Job).where(Job.id == job).values(state="cancelled"))
    result = fleet.write([fleet.status("d1", job, "downloading", 1, progress=0.3)])
    assert result.stored == 1 and result.job_states == {}
    assert (fleet.job_row("d1").state, fleet.job_row("d1").progress) == ("cancelled", 0.0)

    def end_it_first(conn, cursor, statement, parameters, context, executemany):
        if statement.startswith("UPDATE jobs SET state"):  # the batch's job update: another writer wins the race
            raw = conn.connection.cursor()
            raw.execute(f"UPDATE jobs SET state = 'failed' WHERE id = {other}")
            raw.close()
    event.listen(fleet.store.engine, "before_cursor_execute", end_it_first)
    try:
        fleet.write([fleet.status("d2", other, "downloading", 1, progress=0.3)])
    finally:
        event.remove(fleet.store.engine, "before_cursor_execute", end_it_first)
    assert (fleet.job_row("d2").state, fleet.job_row("d2").progress) == ("failed", 0.0)


def test_duplicates_within_the_batch_and_against_the_table(fleet):
    job = fleet.job["d1"]
    fleet.write([fleet.status("d1", job, "downloading", 1, progress=0.1)])
    result = fleet.write([fleet.status("d1", job, "failed", 1, code=protocol.E_TIMEOUT),  # stored (1, 1)
                          fleet.status("d1", job, "downloading", 2, progress=0.4),
                          fleet.status("d1", job, "failed", 2, code=protocol.E_TIMEOUT),  # same (1, 2)
                          fleet.status("d1", job, "downloading", 1, boot=2, progress=0.5),  # new boot
                          fleet.status("d2", fleet.job["d2"], "downloading", 1, progress=0.7)])  # other device
    assert (result.stored, result.duplicates) == (3, 2)
    row = fleet.job_row("d1")
    assert (row.state, row.progress, row.code) == ("downloading", 0.5, None)
    assert fleet.job_row("d2").progress == 0.7
    assert [(e.boot, e.seq, e.state) for e in device_history(fleet.store, "d1")] == [
        (1, 1, "downloading"), (1, 2, "downloading"), (2, 1, "downloading")]


def test_duplicate_lookup_over_many_keys(fleet):
    """Batches larger than one lookup statement (256 keys), and sizes that are not a power of two."""
    job = fleet.job["d1"]
    first = fleet.write([fleet.status("d1", job, "downloading", seq, progress=seq / 1000) for seq in range(1, 301)])
    assert (first.stored, first.duplicates) == (300, 0)
    again = [fleet.status("d1", job, "downloading", seq, progress=0.0) for seq in range(1, 301)]
    result = fleet.write(again + [fleet.status("d1", job, "downloading", 301, progress=0.99)])
    assert (result.stored, result.duplicates) == (1, 300)
    assert fleet.job_row("d1").progress == 0.99
    for size in (1, 3, 5):
        result = fleet.write([fleet.status("d1", job, "downloading", seq) for seq in range(298, 298 + size)])
        assert (result.stored, result.duplicates) == (max(0, size - 4), min(size, 4))


def test_statuses_that_change_no_job(fleet):
    """Stored as events, but a foreign job, a rejected, key-update or health status, an unknown or
    no job change nothing."""
    job = fleet.job["d1"]
    fleet.write([fleet.status("d1", job, "downloading", 1, progress=0.25)])
    result = fleet.write([
        fleet.status("d2", job, "failed", 1, code=protocol.E_TIMEOUT),             # d1's job
        fleet.status("d1", job, "rejected", 2, code=protocol.E_BAD_CHUNK, current="downloading"),
        fleet.status("d1", 2**31 - 1, "failed", 3, code=protocol.E_TIMEOUT),       # no such job
        fleet.status("d1", None, "rejected", 4, code=protocol.E_BAD_COMMAND),
        fleet.status("d1", job, protocol.KEYS_UPDATED, 5),                          # a key update
        fleet.status("d1", job, protocol.HEALTH, 6)])                               # a health report
    assert (result.stored, result.job_states, result.finished) == (6, {}, set())
    row = fleet.job_row("d1")
    assert (row.state, row.progress, row.code) == ("downloading", 0.25, None)
    # Stored, but the history shows only what took effect (or, rejected / keys / health: happened).
    assert device_history(fleet.store, "d2") == []
    (event,) = device_history(fleet.store, "d2", include_ignored=True)
    assert (event.job_id, event.state, event.code, event.ignored) == (job, "failed", protocol.E_TIMEOUT, "other_device")
    assert [e.job_id for e in device_history(fleet.store, "d1")][1:] == [job, None, job, job]
    assert [(e.job_id, e.ignored) for e in device_history(fleet.store, "d1", include_ignored=True)][1:] == [
        (job, None), (2**31 - 1, "no_such_job"), (None, None), (job, None), (job, None)]


def test_a_command_refused_for_good_ends_its_job_with_the_code(fleet):
    """A `rejected` naming the device's own job with a job-ending code ends it `failed` with the
    device's code and reason, and its deployment is reported; a redelivery (E_DUPLICATE_JOB), a bad
    chunk, or a code the center re-sends for (E_EXPIRED) leave the job as it was."""
    j1, j2 = fleet.job["d1"], fleet.job["d2"]
    fleet.write([fleet.status("d1", j1, "downloading", 1, progress=0.5)])
    result = fleet.write([
        fleet.status("d1", j1, "rejected", 2, code=protocol.E_DUPLICATE_JOB, current="downloading"),
        fleet.status("d1", j1, "rejected", 3, code=protocol.E_BAD_CHUNK, current="downloading"),
        fleet.status("d1", j1, "rejected", 4, code="E_EXPIRED", current="downloading"),
        fleet.status("d1", j2, "rejected", 5, code=protocol.E_WRONG_DEVICE)])  # d2's job: not d1's to end
    assert (result.job_states, result.finished) == ({}, set())
    assert (fleet.job_row("d1").state, fleet.job_row("d2").state) == ("downloading", "pending")
    result = fleet.write([fleet.status("d2", j2, "rejected", 1, code=protocol.E_WRONG_DEVICE, current="idle",
                                       reason="command is for device 'x', this is 'd2'")])
    assert (result.job_states, result.finished) == ({j2: "failed"}, {fleet.deployment.id})
    row = fleet.job_row("d2")
    assert (row.state, row.code, row.reason) == ("failed", protocol.E_WRONG_DEVICE, "command is for device 'x', this is 'd2'")
    result = fleet.write([fleet.status("d1", j1, "rejected", 6, code=protocol.E_STALE_JOB, current="idle")])
    assert result.job_states == {j1: "failed"} and fleet.job_row("d1").code == protocol.E_STALE_JOB
    # Every refusal happened: all in the history, none marked.
    assert [(e.code, e.ignored) for e in device_history(fleet.store, "d1") if e.state == "rejected"] == [
        (protocol.E_DUPLICATE_JOB, None), (protocol.E_BAD_CHUNK, None), ("E_EXPIRED", None),
        (protocol.E_WRONG_DEVICE, None), (protocol.E_STALE_JOB, None)]


def _cancel_job(fleet, target: int, device_id: str, state: str = "sent") -> int:
    with fleet.store.session() as s:
        job = Job(deployment_id=fleet.deployment.id, device_id=device_id, kind="cancel", target_job=target,
                  state=state)
        s.add(job)
        s.flush()
        return job.id


def _state(fleet, job_id):
    with fleet.store.session() as s:
        job = s.get(Job, job_id)
        return job.state, job.code


def test_a_cancel_job_ends_with_its_target_or_its_refusal(fleet):
    j1, j2 = fleet.job["d1"], fleet.job["d2"]
    fleet.write([fleet.status("d1", j1, "downloading", 1), fleet.status("d2", j2, "installing", 1)])
    c1, c2 = _cancel_job(fleet, j1, "d1"), _cancel_job(fleet, j2, "d2", state="pending")
    # d2 refuses its cancel (E_NOT_RUNNING names the target): the cancel ends, the install goes on.
    result = fleet.write([fleet.status("d1", j1, "cancelled", 2, reason=f"cancelled by job {c1}"),
                          fleet.status("d2", j2, "rejected", 2, code=protocol.E_NOT_RUNNING, current="installing")])
    assert result.job_states == {j1: "cancelled", c1: "cancelled", c2: "failed"}
    assert (_state(fleet, c1), _state(fleet, c2)) == (("cancelled", None), ("failed", protocol.E_NOT_RUNNING))
    assert _state(fleet, j2) == ("installing", None)
    # With no cancel of it open, E_NOT_RUNNING is the refusal of the update itself (the device was
    # busy with another job): the job ends with it.
    assert fleet.write([fleet.status("d2", j2, "rejected", 3, code=protocol.E_NOT_RUNNING)]).job_states == {
        j2: "failed"}
    assert _state(fleet, j2) == ("failed", protocol.E_NOT_RUNNING)
    # A target the server ended (timed out) that the device ends later: the cancel ends too,
    # and the device's status, which moved no job, is marked.
    with fleet.store.session() as s:
        s.execute(update(Job).where(Job.id == j2).values(state="timed_out"))
    c3 = _cancel_job(fleet, j2, "d2")
    result = fleet.write([fleet.status("d2", j2, "confirmed", 4, version="2.0.0")])
    assert result.job_states == {c3: "failed"} and _state(fleet, c3) == ("failed", protocol.E_NOT_RUNNING)
    assert [(e.state, e.ignored) for e in device_history(fleet.store, "d2", include_ignored=True)] == [
        ("installing", None), ("rejected", None), ("rejected", None), ("confirmed", "job_ended")]


def test_a_status_from_another_device_does_not_hold_a_job_back(fleet):
    """Only a job's own device's statuses order it: another device's status naming the job (stored,
    far ahead in (boot, seq)) does not make the owner's statuses look old, in a later batch with
    both devices either."""
    job = fleet.job["d1"]
    fleet.write([fleet.status("d2", job, "failed", 100, boot=9, code=protocol.E_TIMEOUT)])
    result = fleet.write([fleet.status("d2", None, protocol.HEALTH, 101, boot=9),
                          fleet.status("d1", job, "downloading", 1, progress=0.5)])
    assert result.job_states == {job: "downloading"}
    assert (fleet.job_row("d1").state, fleet.job_row("d1").progress) == ("downloading", 0.5)


def test_a_device_whose_counters_start_over_is_not_silenced(fleet):
    """Statuses are identified by (device, epoch, boot, seq): a device re-provisioned or erased
    (a new random epoch, counters from 1 again) has its statuses stored, and they move its job
    although their (boot, seq) is lower than the stored ones; within an epoch an older status
    still moves nothing. No epoch (an old device) is epoch 0."""
    job = fleet.job["d1"]
    fleet.write([fleet.status("d1", job, "downloading", seq, boot=3, progress=seq / 10) for seq in (1, 2)]
                + [fleet.status("d1", None, protocol.HEALTH, 1, boot=1)])  # no epoch: 0
    assert fleet.write([fleet.status("d1", None, protocol.HEALTH, 1, boot=1, epoch=0)]).duplicates == 1
    again = fleet.write([fleet.status("d1", job, "downloading", 1, boot=1, epoch=777, progress=0.6),
                         fleet.status("d1", None, protocol.HEALTH, 1, boot=1, epoch=777)])  # same batch: dup
    assert (again.stored, again.duplicates, again.job_states) == (1, 1, {job: "downloading"})
    assert fleet.job_row("d1").progress == 0.6
    # within the new epoch, order still holds: an older (boot, seq) stored but moves nothing
    fleet.write([fleet.status("d1", job, "verifying", 3, boot=1, epoch=777)])
    late = fleet.write([fleet.status("d1", job, "downloading", 2, boot=1, epoch=777, progress=0.7)])
    assert (late.stored, late.job_states) == (1, {})
    assert fleet.job_row("d1").state == "verifying"
    done = fleet.write([fleet.status("d1", job, "confirmed", 1, boot=2, epoch=777, progress=1.0)])
    assert done.job_states == {job: "confirmed"} and fleet.job_row("d1").state == "confirmed"
    assert [(e.epoch, e.boot, e.seq) for e in device_history(fleet.store, "d1")][-5:] == [
        (0, 1, 1), (777, 1, 1), (777, 1, 3), (777, 1, 2), (777, 2, 1)]


@pytest.mark.parametrize("epoch, ok", [(None, True), (0, True), (1, True), (2**31 - 1, True), (2**31, False),
                                       (-1, False), (True, False), ("5", False), (1.5, False)])
def test_status_epoch_is_an_integer_in_range_or_absent(epoch, ok):
    msg = {"job": None, "state": "health", "boot": 1, "seq": 1}
    if epoch is not None:
        msg["epoch"] = epoch
    if ok:
        assert parse_status(json.dumps(msg).encode()).get("epoch") == epoch
    else:
        with pytest.raises(ValueError, match="epoch"):
            parse_status(json.dumps(msg).encode())


def test_a_command_refused_as_expired_is_sent_again_then_fails(fleet):
    """A `rejected` E_EXPIRED for a job still `sent`: the job goes back to `pending` (any worker
    signs its command again), MAX_RESENDS times; the next refusal ends it failed E_EXPIRED.
    Refusals for a job the device already took, or for another device's job, change nothing."""
    from fota.server.expiry import MAX_RESENDS
    job, other = fleet.job["d1"], fleet.job["d2"]

    def sent(*job_ids):
        with fleet.store.session() as s:
            s.execute(update(Job).where(Job.id.in_(job_ids)).values(state="sent", worker="w-gone"))

    def refusal(device_id, job_id, seq):
        return fleet.status(device_id, job_id, "rejected", seq, code=protocol.E_EXPIRED, current="idle")

    sent(job, other)
    seq = 0
    for _ in range(MAX_RESENDS):
        seq += 1
        result = fleet.write([refusal("d1", job, seq), refusal("d1", other, 100 + seq)])
        assert result.job_states == {job: "pending"} and result.finished == set()
        row = fleet.job_row("d1")
        assert (row.state, row.worker) == ("pending", None)
        assert fleet.job_row("d2").state == "sent"
        sent(job)
    result = fleet.write([refusal("d1", job, seq + 1)])
    assert result.job_states == {job: "failed"} and result.finished == {fleet.deployment.id}
    row = fleet.job_row("d1")
    assert (row.state, row.code) == ("failed", protocol.E_EXPIRED)
    # a job its device took (downloading) is not sent again for a stale copy's refusal
    fleet.write([fleet.status("d2", other, "downloading", 1, progress=0.1)])
    assert fleet.write([refusal("d2", other, 2)]).job_states == {}
    assert fleet.job_row("d2").state == "downloading"


def test_messages_from_unprovisioned_devices_are_ignored(fleet):
    result = fleet.write([fleet.status("ghost", fleet.job["d1"], "failed", 1),
                          fleet.inventory("ghost", version="9"), fleet.online("ghost", True)])
    assert (result.stored, result.ignored) == (0, 3)
    assert fleet.job_row("d1").state == "pending"
    with fleet.store.session() as s:
        assert s.get(Device, "ghost") is None
        assert s.scalars(select(StatusEvent)).all() == []


def test_device_columns_follow_arrival_order(fleet):
    """Inventory, online flags and statuses of one device in one batch, as if applied one by one."""
    job = fleet.job["d1"]
    batch = [fleet.inventory("d1", version="1.0.0", max_chunk=512),
             fleet.online("d1", True),
             fleet.status("d1", job, "downloading", 1, version="1.0.1"),
             fleet.online("d2", True),
             fleet.inventory("d2", version="3.0.0", hardware="esp32"),  # differing hardware: logged only
             fleet.online("d2", False)]
    result = fleet.write(batch)
    assert (result.stored, result.ignored) == (1, 0)
    d1, d2 = fleet.device("d1"), fleet.device("d2")
    assert (d1.online, d1.version, d1.inventory["max_chunk"], d1.last_seen) == (True, "1.0.1", 512, batch[2].received_at)
    assert (d2.online, d2.version, d2.hardware, d2.inventory["hardware"], d2.last_seen) == (
        False, "3.0.0", "unix", "esp32", batch[5].received_at)
    # an inventory after a status: its version is the latest word
    fleet.write([fleet.status("d1", job, "downloading", 2, version="1.0.2"), fleet.inventory("d1", version="1.0.3")])
    assert fleet.device("d1").version == "1.0.3"


def test_an_older_online_flag_committed_later_does_not_overwrite_a_newer_one(fleet):
    """A device's `online 0` (before a clean DISCONNECT) and its `online 1` a second later, taken by
    two workers: the batch holding the `1` commits first, then the one holding the older `0`."""
    offline, online = fleet.online("d1", False), fleet.online("d1", True)  # received in this order
    fleet.write([online])
    result = fleet.write([offline, fleet.online("d2", True)])
    d1 = fleet.device("d1")
    assert (d1.online, d1.online_at, d1.last_seen) == (True, online.received_at, online.received_at)
    assert result.stale_online == 1
    assert fleet.device("d2").online  # the batch's other flags apply
    # a flag received later applies, and an older one held in the same batch does not
    later = fleet.online("d1", False)
    fleet.write([later, offline])
    assert (fleet.device("d1").online, fleet.device("d1").online_at) == (False, later.received_at)


def test_served_bytes_accumulate(fleet):
    j1, j2 = fleet.job["d1"], fleet.job["d2"]
    assert fleet.write([], {j1: 100, j2: 50}).stored == 0
    fleet.write([fleet.status("d1", j1, "downloading", 1)], {j1: 28})
    assert (fleet.job_row("d1").bytes_served, fleet.job_row("d2").bytes_served) == (128, 50)


def test_duplicate_lookup_searches_the_index(sqlite_url, tmp_path):
    """The lookup must not scan every stored status (SQLite does for `(a, b, c) IN (...)`)."""
    from fota.server.ingest_sql import lookup
    store = Store(sqlite_url)
    try:
        with store.engine.connect() as conn:
            sql = str(lookup(4).compile(dialect=store.engine.dialect))
            params = tuple(v for i in range(4) for v in (f"d{i}", 7, 1, i))
            plan = " | ".join(row[-1] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, params))
    finally:
        store.dispose()
    assert "SEARCH e USING COVERING INDEX" in plan and "SCAN e" not in plan, plan


def test_sender_does_not_wait_between_full_batches(db_url, broker, tmp_path):
    """More pending jobs than one sender pass claims: the next passes follow at once, not a
    poll interval later (10,000 jobs used to take 20 poll intervals)."""
    store = Store(db_url)
    try:
        n = 2 * SEND_BATCH + 100
        ids = [f"s{i:05d}" for i in range(n)]
        with store.session() as s:
            s.add_all(Device(id=i, hardware="unix", online=True, inventory={}) for i in ids)
        release = create_release(store, tmp_path / "blobs", KEY, os.urandom(300), "2.0.0", ["unix"])
        dep = create_deployment(store, release, device_ids=ids)
        center = ControlCenter(store, broker.server_url, tmp_path / "blobs", signer=Signer(KEY),
                               client_id=f"fota-center-{os.getpid()}-sender", poll_interval=60)

        async def scenario():
            await center.start()
            try:
                # three passes; with a poll interval between them this would take 120 s
                await asyncio.to_thread(wait_until, lambda: center.commands == n, timeout=40, interval=0.05,
                                        what=f"{n} commands sent")
                await asyncio.to_thread(wait_until, lambda: set(center.job_states(dep.id).values()) == {"sent"},
                                        timeout=40, interval=0.05, what="jobs marked sent")
            finally:
                await center.stop()
        asyncio.run(scenario())
    finally:
        store.dispose()

