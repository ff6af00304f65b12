"""Payload transport `http` from the control center's own HTTP server (docs/http-transport.md).

A job sent with transport `http` names its payload (the release image, or the delta patch) by a
URL that only that device, for that job, can use until the URL's expiry:

    <base>/v1/blobs/<sha256>?d=<device>&j=<job>&e=<exp>&s=<hmac>

``s`` = hex HMAC-SHA256 over ``"<device>\\n<job>\\n<sha256>\\n<exp>"`` with the URL key (derived
from the home's key-encryption key, fota.server.kek: every process that has the KEK signs and
checks the same URLs; no key or token is stored in the database or sent to the device). The
route serves a blob only while the signature holds, ``exp`` has not passed, the job is the
named device's and has not ended; it answers single byte ranges (206, ``Content-Range``), a
request without ``Range`` with the whole blob (200), an unsatisfiable range with 416, and
anything refused with 403 (404: no such blob). The URL grants nothing else: no other blob, no
other job, no API access.
"""
from __future__ import annotations

import collections
import re
import time
from pathlib import Path

from anyio import from_thread
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import select

from fota.server.payloadurls import PATH, check_url
from fota.server.releases import blob_file
from fota.server.store import Delta, Job, Release, Store

__all__ = ["parse_range", "mount"]

_SHA = re.compile(r"[0-9a-f]{64}")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
LOG_SIZE = 256  # requests kept in app.state.blob_log (tests and diagnostics)


def parse_range(value: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a single ``Range: bytes=`` header; None for the whole blob (no header,
    or one this server ignores: several ranges, another unit). ValueError: not satisfiable."""
    if not value:
        return None
    m = _RANGE.fullmatch(value.strip())
    if not m or not (m.group(1) or m.group(2)):
        return None
    if not m.group(1):  # a suffix: the last n bytes
        n = int(m.group(2))
        if n == 0:
            raise ValueError("empty suffix range")
        return max(0, size - n), size - 1
    first = int(m.group(1))
    last = int(m.group(2)) if m.group(2) else size - 1
    if first >= size or last < first:
        raise ValueError("range outside the blob")
    return first, min(last, size - 1)


def _blob_path(store: Store, blobs_dir: Path, sha256: str, remote=None) -> Path | None:
    path = blobs_dir / sha256
    if path.is_file():
        return path
    with store.session() as s:  # a release stored elsewhere (the data directory moved)
        for model in (Release, Delta):
            stored = s.scalar(select(model.blob_path).where(model.sha256 == sha256))
            if stored and Path(stored).is_file():
                return Path(stored)
    # Object storage, the blobs' source of truth: read into blobs_dir (checked), served from there.
    return blob_file(blobs_dir, sha256, remote) if remote is not None else None


def _refuse(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers={"Cache-Control": "no-store"})


def mount(app: FastAPI, store: Store, blobs_dir: str | Path, url_key,
          clock=time.time, remote=None) -> None:
    """Add ``GET /v1/blobs/{sha256}`` to ``app`` (not in its OpenAPI schema: it is the devices',
    not the operators'). url_key: the key, or a function that loads it (at the first request).
    remote: object storage (S3Payloads): a blob missing from blobs_dir is read from there."""
    from fota.server.deployments import TERMINAL_STATES

    blobs_dir = Path(blobs_dir)
    log = app.state.blob_log = collections.deque(maxlen=LOG_SIZE)
    keys = [url_key] if isinstance(url_key, bytes) else []

    def key() -> bytes:
        if not keys:
            keys.append(url_key())
        return keys[0]

    def blob(sha256: str, request: Request):
        q = request.query_params
        device, job, exp, sig = q.get("d"), q.get("j"), q.get("e"), q.get("s")
        rng = request.headers.get("range")
        entry = {"sha256": sha256, "device": device, "job": job, "range": rng, "status": 403, "at": time.time()}
        log.append(entry)
        if from_thread.run(request.is_disconnected):
            # The device gave up waiting (its fetch restarted, it rebooted) while this request
            # queued for a thread: a loaded server skips it rather than serve nobody
            # (bench/fleet, part 4). Nothing is sent; 499 is only what the log says.
            entry["status"] = 499
            return Response(status_code=499)
        if not (_SHA.fullmatch(sha256) and device and job and job.isdigit() and exp and exp.isdigit() and sig):
            return _refuse(403, "not a signed blob URL")
        why = check_url(key(), device, int(job), sha256, int(exp), sig, clock())
        if why:
            return _refuse(403, f"URL refused: {why}")
        with store.session() as s:
            row = s.execute(select(Job.device_id, Job.state).where(Job.id == int(job))).first()
        if row is None or row.device_id != device or row.state in TERMINAL_STATES:
            return _refuse(403, "URL refused: the job is not open for this device")
        path = _blob_path(store, blobs_dir, sha256, remote)
        if path is None:
            entry["status"] = 404
            return _refuse(404, "no such blob")
        size = path.stat().st_size
        try:
            span = parse_range(rng, size)
        except ValueError:
            entry["status"] = 416
            return Response(status_code=416, headers={"Content-Range": f"bytes */{size}"})
        first, last = span if span else (0, size - 1)
        with open(path, "rb") as f:
            f.seek(first)
            data = f.read(last - first + 1)
        headers = {"Accept-Ranges": "bytes", "Cache-Control": "private, no-store"}
        entry["status"] = 206 if span else 200
        if span:
            headers["Content-Range"] = f"bytes {first}-{last}/{size}"
        return Response(data, status_code=entry["status"], headers=headers, media_type="application/octet-stream")

    app.add_api_route(PATH + "{sha256}", blob, methods=["GET"], include_in_schema=False)
