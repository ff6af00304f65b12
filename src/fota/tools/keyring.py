"""Key hierarchy on the operator side: a root key certifies signing keys (CPython only).

    root key      pinned on every device at provisioning; signs certificates and key updates
                  only. Keep it offline in production (see docs/security.md).
    signing key   signs release manifests and device commands; certified by the root for
                  ["release", "command"] with validity bounds; rotated without reflashing.
    trust doc     {"version", "certs", "revoked"}: what devices trust; a root-signed "keys"
                  command with a higher version replaces it on the device.

Formats are the ones fota.device.trust and fota.device.core verify (docs/protocol.md §4).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from fota.tools.signing import (SigningError, generate_private_key, key_id, load_private_key,
                                public_key_bytes, save_private_key, sign)
from fota.tools.private import private_dir, write_private

DEFAULT_VALIDITY = 5 * 365 * 24 * 3600
# Seconds a signed command stays acceptable (its "exp" = "time" + this; docs/protocol.md §4):
# a command captured or stuck in a queue cannot be replayed long after. A sleeping device that
# wakes later refuses it (E_EXPIRED) and the control center signs it again (§9).
COMMAND_TTL = 24 * 3600
USAGES = ("release", "command")


def _compact(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def make_cert(root: ec.EllipticCurvePrivateKey, key: ec.EllipticCurvePrivateKey, *,
              usage=USAGES, not_before: int | None = None, not_after: int | None = None) -> dict:
    """A root-signed certificate for `key`."""
    pub = public_key_bytes(key)
    nb = int(time.time()) - 3600 if not_before is None else not_before
    na = nb + DEFAULT_VALIDITY if not_after is None else not_after
    body = _compact({"kid": key_id(pub), "pub": pub.hex(), "usage": list(usage),
                     "not_before": nb, "not_after": na})
    return {"body": body, "sig": sign(root, body.encode()).hex()}


def envelope(key: ec.EllipticCurvePrivateKey, body: dict) -> bytes:
    """A signed command envelope: {"body": text, "kid", "sig"} as published on `cmd`."""
    text = _compact(body)
    return _compact({"body": text, "kid": key_id(public_key_bytes(key)),
                     "sig": sign(key, text.encode()).hex()}).encode()


@dataclass
class Signer:
    """The key that signs manifests and commands, with its key id."""
    key: ec.EllipticCurvePrivateKey

    @property
    def kid(self) -> str:
        return key_id(public_key_bytes(self.key))

    def sign(self, message: bytes) -> str:
        return sign(self.key, message).hex()

    def command(self, body: dict, now: int | None = None, ttl: int = COMMAND_TTL) -> bytes:
        """The signed envelope of a device command: `time` (now) and `exp` (now + ttl) added."""
        body = dict(body)
        body.setdefault("time", int(time.time() if now is None else now))
        body.setdefault("exp", body["time"] + ttl)
        return envelope(self.key, body)


class Keyring:
    """The keys directory of a fota home: root.pem, signing.pem, trust.json."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)

    @property
    def root_path(self) -> Path:
        return self.dir / "root.pem"

    @property
    def signing_path(self) -> Path:
        return self.dir / "signing.pem"

    @property
    def trust_path(self) -> Path:
        return self.dir / "trust.json"

    def exists(self) -> bool:
        return self.signing_path.exists() and self.trust_path.exists()

    def init(self) -> None:
        """Create a root key, a certified signing key and trust version 1."""
        private_dir(self.dir)
        root = generate_private_key()
        save_private_key(root, self.root_path)
        signing = generate_private_key()
        save_private_key(signing, self.signing_path)
        self._write_trust({"version": 1, "certs": [make_cert(root, signing)], "revoked": []})

    def root(self) -> ec.EllipticCurvePrivateKey:
        if not self.root_path.exists():
            raise SigningError(f"no root key at {self.root_path}: run 'fota keys init'")
        return load_private_key(self.root_path)

    def root_public(self) -> bytes:
        return public_key_bytes(self.root())

    def signer(self) -> Signer:
        if not self.signing_path.exists():
            raise SigningError(f"no signing key in {self.dir}: run 'fota keys init' first")
        return Signer(load_private_key(self.signing_path))

    def trust(self) -> dict:
        if not self.trust_path.exists():
            raise SigningError(f"no trust document in {self.dir}: run 'fota keys init' first")
        return json.loads(self.trust_path.read_text())

    @property
    def keys_update_path(self) -> Path:
        return self.dir / "keys-update.json"

    def _write_trust(self, doc: dict) -> None:
        # The root signs the key update now, once: the control center only distributes it and
        # never needs the root key online.
        for path, data in ((self.trust_path, json.dumps(doc, indent=1)),
                           (self.keys_update_path, self._sign_keys_update(doc).decode())):
            write_private(path, data)

    def _sign_keys_update(self, doc: dict) -> bytes:
        body = {"type": "keys", "version": doc["version"], "certs": doc["certs"], "revoked": doc["revoked"],
                "time": int(time.time())}
        return envelope(self.root(), body)

    def keys_update(self) -> bytes:
        """The root-signed key update bringing a device to the current trust document."""
        if not self.keys_update_path.exists():
            raise SigningError(f"no key update in {self.dir}: run 'fota keys init' first")
        return self.keys_update_path.read_bytes()

    def fingerprint(self) -> tuple:
        """What changes when a rotation or revocation rewrites the key files (cheap: stat only)."""
        marks = []
        for path in (self.signing_path, self.keys_update_path):
            try:
                st = path.stat()
                marks.append((st.st_ino, st.st_mtime_ns, st.st_size))
            except FileNotFoundError:
                marks.append(None)
        return tuple(marks)

    def current(self) -> tuple[Signer, bytes]:
        """The signing key and the key update, checked to belong together: the key update
        certifies the signing key and does not revoke it. SigningError while a rotation is
        still writing the files (or if they disagree)."""
        try:
            signer = self.signer()
            update = self.keys_update()
            body = json.loads(json.loads(update)["body"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SigningError(f"the keys in {self.dir} cannot be read: {exc}") from None
        certified = {json.loads(cert["body"])["kid"] for cert in body.get("certs", ())}
        if signer.kid not in certified or signer.kid in body.get("revoked", ()):
            raise SigningError(f"signing key {signer.kid} is not certified by key update v{body.get('version')}")
        return signer, update

    def rotate(self, *, revoke_old: bool = True) -> Signer:
        """A new signing key, certified by the root; the old one revoked; trust version + 1."""
        root = self.root()
        old = self.signer()
        new = generate_private_key()
        doc = self.trust()
        certs = [c for c in doc["certs"] if json.loads(c["body"])["kid"] != old.kid or not revoke_old]
        certs.append(make_cert(root, new))
        revoked = sorted(set(doc["revoked"]) | ({old.kid} if revoke_old else set()))
        self._write_trust({"version": doc["version"] + 1, "certs": certs, "revoked": revoked})
        save_private_key(new, self.signing_path)
        return Signer(new)

    def revoke(self, kid: str) -> dict:
        # Devices compare key ids as key_id() writes them and refuse a key update whose revoked
        # list holds anything else (E_BAD_KEYS): an upper-case id typed by hand is normalised.
        kid = kid.strip().lower()
        if len(kid) != 16 or any(ch not in "0123456789abcdef" for ch in kid):
            raise SigningError(f"{kid!r} is not a key id (16 hex characters)")
        doc = self.trust()
        doc = {"version": doc["version"] + 1,
               "certs": [c for c in doc["certs"] if json.loads(c["body"])["kid"] != kid],
               "revoked": sorted(set(doc["revoked"]) | {kid})}
        self._write_trust(doc)
        return doc
