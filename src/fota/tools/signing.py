"""ECDSA P-256 / SHA-256 signing keys for firmware images (CPython only).

Signatures are raw 64-byte r||s and public keys are 65-byte uncompressed SEC1
points (0x04||X||Y): the formats fota.device.ecdsa verifies on the device.
"""
from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from fota.device.ecdsa import key_id as _device_key_id

PUBLIC_KEY_SIZE = 65
SIGNATURE_SIZE = 64


class SigningError(ValueError):
    """A signing key is missing, unreadable or not an ECDSA P-256 key."""


def generate_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def save_private_key(key: ec.EllipticCurvePrivateKey, path: str | os.PathLike) -> None:
    """Write the key as unencrypted PKCS#8 PEM, readable by the owner only (0600)."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the file may have existed with a wider mode
        os.write(fd, pem)
    finally:
        os.close(fd)


def load_private_key(path: str | os.PathLike) -> ec.EllipticCurvePrivateKey:
    """Read a PEM private key; SigningError if missing, unreadable or not P-256."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise SigningError(f"signing key not found: {p}") from None
    except OSError as exc:
        raise SigningError(f"cannot read signing key {p}: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise SigningError(f"signing key {p} is encrypted; an unencrypted PKCS#8 PEM key is required") from None
    except (ValueError, UnsupportedAlgorithm):
        raise SigningError(f"signing key {p} is not a valid PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise SigningError(f"signing key {p} is not an ECDSA P-256 (secp256r1) key")
    return key


def _public(key_or_pub) -> ec.EllipticCurvePublicKey:
    pub = key_or_pub.public_key() if isinstance(key_or_pub, ec.EllipticCurvePrivateKey) else key_or_pub
    if not isinstance(pub, ec.EllipticCurvePublicKey) or not isinstance(pub.curve, ec.SECP256R1):
        raise SigningError("not an ECDSA P-256 (secp256r1) key")
    return pub


def public_key_bytes(key_or_pub) -> bytes:
    """The 65-byte uncompressed point 0x04||X||Y of a private or public P-256 key."""
    return _public(key_or_pub).public_bytes(serialization.Encoding.X962,
                                            serialization.PublicFormat.UncompressedPoint)


def load_public_key_bytes(data: bytes) -> ec.EllipticCurvePublicKey:
    """Parse a 65-byte uncompressed P-256 point; SigningError if malformed or off the curve."""
    data = bytes(data)
    if len(data) != PUBLIC_KEY_SIZE or data[0] != 4:
        raise SigningError(f"public key must be {PUBLIC_KEY_SIZE} bytes starting with 0x04 (uncompressed point)")
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), data)
    except ValueError:
        raise SigningError("public key is not a point on P-256") from None


def sign(key: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    """ECDSA P-256 signature of sha256(message) as raw 64-byte r||s (big-endian)."""
    r, s = decode_dss_signature(key.sign(bytes(message), ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def key_id(pub65: bytes) -> str:
    """Lowercase hex of the first 8 bytes of sha256(pub65), as on the device."""
    return _device_key_id(bytes(pub65))
