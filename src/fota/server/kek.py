"""The key-encryption key (KEK): what the database's secret keys are wrapped with.

The AES keys of encrypted releases (Release.enc_key) and the devices' payload keys
(Device.enc_key) are stored wrapped, never in clear, so a copy of the database alone opens
no release. The KEK itself is never in the database:

* ``FOTA_KEK`` (64 hex characters) in the environment, if set; otherwise
* ``<home>/keys/kek`` (64 hex characters, mode 0600), created on first need.

Stored form: ``kek1:`` + hex(nonce 12 bytes || AES-256-GCM(KEK, key) with its 16-byte tag).
The associated data is what the key belongs to (``release:<version>``, ``device:<id>``), so a
wrapped key copied onto another row does not open.

Databases written before wrapping hold plain 64-hex keys: ``wrap_plain_keys`` wraps them (run
by every ``fota`` command that opens a home's database, ``fota serve`` included).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import select, update

from fota.tools.private import write_private

__all__ = ["ENV", "PREFIX", "Kek", "KekError", "count_wrapped", "is_wrapped", "wrap_plain_keys"]

ENV = "FOTA_KEK"
PREFIX = "kek1:"
KEY_BYTES = 32
NONCE_BYTES = 12


class KekError(ValueError):
    """No KEK, a malformed one, or one that does not open a stored key."""


def is_wrapped(value: str | None) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


def _parse_hex_key(text: str, where: str) -> bytes:
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise KekError(f"{where}: the key-encryption key must be {2 * KEY_BYTES} hex characters")
    return key


class Kek:
    """Wraps and unwraps the secret keys the database holds."""

    def __init__(self, key: bytes):
        if len(key) != KEY_BYTES:
            raise KekError(f"a key-encryption key is {KEY_BYTES} bytes")
        self._aead = AESGCM(key)
        # The key of the payload URLs' HMAC (fota.server.blobhttp), derived, so that every
        # process holding the KEK (the API server, each worker) signs and checks the same URLs.
        self.url_key = hmac.new(key, b"fota blob url v1", hashlib.sha256).digest()

    @classmethod
    def generate(cls) -> Kek:
        return cls(secrets.token_bytes(KEY_BYTES))

    @classmethod
    def load(cls, path: str | os.PathLike, create: bool = True) -> Kek:
        """$FOTA_KEK if set, else the file at ``path`` (created 0600 when missing and ``create``)."""
        if os.environ.get(ENV):
            return cls(_parse_hex_key(os.environ[ENV], f"${ENV}"))
        path = Path(path)
        if not path.exists():
            if not create:
                raise KekError(f"no key-encryption key: set ${ENV} or restore {path} (docs/operations.md)")
            try:
                write_private(path, secrets.token_hex(KEY_BYTES) + "\n", exclusive=True)
            except FileExistsError:  # another process created it meanwhile: use that one
                pass
        return cls(_parse_hex_key(path.read_text(), str(path)))

    # ---- the two kinds of keys ------------------------------------------------------------
    def wrap(self, key: bytes, label: str) -> str:
        nonce = secrets.token_bytes(NONCE_BYTES)
        return PREFIX + (nonce + self._aead.encrypt(nonce, key, label.encode())).hex()

    def unwrap(self, stored: str, label: str) -> bytes:
        if not is_wrapped(stored):
            raise KekError(f"the key of {label} is not wrapped (run any fota command on the home to wrap it)")
        try:
            raw = bytes.fromhex(stored[len(PREFIX):])
            return self._aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], label.encode())
        except (ValueError, InvalidTag):
            raise KekError(f"the key-encryption key does not open the key of {label}: "
                           f"wrong ${ENV} or keys/kek?") from None

    def release_key(self, release) -> bytes | None:
        """The plain AES key of a Release row (None: a plain release)."""
        return self.unwrap(release.enc_key, f"release:{release.version}") if release.enc_key else None

    def wrap_release_key(self, version: str, key: bytes) -> str:
        return self.wrap(key, f"release:{version}")

    def device_key(self, device_id: str, stored: str | None) -> bytes | None:
        """The plain payload key of a device (its Device.enc_key; None: the device has none)."""
        return self.unwrap(stored, f"device:{device_id}") if stored else None

    def wrap_device_key(self, device_id: str, key: bytes) -> str:
        return self.wrap(key, f"device:{device_id}")


def _keyed(store, wrapped: bool):
    """(model, id, name, stored key) of the rows holding a key, wrapped or plain."""
    from fota.server.store import Device, Release
    rows = []
    with store.session() as s:
        for model, name in ((Release, Release.version), (Device, Device.id)):
            form = model.enc_key.like(PREFIX + "%") if wrapped else model.enc_key.not_like(PREFIX + "%")
            rows += [(model, *row) for row in s.execute(select(model.id, name, model.enc_key)
                                                        .where(model.enc_key.is_not(None), form))]
    return rows


def count_wrapped(store) -> int:
    """How many keys in the database are wrapped (and need the KEK that wrapped them)."""
    return len(_keyed(store, wrapped=True))


def wrap_plain_keys(store, kek: Callable[[], Kek]) -> int:
    """Wrap the keys a database written before wrapping holds in clear; how many were wrapped.
    ``kek`` is called only if there is one (a home without keys needs no KEK file).

    Idempotent and safe with several processes at once: a row is updated only while it still
    holds the plain value read."""
    from fota.server.store import Release
    rows = _keyed(store, wrapped=False)
    if not rows:
        return 0
    wrapping = kek()
    count = 0
    with store.session() as s:
        for model, row_id, name, plain in rows:
            label = f"{'release' if model is Release else 'device'}:{name}"
            wrapped = wrapping.wrap(_parse_hex_key(plain, f"{model.__tablename__} {name}"), label)
            count += s.execute(update(model).where(model.id == row_id, model.enc_key == plain)
                               .values(enc_key=wrapped)).rowcount
    return count
