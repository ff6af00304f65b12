"""Retention of the status history (status_events): what is kept, and bounded deletes of the rest.

Kept whatever its age or number (campaigns and operators need it; docs/operations.md §Retention):

* every status of a job that is still open (its device's own job, not in a final state);
* the first status that reported a job's final state (confirmed, failed, reverted, cancelled),
  for the device's own jobs: the campaign engine reads confirmations, an operator the outcome;
* the health reports of a device on probation in a campaign (the engine judges probation by them).

Everything else ("unprotected") is kept while it is among its device's newest ``keep`` unprotected
statuses and younger than ``days``. A pass deletes with set-based statements of at most
``batch`` rows each (one short transaction each, the same SQL on SQLite and PostgreSQL), and
at most ``max_rows`` rows a pass; what is left waits for the next pass.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import bindparam, select, text

from fota.device import protocol
from fota.server import counters
from fota.server.campaigns import states as campaign_states
from fota.server.deployments import TERMINAL_STATES
from fota.server.store import Device, Store, UTCDateTime
from fota.server.store.inlists import chunks

__all__ = ["DEFAULT_DAYS", "DEFAULT_INTERVAL", "DEFAULT_KEEP", "Retention", "prune", "retention_policy",
           "sweep_devices"]

log = logging.getLogger(__name__)

DEFAULT_KEEP = 200        # unprotected statuses kept per device
DEFAULT_DAYS = 90.0       # unprotected statuses older than this are deleted
DEFAULT_INTERVAL = 60.0   # seconds between the control center's passes


@dataclass(frozen=True)
class Retention:
    """keep: unprotected statuses kept per device (newest first; None: no count limit); days: age limit of
    unprotected statuses (None: none); batch: rows per DELETE; max_rows: rows per pass;
    sweep: devices not heard from that a pass checks too (all of them over the passes)."""
    keep: int | None = DEFAULT_KEEP
    days: float | None = DEFAULT_DAYS
    batch: int = 2000
    max_rows: int = 20000
    sweep: int = 500

    def __post_init__(self):
        if (self.keep is not None and self.keep < 0) or self.batch < 1 or self.max_rows < 1 or self.sweep < 0:
            raise ValueError("retention: keep >= 0, batch >= 1, max_rows >= 1, sweep >= 0")
        if self.days is not None and self.days <= 0:
            raise ValueError("retention: days must be > 0 (or None: no age limit)")


def retention_policy(keep: int | None, days: float | None) -> Retention | None:
    """The policy for a history_keep / history_days setting: 0 or None turns that limit off;
    None when both are off (everything is kept)."""
    keep = keep if keep else None
    days = days if days else None
    return Retention(keep=keep, days=days) if keep is not None or days is not None else None


def _quoted(states: Iterable[str]) -> str:
    return ", ".join(f"'{state}'" for state in sorted(states))  # fixed names, no quoting issue


_FINAL = _quoted(protocol.TERMINAL_STATES)
# A status of status_events `e` that retention keeps (see the module docstring).
_PROTECTED = f"""(
  EXISTS (SELECT 1 FROM jobs j WHERE j.id = e.job_id AND j.device_id = e.device_id
          AND j.state NOT IN ({_quoted(TERMINAL_STATES)}))
  OR (e.state IN ({_FINAL})
      AND EXISTS (SELECT 1 FROM jobs j WHERE j.id = e.job_id AND j.device_id = e.device_id)
      AND e.id = (SELECT MIN(f.id) FROM status_events f WHERE f.job_id = e.job_id
                  AND f.device_id = e.device_id AND f.state IN ({_FINAL})))
  OR (e.state = '{protocol.HEALTH}'
      AND EXISTS (SELECT 1 FROM campaign_devices c WHERE c.device_id = e.device_id
                  AND c.state = '{campaign_states.PROBATION}'))
)"""

# Beyond the newest :keep unprotected statuses of each of the devices (ids in arrival order).
_OVER_COUNT = text(f"""
DELETE FROM status_events WHERE id IN (
  SELECT id FROM (
    SELECT e.id AS id, ROW_NUMBER() OVER (PARTITION BY e.device_id ORDER BY e.id DESC) AS rn
    FROM status_events e WHERE e.device_id IN :devices AND NOT {_PROTECTED}
  ) ranked WHERE rn > :keep LIMIT :batch)
""").bindparams(bindparam("devices", expanding=True))

# Unprotected statuses received before :cutoff (ix_status_events_received_at).
_OVER_AGE = text(f"""
DELETE FROM status_events WHERE id IN (
  SELECT e.id FROM status_events e WHERE e.received_at < :cutoff AND NOT {_PROTECTED} LIMIT :batch)
""").bindparams(bindparam("cutoff", type_=UTCDateTime()))


def prune(store: Store, policy: Retention, devices: Iterable[str], now: datetime, worker: str) -> int:
    """One bounded pass: the devices' statuses beyond ``policy.keep``, then statuses older than
    ``policy.days``. Returns how many were deleted (counted as ``pruned`` for ``worker``)."""
    deleted = 0
    budget = policy.max_rows

    def run(stmt, params) -> None:
        nonlocal deleted, budget
        while budget > 0:
            want = min(policy.batch, budget)
            with store.session() as s:  # one short transaction per statement
                n = s.execute(stmt, dict(params, batch=want)).rowcount or 0
                counters.add(s, worker, {counters.PRUNED: n})
            deleted += n
            budget -= n
            if n < want:
                return

    # A few devices a statement: the window function ranks only their rows.
    for part in chunks(sorted(set(devices)) if policy.keep is not None else [], 50):
        run(_OVER_COUNT, {"devices": part, "keep": policy.keep})
        if budget <= 0:
            break
    if policy.days is not None and budget > 0:
        run(_OVER_AGE, {"cutoff": now - timedelta(days=policy.days)})
    if deleted:
        log.info("retention: %d status(es) deleted", deleted)
    return deleted


def sweep_devices(store: Store, after: str, count: int) -> list[str]:
    """The next ``count`` device ids after ``after`` (wrapping round): a pass's share of the fleet."""
    if count <= 0:
        return []
    with store.session() as s:
        ids = list(s.scalars(select(Device.id).where(Device.id > after).order_by(Device.id).limit(count)))
        if len(ids) < count:
            ids += [d for d in s.scalars(select(Device.id).order_by(Device.id).limit(count - len(ids)))
                    if d not in ids]
    return ids
