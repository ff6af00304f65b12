"""API tokens of the control center's operators.

A token is a random secret, ``fota_`` + 43 URL-safe characters (256 bits), shown once at
creation. The store keeps its SHA-256 (hex), never the secret: a stolen database holds
no usable token. Verification looks the hash up (an indexed, unique column), so the
secret itself is never compared byte by byte against anything.

Roles: ``read`` (GET endpoints) and ``admin`` (everything, including state changes and the
audit log). A token can expire (``ttl_seconds``) and be revoked; names are unique, revoked
tokens included, because the name is the actor the audit log records.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from fota.server import audit
from fota.server.store import Store, utcnow
from fota.server.store.models import TOKEN_ROLES, ApiToken

__all__ = ["ADMIN", "READ", "ROLES", "SECRET_PREFIX", "AuthError", "create_token", "hash_secret",
           "list_tokens", "note_use", "revoke_token", "token_state", "verify_token"]

READ = "read"
ADMIN = "admin"
ROLES = TOKEN_ROLES
SECRET_PREFIX = "fota_"
MAX_SECRET = 256  # ours are 48 characters; anything much longer is not one of ours
# last_used_at is refreshed at most this often: not one write per request
LAST_USED_RESOLUTION = timedelta(seconds=60)
MAX_TTL_SECONDS = 10 * 365 * 24 * 3600
# Not ':' (the CLI's actors are "cli:<user>"): a token cannot pose as the CLI in the audit log.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")


class AuthError(Exception):
    """A token is unknown, revoked or expired; or a token cannot be created or revoked."""


def hash_secret(secret: str) -> str:
    """The stored form of a secret: SHA-256, hex."""
    return hashlib.sha256(secret.encode()).hexdigest()


def token_state(token: ApiToken, now: datetime | None = None) -> str:
    """'active', 'revoked' or 'expired'."""
    if token.revoked:
        return "revoked"
    if token.expires_at is not None and token.expires_at <= (now or utcnow()):
        return "expired"
    return "active"


def create_token(store: Store, name: str, role: str, ttl_seconds: int | None = None, *,
                 actor: str | None = None) -> tuple[ApiToken, str]:
    """A new token; returns (token row, secret). The secret is not kept anywhere: show it once.

    actor: when given, a ``token.create`` audit event by this actor is written in the same
    transaction.
    """
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise AuthError(f"invalid token name {name!r}: 1-64 characters of [A-Za-z0-9_.@-], "
                        "starting with a letter or digit")
    if role not in ROLES:
        raise AuthError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    expires_at = None
    if ttl_seconds is not None:
        if (not isinstance(ttl_seconds, int) or isinstance(ttl_seconds, bool)
                or not 0 < ttl_seconds <= MAX_TTL_SECONDS):
            raise AuthError(f"ttl must be 1..{MAX_TTL_SECONDS} seconds")
        expires_at = utcnow() + timedelta(seconds=ttl_seconds)
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken(name=name, role=role, token_hash=hash_secret(secret), expires_at=expires_at,
                     revoked=False)
    try:
        with store.session() as s:
            if s.scalar(select(ApiToken.id).where(ApiToken.name == name)) is not None:
                raise AuthError(f"a token named {name} already exists (names are never reused)")
            s.add(token)
            if actor is not None:
                audit.record(s, actor, "token.create", f"token:{name}",
                             {"role": role, "expires_at": expires_at.isoformat() if expires_at else None})
    except IntegrityError:  # created concurrently
        raise AuthError(f"a token named {name} already exists (names are never reused)") from None
    return token, secret


def verify_token(store: Store, secret: str | None) -> ApiToken:
    """The active token whose secret this is; AuthError if unknown, revoked or expired."""
    if (not isinstance(secret, str) or not secret.startswith(SECRET_PREFIX)
            or len(secret) > MAX_SECRET):
        raise AuthError("invalid token")
    digest = hash_secret(secret)
    now = utcnow()
    with store.session() as s:
        token = s.scalar(select(ApiToken).where(ApiToken.token_hash == digest))
        # the lookup matched on the hash already; compare_digest keeps the check itself constant-time
        if token is None or not hmac.compare_digest(token.token_hash, digest):
            raise AuthError("invalid token")
        state = token_state(token, now)
        if state != "active":
            raise AuthError(f"token {state}")
        note_use(token, now)
    return token


def note_use(token: ApiToken, now: datetime) -> None:
    """A use of this token (loaded in a store session), by a request or a dashboard session:
    last_used_at refreshed at most every LAST_USED_RESOLUTION, so a request is not a write."""
    if token.last_used_at is None or now - token.last_used_at >= LAST_USED_RESOLUTION:
        token.last_used_at = now


def revoke_token(store: Store, name: str, *, actor: str | None = None) -> ApiToken:
    """Revoke a token by name (for good: it cannot be re-enabled); AuthError if unknown or revoked.

    actor: when given, a ``token.revoke`` audit event is written in the same transaction.
    """
    with store.session() as s:
        token = s.scalar(select(ApiToken).where(ApiToken.name == name))
        if token is None:
            raise AuthError(f"no token named {name!r}")
        if token.revoked:
            raise AuthError(f"token {name} is already revoked")
        token.revoked = True
        if actor is not None:
            audit.record(s, actor, "token.revoke", f"token:{name}", {"role": token.role})
    return token


def list_tokens(store: Store) -> list[ApiToken]:
    """All tokens, oldest first (revoked and expired ones included)."""
    with store.session() as s:
        return list(s.scalars(select(ApiToken).order_by(ApiToken.id)))
