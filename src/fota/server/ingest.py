"""Status ingestion: a batch of device messages written with a few set-based statements.

The control center queues status, inventory and online messages and writes them here, one
transaction per batch. The rules are those of applying the messages one by one in arrival
order; only the writing is set-based (an ORM unit of work cost ~1 ms of CPU per status):

* statuses are deduplicated on (device, boot, seq), against the table and within the batch,
  and the new ones inserted with one executemany INSERT;
* job rules (a device's own jobs only; a `rejected`, `keys` or `health` status changes no
  job; a terminal state is never overwritten; a status older (boot, seq) than a stored one of
  the same job is stored but moves no job — several workers may ingest a device's statuses out
  of order, so a batch locks its jobs first, in id order; progress and total kept when a status has
  none) are applied in memory, and each job's final values written by one executemany ``UPDATE jobs ... WHERE id = :id``
  that also skips rows another writer made terminal meanwhile;
* devices (last_seen, version, inventory, online; fota.server.fleet decides the values): one
  executemany UPDATE per set of changed columns.

The same statements run on SQLite and PostgreSQL.
"""
from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Float,
    Integer,
    TextClause,
    bindparam,
    cast,
    func,
    insert,
    literal_column,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session

from fota.device import protocol
from fota.server import fleet
from fota.server.deployments import TERMINAL_STATES
from fota.server.store import Device, Job, StatusEvent, utcnow
from fota.server.store.inlists import chunks

__all__ = ["REJECTED", "BatchResult", "Incoming", "write_batch"]

log = logging.getLogger(__name__)

REJECTED = "rejected"

_events = StatusEvent.__table__
_jobs = Job.__table__
_devices = Device.__table__

# Bound parameter names start with b_: SQLAlchemy reserves a column's own name in SET clauses.
_INSERT_EVENTS = insert(_events)
_ADD_SERVED = (update(_jobs).where(_jobs.c.id == bindparam("b_id"))
               .values(bytes_served=_jobs.c.bytes_served + bindparam("b_served", type_=Integer)))
# Terminal states inline: executemany() takes no expanding IN parameter (fixed names, no quoting issue).
_TERMINAL = [literal_column(f"'{state}'") for state in sorted(TERMINAL_STATES)]
# A status without progress or total keeps the stored one (COALESCE with NULL).
_UPDATE_JOB = (update(_jobs)
               .where(_jobs.c.id == bindparam("b_id"), _jobs.c.state.not_in(_TERMINAL))
               .values(state=bindparam("b_state"), code=bindparam("b_code"), reason=bindparam("b_reason"),
                       progress=func.coalesce(bindparam("b_progress", type_=Float), _jobs.c.progress),
                       bytes_total=func.coalesce(bindparam("b_total", type_=Integer), _jobs.c.bytes_total),
                       updated_at=bindparam("b_now")))


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


class _JobRow:
    """The part of a job row the status rules read; state follows the batch in memory."""
    __slots__ = ("device_id", "state", "deployment_id")

    def __init__(self, device_id: str, state: str, deployment_id: int):
        self.device_id, self.state, self.deployment_id = device_id, state, deployment_id


def write_batch(s: Session, batch: list[Incoming], served: dict[int, int]) -> BatchResult:
    """Write a batch of messages and served-byte counters in the session's transaction."""
    result = BatchResult()
    statuses = [i for i in batch if i.kind == protocol.STATUS]
    job_ids = {i.data["job"] for i in statuses if i.data.get("job") is not None}
    # Several workers (docs/operations.md §3) may hold statuses of one device in two batches at
    # once. The batch's jobs (and those of its served-byte counters) are locked first, all at
    # once and in id order (no deadlock between workers), and read once locked, so a batch sees
    # what the other committed: its states and its statuses' (boot, seq).
    # (Slices in id order keep the locks in id order.)
    jobs: dict[int, _JobRow] = {}
    for ids in chunks(sorted(job_ids | set(served))):
        jobs.update((row.id, _JobRow(row.device_id, row.state, row.deployment_id)) for row in s.execute(
            select(_jobs.c.id, _jobs.c.device_id, _jobs.c.state, _jobs.c.deployment_id)
            .where(_jobs.c.id.in_(ids)).order_by(_jobs.c.id).with_for_update()))
    if served:
        s.execute(_ADD_SERVED, [{"b_id": job_id, "b_served": n} for job_id, n in sorted(served.items())])
    if not batch:
        return result
    hardware: dict[str, str] = {}
    for ids in chunks(sorted({item.device_id for item in batch})):
        hardware.update(s.execute(select(_devices.c.id, _devices.c.hardware).where(_devices.c.id.in_(ids))).all())
    seen = _known_statuses(s, statuses) if statuses else set()
    newest = _newest_statuses(s, {job_id: jobs[job_id].device_id for job_id in job_ids & set(jobs)})

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
            device_changes.setdefault(item.device_id, {}).update(fleet.online_values(item.data, item.received_at))
        else:
            key = (item.device_id, item.data["boot"], item.data["seq"])
            if key in seen:
                result.duplicates += 1
                continue
            seen.add(key)
            _apply_status(item, result, events, job_changes, device_changes, jobs, newest)

    if events:
        s.execute(_INSERT_EVENTS, events)
    if job_changes:
        now = utcnow()
        for change in job_changes.values():
            change["b_now"] = now
        s.execute(_UPDATE_JOB, [job_changes[job_id] for job_id in sorted(job_changes)])
    _update_devices(s, device_changes)
    return result


def _order(boot: int, seq: int) -> int:
    """A status's place in its device's order: (boot, seq) as one integer."""
    return boot * _SEQ_SPAN + seq


_SEQ_SPAN = 2**31  # boot and seq are 0..2**31-1


def _newest_statuses(s: Session, job_devices: dict[int, str]) -> dict[int, int]:
    """job id -> the order key of the newest stored status of that job (job_devices: job -> its device)."""
    key = func.max(cast(_events.c.boot, BigInteger) * _SEQ_SPAN + _events.c.seq)
    newest: dict[int, int] = {}
    for job_ids in chunks(sorted(job_devices)):
        # status_events has no index on job_id: the device filter lets the query use device_id's.
        device_ids = sorted({job_devices[job_id] for job_id in job_ids})
        newest.update(s.execute(select(_events.c.job_id, key).where(_events.c.device_id.in_(device_ids),
                                                                    _events.c.job_id.in_(job_ids))
                                .group_by(_events.c.job_id)).all())
    return newest


def _known_statuses(s: Session, statuses: list[Incoming]) -> set[tuple[str, int, int]]:
    """The batch's (device, boot, seq) keys already stored."""
    keys = list({(i.device_id, i.data["boot"], i.data["seq"]) for i in statuses})
    found: set[tuple[str, int, int]] = set()
    for start in range(0, len(keys), _LOOKUP_MAX):
        part = keys[start:start + _LOOKUP_MAX]
        part += part[-1:] * (_lookup_size(len(part)) - len(part))  # padding: a repeated key
        params = {}
        for n, (device_id, boot, seq) in enumerate(part):
            params[f"d{n}"], params[f"b{n}"], params[f"s{n}"] = device_id, boot, seq
        found.update(tuple(row) for row in s.execute(_lookup(len(part)), params))
    return found


# The dedup lookup joins the batch's keys, as a VALUES list, to the unique index of
# status_events: SQLite answers `(device_id, boot, seq) IN (...)` with a scan of the whole
# index (EXPLAIN QUERY PLAN), ~25 ms per batch at 200,000 rows and growing with the history.
# Plain SQL text: SQLAlchemy's values() took ~14 ms to compile for 200 rows. Key lists are
# padded to a power of two so that a few statements serve every batch size.
_LOOKUP_MAX = 256


def _lookup_size(n: int) -> int:
    return 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=16)
def _lookup(n: int) -> TextClause:
    rows = ", ".join(f"(:d{i}, :b{i}, :s{i})" for i in range(n))
    return text(f"WITH v (device_id, boot, seq) AS (VALUES {rows}) "
                "SELECT e.device_id, e.boot, e.seq FROM v JOIN status_events e "
                "ON e.device_id = v.device_id AND e.boot = v.boot AND e.seq = v.seq")


def _apply_status(item: Incoming, result: BatchResult, events: list[dict[str, Any]],
                  job_changes: dict[int, dict[str, Any]], device_changes: dict[str, dict[str, Any]],
                  jobs: dict[int, _JobRow], newest: dict[int, int]) -> None:
    msg = item.data
    device_id = item.device_id
    progress = float(msg["progress"]) if msg.get("progress") is not None else None
    code = msg["code"][:32] if msg.get("code") is not None else None
    version = msg["version"][:64] if msg.get("version") is not None else None
    events.append({"device_id": device_id, "job_id": msg.get("job"), "state": msg["state"], "code": code,
                   "reason": msg.get("reason"), "progress": progress, "version": version,
                   "boot": msg["boot"], "seq": msg["seq"], "payload": msg, "received_at": item.received_at})
    result.stored += 1
    device = device_changes.setdefault(device_id, {})
    device["last_seen"] = item.received_at
    if version:
        device["version"] = version
    if msg.get("job") is None or msg["state"] in (REJECTED, protocol.KEYS_UPDATED, protocol.HEALTH):
        return  # a refused message, a key update or a health report changes no job
    job_id = msg["job"]
    job = jobs.get(job_id)
    if job is None or job.device_id != device_id:
        log.warning("status from %s for job %s that is not its own ignored", device_id, job_id)
        return
    if job.state in TERMINAL_STATES:
        log.warning("status %s from %s for finished job %s (%s) not applied", msg["state"], device_id, job_id, job.state)
        return
    # Several workers may ingest a device's statuses out of order: a job takes a status only
    # if it is newer (boot, seq) than every stored one of that job (it is stored regardless).
    order = _order(msg["boot"], msg["seq"])
    if newest.get(job_id, -1) > order:
        return
    newest[job_id] = order
    job.state = msg["state"]
    change = job_changes.setdefault(job_id, {"b_id": job_id, "b_progress": None, "b_total": None})
    change.update(b_state=job.state, b_code=code, b_reason=msg.get("reason"))
    if progress is not None:
        change["b_progress"] = progress
    total = msg.get("total")
    if isinstance(total, int) and not isinstance(total, bool) and total > 0:
        change["b_total"] = total
    result.job_states[job_id] = job.state
    if job.state in TERMINAL_STATES:
        result.finished.add(job.deployment_id)


def _update_devices(s: Session, changes: dict[str, dict[str, Any]]) -> None:
    """One executemany UPDATE per distinct set of changed columns (usually one or two)."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for device_id, values in sorted(changes.items()):  # id order: no deadlock between workers
        params = {"b_" + name: value for name, value in values.items()}
        params["b_id"] = device_id
        groups.setdefault(tuple(sorted(values)), []).append(params)
    for columns, params in groups.items():
        stmt = (update(_devices).where(_devices.c.id == bindparam("b_id"))
                .values({name: bindparam("b_" + name) for name in columns}))
        s.execute(stmt, params)
