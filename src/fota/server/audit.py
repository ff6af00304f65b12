"""The audit log: who changed what, when (API tokens and the CLI alike).

    record(store, "cli:alice", "device.add", "device:dev-01", {"hardware": "esp32"})

An action and its audit event belong in one transaction, so that neither exists without the
other. The service modules (releases, fleet, deployments) open their own sessions from the
store they are given; ``transaction(store)`` gives them a store whose sessions all share one
transaction, committed once at the end, audit event included:

    with audit.transaction(store) as tx:
        release = create_release(tx, blobs, key, data, "1.1.0", ["esp32"])
        tx.record("ops-bot", "release.create", "release:1.1.0", {"sha256": release.sha256})
    # committed here; rolled back, audit event included, if anything raised
"""
from __future__ import annotations

import getpass
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fota.server.store import Store
from fota.server.store.models import AuditEvent

__all__ = ["AuditTransaction", "cli_actor", "list_events", "record", "transaction"]

MAX_ACTOR = 64
MAX_ACTION = 64
MAX_TARGET = 128
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


def cli_actor() -> str:
    """The actor of CLI commands: ``cli:<os user>``."""
    try:
        user = getpass.getuser()
    except Exception:  # no login name, no $USER (containers)
        user = "unknown"
    return f"cli:{user}"[:MAX_ACTOR]


class AuditTransaction:
    """A store stand-in whose ``session()`` blocks all use one session (one transaction).

    Nested blocks neither commit nor roll back: the outer ``transaction()`` does, once.
    """

    def __init__(self, store: Store, session: Session):
        self.url = store.url
        self._session = session

    @contextmanager
    def session(self) -> Iterator[Session]:
        yield self._session

    def flush(self) -> None:
        """Send the pending changes (ids get assigned; conflicts raise here)."""
        self._session.flush()

    def record(self, actor: str, action: str, target: str, detail: dict[str, Any] | None = None) -> AuditEvent:
        """Add an audit event to this transaction.

        Flushes first, so the action's rows have their ids (and a conflict surfaces here).
        """
        self._session.flush()
        return record(self._session, actor, action, target, detail)


@contextmanager
def transaction(store: Store) -> Iterator[AuditTransaction]:
    """One transaction for an action and its audit event; see the module docstring."""
    with store.session() as session:
        yield AuditTransaction(store, session)


def _event(actor: str, action: str, target: str, detail: dict[str, Any] | None) -> AuditEvent:
    if not actor or not action:
        raise ValueError("an audit event needs an actor and an action")
    return AuditEvent(actor=str(actor)[:MAX_ACTOR], action=str(action)[:MAX_ACTION],
                      target=str(target or "")[:MAX_TARGET], detail=dict(detail or {}))


def record(store_or_session: Store | Session | AuditTransaction, actor: str, action: str, target: str,
           detail: dict[str, Any] | None = None) -> AuditEvent:
    """Record an audit event.

    With a Session (or an AuditTransaction) the event joins that transaction (committed with
    it); with a Store it is committed on its own.
    """
    event = _event(actor, action, target, detail)
    if isinstance(store_or_session, Session):
        store_or_session.add(event)
        return event
    with store_or_session.session() as s:
        s.add(event)
        s.flush()
    return event


def list_events(store: Store, limit: int = DEFAULT_LIMIT, actor: str | None = None,
                action: str | None = None) -> list[AuditEvent]:
    """The newest events first, at most ``limit`` (1..1000), optionally of one actor / action."""
    limit = max(1, min(int(limit), MAX_LIMIT))
    query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
    if actor is not None:
        query = query.where(AuditEvent.actor == actor)
    if action is not None:
        query = query.where(AuditEvent.action == action)
    with store.session() as s:
        return list(s.scalars(query))
