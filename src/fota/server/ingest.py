"""Status ingestion: a batch of device messages written with a few set-based statements.

The control center queues status, inventory and online messages and writes them here, one
transaction per batch. The rules are those of applying the messages one by one in arrival
order; only the writing is set-based (an ORM unit of work cost ~1 ms of CPU per status):

* statuses are deduplicated on (device, epoch, boot, seq), against the table and within the
  batch, and the new ones inserted with one statement (`epoch`: chosen at random when a
  device's agent state is created, 0 when a status has none; a device whose counters start over
  gets a new one, so its new statuses are not taken for duplicates of its old ones);
* job rules (a device's own jobs only; a `keys` or `health` status changes no job, nor does a
  `rejected` one unless its code is in JOB_ENDING_REFUSALS: then the refused job ends `failed`
  with that code; a terminal state is never overwritten; a status older (boot, seq) than a
  stored one of the same job and epoch is stored but moves no job — several workers may ingest
  a device's statuses out of order, so a batch locks its jobs first, in id order; a status of
  another epoch than the job's newest stored one counts as newer: its device started over;
  progress and total kept when a status has none) are applied in memory, and each job's final
  values written by one statement that also skips rows another writer made terminal meanwhile;
* a `rejected` `E_EXPIRED` for a job still `sent` hands the job to fota.server.expiry (its
  command is signed again, or the job fails once refused too often);
* a cancel job (kind 'cancel') ends with its target: `cancelled` when the device reports the
  target `cancelled`, `failed`/E_NOT_RUNNING when it reports another end or refuses the cancel;
* a job-state status that moves no job because the job is another device's, unknown or already
  ended is stored marked with why (status_events.ignored, IGNORED_WHY), so the history does
  not show it as what happened;
* devices (last_seen, version, inventory, online; fota.server.fleet decides the values): one
  statement per set of changed columns; an online flag received before the one a device row
  holds (devices.online_at: another worker's batch committed a newer one first) is not applied.

The statements themselves (executemany on SQLite, column arrays on PostgreSQL) are in
fota.server.ingest_sql.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from fota.device import protocol
from fota.server import expiry, fleet
from fota.server.deployments import TERMINAL_STATES
from fota.server.ingest_sql import SEQ_SPAN, statements_for
from fota.server.statuses import stored_payload
from fota.server.store import utcnow

__all__ = ["IGNORED_WHY", "JOB_ENDING_REFUSALS", "REJECTED", "BatchResult", "Incoming", "write_batch"]

log = logging.getLogger(__name__)

REJECTED = "rejected"
# A `rejected` status with one of these codes and the id of one of the device's jobs ends that
# job `failed` with the code: the device will never run that command (docs/protocol.md §9).
# Not in it: E_DUPLICATE_JOB (a redelivery of a command it accepted: the job goes on),
# E_BAD_CHUNK (about a chunk), E_STALE_KEYS / E_BAD_KEYS (key updates, no job), and any code
# not listed (E_EXPIRED: the center signs the job again and re-sends it).
# E_NOT_RUNNING names the target of a refused cancel: it ends that cancel job, not the target.
JOB_ENDING_REFUSALS = frozenset({
    protocol.E_BAD_COMMAND, protocol.E_OVERSIZE, protocol.E_UNKNOWN_COMMAND, protocol.E_STALE_JOB,
    protocol.E_NOT_RUNNING, protocol.E_WRONG_DEVICE, protocol.E_UNKNOWN_KEY, protocol.E_KEY_REVOKED,
    protocol.E_KEY_EXPIRED, protocol.E_BAD_SIGNATURE})
# status_events.ignored: why a job-state status did not take effect.
OTHER_DEVICE = "other_device"  # the job is another device's
NO_SUCH_JOB = "no_such_job"    # no job has that id
JOB_ENDED = "job_ended"        # the job had already ended (a terminal state is never overwritten)
IGNORED_WHY = (OTHER_DEVICE, NO_SUCH_JOB, JOB_ENDED)


@dataclass
class Incoming:
    """A device message waiting for the next batch write."""
    kind: str  # protocol.STATUS | protocol.INVENTORY | protocol.ONLINE
    device_id: str
    data: Any
    received_at: datetime
    done: asyncio.Future[None] | None = None


@dataclass
class BatchResult:
    job_states: dict[int, str] = field(default_factory=dict)  # job -> state it was moved to
    finished: set[int] = field(default_factory=set)           # deployments with a job just ended
    stored: int = 0
    duplicates: int = 0
    ignored: int = 0
    expired: dict[int, str] = field(default_factory=dict)  # job -> device that refused it E_EXPIRED
    stale_online: int = 0  # online flags older than the one stored (ingested late by this worker)


class _JobRow:
    """The part of a job row the status rules read; state follows the batch in memory."""
    __slots__ = ("device_id", "state", "deployment_id")

    def __init__(self, device_id: str, state: str, deployment_id: int):
        self.device_id, self.state, self.deployment_id = device_id, state, deployment_id


def write_batch(s: Session, batch: list[Incoming], served: dict[int, int]) -> BatchResult:
    """Write a batch of messages and served-byte counters in the session's transaction."""
    sql = statements_for(s)
    result = BatchResult()
    statuses = [i for i in batch if i.kind == protocol.STATUS]
    job_ids = {i.data["job"] for i in statuses if i.data.get("job") is not None}
    # Several workers (docs/operations.md §3) may hold statuses of one device in two batches at
    # once. The batch's jobs (and those of its served-byte counters) are locked first, all at
    # once and in id order (no deadlock between workers), and read once locked, so a batch sees
    # what the other committed: its states and its statuses' (boot, seq).
    # Cancel jobs a status of the batch may end: those whose target it reports ended, or whose
    # refusal (E_NOT_RUNNING, naming the target) it is.
    ends = {(i.device_id, i.data["job"]) for i in statuses if i.data.get("job") is not None and (
        i.data["state"] in protocol.TERMINAL_STATES
        or (i.data["state"] == REJECTED and i.data.get("code") == protocol.E_NOT_RUNNING))}
    cancels: dict[tuple[str, int], list[int]] = {}  # (device, target job) -> its open cancel jobs
    if ends:
        for cancel_id, device_id, target in sql.open_cancels(s, {device_id for device_id, _ in ends}):
            if (device_id, target) in ends:
                cancels.setdefault((device_id, target), []).append(cancel_id)
    locked = job_ids | set(served) | {cancel_id for ids in cancels.values() for cancel_id in ids}
    jobs = {job_id: _JobRow(device_id, state, deployment_id)
            for job_id, device_id, state, deployment_id in sql.lock_jobs(s, locked)} if locked else {}
    if served:
        sql.add_served(s, served)
    if not batch:
        return result
    device_ids = {item.device_id for item in batch}
    locked_devices = sql.lock_devices(s, device_ids)
    hardware = {device_id: hw for device_id, (hw, _) in locked_devices.items()}
    # when the online flag each device row holds was received (fleet.online_values keeps the newer)
    online_at = {device_id: at for device_id, (_, at) in locked_devices.items()}
    seen = sql.known_statuses(s, list({_key(i) for i in statuses})) if statuses else set()
    # (a status for a job that is not its device's moves nothing, so only the device's own count)
    own = {job_id: jobs[job_id].device_id for job_id in job_ids if job_id in jobs}
    newest = sql.newest_statuses(s, own) if own else {}

    events: list[dict[str, Any]] = []
    job_changes: dict[int, dict[str, Any]] = {}
    device_changes: dict[str, dict[str, Any]] = {}
    for item in batch:
        if item.device_id not in hardware:
            result.ignored += 1
            log.warning("%s from unprovisioned device %s ignored", item.kind, item.device_id)
        elif item.kind == protocol.INVENTORY:
            device_changes.setdefault(item.device_id, {}).update(
                fleet.inventory_values(item.device_id, hardware[item.device_id], item.data, item.received_at))
        elif item.kind == protocol.ONLINE:
            values = fleet.online_values(item.data, item.received_at, online_at[item.device_id])
            if values is None:  # older than the flag stored by another worker's batch
                result.stale_online += 1
                log.info("online %d from %s received before the stored flag: not applied", item.data, item.device_id)
                continue
            online_at[item.device_id] = item.received_at
            device_changes.setdefault(item.device_id, {}).update(values)
        else:
            key = _key(item)
            if key in seen:
                result.duplicates += 1
                continue
            seen.add(key)
            _apply_status(item, result, events, job_changes, device_changes, jobs, newest, cancels)

    if events:
        sql.insert_events(s, events)
    if job_changes:
        sql.update_jobs(s, [job_changes[job_id] for job_id in sorted(job_changes)], utcnow())
    if result.expired:
        expiry.refused(s, result, jobs)
    # One UPDATE per distinct set of changed columns (usually one or two), rows in id order.
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for device_id, values in sorted(device_changes.items()):
        groups.setdefault(tuple(sorted(values)), []).append(dict(values, id=device_id))
    for columns, rows in groups.items():
        sql.update_devices(s, columns, rows)
    return result


def _key(item: Incoming) -> tuple[str, int, int, int]:
    """What identifies a status: (device, epoch, boot, seq)."""
    return item.device_id, item.data.get("epoch") or 0, item.data["boot"], item.data["seq"]


def _order(boot: int, seq: int) -> int:
    """A status's place in its device's order within one epoch: (boot, seq) as one integer."""
    return boot * SEQ_SPAN + seq


def _move_job(job_id: int, state: str, code: str | None, reason: str | None, result: BatchResult,
              job_changes: dict[int, dict[str, Any]], jobs: dict[int, _JobRow]) -> dict[str, Any]:
    """A job takes `state` with the device's code and reason; its pending row change."""
    job = jobs[job_id]
    job.state = state
    change = job_changes.setdefault(job_id, {"b_id": job_id, "b_progress": None, "b_total": None})
    change.update(b_state=state, b_code=code, b_reason=reason)
    result.job_states[job_id] = state
    if state in TERMINAL_STATES:
        result.finished.add(job.deployment_id)
    return change


def _apply_status(item: Incoming, result: BatchResult, events: list[dict[str, Any]],
                  job_changes: dict[int, dict[str, Any]], device_changes: dict[str, dict[str, Any]],
                  jobs: dict[int, _JobRow], newest: dict[int, tuple[int, int]],
                  cancels: dict[tuple[str, int], list[int]]) -> None:
    msg = item.data
    device_id = item.device_id
    progress = float(msg["progress"]) if msg.get("progress") is not None else None
    code = msg["code"][:32] if msg.get("code") is not None else None
    version = msg["version"][:64] if msg.get("version") is not None else None
    epoch = msg.get("epoch") or 0
    event = {"device_id": device_id, "job_id": msg.get("job"), "state": msg["state"], "code": code,
             "reason": msg.get("reason"), "progress": progress, "version": version, "epoch": epoch,
             "boot": msg["boot"], "seq": msg["seq"],
             "payload": stored_payload(msg),  # a reason, a version ... once: in their columns
             "received_at": item.received_at, "ignored": None}
    events.append(event)
    result.stored += 1
    device = device_changes.setdefault(device_id, {})
    device["last_seen"] = item.received_at
    if version:
        device["version"] = version
    if msg.get("job") is None or msg["state"] in (protocol.KEYS_UPDATED, protocol.HEALTH):
        return  # a key update or a health report changes no job
    job_id = msg["job"]
    job = jobs.get(job_id)
    own = job is not None and job.device_id == device_id
    open_cancels = [c for c in cancels.get((device_id, job_id), ())
                    if c in jobs and jobs[c].state not in TERMINAL_STATES] if own else []
    if msg["state"] == REJECTED and code == protocol.E_EXPIRED:
        result.expired[job_id] = device_id  # its command came too late: fota.server.expiry
        return
    if msg["state"] == REJECTED:
        # A refusal happened whatever it ends (never marked ignored): the device will not run
        # that command. E_NOT_RUNNING names the target of a refused cancel: the cancel ends.
        if not own or code not in JOB_ENDING_REFUSALS:
            return
        if code == protocol.E_NOT_RUNNING and open_cancels:
            for cancel_id in open_cancels:
                _move_job(cancel_id, protocol.FAILED, code, msg.get("reason"), result, job_changes, jobs)
        elif job.state not in TERMINAL_STATES:
            _move_job(job_id, protocol.FAILED, code, msg.get("reason"), result, job_changes, jobs)
        return
    if not own:
        event["ignored"] = NO_SUCH_JOB if job is None else OTHER_DEVICE
        log.warning("status from %s for job %s that is not its own ignored", device_id, job_id)
        return
    if msg["state"] in protocol.TERMINAL_STATES:
        # The target ended (whatever the server's verdict on it): its cancel commands end too.
        took = msg["state"] == protocol.CANCELLED
        for cancel_id in open_cancels:
            _move_job(cancel_id, protocol.CANCELLED if took else protocol.FAILED, None if took else protocol.E_NOT_RUNNING,
                     f"job {job_id} {msg['state']}" + ("" if took else " before the cancel took effect"),
                     result, job_changes, jobs)
    # Several workers may ingest a device's statuses out of order: a job takes a status only
    # if it is newer (boot, seq) than every stored one of that job (it is stored regardless, and
    # shown: it happened before what the job took, as a `trial` delivered after `confirmed`).
    # Another epoch than the newest stored status's is newer: the device started over.
    order = _order(msg["boot"], msg["seq"])
    last = newest.get(job_id)
    older = last is not None and last[0] == epoch and last[1] > order
    if job.state in TERMINAL_STATES:
        if not older:  # sent after the job had ended: marked
            event["ignored"] = JOB_ENDED
            log.warning("status %s from %s for finished job %s (%s) not applied",
                        msg["state"], device_id, job_id, job.state)
        return
    if older:
        return
    newest[job_id] = (epoch, order)
    change = _move_job(job_id, msg["state"], code, msg.get("reason"), result, job_changes, jobs)
    if progress is not None:
        change["b_progress"] = progress
    total = msg.get("total")
    if isinstance(total, int) and not isinstance(total, bool) and total > 0:
        change["b_total"] = total
