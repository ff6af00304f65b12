"""The worker registry: which control-center workers are alive, and who takes over a dead one.

Each worker is one process with one persistent MQTT session (client id = ``center_workers.id``,
new for every start) in the shared subscription group. Mosquitto keeps routing a dead member's
share of the QoS 1 statuses into its session (measured: tests/test_workers.py), so a dead
worker's session must be drained and deleted by a live one. This module is the database side
of that (docs/operations.md §3):

* ``register`` / ``heartbeat``: a worker renews its row every HEARTBEAT seconds;
  ``heartbeat`` returns False once the row is gone or adopted (the worker was declared dead:
  it must stop, since its session now belongs to another worker);
* ``adopt_stale``: a live worker takes one worker silent for longer than ``lease``: marks it
  adopted and frees the jobs it had claimed but not marked sent (they get sent again; a device
  that already had one answers ``E_DUPLICATE_JOB``);
* ``forget``: the adopter drained the session and deleted it; the row goes.

All functions are called on a database thread and run in their own transaction.
"""
from __future__ import annotations

import os
import secrets
import socket
from datetime import datetime, timedelta, timezone

from sqlalchemy import delete, func, select, update

from fota.server.deployments import PENDING
from fota.server.store import CenterWorker, Job, Store, utcnow

__all__ = ["HEARTBEAT", "LEASE", "SingleWorkerError", "adopt_stale", "count_workers", "forget", "heartbeat",
           "live_workers", "new_worker_id", "register", "retire"]

HEARTBEAT = 1.0     # seconds between a worker's heartbeats
LEASE = 10.0        # seconds of silence after which a worker counts as dead


class SingleWorkerError(RuntimeError):
    """Several workers on a database that supports only one (SQLite)."""


def new_worker_id(prefix: str = "fota:w") -> str:
    """A client id for one worker start: host, pid and randomness (≤ 64 characters). The ':'
    makes it one that no device can take (device ids are [A-Za-z0-9_-], fota.server.broker)."""
    host = socket.gethostname().split(".")[0][:24]
    return f"{prefix}:{host}:{os.getpid()}:{secrets.token_hex(3)}"[:64]


def live_workers(store: Store, lease: float = LEASE) -> list[str]:
    """Ids of the workers whose heartbeat is fresh."""
    cutoff = utcnow() - timedelta(seconds=lease)
    with store.session() as s:
        return list(s.scalars(select(CenterWorker.id).where(CenterWorker.heartbeat_at >= cutoff,
                                                            CenterWorker.adopted_by.is_(None))
                              .order_by(CenterWorker.id)))


def register(store: Store, worker_id: str, lease: float = LEASE) -> None:
    """Add this worker. On SQLite (one writer, no row locks) a second live worker is refused."""
    if store.engine.dialect.name == "sqlite":
        others = [w for w in live_workers(store, lease) if w != worker_id]
        if others:
            raise SingleWorkerError(
                f"SQLite supports one control-center worker and {others[0]} is alive "
                f"(heartbeat within {lease:.0f}s): use PostgreSQL for several workers")
    now = utcnow()
    with store.session() as s:
        s.add(CenterWorker(id=worker_id, host=socket.gethostname()[:64], pid=os.getpid(), started_at=now,
                           heartbeat_at=now))


def heartbeat(store: Store, worker_id: str, adopting: list[str] | tuple[str, ...] = ()) -> bool:
    """Renew this worker's row (and of the dead ones it is draining); False if it was declared dead."""
    now = utcnow()
    with store.session() as s:
        renewed = s.execute(update(CenterWorker).where(CenterWorker.id == worker_id,
                                                       CenterWorker.adopted_by.is_(None))
                            .values(heartbeat_at=now)).rowcount
        if adopting:
            s.execute(update(CenterWorker).where(CenterWorker.id.in_(adopting),
                                                 CenterWorker.adopted_by == worker_id).values(heartbeat_at=now))
    return renewed == 1


def adopt_stale(store: Store, worker_id: str, lease: float = LEASE) -> str | None:
    """Take over one dead worker (silent for ``lease`` seconds, or its adopter is); its id or None.

    Its claimed-but-unsent jobs are released in the same transaction."""
    cutoff = utcnow() - timedelta(seconds=lease)
    with store.session() as s:
        dead = s.scalars(select(CenterWorker).where(CenterWorker.heartbeat_at < cutoff, CenterWorker.id != worker_id)
                         .order_by(CenterWorker.heartbeat_at).limit(1)
                         .with_for_update(skip_locked=True)).first()
        if dead is None:
            return None
        dead.adopted_by = worker_id
        dead.heartbeat_at = utcnow()
        s.execute(update(Job).where(Job.worker == dead.id, Job.state == PENDING).values(worker=None))
        return dead.id


def forget(store: Store, worker_id: str) -> None:
    """The worker's session is gone: delete its row."""
    with store.session() as s:
        s.execute(delete(CenterWorker).where(CenterWorker.id == worker_id))


def count_workers(store: Store) -> int:
    with store.session() as s:
        return s.scalar(select(func.count()).select_from(CenterWorker))



def retire(store: Store, worker_id: str) -> None:
    """A worker stopping cleanly: make its row stale at once, so that a live worker adopts
    (drains and deletes) its session now, or the next one to start does."""
    with store.session() as s:
        s.execute(update(CenterWorker).where(CenterWorker.id == worker_id, CenterWorker.adopted_by.is_(None))
                  .values(heartbeat_at=datetime(2000, 1, 1, tzinfo=timezone.utc)))
