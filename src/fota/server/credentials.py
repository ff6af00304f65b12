"""Per-device broker credentials in Mosquitto's password-file format.

Mosquitto 2 accepts "$7$<iterations>$<b64 salt>$<b64 hash>" lines: PBKDF2-HMAC-SHA512.
Hashing here (instead of calling mosquitto_passwd) lets the store keep only hashes.
"""
from __future__ import annotations

import base64
import hashlib
import os
import secrets

ITERATIONS = 101  # mosquitto_passwd's default for $7$


def new_password() -> str:
    return secrets.token_urlsafe(18)


def mosquitto_hash(password: str, salt: bytes | None = None, iterations: int = ITERATIONS) -> str:
    salt = salt if salt is not None else os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"
