"""Delta patches (docs/delta.md): encoder, and the per-(base, target) cache of the control center.

The diff itself comes from bsdiff4 (``bsdiff4.core.diff``: suffix sorting and the
control/diff/extra triples); this module lays the triples out as one stream of records inside one
raw-deflate stream with a small window, which fota.device.delta applies as it streams in.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import struct
import threading
import zlib
from collections import OrderedDict
from pathlib import Path

import bsdiff4.core
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from fota.device import delta as device_delta
from fota.server.releases import blob_file, write_blob
from fota.server.store import Delta, Release, Store

__all__ = ["DEFAULT_WBITS", "DeltaInfo", "encode", "get_delta", "header", "load_delta"]

log = logging.getLogger(__name__)

DEFAULT_WBITS = 12   # a 4 KiB window: the decoder then fits in ~20 KiB of MicroPython heap
DEFAULT_COPY_RUN = 32  # zero diff bytes in a row that become a copy (bench delta --copy-run)
_locks: dict[tuple[str, str, int, int], threading.Lock] = {}
_locks_guard = threading.Lock()
_CACHE_SIZE = 8   # patches kept in memory: a rollout moves a fleet from one or two bases
_cache: OrderedDict[str, bytes] = OrderedDict()   # patch sha256 -> bytes, shared by all jobs


def header(base: bytes, new: bytes, wbits: int, fmt: int = device_delta.FORMAT) -> bytes:
    return struct.pack(device_delta.HEADER, device_delta.MAGIC, fmt, wbits,
                       len(base), hashlib.sha256(base).digest(), len(new), hashlib.sha256(new).digest())


def records(base: bytes, new: bytes):
    """The patch's records as (diff_len, extra_len, seek, diff_bytes, extra_bytes)."""
    control, diff, extra = bsdiff4.core.diff(base, new)  # control: 24-byte triples of int64
    d = e = 0
    for at in range(0, len(control), 24):
        x, y, z = (bsdiff4.core.decode_int64(control[at + k:at + k + 8]) for k in (0, 8, 16))
        yield x, y, z, diff[d:d + x], extra[e:e + y]
        d += x
        e += y


def varint(n: int) -> bytes:
    """LEB128: 7 bits a byte, low bits first, high bit set on all but the last byte."""
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def zigzag(n: int) -> int:
    return (n << 1) ^ (n >> 63)


def fota_records(base: bytes, new: bytes, copy_run: int = DEFAULT_COPY_RUN):
    """Records (copy, diff, extra, seek, diff bytes, extra bytes) of the fota format.

    A bsdiff diff region is mostly zero bytes (code that did not change); every run of at least
    `copy_run` zeros becomes a copy, which costs a few header bytes instead of the run and lets
    the decoder pass old bytes through without touching them.
    """
    zeros = re.compile(b"\\x00{%d,}" % copy_run)
    for x, y, seek, dbytes, ebytes in records(base, new):
        segments = []   # (copy, diff bytes)
        copy, at = 0, 0
        for m in zeros.finditer(dbytes):
            segments.append((copy, dbytes[at:m.start()]))
            copy, at = m.end() - m.start(), m.end()
        segments.append((copy, dbytes[at:]))
        segments = [seg for seg in segments if seg[0] or seg[1]] or [(0, b"")]
        for i, (copy, dpart) in enumerate(segments):
            last = i == len(segments) - 1
            rec = (copy, len(dpart), y if last else 0, seek if last else 0, dpart, ebytes if last else b"")
            if rec[0] or rec[1] or rec[2] or rec[3]:
                yield rec


def encode(base: bytes, new: bytes, wbits: int = DEFAULT_WBITS, level: int = 9,
           copy_run: int = DEFAULT_COPY_RUN, fmt: int = device_delta.FORMAT) -> bytes:
    """The patch that turns `base` into `new`, for a decoder with a 2**wbits-byte window:
    format 1 (deflate) or 2 (range-coded, docs/delta.md §5)."""
    if not device_delta.MIN_WBITS <= wbits <= device_delta.MAX_WBITS:
        raise ValueError(f"wbits must be {device_delta.MIN_WBITS}..{device_delta.MAX_WBITS}")
    if fmt == device_delta.RC_FORMAT:
        from fota.server.delta_rc import encode_records
        return header(base, new, wbits, fmt) + encode_records(base, fota_records(base, new, copy_run), wbits)
    if fmt != device_delta.FORMAT:
        raise ValueError(f"unknown patch format {fmt}")
    z = zlib.compressobj(level, zlib.DEFLATED, -wbits, 9)
    out = [header(base, new, wbits)]
    for copy, diff, extra, seek, dbytes, ebytes in fota_records(base, new, copy_run):
        out.append(z.compress(varint(copy) + varint(diff) + varint(extra) + varint(zigzag(seek))))
        out.append(z.compress(dbytes))
        out.append(z.compress(ebytes))
    out.append(z.flush())
    return b"".join(out)


class DeltaInfo:
    """A cached patch: what the update command describes and the chunk server serves."""

    def __init__(self, row: Delta, data: bytes):
        self.id = row.id
        self.base_sha256 = row.base_sha256
        self.base_size = row.base_size
        self.target_sha256 = row.target_sha256
        self.wbits, self.format = row.wbits, row.format
        self.size = row.size
        self.sha256 = row.sha256
        self.data = data

    def descriptor(self) -> dict:
        """The `delta` object of the update command (docs/protocol.md §4.1)."""
        d = {"base_sha256": self.base_sha256, "base_size": self.base_size, "size": self.size,
             "sha256": self.sha256, "wbits": self.wbits}
        if self.format != device_delta.FORMAT:
            d["format"] = self.format   # absent: format 1, as agents before format 2 expect
        return d


def _lock(key) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())


def _store_patch(blobs_dir: Path, data: bytes, sha: str, remote) -> Path:
    """A patch into the blob store: blobs_dir, and object storage when configured (where other
    centers read it: a failure there is logged, not fatal, since they can compute it again)."""
    path = write_blob(Path(blobs_dir), data, sha)
    if remote is not None:
        try:
            remote.put_blob(sha, data, fresh=True)
        except Exception:
            log.exception("patch %s not written to object storage", sha[:16])
    return path


def _read_patch(row: Delta, blobs_dir: Path | None, remote) -> bytes | None:
    """A stored patch's bytes, checked: its recorded path, else blobs_dir/<sha256>, else object
    storage (copied into blobs_dir); None when none holds it intact."""
    try:
        data = Path(row.blob_path).read_bytes()
    except OSError:
        data = b""
    if hashlib.sha256(data).hexdigest() == row.sha256:
        return data
    if blobs_dir is None:
        return None
    if Path(row.blob_path) == Path(blobs_dir) / row.sha256 and remote is not None:
        with contextlib.suppress(OSError):  # our own copy is damaged: read the bucket's instead
            (Path(blobs_dir) / row.sha256).unlink()
    path = blob_file(blobs_dir, row.sha256, remote)
    if path is None:
        return None
    data = path.read_bytes()
    return data if hashlib.sha256(data).hexdigest() == row.sha256 else None


def get_delta(store: Store, blobs_dir: Path, base: Release, target: Release, wbits: int,
              read_blob, fmt: int = device_delta.FORMAT, remote=None) -> DeltaInfo | None:
    """The patch from `base` to `target` at window 2**wbits in format `fmt`, computed once and
    cached (a row in `deltas`, the bytes in the blob store). None when a patch is not worth it
    (not smaller than the full image) or not possible (different kinds, an encrypted release).

    remote: object storage (fota.server.objectstore.S3Payloads): a patch made here is written
    there too, and one this machine lacks is read from there before it is computed again."""
    if base.kind != target.kind or base.enc_key or target.enc_key or base.sha256 == target.sha256:
        return None
    key = (base.sha256, target.sha256, wbits, fmt)
    with _lock(key):
        with store.session() as s:
            row = s.scalar(select(Delta).where(Delta.base_sha256 == base.sha256,
                                               Delta.target_sha256 == target.sha256,
                                               Delta.wbits == wbits, Delta.format == fmt))
        if row is None:
            data = encode(read_blob(base), read_blob(target), wbits, fmt=fmt)
            sha = hashlib.sha256(data).hexdigest()
            path = _store_patch(blobs_dir, data, sha, remote)
            row = Delta(base_sha256=base.sha256, base_size=base.size, target_sha256=target.sha256,
                        wbits=wbits, format=fmt, size=len(data), sha256=sha, blob_path=str(path.resolve()))
            try:
                with store.session() as s:
                    s.add(row)
            except IntegrityError:  # another process cached it meanwhile: same bytes
                with store.session() as s:
                    row = s.scalar(select(Delta).where(Delta.base_sha256 == base.sha256,
                                                       Delta.target_sha256 == target.sha256,
                                                       Delta.wbits == wbits, Delta.format == fmt))
            log.info("delta %s -> %s (format %d, 2**%d): %d bytes for a %d-byte image", base.version,
                     target.version, fmt, wbits, len(data), target.size)
        if row.size >= target.size:
            return None
        data = _cached(row.sha256)
        if data is not None:
            return DeltaInfo(row, data)
        data = _read_patch(row, blobs_dir, remote)
        if data is None:
            # Lost or damaged in the blob store: recompute rather than serve a bad patch.
            data = encode(read_blob(base), read_blob(target), wbits, fmt=fmt)
            if hashlib.sha256(data).hexdigest() != row.sha256:
                log.error("delta %s -> %s cannot be reproduced; full image", base.version, target.version)
                return None
            with contextlib.suppress(OSError):
                (Path(blobs_dir) / row.sha256).unlink()  # a damaged copy: replaced
            _store_patch(blobs_dir, data, row.sha256, remote)
        _remember(row.sha256, data)
        return DeltaInfo(row, data)


def best_delta(store: Store, blobs_dir: Path, base: Release, target: Release, wbits: int,
               read_blob, formats, remote=None) -> DeltaInfo | None:
    """The smallest patch from `base` to `target` in one of `formats` (the formats the device
    decodes), or None when none is smaller than the image.

    Format 1 is made first: it takes a fraction of a second where format 2's literal coder, in
    Python, takes about 30 us per byte it cannot match. When even format 1 is not smaller than the
    image (an image unlike its base: compressed, encrypted or rebuilt), format 2 is not tried: on
    every measured pair it is 0.76-0.88x format 1 (bench delta), it would cost seconds of the
    control center's database thread (20 s for a 256 KiB image of random bytes) and lose anyway."""
    first = get_delta(store, blobs_dir, base, target, wbits, read_blob, device_delta.FORMAT, remote)
    if first is None or device_delta.RC_FORMAT not in formats:
        return first if device_delta.FORMAT in formats else None
    second = get_delta(store, blobs_dir, base, target, wbits, read_blob, device_delta.RC_FORMAT, remote)
    if device_delta.FORMAT not in formats or (second is not None and second.size < first.size):
        return second
    return first


def _cached(sha256: str) -> bytes | None:
    with _locks_guard:
        data = _cache.get(sha256)
        if data is not None:
            _cache.move_to_end(sha256)
        return data


def _remember(sha256: str, data: bytes) -> None:
    with _locks_guard:
        _cache[sha256] = data
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)


def load_delta(store: Store, delta_id: int, blobs_dir: Path | None = None, remote=None) -> bytes | None:
    """The bytes of a cached patch (a job sent as a delta, after a restart or by another worker);
    from its recorded path, else blobs_dir, else object storage (``remote``); None if lost."""
    with store.session() as s:
        row = s.get(Delta, delta_id)
    if row is None:
        return None
    data = _cached(row.sha256)
    if data is not None:
        return data
    return _read_patch(row, blobs_dir, remote)
