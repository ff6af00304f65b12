"""Per-device broker credentials, hashed for each broker fota writes users for.

Mosquitto 2 accepts "$7$<iterations>$<b64 salt>$<b64 hash>" lines: PBKDF2-HMAC-SHA512.
nats-server accepts bcrypt hashes ("$2b$...") as a user's password (MQTT users too; checked on
2.15.1: tests/test_natsconfig.py). Hashing here (instead of calling mosquitto_passwd) lets the
store keep only hashes: both are made when a password is set (fota.server.fleet).

Both work factors are low on purpose. A broker password is 144 random bits (new_password): no
work factor makes guessing it any harder that matters, while the broker pays the hash on every
CONNECT: measured on nats-server 2.15.1 (this machine), a CONNECT took 0.1 s at bcrypt cost 10 and 5-18 ms
at cost 4 (the whole CONNECT).
"""
from __future__ import annotations

import base64
import hashlib
import os
import secrets

ITERATIONS = 101  # mosquitto_passwd's default for $7$
BCRYPT_COST = 4    # bcrypt's minimum (see above)


def new_password() -> str:
    return secrets.token_urlsafe(18)


def mosquitto_hash(password: str, salt: bytes | None = None, iterations: int = ITERATIONS) -> str:
    salt = salt if salt is not None else os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def bcrypt_hash(password: str) -> str | None:
    """The password's bcrypt hash for a NATS users file; None without the `bcrypt` module (the
    `cluster` extra): provisioning works on any install, and such a device has no NATS user
    until its credentials are set again (fota broker nats-config lists it)."""
    try:
        import bcrypt
    except ImportError:
        return None
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(BCRYPT_COST)).decode()
