"""Sign-in sessions of the web dashboard, and their CSRF tokens.

An operator signs in with an API token (fota.server.auth). The browser gets only a random session
id, in an HttpOnly, SameSite=Strict cookie; the token's secret stays in this process's memory, and
every request checks it again (verify_token), so a revoked or expired token ends its sessions at
once and a session has exactly the token's role.

CSRF: each session has its own random CSRF token (session-bound, not a cookie): every form that
changes state carries it and the server compares it in constant time. A token of an earlier
session (signed out, signed in again, or the server restarted) is stale and refused with 403.
The sign-in form itself is protected by a double-submit value (a short-lived cookie equal to a
hidden field), so no other site can sign a browser in under its own token.
"""
from __future__ import annotations

import hmac
import secrets
import threading
import time
from dataclasses import dataclass, field

__all__ = ["COOKIE", "LOGIN_COOKIE", "Session", "SessionStore", "same"]

COOKIE = "fota_session"
LOGIN_COOKIE = "fota_login"
IDLE_SECONDS = 8 * 3600     # a session unused this long ends
MAX_SESSIONS = 10_000       # oldest dropped beyond this (memory bound)


@dataclass
class Session:
    secret: str                                  # the API token it was opened with
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    used: float = field(default_factory=time.monotonic)


def same(expected: str | None, given: str | None) -> bool:
    """Constant-time equality of two secrets; False when either is missing."""
    return bool(expected) and bool(given) and hmac.compare_digest(expected.encode(), given.encode())


class SessionStore:
    """Sessions by id, in memory (one dashboard process: `fota api`)."""

    def __init__(self, idle: float = IDLE_SECONDS):
        self.idle = idle
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}

    def open(self, secret: str) -> tuple[str, Session]:
        sid = secrets.token_urlsafe(32)
        with self._lock:
            if len(self._sessions) >= MAX_SESSIONS:
                oldest = min(self._sessions, key=lambda k: self._sessions[k].used)
                del self._sessions[oldest]
            session = self._sessions[sid] = Session(secret)
        return sid, session

    def get(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        now = time.monotonic()
        with self._lock:
            session = self._sessions.get(sid)
            if session is None:
                return None
            if now - session.used > self.idle:
                del self._sessions[sid]
                return None
            session.used = now
            return session

    def close(self, sid: str | None) -> None:
        with self._lock:
            self._sessions.pop(sid or "", None)
