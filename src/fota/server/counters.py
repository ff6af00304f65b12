"""Counters of statuses a control-center worker did not store or deleted (ingest_counters).

Each worker adds to its own rows (worker, name), in the transaction of the batch or the
retention pass that counted them; /metrics (fota.server.metrics) reads the sums.
"""
from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from fota.server.store import IngestCounter

__all__ = ["OVERSIZE", "INVALID", "PRUNED", "RATE_LIMITED", "add", "totals"]

OVERSIZE = "refused_oversize"     # statuses over protocol.MAX_STATUS_BYTES
INVALID = "refused_invalid"       # not JSON, NUL, NaN, a field out of range ...
RATE_LIMITED = "rate_limited"     # over the device's status rate (fota.server.statuses.StatusLimiter)
PRUNED = "pruned"                 # deleted by the retention policy (fota.server.retention)


def add(s: Session, worker: str, deltas: Mapping[str, int]) -> None:
    """Add deltas (name -> count) to the worker's counters."""
    rows = [{"worker": worker, "name": name, "value": n} for name, n in sorted(deltas.items()) if n]
    if not rows:
        return
    dialect = postgresql if s.get_bind().dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(IngestCounter)
    s.execute(stmt.on_conflict_do_update(index_elements=["worker", "name"],
                                         set_={"value": IngestCounter.value + stmt.excluded.value}), rows)


def totals(s: Session) -> dict[str, int]:
    """name -> the sum over every worker."""
    return {name: int(n) for name, n in s.execute(select(IngestCounter.name, func.sum(IngestCounter.value))
                                                  .group_by(IngestCounter.name))}
