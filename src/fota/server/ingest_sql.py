"""The statements of the status batch writer (fota.server.ingest holds its rules), per database.

* ``Portable`` (SQLite): SQLAlchemy Core; several rows are one executemany, which the sqlite3
  module runs in C.
* ``PostgreSQL``: every statement takes its rows as one array per column (``unnest``) and its
  id lists as ``= ANY(array)``. Measured on the writer alone, this halves its CPU per status: with
  psycopg 3 an executemany is one server-side execution per row (pipelined, but ~10 µs of client
  CPU each), and an expanding ``IN`` or a ``VALUES`` list is new SQL text for every batch size,
  which psycopg parses again every time (it caches only short statements). Here the SQL text is
  constant and short, the arrays are dumped by psycopg's C code, and a statement runs once.

Both lock the batch's job rows first, in id order, and the batch's device rows next, in id order
(several workers may write batches of the same devices at once: one lock order, no deadlock).
"""
from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Float,
    Integer,
    Table,
    TextClause,
    bindparam,
    func,
    insert,
    literal_column,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from fota.server.deployments import CANCEL, PENDING, SENT, TERMINAL_STATES
from fota.server.store import Device, Job, StatusEvent
from fota.server.store.inlists import chunks

__all__ = ["SEQ_SPAN", "Portable", "PostgreSQL", "statements_for"]

_events: Table = StatusEvent.__table__
_jobs: Table = Job.__table__
_devices: Table = Device.__table__

SEQ_SPAN = 2**31  # boot and seq are 0..2**31-1: (boot, seq) as one integer is boot * SEQ_SPAN + seq

# The columns a status event is inserted with (the id is the database's).
EVENT_COLUMNS = ("device_id", "job_id", "state", "code", "reason", "progress", "version", "epoch", "boot",
                 "seq", "payload", "received_at", "ignored")

_TERMINAL_SQL = ", ".join(f"'{state}'" for state in sorted(TERMINAL_STATES))  # fixed names, no quoting issue


class Portable:
    """SQLAlchemy Core statements, executemany for rows (used on SQLite)."""

    # Bound parameter names start with b_: SQLAlchemy reserves a column's own name in SET clauses.
    _ADD_SERVED = (update(_jobs).where(_jobs.c.id == bindparam("b_id"))
                   .values(bytes_served=_jobs.c.bytes_served + bindparam("b_served", type_=Integer)))
    # Terminal states inline: executemany() takes no expanding IN parameter.
    _UPDATE_JOB = (update(_jobs)
                   .where(_jobs.c.id == bindparam("b_id"),
                          _jobs.c.state.not_in([literal_column(f"'{s}'") for s in sorted(TERMINAL_STATES)]))
                   .values(state=bindparam("b_state"), code=bindparam("b_code"), reason=bindparam("b_reason"),
                           # a status without progress or total keeps the stored one
                           progress=func.coalesce(bindparam("b_progress", type_=Float), _jobs.c.progress),
                           bytes_total=func.coalesce(bindparam("b_total", type_=Integer), _jobs.c.bytes_total),
                           updated_at=bindparam("b_now")))

    def lock_jobs(self, s: Session, job_ids: set[int]) -> list[tuple[int, str, str, int]]:
        """(id, device_id, state, deployment_id) of the jobs, locked in id order."""
        # slices in id order keep the locks in id order (and under SQLite's parameter cap)
        return [tuple(row) for ids in chunks(sorted(job_ids)) for row in s.execute(
            select(_jobs.c.id, _jobs.c.device_id, _jobs.c.state, _jobs.c.deployment_id)
            .where(_jobs.c.id.in_(ids)).order_by(_jobs.c.id).with_for_update())]

    def open_cancels(self, s: Session, device_ids: set[str]) -> list[tuple[int, str, int]]:
        """(id, device_id, target_job) of the devices' cancel jobs that have not ended (not locked:
        the caller locks the ones it may end with the batch's jobs, in id order)."""
        return [tuple(row) for ids in chunks(sorted(device_ids)) for row in s.execute(
            select(_jobs.c.id, _jobs.c.device_id, _jobs.c.target_job)
            .where(_jobs.c.device_id.in_(ids), _jobs.c.state.in_((PENDING, SENT)), _jobs.c.kind == CANCEL))]

    def add_served(self, s: Session, served: dict[int, int]) -> None:
        s.execute(self._ADD_SERVED, [{"b_id": job_id, "b_served": n} for job_id, n in sorted(served.items())])

    def lock_devices(self, s: Session, device_ids: set[str]) -> dict[str, tuple[str | None, datetime | None]]:
        """device id -> (provisioned hardware, online_at) of the provisioned ones, locked in id order."""
        found: dict[str, tuple[str | None, datetime | None]] = {}
        for ids in chunks(sorted(device_ids)):
            found.update((device_id, (hardware, online_at)) for device_id, hardware, online_at in s.execute(
                select(_devices.c.id, _devices.c.hardware, _devices.c.online_at).where(_devices.c.id.in_(ids))
                .order_by(_devices.c.id).with_for_update(key_share=True)))
        return found

    def known_statuses(self, s: Session, keys: list[tuple[str, int, int, int]]) -> set[tuple[str, int, int, int]]:
        """The (device, epoch, boot, seq) keys already stored."""
        found: set[tuple[str, int, int, int]] = set()
        for start in range(0, len(keys), _LOOKUP_MAX):
            part = keys[start:start + _LOOKUP_MAX]
            part += part[-1:] * (_lookup_size(len(part)) - len(part))  # padding: a repeated key
            params = {}
            for n, (device_id, epoch, boot, seq) in enumerate(part):
                params[f"d{n}"], params[f"e{n}"], params[f"b{n}"], params[f"s{n}"] = device_id, epoch, boot, seq
            found.update(tuple(row) for row in s.execute(lookup(len(part)), params))
        return found

    def newest_statuses(self, s: Session, jobs: dict[int, str]) -> dict[int, tuple[int, int]]:
        """job id -> (epoch, (boot, seq) as one integer) of the newest status its device sent for
        it: the epoch of the last one stored, and the highest (boot, seq) of that epoch.

        jobs: job id -> its device."""
        found: dict[int, tuple[int, int]] = {}
        pairs = sorted(jobs.items())
        for start in range(0, len(pairs), _LOOKUP_MAX):
            part = pairs[start:start + _LOOKUP_MAX]
            part += part[-1:] * (_lookup_size(len(part)) - len(part))  # padding: a repeated pair
            params = {}
            for n, (job_id, device_id) in enumerate(part):
                params[f"j{n}"], params[f"d{n}"] = job_id, device_id
            found.update((job_id, (epoch, newest)) for job_id, epoch, newest
                         in s.execute(newest_lookup(len(part)), params) if newest is not None)
        return found

    def insert_events(self, s: Session, events: list[dict[str, Any]]) -> None:
        s.execute(insert(_events), events)

    def update_jobs(self, s: Session, changes: list[dict[str, Any]], now: datetime) -> None:
        """changes: b_id, b_state, b_code, b_reason, b_progress, b_total (None: keep), in id order;
        a job another writer made terminal meanwhile is skipped."""
        s.execute(self._UPDATE_JOB, [dict(change, b_now=now) for change in changes])

    def update_devices(self, s: Session, columns: Sequence[str], rows: list[dict[str, Any]]) -> None:
        """rows: {"id": ..., column: value, ...}, the same columns each, in id order."""
        stmt = (update(_devices).where(_devices.c.id == bindparam("b_id"))
                .values({name: bindparam("b_" + name) for name in columns}))
        s.execute(stmt, [{"b_" + name: value for name, value in row.items()} for row in rows])


# The dedup lookup joins the batch's keys, as a VALUES list, to the unique index of
# status_events: SQLite answers `(device_id, boot, seq) IN (...)` with a scan of the whole
# index (EXPLAIN QUERY PLAN), ~25 ms per batch at 200,000 rows and growing with the history.
# Plain SQL text: SQLAlchemy's values() took ~14 ms to compile for 200 rows. Key lists are
# padded to a power of two so that a few statements serve every batch size.
_LOOKUP_MAX = 256


def _lookup_size(n: int) -> int:
    return 1 << (n - 1).bit_length()


# A job's newest status: the epoch of the last one stored for it (along the job_id index: a
# job has a few dozen statuses at most), then the highest (boot, seq) of that epoch. Statuses
# of an older epoch do not count: their device started over since.
_OF_JOB = "FROM status_events e WHERE e.device_id = v.device_id AND e.job_id = v.job_id"
_EPOCH_OF = f"(SELECT e.epoch {_OF_JOB} ORDER BY e.id DESC LIMIT 1)"
_NEWEST_OF = (f"{_EPOCH_OF}, (SELECT MAX(CAST(e.boot AS BIGINT) * {SEQ_SPAN} + e.seq) {_OF_JOB} "
              f"AND e.epoch = {_EPOCH_OF})")


@functools.lru_cache(maxsize=16)
def newest_lookup(n: int) -> TextClause:
    rows = ", ".join(f"(:j{i}, :d{i})" for i in range(n))
    return text(f"WITH v (job_id, device_id) AS (VALUES {rows}) SELECT v.job_id, {_NEWEST_OF} FROM v")


@functools.lru_cache(maxsize=16)
def lookup(n: int) -> TextClause:
    rows = ", ".join(f"(:d{i}, :e{i}, :b{i}, :s{i})" for i in range(n))
    return text(f"WITH v (device_id, epoch, boot, seq) AS (VALUES {rows}) "
                "SELECT e.device_id, e.epoch, e.boot, e.seq FROM v JOIN status_events e "
                "ON e.device_id = v.device_id AND e.epoch = v.epoch AND e.boot = v.boot AND e.seq = v.seq")


# ------------------------------------------------------------------------------ PostgreSQL

def _sql_type(table: Table, name: str) -> str:
    return table.c[name].type.compile(dialect=postgresql.dialect())


def _recordset(table: Table, names: Iterable[str], **types: str) -> str:
    """The rows of the JSON array parameter ``:rows`` as a table ``v(name, ..., n)``, each
    field typed like the table's column (or as ``types`` says), n its position."""
    names = list(names)
    columns = ", ".join(f"{name} {types.get(name) or _sql_type(table, name)}" for name in names)
    return (f"ROWS FROM (json_to_recordset(CAST(:rows AS json)) AS ({columns})) "
            f"WITH ORDINALITY AS v({', '.join(names)}, n)")


def _json_default(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _rows(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, default=_json_default)


class PostgreSQL(Portable):
    """One JSON array of rows per statement, and ``= ANY(array)`` for id lists.

    The rows go as one JSON text (``json_to_recordset``): the json module's C encoder writes a
    batch in about a microsecond per row, where psycopg's array dumper spends Python time on
    every element (and escapes every quote of the status payloads)."""

    _LOCK_JOBS = text("SELECT id, device_id, state, deployment_id FROM jobs WHERE id = ANY(CAST(:ids AS integer[])) "
                      "ORDER BY id FOR UPDATE")
    # (the (device_id, state) index finds them: a cancel job is only ever pending or sent)
    _OPEN_CANCELS = text("SELECT id, device_id, target_job FROM jobs WHERE device_id = ANY(CAST(:ids AS varchar[])) "
                         f"AND state IN ('{PENDING}', '{SENT}') AND kind = '{CANCEL}'")
    _ADD_SERVED_PG = text("UPDATE jobs SET bytes_served = jobs.bytes_served + v.served "
                          f"FROM {_recordset(_jobs, ['id', 'served'], served='bigint')} WHERE jobs.id = v.id")
    # FOR NO KEY UPDATE: the lock the UPDATE takes anyway (it blocks no insert of a job for the device).
    _LOCK_DEVICES = text("SELECT id, hardware, online_at FROM devices WHERE id = ANY(CAST(:ids AS varchar[])) "
                         "ORDER BY id FOR NO KEY UPDATE")
    # One index lookup per key (LIMIT 1 keeps the planner from turning the join into a scan
    # of the whole table, which it did for a 10,000-row history).
    _KNOWN = text("SELECT v.device_id, v.epoch, v.boot, v.seq "
                  f"FROM {_recordset(_events, ['device_id', 'epoch', 'boot', 'seq'])} "
                  "CROSS JOIN LATERAL (SELECT 1 FROM status_events e WHERE e.device_id = v.device_id "
                  "AND e.epoch = v.epoch AND e.boot = v.boot AND e.seq = v.seq LIMIT 1) AS found")
    # The same answer as _NEWEST_OF in one pass over the job's statuses (a third of the time of
    # the two subqueries): per epoch its highest (boot, seq) and last id, the last epoch first.
    _NEWEST = text("SELECT v.job_id, n.epoch, n.newest "
                   f"FROM {_recordset(_events, ['job_id', 'device_id'])} CROSS JOIN LATERAL ("
                   f"SELECT e.epoch, MAX(CAST(e.boot AS BIGINT) * {SEQ_SPAN} + e.seq) AS newest, MAX(e.id) AS last "
                   "FROM status_events e WHERE e.device_id = v.device_id AND e.job_id = v.job_id "
                   "GROUP BY e.epoch ORDER BY last DESC LIMIT 1) AS n")
    # Ordered by position: event ids follow arrival order.
    _INSERT = text(f"INSERT INTO status_events ({', '.join(EVENT_COLUMNS)}) "
                   f"SELECT {', '.join(EVENT_COLUMNS)} FROM {_recordset(_events, EVENT_COLUMNS)} ORDER BY n")
    _UPDATE_JOBS = text(
        "UPDATE jobs SET state = v.state, code = v.code, reason = v.reason, "
        "progress = COALESCE(v.progress, jobs.progress), bytes_total = COALESCE(v.bytes_total, jobs.bytes_total), "
        "updated_at = :now "
        f"FROM {_recordset(_jobs, ['id', 'state', 'code', 'reason', 'progress', 'bytes_total'])} "
        f"WHERE jobs.id = v.id AND jobs.state NOT IN ({_TERMINAL_SQL})")

    def lock_jobs(self, s: Session, job_ids: set[int]) -> list[tuple[int, str, str, int]]:
        return [tuple(row) for row in s.execute(self._LOCK_JOBS, {"ids": list(job_ids)})]

    def open_cancels(self, s: Session, device_ids: set[str]) -> list[tuple[int, str, int]]:
        return [tuple(row) for row in s.execute(self._OPEN_CANCELS, {"ids": list(device_ids)})]

    def add_served(self, s: Session, served: dict[int, int]) -> None:
        s.execute(self._ADD_SERVED_PG, {"rows": _rows([{"id": job_id, "served": n} for job_id, n in served.items()])})

    def lock_devices(self, s: Session, device_ids: set[str]) -> dict[str, tuple[str | None, datetime | None]]:
        return {device_id: (hardware, online_at) for device_id, hardware, online_at
                in s.execute(self._LOCK_DEVICES, {"ids": list(device_ids)})}

    def known_statuses(self, s: Session, keys: list[tuple[str, int, int, int]]) -> set[tuple[str, int, int, int]]:
        rows = _rows([{"device_id": device_id, "epoch": epoch, "boot": boot, "seq": seq}
                      for device_id, epoch, boot, seq in keys])
        return {tuple(row) for row in s.execute(self._KNOWN, {"rows": rows})}

    def newest_statuses(self, s: Session, jobs: dict[int, str]) -> dict[int, tuple[int, int]]:
        rows = _rows([{"job_id": job_id, "device_id": device_id} for job_id, device_id in jobs.items()])
        return {job_id: (epoch, newest) for job_id, epoch, newest in s.execute(self._NEWEST, {"rows": rows})
                if newest is not None}

    def insert_events(self, s: Session, events: list[dict[str, Any]]) -> None:
        s.execute(self._INSERT, {"rows": _rows(events)})

    def update_jobs(self, s: Session, changes: list[dict[str, Any]], now: datetime) -> None:
        rows = [{"id": c["b_id"], "state": c["b_state"], "code": c["b_code"], "reason": c["b_reason"],
                 "progress": c["b_progress"], "bytes_total": c["b_total"]} for c in changes]
        s.execute(self._UPDATE_JOBS, {"rows": _rows(rows), "now": now})

    def update_devices(self, s: Session, columns: Sequence[str], rows: list[dict[str, Any]]) -> None:
        s.execute(_update_devices_pg(tuple(columns)), {"rows": _rows(rows)})


@functools.lru_cache(maxsize=32)
def _update_devices_pg(columns: tuple[str, ...]) -> TextClause:
    sets = ", ".join(f"{name} = v.{name}" for name in columns)
    return text(f"UPDATE devices SET {sets} FROM {_recordset(_devices, ('id', *columns))} WHERE devices.id = v.id")


_PORTABLE, _POSTGRESQL = Portable(), PostgreSQL()


def statements_for(s: Session) -> Portable:
    """The statements for the session's database."""
    return _POSTGRESQL if s.get_bind().dialect.name == "postgresql" else _PORTABLE
