"""Payload transport http (docs/http-transport.md): the control center's blob route with signed
URLs and byte ranges, the device's ranged keep-alive HTTP/1.1 client, and real MicroPython
devices updated over http (through a fault proxy that cuts, with a tampered blob, with an expired
URL, over TLS)."""
from __future__ import annotations

import json
import socket
import time

import pytest

from conftest import both_interpreters
from fota.device import http as devhttp
from fota.device import protocol as P
from fota.server.api import create_app
from fota.server.blobhttp import parse_range
from fota.server.deployments import create_deployment
from fota.server.payloadurls import HttpPayloads, check_url, sign_url
from fota.server.tls import ca_der, create_ca, ensure_tls
from fota.testkit.appserver import AppServer
from fota.testkit.faultproxy import FaultProxy
from fota.testkit.fleet import Fleet, bundle_of_size
from fota.tools.waiting import wait_until

KEY = b"k" * 32


def test_url_signature_binds_device_job_blob_and_expiry():
    sha = "ab" * 32
    url = sign_url("http://h:1/", KEY, "dev-1", 7, sha, 2000)
    assert url.startswith(f"http://h:1/v1/blobs/{sha}?d=dev-1&j=7&e=2000&s=")
    sig = url.rsplit("s=", 1)[1]
    assert check_url(KEY, "dev-1", 7, sha, 2000, sig, now=1999) is None
    assert check_url(KEY, "dev-1", 7, sha, 2000, sig, now=2001) == "expired"
    for other in (("dev-2", 7, sha, 2000), ("dev-1", 8, sha, 2000), ("dev-1", 7, "cd" * 32, 2000),
                  ("dev-1", 7, sha, 9999)):
        assert check_url(KEY, *other, sig, now=0) == "bad signature", other
    assert check_url(b"x" * 32, "dev-1", 7, sha, 2000, sig, now=0) == "bad signature"


def test_parse_range():
    assert parse_range(None, 100) is None
    assert parse_range("bytes=0-9", 100) == (0, 9)
    assert parse_range("bytes=90-", 100) == (90, 99)
    assert parse_range("bytes=90-500", 100) == (90, 99)
    assert parse_range("bytes=-10", 100) == (90, 99)
    assert parse_range("bytes=0-1,5-6", 100) is None  # several ranges: the whole blob
    for bad in ("bytes=100-", "bytes=5-4", "bytes=-0"):
        with pytest.raises(ValueError):
            parse_range(bad, 100)


# ---- the blob route on a real uvicorn server, and the device's client against it ------------------

@pytest.fixture
def blob_server(tmp_path, sqlite_url):
    """The API app with the blob route on a store with one open job: (server, fleet-like facts)."""
    from fota.server.fleet import provision_device
    from fota.server.releases import create_release
    from fota.server.store import Store
    from fota.tools.keyring import Keyring
    ring = Keyring(tmp_path / "keys")
    ring.init()
    store = Store(sqlite_url)
    provision_device(store, "dev-1", "unix")
    provision_device(store, "dev-2", "unix")
    image = bundle_of_size("2.0.0", 150_000)
    rel = create_release(store, tmp_path / "blobs", ring.signer().key, image, "2.0.0", ["unix"])
    dep = create_deployment(store, rel, device_ids=["dev-1", "dev-2"])
    app = create_app(store, tmp_path / "blobs", lambda: ring.signer().key, url_key=KEY)
    with AppServer(app) as server:
        yield server, app, store, rel, image, {j.device_id: j.id for j in dep.jobs}
    store.dispose()


def _get(url: str, headers: dict | None = None):
    import httpx
    return httpx.get(url, headers=headers or {}, timeout=5)


def test_blob_route_serves_ranges_only_to_the_signed_device_and_job(blob_server):
    server, app, store, rel, image, jobs = blob_server
    exp = int(time.time()) + 60
    url = sign_url(server.url, KEY, "dev-1", jobs["dev-1"], rel.sha256, exp)
    whole = _get(url)
    assert whole.status_code == 200 and whole.content == image
    part = _get(url, {"Range": "bytes=1000-2999"})
    assert part.status_code == 206 and part.content == image[1000:3000]
    assert part.headers["content-range"] == f"bytes 1000-2999/{len(image)}"
    tail = _get(url, {"Range": "bytes=149000-"})
    assert tail.status_code == 206 and tail.content == image[149000:]
    beyond = _get(url, {"Range": f"bytes={len(image)}-"})
    assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{len(image)}"
    # Forged, altered, another device's job, expired: 403, nothing served.
    forged = url[:-4] + ("0000" if not url.endswith("0000") else "1111")
    other_job = url.replace(f"j={jobs['dev-1']}", f"j={jobs['dev-2']}")
    other_dev = url.replace("d=dev-1", "d=dev-2")
    expired = sign_url(server.url, KEY, "dev-1", jobs["dev-1"], rel.sha256, int(time.time()) - 1)
    wrong_key = sign_url(server.url, b"z" * 32, "dev-1", jobs["dev-1"], rel.sha256, exp)
    unsigned = url.split("?")[0]
    for bad in (forged, other_job, other_dev, expired, wrong_key, unsigned):
        r = _get(bad, {"Range": "bytes=0-99"})
        assert r.status_code == 403 and image[:100] not in r.content, bad
    assert "expired" in _get(expired).json()["detail"]
    # A correctly signed URL for another device's open job works for that device only.
    ok2 = sign_url(server.url, KEY, "dev-2", jobs["dev-2"], rel.sha256, exp)
    assert _get(ok2, {"Range": "bytes=0-9"}).content == image[:10]
    # Once the job ended, its URL is dead.
    from sqlalchemy import update
    from fota.server.store import Job
    with store.session() as s:
        s.execute(update(Job).where(Job.id == jobs["dev-1"]).values(state="confirmed"))
    assert _get(url, {"Range": "bytes=0-9"}).status_code == 403
    assert [e["status"] for e in app.state.blob_log][:4] == [200, 206, 206, 416]


def _fetch_all(fetch: devhttp.Fetch, job, http, offset, size, chunk, limit_s=10.0):
    """Drive a Fetch as the runner does; (chunks, error or None)."""
    fetch.start(job, http, offset, size, chunk)
    got = []
    deadline = time.monotonic() + limit_s
    while not fetch.done and time.monotonic() < deadline:
        try:
            data = fetch.step(50)
        except OSError as e:
            return got, e
        if data is not None:
            got.append(bytes(data))
    return got, None


def test_device_client_streams_ranges_on_one_kept_alive_connection(blob_server, monkeypatch):
    server, app, store, rel, image, jobs = blob_server
    monkeypatch.setattr(devhttp, "SEGMENT", 16384)
    http = {"url": sign_url(server.url, KEY, "dev-1", jobs["dev-1"], rel.sha256, int(time.time()) + 60), "exp": 0}
    fetch = devhttp.Fetch()
    chunks, error = _fetch_all(fetch, 1, http, 0, len(image), 2048)
    assert error is None and b"".join(chunks) == image
    assert all(len(c) == 2048 for c in chunks[:-1])
    assert fetch.requests == (len(image) + 16383) // 16384 and fetch.connections == 1  # keep-alive
    assert fetch.sock is None  # closed once the blob is complete
    # Resume from a chunk boundary: one ranged request from there.
    fetch2 = devhttp.Fetch()
    chunks, error = _fetch_all(fetch2, 1, http, 40 * 2048, len(image), 2048)
    assert error is None and b"".join(chunks) == image[40 * 2048:]
    assert any(e["range"] == f"bytes={40 * 2048}-{6 * 16384 - 1}" for e in app.state.blob_log)


def test_device_client_refusals_have_precise_codes(blob_server):
    server, app, store, rel, image, jobs = blob_server
    good = sign_url(server.url, KEY, "dev-1", jobs["dev-1"], rel.sha256, int(time.time()) + 60)
    cases = {
        P.E_HTTP_STATUS: (good.replace("s=", "s=00"), len(image)),  # forged: 403
        P.E_HTTP_RANGE: (good, len(image) + 10),                      # not the signed size
    }
    for code, (url, size) in cases.items():
        with pytest.raises(devhttp.HttpError) as e:
            _fetch_all(devhttp.Fetch(), 1, {"url": url, "exp": 0}, 0, size, 2048)
        assert e.value.code == code, (code, e.value.reason)


class _Redirector:
    """A one-shot HTTP server answering every request with a redirect to `location`."""

    def __init__(self, location: str):
        import threading
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.location = location
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.recv(4096)
            conn.sendall(f"HTTP/1.1 302 Found\r\nLocation: {self.location}\r\nContent-Length: 0\r\n\r\n".encode())
            conn.close()


def test_device_client_follows_redirects_only_where_the_command_allows(blob_server):
    server, app, store, rel, image, jobs = blob_server
    good = sign_url(server.url, KEY, "dev-1", jobs["dev-1"], rel.sha256, int(time.time()) + 60)
    # "localhost" is another host than the signed 127.0.0.1: refused unless listed in hosts.
    target = good.replace("127.0.0.1", "localhost")
    r = _Redirector(target)
    try:
        url = f"http://127.0.0.1:{r.port}/blob"
        with pytest.raises(devhttp.HttpError) as e:
            _fetch_all(devhttp.Fetch(), 1, {"url": url, "exp": 0}, 0, len(image), 2048)
        assert e.value.code == P.E_HTTP_REDIRECT and "localhost" in e.value.reason
        chunks, error = _fetch_all(devhttp.Fetch(), 1, {"url": url, "exp": 0, "hosts": ["localhost"]}, 0,
                                   len(image), 2048)
        assert error is None and b"".join(chunks) == image
    finally:
        r.sock.close()


def test_device_client_resumes_after_a_cut_with_a_range(blob_server, monkeypatch):
    server, app, store, rel, image, jobs = blob_server
    with FaultProxy(server.port, cut_after_down=50_000) as proxy:
        url = sign_url(f"http://127.0.0.1:{proxy.port}", KEY, "dev-1", jobs["dev-1"], rel.sha256,
                       int(time.time()) + 60)
        fetch = devhttp.Fetch()
        got, error = _fetch_all(fetch, 1, {"url": url, "exp": 0}, 0, len(image), 2048)
        assert isinstance(error, OSError) and 0 < len(got) < len(image) // 2048
        # As the runner does after the core's chunk timeout: start again from the next chunk.
        more, error = _fetch_all(fetch, 1, {"url": url, "exp": 0}, len(got) * 2048, len(image), 2048)
        while error is not None:
            got += more
            more, error = _fetch_all(fetch, 1, {"url": url, "exp": 0}, len(got) * 2048, len(image), 2048)
        got += more
    assert b"".join(got) == image and fetch.connections >= 3
    ranges = [e["range"] for e in app.state.blob_log]
    assert ranges[0].startswith("bytes=0-") and any(not r.startswith("bytes=0-") for r in ranges)
