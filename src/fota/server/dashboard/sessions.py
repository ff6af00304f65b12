"""Sign-in sessions of the web dashboard, and their CSRF tokens.

An operator signs in with an API token (fota.server.auth). The browser gets only a random session
id (256 bits), in an HttpOnly, SameSite=Strict cookie. The session lives in the database
(store.models.DashboardSession), so every `fota api` process on that database knows it and a
restart keeps it. The row holds the SHA-256 of the session id and the id of its token, never the
session id nor the token's secret: a stolen database opens no session. Every request reads the
session with its token, so a revoked or expired token ends its sessions at once on every process,
and a session has exactly the token's role.

A session unused for IDLE_SECONDS ends. Its last use is written at most every USED_RESOLUTION,
not at every page view. Signing out deletes the row; each sign-in deletes a bounded batch of
idle rows, and a token keeps at most MAX_PER_TOKEN sessions (its least recently used dropped).

CSRF: each session has its own random CSRF token, stored with it (useless without the session
cookie): every form that changes state carries it and the server compares it in constant time.
A token of an earlier session (signed out, signed in again) is stale and refused with 403.
The sign-in form itself is protected by a double-submit value (a short-lived cookie equal to a
hidden field), so no other site can sign a browser in under its own token.
"""
from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select, update

from fota.server.auth import hash_secret, note_use, token_state
from fota.server.store import Store, utcnow
from fota.server.store.models import ApiToken, DashboardSession

__all__ = ["COOKIE", "IDLE_SECONDS", "LOGIN_COOKIE", "MAX_PER_TOKEN", "SignedIn", "close_session",
           "open_session", "same", "signed_in"]

COOKIE = "fota_session"
LOGIN_COOKIE = "fota_login"
IDLE_SECONDS = 8 * 3600      # a session unused this long ends
USED_RESOLUTION = timedelta(seconds=60)  # used_at is refreshed at most this often
MAX_PER_TOKEN = 100          # a token's least recently used sessions dropped beyond this
PRUNE_BATCH = 500            # idle sessions deleted at one sign-in, at most
MAX_SESSION_ID = 128         # ours are 43 characters


@dataclass(frozen=True)
class SignedIn:
    """The operator behind a session: its token's name and role, the session's CSRF token."""
    name: str
    role: str
    csrf: str


def same(expected: str | None, given: str | None) -> bool:
    """Constant-time equality of two secrets; False when either is missing."""
    return bool(expected) and bool(given) and hmac.compare_digest(expected.encode(), given.encode())


def _digest(sid: str | None) -> str | None:
    if not isinstance(sid, str) or not sid or len(sid) > MAX_SESSION_ID:
        return None
    return hash_secret(sid)


def _idle(used_at: datetime, now: datetime) -> bool:
    return now - used_at > timedelta(seconds=IDLE_SECONDS)


def open_session(store: Store, token_id: int) -> tuple[str, str]:
    """A new session acting as this (verified) token: (session id for the cookie, CSRF token).
    Prunes idle sessions (a bounded batch) and the token's sessions beyond MAX_PER_TOKEN."""
    sid = secrets.token_urlsafe(32)
    csrf = secrets.token_urlsafe(32)
    now = utcnow()
    with store.session() as s:
        idle = (select(DashboardSession.id_hash)
                .where(DashboardSession.used_at < now - timedelta(seconds=IDLE_SECONDS))
                .limit(PRUNE_BATCH))
        s.execute(delete(DashboardSession).where(DashboardSession.id_hash.in_(idle.scalar_subquery())),
                  execution_options={"synchronize_session": False})
        mine = s.scalar(select(func.count()).select_from(DashboardSession)
                        .where(DashboardSession.token_id == token_id))
        if mine >= MAX_PER_TOKEN:
            oldest = (select(DashboardSession.id_hash).where(DashboardSession.token_id == token_id)
                      .order_by(DashboardSession.used_at).limit(mine - MAX_PER_TOKEN + 1))
            s.execute(delete(DashboardSession).where(DashboardSession.id_hash.in_(oldest.scalar_subquery())),
                      execution_options={"synchronize_session": False})
        s.add(DashboardSession(id_hash=hash_secret(sid), token_id=token_id, csrf=csrf, created_at=now,
                               used_at=now))
    return sid, csrf


def signed_in(store: Store, sid: str | None) -> SignedIn | None:
    """The operator of this session id (the cookie's value); None when there is no such session,
    it went idle, or its token is revoked or expired (then the session is deleted)."""
    digest = _digest(sid)
    if digest is None:
        return None
    now = utcnow()
    with store.session() as s:
        found = s.execute(select(DashboardSession.id_hash, DashboardSession.csrf, DashboardSession.used_at,
                                 ApiToken)
                          .join(ApiToken, ApiToken.id == DashboardSession.token_id)
                          .where(DashboardSession.id_hash == digest)).first()
        # the lookup matched on the hash already; compare_digest keeps the check itself constant-time
        if found is None or not hmac.compare_digest(found.id_hash, digest):
            return None
        token = found.ApiToken
        this = DashboardSession.id_hash == digest
        if _idle(found.used_at, now) or token_state(token, now) != "active":
            s.execute(delete(DashboardSession).where(this), execution_options={"synchronize_session": False})
            return None
        if now - found.used_at >= USED_RESOLUTION:
            # a statement, not an ORM change: another process may have deleted the row meanwhile
            s.execute(update(DashboardSession).where(this).values(used_at=now),
                      execution_options={"synchronize_session": False})
        note_use(token, now)
        return SignedIn(token.name, token.role, found.csrf)


def close_session(store: Store, sid: str | None) -> None:
    """Sign out: the session's row deleted (on every process at once)."""
    digest = _digest(sid)
    if digest is None:
        return
    with store.session() as s:
        s.execute(delete(DashboardSession).where(DashboardSession.id_hash == digest),
                  execution_options={"synchronize_session": False})
