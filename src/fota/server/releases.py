"""Releases: build and sign the manifest (docs/protocol.md §4.1), keep the image as a blob.

Blobs are content-addressed files ``blobs_dir/<sha256>``; the database keeps their path. With
object storage configured (fota.server.objectstore, docs/http-transport.md) the bucket is the
blobs' source of truth: a release's image is written there when the release is created, and a
machine whose ``blobs_dir`` lacks a blob reads it from there (``blob_file``), checked, into its
own directory.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.keywrap import aes_key_wrap
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from fota.device import protocol
from fota.server import names
from fota.server.store import Release, Store
from fota.tools import bundle
from fota.server.kek import Kek, KekError
from fota.tools.keyring import COMMAND_TTL, Signer
from fota.tools.private import private_dir, write_private
from fota.tools.signing import key_id, public_key_bytes, sign

__all__ = ["KINDS", "ReleaseDeleted", "ReleaseError", "ReleaseNotFound", "blob_file", "build_manifest",
           "check_release_key", "create_release", "get_release", "is_blob_name", "list_releases", "lock_live",
           "read_blob", "resign_release", "update_command", "wrap_release_key", "write_blob"]

log = logging.getLogger(__name__)

KINDS = ("bundle", "image")
# .app-bin: an ESP32 firmware as MicroPython publishes it for an OTA build (ESP32_GENERIC-OTA): the
# app partition's image, the one an ESP32 release takes (not the combined .bin with the bootloader)
IMAGE_SUFFIXES = (".bin", ".img", ".app-bin")
MANIFEST_FORMAT = 1
BLOB_CACHE_SIZE = 8  # releases kept in memory; a rollout serves one or two at a time
BLOB_NAME = re.compile(r"[0-9a-f]{64}")  # a blob's file (and object) name: its sha256, lower-case hex


class ReleaseError(ValueError):
    """A release cannot be created or found."""


class ReleaseNotFound(ReleaseError):
    """No release of that version or id."""


class ReleaseDeleted(ReleaseNotFound):
    """The release was deleted (fota.server.release_delete): nothing can use it any more."""

    def __init__(self, version: str, deleted_at):
        super().__init__(f"no release {version!r}: it was deleted at {deleted_at:%Y-%m-%d %H:%M:%S} UTC")


def encrypt_image(image: bytes, key: bytes) -> bytes:
    """IV || AES-256-CBC(PKCS#7(image)): the transferred form of an encrypted release."""
    iv = os.urandom(16)
    padder = padding.PKCS7(128).padder()
    padded = padder.update(image) + padder.finalize()
    return iv + Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor().update(padded)


def wrap_release_key(release: Release, device_id: str, device_enc_key: str | None, kek: Kek | None) -> str | None:
    """The release key wrapped (RFC 3394) for one device, as hex; None for plain releases.

    Both keys are stored wrapped by the key-encryption key (fota.server.kek); ``kek`` opens them."""
    if not release.enc_key:
        return None
    if not device_enc_key:
        raise ReleaseError(f"release {release.version} is encrypted and the device has no key")
    if kek is None:
        raise ReleaseError(f"release {release.version} is encrypted and no key-encryption key is loaded")
    try:
        return aes_key_wrap(kek.device_key(device_id, device_enc_key), kek.release_key(release)).hex()
    except KekError as exc:
        raise ReleaseError(str(exc)) from None


def check_release_key(release: Release, trust: dict) -> None:
    """ReleaseError unless devices holding ``trust`` (the keyring's trust document) accept the
    key that signed the release's manifest: refused before a deployment or campaign is made,
    since every device would answer E_KEY_REVOKED / E_UNKNOWN_KEY."""
    fix = f"re-sign it with the current signing key: fota release resign {release.version}"
    if release.key_id in trust.get("revoked", ()):
        raise ReleaseError(f"release {release.version} is signed by key {release.key_id}, revoked in trust "
                           f"version {trust['version']}: devices would refuse it (E_KEY_REVOKED); {fix}")
    certified = {json.loads(cert["body"])["kid"] for cert in trust.get("certs", ())}
    if release.key_id not in certified:
        raise ReleaseError(f"release {release.version} is signed by key {release.key_id}, which trust version "
                           f"{trust['version']} does not certify: devices would refuse it (E_UNKNOWN_KEY); {fix}")


def resign_release(store: Store, version_or_id: str | int, signer: Signer) -> tuple[Release, str]:
    """Sign a release's unchanged manifest with ``signer`` (after a key rotation); returns the
    release and the key id it had. Image, hash and version stay the same."""
    release = get_release(store, version_or_id)
    old_kid = release.key_id
    with store.session() as s:
        row = s.get(Release, release.id)
        row.signature = signer.sign(row.manifest.encode())
        row.key_id = signer.kid
        s.flush()
        release = row
    return release, old_kid


def build_manifest(version: str, hardware: list[str], kind: str, image: bytes, counter: int = 0,
                   transferred: bytes | None = None) -> str:
    """The manifest text that gets signed: compact JSON, sorted keys (§4.1).

    A bundle's manifest also lists every file with its size and SHA-256, so the device can
    check each file it unpacks against the one signed release (no mixing of releases).
    """
    names.check(version, names.VERSION, "version", ReleaseError)
    if not isinstance(hardware, (list, tuple)) or not hardware:
        raise ReleaseError("hardware must be a non-empty list of hardware type names")
    for hw in hardware:
        names.check(hw, names.NAME, "hardware type", ReleaseError)
    if kind not in KINDS:
        raise ReleaseError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if not image:
        raise ReleaseError("the image is empty")
    if not isinstance(counter, int) or isinstance(counter, bool) or counter < 0:
        raise ReleaseError("the security counter must be an integer >= 0")
    # transferred: the encrypted form of the image, when the release is encrypted; size and
    # sha256 then describe those bytes, and "enc" the plaintext's size.
    wire = image if transferred is None else transferred
    manifest = {
        "v": MANIFEST_FORMAT,
        "version": version,
        "hw": list(dict.fromkeys(hardware)),  # de-duplicated, order kept
        "kind": kind,
        "size": len(wire),
        "sha256": hashlib.sha256(wire).hexdigest(),
        "counter": counter,
    }
    if transferred is not None:
        manifest["enc"] = {"alg": "aes-256-cbc", "plain_size": len(image)}
    if kind == "bundle":
        manifest["files"] = [[name, len(data), hashlib.sha256(data).hexdigest()]
                             for name, data in bundle.unpack(image).items()]
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"))


def update_command(job_id: int, device_id: str, release: Release, signer: Signer,
                   chunk: int = protocol.DEFAULT_CHUNK_SIZE, window: int = protocol.DEFAULT_WINDOW,
                   now: int | None = None, wrapped_key: str | None = None,
                   delta: dict | None = None, min_battery: int | None = None,
                   ttl: int = COMMAND_TTL, http: dict | None = None) -> bytes:
    """The signed `update` command (§4.1) for one job on one device, as published on `cmd`.

    delta: the descriptor of the patch sent instead of the image (fota.server.delta), or None.

    wrapped_key: for an encrypted release, the release key wrapped for this device
    (wrap_release_key). min_battery: the deployment's battery gate (§5.1), if any. ttl: seconds
    until the command expires (its `exp`, §4). http: transport http's signed URL object
    (fota.server.payloadurls.HttpPayloads.command_field, §5.2), or None: chunks over MQTT.
    """
    body = {"type": "update", "job": job_id, "device": device_id, "manifest": release.manifest,
            "manifest_kid": release.key_id, "manifest_sig": release.signature, "chunk": chunk,
            "window": window, "req_format": 2}  # this center takes chunk requests in text (§5)
    if wrapped_key:
        body["key"] = wrapped_key
    if delta:
        body["delta"] = delta
    if min_battery:
        body["min_battery"] = min_battery
    if http:
        body["http"] = http
    return signer.command(body, now, ttl)


def _load_image(source: str | os.PathLike | bytes, kind: str | None) -> tuple[bytes, str]:
    """(image bytes, kind) from a directory (bundle), a .bin/.img/.app-bin file (image) or raw bytes."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if kind is None:
            kind = "bundle" if data.startswith(bundle.MAGIC) else "image"
    else:
        path = Path(source)
        if path.is_dir():
            if kind not in (None, "bundle"):
                raise ReleaseError(f"{path} is a directory: it can only become a bundle")
            try:
                return bundle.pack_dir(path), "bundle"
            except bundle.BundleError as exc:
                raise ReleaseError(f"{path}: {exc}") from None
        if not path.is_file():
            raise ReleaseError(f"no such file or directory: {path}")
        data = path.read_bytes()
        if kind is None:
            if path.suffix.lower() in IMAGE_SUFFIXES:
                kind = "image"
            elif data.startswith(bundle.MAGIC):
                kind = "bundle"
            else:
                raise ReleaseError(f"{path}: expected a directory (bundle), a .bin/.img/.app-bin image "
                                   "or a bundle file; or give the kind")
    if kind == "bundle":
        try:
            bundle.unpack(data)  # never sign a bundle the device would refuse
        except bundle.BundleError as exc:
            raise ReleaseError(f"invalid bundle: {exc}") from None
    return data, kind


def is_blob_name(name: str) -> bool:
    """Whether a file or object name is a blob's (its sha256 in lower-case hex, nothing else)."""
    return BLOB_NAME.fullmatch(name) is not None


def write_blob(blobs_dir: Path, data: bytes, sha256: str) -> Path:
    """Store ``data`` as blobs_dir/<sha256> (0600, in a 0700 directory); its resolved path.

    A file already there holds these bytes (content-addressed): it is only made recent, so that
    a garbage collection running before the row that names it commits (fota.server.blob_gc
    leaves files younger than its grace period) keeps it; one removed meanwhile is written."""
    private_dir(blobs_dir)
    path = blobs_dir / sha256
    try:
        os.utime(path)
    except FileNotFoundError:
        write_private(path, data)
    except OSError as exc:  # another owner's read-only file: still these bytes
        log.warning("blob %s: its time not refreshed: %s", sha256[:16], exc)
    return path.resolve()


def blob_file(blobs_dir: str | os.PathLike, sha256: str, remote=None) -> Path | None:
    """``blobs_dir/<sha256>``; when it is missing and ``remote`` (object storage: an object with
    ``get_blob(sha256) -> bytes``, fota.server.objectstore.S3Payloads) is given, the blob read from
    there, checked against ``sha256`` and kept in ``blobs_dir`` (content-addressed: a local cache
    of the bucket). None when neither has it (or the stored object is not those bytes)."""
    path = Path(blobs_dir) / sha256
    if path.is_file():
        return path
    if remote is None:
        return None
    try:
        data = remote.get_blob(sha256)
    except Exception as exc:  # missing object, storage unreachable, no credentials
        log.warning("blob %s: not in %s and not read from object storage: %s", sha256[:16], blobs_dir, exc)
        return None
    if hashlib.sha256(data).hexdigest() != sha256:
        log.error("blob %s in object storage is corrupt (sha256 differs): not used", sha256[:16])
        return None
    log.info("blob %s read from object storage into %s", sha256[:16], blobs_dir)
    return write_blob(Path(blobs_dir), data, sha256)


def create_release(store: Store, blobs_dir: str | os.PathLike, key: ec.EllipticCurvePrivateKey,
                   path_or_bytes: str | os.PathLike | bytes, version: str, hardware: list[str],
                   kind: str | None = None, counter: int = 0, encrypt: bool = False,
                   min_version: str | None = None, kek: Kek | None = None, remote=None) -> Release:
    """Pack, sign and store a release; ReleaseError if invalid or the version exists.

    remote: object storage (an object with ``put_blob(sha256, data)``: S3Payloads), the blobs'
    source of truth: the image is written there before the release exists in the database, so
    that every center finds it; ReleaseError (nothing created) if that fails.

    encrypt: the image is stored and sent AES-encrypted; its key is stored wrapped by ``kek``
    (fota.server.kek), which an encrypted release needs.

    counter: the security counter devices compare against the highest one they installed
    (anti-rollback); a release may keep the previous counter or raise it, never lower it.
    min_version: campaigns send the release only to devices running at least this version.
    """
    if min_version is not None:
        names.check(min_version, names.VERSION, "min_version", ReleaseError)
    image, kind = _load_image(path_or_bytes, kind)
    enc_key = os.urandom(32) if encrypt else None
    if encrypt and kind != "bundle":
        raise ReleaseError("only bundles can be encrypted (flash backends write the image as it arrives)")
    if encrypt and kek is None:
        raise ReleaseError("an encrypted release needs the key-encryption key (its key is stored wrapped)")
    plain = image
    if enc_key:
        image = encrypt_image(plain, enc_key)  # what is stored, served and hashed
    manifest = build_manifest(version, list(hardware), kind, plain, counter,
                              transferred=image if enc_key else None)
    signature = sign(key, manifest.encode()).hex()
    kid = key_id(public_key_bytes(key))
    release = Release(version=version, hardware=json.loads(manifest)["hw"], kind=kind,
                      size=len(image), sha256=hashlib.sha256(image).hexdigest(),
                      manifest=manifest, signature=signature, key_id=kid, blob_path="",
                      security_counter=counter, enc_key=kek.wrap_release_key(version, enc_key) if enc_key else None,
                      min_version=min_version)
    # The command carries the manifest; it must fit the device's command limit.
    longest = update_command(2**32 - 1, "x" * 64, release, Signer(key), protocol.MAX_CHUNK_SIZE,
                             protocol.MAX_WINDOW, now=2**40, wrapped_key="00" * 40 if enc_key else None,
                             delta={"base_sha256": "0" * 64, "base_size": 2**32, "size": 2**32,
                                    "sha256": "0" * 64, "wbits": 15})
    if len(longest) > protocol.MAX_COMMAND_BYTES:
        raise ReleaseError(f"the update command would exceed {protocol.MAX_COMMAND_BYTES} bytes "
                           "(too many hardware types or files?)")
    with store.session() as s:
        if s.scalar(select(Release.id).where(Release.version == version)) is not None:
            raise ReleaseError(f"release {version} already exists")
    release.blob_path = str(write_blob(Path(blobs_dir), image, release.sha256))
    if remote is not None:
        try:
            remote.put_blob(release.sha256, image, fresh=True)
        except Exception as exc:
            raise ReleaseError(f"the image could not be written to object storage: {exc}") from None
    try:
        with store.session() as s:
            s.add(release)
    except IntegrityError:  # created concurrently since the check above
        raise ReleaseError(f"release {version} already exists") from None
    return release


def get_release(store: Store, version_or_id: str | int, deleted: bool = False) -> Release:
    """A release by version, or by id (an int, or a string of digits no version matches).

    ReleaseNotFound if there is none; ReleaseDeleted for a deleted one, unless ``deleted``."""
    with store.session() as s:
        release = None
        if names.may_be_stored(version_or_id):
            release = s.scalar(select(Release).where(Release.version == version_or_id))
        release_id = names.as_id(version_or_id)
        if release is None and release_id is not None:
            release = s.get(Release, release_id)
        if release is None:
            raise ReleaseNotFound(f"no release {version_or_id!r}")
        if not release.live and not deleted:
            raise ReleaseDeleted(release.version, release.deleted_at)
        return release


def list_releases(store: Store, deleted: bool = False) -> list[Release]:
    """The releases, oldest first; the deleted ones too (deleted_at set) if ``deleted``."""
    query = select(Release).order_by(Release.id)
    if not deleted:
        query = query.where(Release.live)
    with store.session() as s:
        return list(s.scalars(query))


def lock_live(session, release: Release) -> None:
    """ReleaseDeleted if ``release`` was deleted meanwhile; else its row stays share-locked
    (PostgreSQL's FOR SHARE; SQLite has one writer anyway) until ``session``'s transaction ends.
    A deployment or campaign takes it before it names the release: delete_release, which
    updates the row first, then waits for that transaction and sees what it made (or it sees
    the release deleted)."""
    deleted_at = session.scalar(select(Release.deleted_at).where(Release.id == release.id)
                                .with_for_update(read=True))
    if deleted_at is not None:
        raise ReleaseDeleted(release.version, deleted_at)


class _BlobCache:
    """A small LRU of verified blob contents, keyed by blob path and sha256."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._lock = threading.Lock()  # the control center reads blobs from worker threads

    def get(self, release: Release) -> bytes:
        key = (release.blob_path, release.sha256)
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
                return data
        try:
            data = Path(release.blob_path).read_bytes()
        except OSError as exc:
            raise ReleaseError(f"cannot read the image of release {release.version}: {exc}") from None
        if hashlib.sha256(data).hexdigest() != release.sha256:
            raise ReleaseError(f"the image of release {release.version} is corrupt "
                               f"({release.blob_path}: sha256 differs from the manifest)")
        with self._lock:
            self._items[key] = data
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return data

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


_blob_cache = _BlobCache(BLOB_CACHE_SIZE)


def read_blob(release: Release) -> bytes:
    """The release's image bytes (checked against its sha256, cached in memory)."""
    return _blob_cache.get(release)
