"""Payload transport http (docs/http-transport.md): the control center's blob route with signed
URLs and byte ranges, the device's ranged keep-alive HTTP/1.1 client, and real MicroPython
devices updated over http (through a fault proxy that cuts, with a tampered blob, with an expired
URL, over TLS)."""
from __future__ import annotations

import json
import os
import socket
import time

import pytest
from sqlalchemy import select

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
    for junk in ("", sig[:-1], sig + "0", "é" * 64, sig.upper()):
        assert check_url(KEY, "dev-1", 7, sha, 2000, junk, now=0) == "bad signature", junk


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
    non_ascii = url.rsplit("s=", 1)[0] + "s=" + "%C3%A9" * 64
    for bad in (forged, other_job, other_dev, expired, wrong_key, unsigned, non_ascii):
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


def test_blob_route_skips_a_request_whose_device_has_gone(blob_server):
    """A request that waited for a thread while its device closed the connection (it gave up, it
    rebooted) is not served: at 10,000 devices such requests filled a loaded server's queue."""
    import asyncio
    from urllib.parse import urlsplit
    server, app, store, rel, image, jobs = blob_server
    url = urlsplit(sign_url(server.url, KEY, "dev-1", jobs["dev-1"], rel.sha256, int(time.time()) + 60))

    def request(gone):
        sent = []
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
                 "scheme": "http", "path": url.path, "raw_path": url.path.encode(),
                 "query_string": url.query.encode(), "root_path": "", "headers": [(b"host", b"x")],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}

        async def receive():
            if gone:
                return {"type": "http.disconnect"}
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)
        asyncio.run(app(scope, receive, send))
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return sent[0]["status"], body, app.state.blob_log[-1]["status"]

    assert request(gone=False) == (200, image, 200)
    assert request(gone=True) == (499, b"", 499)


def test_device_client_restarted_while_its_request_waits_keeps_waiting(blob_server):
    """A restart (the core's chunk timeout) from the offset whose request is sent and unanswered
    does not send it again on a new connection: a loaded server would serve both in turn."""
    server, app, store, rel, image, jobs = blob_server
    http = {"url": "", "exp": 0}
    with FaultProxy(server.port) as proxy:
        http["url"] = sign_url(f"http://127.0.0.1:{proxy.port}", KEY, "dev-1", jobs["dev-1"], rel.sha256,
                               int(time.time()) + 60)
        proxy.stall(0.8)  # the server is slow to answer
        fetch = devhttp.Fetch()
        fetch.start(1, http, 0, len(image), 2048)
        assert fetch.step(50) is None and fetch.phase == 1 and fetch.requests == 1
        fetch.start(1, http, 0, len(image), 2048)  # the chunk timeout's restart
        chunks, error = _fetch_all(fetch, 1, http, 0, len(image), 2048)
    assert error is None and b"".join(chunks) == image
    assert fetch.connections == 1 and fetch.requests == -(-len(image) // devhttp.SEGMENT), \
        (fetch.connections, fetch.requests)


def test_device_client_waits_for_a_slow_servers_headers_longer_than_its_network_timeout(blob_server, monkeypatch):
    """A loaded server answers requests in turn: headers are awaited for HEADER_WAIT_S, not the
    connect timeout, so the request is not given up and sent again behind the others."""
    server, app, store, rel, image, jobs = blob_server
    monkeypatch.setattr(devhttp, "HEADER_WAIT_S", 3)
    with FaultProxy(server.port) as proxy:
        http = {"url": sign_url(f"http://127.0.0.1:{proxy.port}", KEY, "dev-1", jobs["dev-1"], rel.sha256,
                                int(time.time()) + 60), "exp": 0}
        proxy.stall(1.5)  # longer than the 1 s network timeout, shorter than the header wait
        fetch = devhttp.Fetch(timeout_s=1)
        chunks, error = _fetch_all(fetch, 1, http, 0, len(image), 2048)
        assert error is None and b"".join(chunks) == image
        assert fetch.connections == 1 and fetch.requests == -(-len(image) // devhttp.SEGMENT)
        proxy.stall(4)  # longer than the header wait: a timeout, retried as a cut
        fetch = devhttp.Fetch(timeout_s=1)
        chunks, error = _fetch_all(fetch, 1, http, 0, len(image), 2048)
        assert isinstance(error, OSError) and chunks == []


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


# ---- real MicroPython devices, a real Mosquitto and the control center ------------------------------

@pytest.fixture
def http_fleet(tmp_path, broker, sqlite_url, interpreter):
    """start(...) -> (fleet, server, app): a fleet whose center signs payload URLs to an API server
    of its own (the blob route), on a port chosen first. tls: serve HTTPS with these TlsFiles."""
    from fota.server.broker import free_port
    from fota.server.kek import Kek
    kek = Kek.load(tmp_path / "keys" / "kek")  # the one the Fleet loads too
    started = []

    def start(tls=None, url_ttl=3600, host="127.0.0.1", proxy=None, **settings):
        """proxy: FaultProxy options: the URLs lead through one (fleet.http_proxy)."""
        port = free_port()
        scheme = "https" if tls else "http"
        front = port
        if proxy is not None:
            fp = FaultProxy(port, **proxy).start_thread()
            started.append(fp)
            front = fp.port
        fleet = Fleet(tmp_path, broker, sqlite_url, interpreter=interpreter,
                      http=HttpPayloads(f"{scheme}://{host}:{front}", kek.url_key, url_ttl), **settings)
        fleet.http_proxy = fp if proxy is not None else None
        started.append(fleet)
        app = create_app(fleet.store, fleet.blobs, lambda: fleet.key, url_key=kek.url_key)
        server = AppServer(app, port=port, tls=tls).start()
        started.append(server)
        return fleet, server, app

    yield start
    for thing in reversed(started):
        if isinstance(thing, AppServer):
            thing.stop()
        elif isinstance(thing, FaultProxy):
            thing.stop_thread()
        else:
            thing.close()


def _requests_of(fleet, dev):
    return [r for _, d, r in fleet.spy.requests if d == dev]


def _job_history(fleet, dev, job_id):
    from fota.server.deployments import device_history
    history = [e.state for e in device_history(fleet.store, dev) if e.job_id == job_id]
    return [s for i, s in enumerate(history) if i == 0 or s != history[i - 1]]


@both_interpreters
def test_update_over_http_end_to_end(http_fleet):
    fleet, server, app = http_fleet()
    fleet.add_devices(["h-1", "h-mqtt"])
    # h-mqtt's agent says it has no http: it gets chunks in the same deployment.
    config = json.loads((fleet.root("h-mqtt") / "config.json").read_text())
    fleet.devices["h-mqtt"].stop()
    config["transports"] = ["mqtt"]
    (fleet.root("h-mqtt") / "config.json").write_text(json.dumps(config))
    fleet.devices["h-mqtt"].start()
    fleet.wait_online("h-1", "h-mqtt")
    wait_until(lambda: (fleet.device_row("h-1").inventory or {}).get("transports") == ["mqtt", "http"]
               and (fleet.device_row("h-mqtt").inventory or {}).get("transports") == ["mqtt"],
               timeout=10, what="inventories naming the transports")
    rel = fleet.release(bundle_of_size("1.1.0", 60_000), "1.1.0")
    dep = create_deployment(fleet.store, rel, device_ids=["h-1", "h-mqtt"], transport="http")
    jobs = {j.device_id: j.id for j in dep.jobs}
    for dev, job_id in jobs.items():
        j = fleet.wait_job(job_id)
        assert j.state == "confirmed", (dev, j.state, j.code, j.reason)
        assert _job_history(fleet, dev, job_id) == ["downloading", "verifying", "installing", "rebooting",
                                                    "trial", "confirmed"]
    fleet.wait_online("h-1", "h-mqtt", version="1.1.0")
    # h-1 fetched over http (ranged GETs, no chunk request); h-mqtt pulled chunks.
    served = [e for e in app.state.blob_log if e["device"] == "h-1"]
    assert served and all(e["status"] == 206 and e["range"].startswith("bytes=") for e in served)
    assert not [e for e in app.state.blob_log if e["device"] == "h-mqtt"]
    assert not _requests_of(fleet, "h-1") and _requests_of(fleet, "h-mqtt")
    assert fleet.center.center.sender.http_sent == 1


FAST = {"stall_timeout_ms": 20000}


def test_cut_downloads_resume_with_a_range_request(http_fleet):
    # Every connection to the blob server is cut after 24 KB: the 90 KB image needs several.
    fleet, server, app = http_fleet(proxy={"cut_after_down": 24_000})
    fleet.add_device("h-cut", **FAST)
    fleet.wait_online("h-cut")
    image = bundle_of_size("1.1.0", 90_000)
    rel = fleet.release(image, "1.1.0")
    dep = create_deployment(fleet.store, rel, device_ids=["h-cut"], transport="http")
    j = fleet.wait_job(dep.jobs[0].id)
    assert j.state == "confirmed", (j.state, j.code, j.reason)
    assert fleet.http_proxy.cuts >= 3
    ranges = [e["range"] for e in app.state.blob_log if e["device"] == "h-cut"]
    starts = [int(r[6:].split("-")[0]) for r in ranges]
    # Each fetch after a cut starts where the last whole chunk ended, not from 0.
    assert starts[0] == 0 and len(set(starts)) >= 3 and all(s % 2048 == 0 for s in starts)
    assert sorted(starts) == starts and max(starts) > 48_000
    # Bytes served stay close to the image: a cut costs at most the chunk being read (and the
    # headers of each response).
    assert fleet.http_proxy.bytes_down < len(image) + len(ranges) * (2048 + 512)



def test_power_cut_mid_download_resumes_from_the_journal_with_a_range(http_fleet):
    # The blob server is slow (60 KB/s); the device is killed once its journal has a checkpoint:
    # after the restart it asks only for the bytes after that checkpoint.
    fleet, server, app = http_fleet(proxy={"throttle_down": 60_000})
    proc = fleet.add_device("h-kill", **FAST)
    fleet.wait_online("h-kill")
    image = bundle_of_size("1.1.0", 150_000)
    rel = fleet.release(image, "1.1.0")
    dep = create_deployment(fleet.store, rel, device_ids=["h-kill"], transport="http")
    journal = fleet.root("h-kill") / "journal.json"
    wait_until(lambda: journal.exists() and json.loads(journal.read_text())["pos"] >= 16, timeout=20,
               interval=0.05, what="a checkpoint past chunk 16")
    assert proc.kill(wait=True)
    saved = json.loads(journal.read_text())
    pos, chunk = saved["pos"], saved["cmd"].get("chunk", 2048)  # the device's chunk size (its heap's)
    assert 16 <= pos < len(image) // chunk
    j = fleet.wait_job(dep.jobs[0].id)
    assert j.state == "confirmed", (j.state, j.code, j.reason)
    starts = [int(e["range"][6:].split("-")[0]) for e in app.state.blob_log if e["device"] == "h-kill"]
    assert starts[0] == 0 and starts.count(0) == 1  # never downloaded from the start again
    assert pos * chunk in starts[1:], (pos, chunk, starts)


def test_tampered_blob_and_expired_url_are_refused_and_the_firmware_kept(http_fleet):
    fleet, server, app = http_fleet()
    fleet.add_devices(["h-tamper"], **FAST)
    fleet.wait_online("h-tamper")
    image = bundle_of_size("1.1.0", 30_000)
    rel = fleet.release(image, "1.1.0")
    # The stored blob is altered after signing (same size): the device's streaming hash refuses it.
    blob = fleet.blobs / rel.sha256
    blob.write_bytes(image[:20_000] + bytes([image[20_000] ^ 1]) + image[20_001:])
    dep = create_deployment(fleet.store, rel, device_ids=["h-tamper"], transport="http")
    j = fleet.wait_job(dep.jobs[0].id)
    assert (j.state, j.code) == ("failed", "E_HASH_MISMATCH"), (j.state, j.code, j.reason)
    assert fleet.running_version("h-tamper") == "1.0.0" and fleet.devices["h-tamper"].reboots == 0
    # An expired URL: the server says 403 and the device ends the job with E_HTTP_STATUS.
    blob.write_bytes(image)
    fleet.center.center.http = HttpPayloads(fleet.center.center.http.base_url, fleet.center.center.http.key,
                                            url_ttl=-5)
    dep2 = create_deployment(fleet.store, rel, device_ids=["h-tamper"], transport="http")
    j2 = fleet.wait_job(dep2.jobs[0].id)
    assert (j2.state, j2.code) == ("failed", "E_HTTP_STATUS") and "403" in j2.reason, (j2.state, j2.code, j2.reason)
    assert [e["status"] for e in app.state.blob_log if e["job"] == str(j2.id)] == [403]
    assert fleet.running_version("h-tamper") == "1.0.0" and fleet.devices["h-tamper"].reboots == 0


def test_https_payloads_are_verified_against_the_provisioned_ca(http_fleet, tmp_path):
    files = ensure_tls(tmp_path / "tls")
    impostor, _ = create_ca(tmp_path / "impostor", name="impostor CA")
    fleet, server, app = http_fleet(tls=files)
    fleet.add_device("h-tls", http_cadata=files.ca_der().hex(), **FAST)
    fleet.add_device("h-impostor", http_cadata=ca_der(impostor).hex(), **FAST)
    fleet.wait_online("h-tls", "h-impostor")
    rel = fleet.release(bundle_of_size("1.1.0", 30_000), "1.1.0")
    dep = create_deployment(fleet.store, rel, device_ids=["h-tls", "h-impostor"], transport="http")
    jobs = {j.device_id: j.id for j in dep.jobs}
    ok = fleet.wait_job(jobs["h-tls"])
    assert ok.state == "confirmed", (ok.state, ok.code, ok.reason)
    bad = fleet.wait_job(jobs["h-impostor"])
    assert (bad.state, bad.code) == ("failed", "E_HTTP_TLS"), (bad.state, bad.code, bad.reason)
    assert fleet.running_version("h-impostor") == "1.0.0"
    assert not [e for e in app.state.blob_log if e["device"] == "h-impostor"]  # nothing reached the route


# ---- choosing the transport: deployments, campaigns, the API -----------------------------------------

def test_transport_is_chosen_per_deployment_and_campaign(db_url, tmp_path):
    from fota.server.campaigns import CampaignError, create_campaign
    from fota.server.deployments import DeploymentError
    from fota.server.store import Deployment
    from test_api import API, bearer, make_env
    env = make_env(db_url, tmp_path, url_key=KEY)
    try:
        assert env.upload(env.admin, "1.1.0").status_code == 201
        made = env.client.post(f"{API}/deployments", headers=bearer(env.admin),
                               json={"release": "1.1.0", "devices": ["dev-1"], "transport": "http"})
        assert made.status_code == 201 and made.json()["transport"] == "http", made.text
        plain = env.client.post(f"{API}/deployments", headers=bearer(env.admin),
                                json={"release": "1.1.0", "devices": ["dev-2"]})
        assert plain.json()["transport"] == "mqtt"
        bad = env.client.post(f"{API}/deployments", headers=bearer(env.admin),
                              json={"release": "1.1.0", "devices": ["dev-2"], "transport": "ftp"})
        assert bad.status_code == 422
        with pytest.raises(DeploymentError, match="transport"):
            create_deployment(env.store, "1.1.0", device_ids=["dev-1"], transport="ftp")
        campaign = create_campaign(env.store, "via-http", "1.1.0", {"transport": "http"})
        with pytest.raises(CampaignError, match="transport"):
            create_campaign(env.store, "via-ftp", "1.1.0", {"transport": "ftp"})
        with env.store.session() as s:
            assert s.get(Deployment, campaign.deployment_id).transport == "http"
            assert s.get(Deployment, made.json()["id"]).transport == "http"
    finally:
        env.client.close()
        env.store.dispose()



def test_home_settings_and_the_deploy_command(tmp_path):
    # http_url in the home's config.json gives the center its URL setting, with the key every
    # process derives from the home's KEK; `fota deploy --transport http` stores the transport.
    from typer.testing import CliRunner
    from fota.cli import app as cli
    from fota.server.fleet import provision_device
    from fota.server.home import Home
    from fota.server.store import Deployment
    home = Home(tmp_path / "home")
    runner = CliRunner()
    assert runner.invoke(cli, ["keys", "init", "--home", str(home.path)]).exit_code == 0
    assert home.http_payloads() is None  # not configured: every job gets chunks
    cfg = home.config()
    cfg.update(http_url="https://fota.example:8443", http_url_ttl=600, http_hosts=["cdn.example"])
    home.save_config(cfg)
    settings = home.http_payloads()
    assert (settings.base_url, settings.url_ttl, settings.hosts) == ("https://fota.example:8443", 600, ("cdn.example",))
    assert settings.key == home.kek().url_key == Home(home.path).kek().url_key and len(settings.key) == 32
    field = settings.command_field("dev-1", 5, "ab" * 32, now=1000)
    assert field == {"url": sign_url("https://fota.example:8443", settings.key, "dev-1", 5, "ab" * 32, 1600),
                     "exp": 1600, "hosts": ["cdn.example"]}
    store = home.store()
    try:
        provision_device(store, "dev-1", "unix")
        _release_hello_with_the_cli(runner, home, tmp_path, "1.2.0")
        r = runner.invoke(cli, ["deploy", "1.2.0", "--device", "dev-1", "--transport", "http", "--home", str(home.path)])
        assert r.exit_code == 0 and "over http" in r.output, r.output
        r = runner.invoke(cli, ["deploy", "1.2.0", "--device", "dev-1", "--transport", "ftp", "--home", str(home.path)])
        assert r.exit_code != 0 and "--transport must be mqtt or http" in str(r.exception)
        with store.session() as s:
            assert [d.transport for d in s.scalars(select(Deployment))] == ["http"]
    finally:
        store.dispose()


# ---- S3-compatible object storage (moto's server on loopback) ------------------------------------------

@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer
    from fota.server.broker import free_port
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch, tmp_path):
    import boto3
    from botocore.config import Config
    for name, value in (("AWS_ACCESS_KEY_ID", "fota-test"), ("AWS_SECRET_ACCESS_KEY", "fota-test-secret"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    bucket = f"fota-{tmp_path.name.lower().replace('_', '-')[-40:]}"
    boto3.client("s3", endpoint_url=s3_endpoint, config=Config(s3={"addressing_style": "path"})) \
        .create_bucket(Bucket=bucket)
    return s3_endpoint, bucket


def test_update_over_presigned_object_storage_urls(s3, tmp_path, broker, sqlite_url):
    from fota.server.objectstore import S3Payloads
    endpoint, bucket = s3
    payloads = S3Payloads(bucket, blobs_dir=tmp_path / "blobs", endpoint_url=endpoint, region="us-east-1",
                          prefix="blobs/", url_ttl=3600)
    fleet = Fleet(tmp_path, broker, sqlite_url, http=payloads)
    try:
        fleet.add_device("h-s3", stall_timeout_ms=20000)
        fleet.wait_online("h-s3")
        image = bundle_of_size("1.1.0", 100_000)
        rel = fleet.release(image, "1.1.0")
        field = payloads.command_field("h-s3", 1, rel.sha256)  # uploads the blob on first use
        assert field["url"].startswith(f"{endpoint}/{bucket}/blobs/{rel.sha256}?")
        assert "X-Amz-Signature=" in field["url"] and "X-Amz-Expires=3600" in field["url"]
        assert payloads.get_blob(rel.sha256) == image
        dep = create_deployment(fleet.store, rel, device_ids=["h-s3"], transport="http")
        j = fleet.wait_job(dep.jobs[0].id)
        assert j.state == "confirmed", (j.state, j.code, j.reason)
        assert fleet.center.center.sender.http_sent == 1 and not _requests_of(fleet, "h-s3")
        fleet.wait_online("h-s3", version="1.1.0")
    finally:
        fleet.close()


def test_object_storage_url_ttl_is_capped_at_sigv4s_week(s3, tmp_path):
    from fota.server.objectstore import MAX_PRESIGN, S3Payloads
    endpoint, bucket = s3
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / ("cd" * 32)).write_bytes(b"x" * 10)
    payloads = S3Payloads(bucket, blobs_dir=tmp_path / "blobs", endpoint_url=endpoint, url_ttl=30 * 86400)
    field = payloads.command_field("d", 1, "cd" * 32, now=1000)
    assert field["exp"] == 1000 + MAX_PRESIGN and f"X-Amz-Expires={MAX_PRESIGN}" in field["url"]


# ---- a static server or CDN in front of the blob directory ---------------------------------------------

def test_update_from_a_static_server_in_front_of_the_blob_directory(tmp_path, broker, sqlite_url):
    # Any web server that answers byte ranges will do: here Starlette's StaticFiles on uvicorn.
    from starlette.applications import Starlette
    from starlette.routing import Mount
    from starlette.staticfiles import StaticFiles
    from fota.server.broker import free_port
    from fota.server.payloadurls import StaticPayloads
    (tmp_path / "blobs").mkdir()
    port = free_port()
    fleet = Fleet(tmp_path, broker, sqlite_url, http=StaticPayloads(f"http://127.0.0.1:{port}/fw"))
    static = AppServer(Starlette(routes=[Mount("/fw", StaticFiles(directory=tmp_path / "blobs"))]), port=port)
    try:
        static.start()
        fleet.add_device("h-static", stall_timeout_ms=20000)
        fleet.wait_online("h-static")
        rel = fleet.release(bundle_of_size("1.1.0", 80_000), "1.1.0")
        part = _get(f"{static.url}/fw/{rel.sha256}", {"Range": "bytes=0-9"})
        assert part.status_code == 206  # the server answers ranges
        dep = create_deployment(fleet.store, rel, device_ids=["h-static"], transport="http")
        j = fleet.wait_job(dep.jobs[0].id)
        assert j.state == "confirmed", (j.state, j.code, j.reason)
        assert not _requests_of(fleet, "h-static")
    finally:
        static.stop()
        fleet.close()


def test_device_client_takes_a_server_that_ignores_ranges(tmp_path):
    # Python's http.server answers every GET with 200 and the whole file (HTTP/1.0): the client
    # checks its length against the signed size, drops the bytes before its offset and goes on.
    import functools
    import http.server
    import threading
    blob = bundle_of_size("1.1.0", 50_000)
    (tmp_path / "blob").write_bytes(blob)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = {"url": f"http://127.0.0.1:{server.server_address[1]}/blob", "exp": 0}
        chunks, error = _fetch_all(devhttp.Fetch(), 1, url, 10 * 2048, len(blob), 2048)
        assert error is None and b"".join(chunks) == blob[10 * 2048:]
        with pytest.raises(devhttp.HttpError) as e:  # a whole file of another size is refused
            _fetch_all(devhttp.Fetch(), 1, url, 0, len(blob) - 1, 2048)
        assert e.value.code == P.E_HTTP_RANGE
    finally:
        server.shutdown()


# ---- the sans-IO core with a payload URL ------------------------------------------------------------

def _http_core(transports=("mqtt", "http")):
    from test_core import new_core
    core = new_core()
    core.transports = transports
    core.booted({"trial": None})
    core.connected_(0)
    return core


def test_core_fetches_over_http_with_the_same_hash_checkpoints_and_deadlines():
    from test_core import SIGNING_KEY, cmd, make_update
    from fota.device import core as C
    image = os.urandom(256 * 10 + 100)
    http = {"url": "https://blobs.example/x?s=1", "exp": 2**31 - 1}
    core = _http_core()
    actions = core.command(cmd({**make_update(SIGNING_KEY, image, chunk=256, window=4), "http": http}))
    fetches = [a for a in actions if a[0] == C.A_FETCH]
    assert fetches == [(C.A_FETCH, http, 0, len(image), 256)]
    assert not [a for a in actions if a[0] == C.A_PUBLISH and a[1] == P.REQ]  # nothing asked on req
    assert core.fetched(image[:100]) == []  # a piece of another length is not a chunk: dropped
    journals, writes = [], []
    for i in range(5):
        for a in core.fetched(image[i * 256:(i + 1) * 256]):
            journals += [a[1]["pos"] for _ in [0] if a[0] == C.A_JOURNAL]
            writes += [a[1] for _ in [0] if a[0] == C.A_WRITE]
            assert a[0] != C.A_FETCH  # one fetch streams to the end: nothing more is asked
    assert writes == [0, 256, 512, 768, 1024] and journals == [4]
    # A reconnect, and a chunk timeout, restart the fetch from the next chunk.
    core.disconnected(10)
    assert [a for a in core.connected_(20) if a[0] == C.A_FETCH] == [(C.A_FETCH, http, 5 * 256, len(image), 256)]
    assert [a for a in core.tick(20 + 3001) if a[0] == C.A_FETCH] == [(C.A_FETCH, http, 5 * 256, len(image), 256)]
    # Timeouts in a row back off (6 s, then 12 s, then 24 s at most): a slow server is not re-asked
    # every 3 s; a chunk taken resets it.
    restarts = [t for t in range(3022, 58000, 100) if [a for a in core.tick(t) if a[0] == C.A_FETCH]]
    assert restarts == [9022, 21122, 45222], restarts
    core.tick(58000)
    assert [a[0] for a in core.fetched(image[5 * 256:6 * 256])][0] == C.A_WRITE  # (and a progress report)
    assert not [a for a in core.tick(58000 + 3000) if a[0] == C.A_FETCH]
    assert [a for a in core.tick(58000 + 3001) if a[0] == C.A_FETCH] == [(C.A_FETCH, http, 6 * 256, len(image), 256)]
    # A refusal the runner reports ends the job with its code.
    ended = core.fetch_failed(P.E_HTTP_STATUS, "HTTP 403 for https://blobs.example/x")
    status = json.loads([a for a in ended if a[0] == C.A_PUBLISH][0][2])
    assert (status["state"], status["code"]) == ("failed", "E_HTTP_STATUS") and core.state == P.IDLE
    assert (C.A_JOURNAL, None) in ended


def test_core_without_http_ignores_the_url_and_pulls_chunks():
    from test_core import SIGNING_KEY, cmd, make_update
    from fota.device import core as C
    image = os.urandom(1000)
    core = _http_core(transports=("mqtt",))
    inventory = json.loads(core.inventory()[2])
    assert inventory["transports"] == ["mqtt"]
    actions = core.command(cmd({**make_update(SIGNING_KEY, image), "http": {"url": "http://x/y", "exp": 1}}))
    assert not [a for a in actions if a[0] == C.A_FETCH]
    assert [a for a in actions if a[0] == C.A_PUBLISH and a[1] == P.REQ]
    assert core.fetched(image[:256]) == [] and core.fetch_failed(P.E_HTTP_TLS, "x") == []


@pytest.mark.parametrize("http", [
    "https://x", {"url": "ftp://x/y", "exp": 1}, {"url": "http://x/" + "a" * P.MAX_URL, "exp": 1},
    {"url": "http://x/y"}, {"url": "http://x/y", "exp": True}, {"url": "http://x/y", "exp": 1, "hosts": "x"},
    {"url": "http://x/y", "exp": 1, "hosts": [1]}])
def test_core_refuses_a_malformed_http_object(http):
    from test_core import SIGNING_KEY, cmd, make_update
    core = _http_core()
    actions = core.command(cmd({**make_update(SIGNING_KEY, b"x" * 300), "http": http}))
    status = json.loads(actions[-1][2])
    assert (status["state"], status["code"]) == ("rejected", "E_BAD_COMMAND") and core.state == P.IDLE


def _object(endpoint: str, bucket: str, key: str) -> bytes | None:
    """An object's bytes as the storage holds them (a client of its own), None if there is none."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError
    client = boto3.client("s3", endpoint_url=endpoint, config=Config(s3={"addressing_style": "path"}))
    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError:
        return None


def test_a_center_without_the_blob_file_reads_it_from_object_storage(s3, tmp_path, broker, sqlite_url):
    # The release is made on another machine (its own blobs directory) and written to the bucket
    # when created; this center's blobs directory never had it: it signs a presigned URL for it
    # (http) and serves its chunks (mqtt) read from the bucket, checked, kept in its blobs/.
    from fota.server.objectstore import S3Payloads
    from fota.server.releases import create_release
    endpoint, bucket = s3
    payloads = S3Payloads(bucket, blobs_dir=tmp_path / "blobs", endpoint_url=endpoint, region="us-east-1")
    maker = S3Payloads(bucket, blobs_dir=tmp_path / "maker-blobs", endpoint_url=endpoint, region="us-east-1")
    fleet = Fleet(tmp_path, broker, sqlite_url, http=payloads)
    try:
        fleet.add_devices(["h-remote", "h-remote-http"])
        fleet.wait_online("h-remote", "h-remote-http")
        wait_until(lambda: "http" in (fleet.device_row("h-remote-http").inventory or {}).get("transports", ()),
                   timeout=10, what="the inventory naming http")
        image = bundle_of_size("1.1.0", 40_000)
        rel = create_release(fleet.store, tmp_path / "maker-blobs", fleet.key, image, "1.1.0", ["unix"], remote=maker)
        assert _object(endpoint, bucket, rel.sha256) == image  # written when created, before any job
        (tmp_path / "maker-blobs" / rel.sha256).unlink()  # the other machine's file: not here
        assert not (fleet.blobs / rel.sha256).exists()
        dep = create_deployment(fleet.store, rel, device_ids=["h-remote-http"], transport="http")
        j = fleet.wait_job(dep.jobs[0].id)
        assert j.state == "confirmed", (j.state, j.code, j.reason)
        assert fleet.center.center.sender.http_sent == 1 and not _requests_of(fleet, "h-remote-http")
        assert not (fleet.blobs / rel.sha256).exists()  # a URL needs no local copy
        dep = create_deployment(fleet.store, rel, device_ids=["h-remote"])  # mqtt: the center serves chunks
        j = fleet.wait_job(dep.jobs[0].id)
        assert j.state == "confirmed", (j.state, j.code, j.reason)
        assert (fleet.blobs / rel.sha256).read_bytes() == image  # fetched into the local store
        assert _requests_of(fleet, "h-remote")
    finally:
        fleet.close()


def test_patches_are_written_to_object_storage_and_a_second_center_reads_them_from_there(
        s3, tmp_path, broker, sqlite_url):
    # Center A makes both releases (written to the bucket when created) and, for the first device,
    # the patch between them (written to the bucket when made). Center B, another machine with an
    # empty blobs directory on the same database, broker and bucket, sends the second device the
    # same patch read from the bucket: not computed again (which would have read both images).
    from fota.examples import hello_files
    from fota.server import delta as server_delta
    from fota.server import releases
    from fota.server.objectstore import S3Payloads
    from fota.server.releases import create_release
    from fota.server.store import Delta
    from fota.testkit.center import CenterThread
    from fota.tools.bundle import pack_files
    endpoint, bucket = s3

    def storage(blobs):
        return S3Payloads(bucket, blobs_dir=blobs, endpoint_url=endpoint, region="us-east-1", prefix="fota/")
    fleet = Fleet(tmp_path, broker, sqlite_url, objects=storage(tmp_path / "blobs"))
    try:
        fleet.add_devices(["sot-1", "sot-2"])
        fleet.wait_online("sot-1", "sot-2")
        files = hello_files("30.0.0")
        for i in range(8):
            files[f"lib/mod{i}.py"] = os.urandom(6000).hex().encode()[:6000]
        files2 = dict(hello_files("30.1.0"), **{k: v for k, v in files.items() if k.startswith("lib/")})
        files2["lib/mod3.py"] = files["lib/mod3.py"][:3000] + b"# changed\n" + files["lib/mod3.py"][3000:]
        rel1, rel2 = (create_release(fleet.store, fleet.blobs, fleet.key, pack_files(f), v, ["unix"],
                                     remote=storage(fleet.blobs))
                      for f, v in ((files, "30.0.0"), (files2, "30.1.0")))
        for rel in (rel1, rel2):
            assert _object(endpoint, bucket, f"fota/{rel.sha256}") == (fleet.blobs / rel.sha256).read_bytes()
        dep = create_deployment(fleet.store, rel1, device_ids=["sot-1", "sot-2"])
        for job in dep.jobs:
            assert fleet.wait_job(job.id).state == "confirmed"
        for dev in ("sot-1", "sot-2"):
            wait_until(lambda: (fleet.device_row(dev).inventory or {}).get("image") == rel1.sha256,
                       what="inventory image")
        dep = create_deployment(fleet.store, rel2, device_ids=["sot-1"])
        j1 = fleet.wait_job(dep.jobs[0].id, timeout=120)
        assert j1.state == "confirmed" and j1.delta_id is not None, (j1.state, j1.code, j1.reason)
        with fleet.store.session() as s:
            patch = s.get(Delta, j1.delta_id)
        assert _object(endpoint, bucket, f"fota/{patch.sha256}") == (fleet.blobs / patch.sha256).read_bytes()

        # Center B: nothing in memory or on disk from center A (whose blobs directory, which the
        # database's blob paths name, is moved out of reach).
        fleet.center.stop()
        fleet.center = None
        blobs_a = fleet.blobs.rename(tmp_path / "blobs-a-elsewhere")
        server_delta._cache.clear()
        releases._blob_cache.clear()
        blobs_b = tmp_path / "blobs-b"
        fleet.center = CenterThread(fleet.store, broker.server_url, blobs_b, signer=fleet.signer,
                                    keys_update=fleet.keyring.keys_update(), kek=fleet.kek,
                                    objects=storage(blobs_b)).start()
        dep = create_deployment(fleet.store, rel2, device_ids=["sot-2"])
        j2 = fleet.wait_job(dep.jobs[0].id, timeout=120)
        assert j2.state == "confirmed" and j2.delta_id == j1.delta_id, (j2.state, j2.code, j2.reason)
        assert j2.bytes_served < 1500, j2.bytes_served  # the patch, not the bundle
        fleet.wait_online("sot-2", version="30.1.0")
        # The patches A made (format 1 and 2: B compares their sizes) read from the bucket; not
        # computed again, which would have read both releases' images into blobs-b.
        with fleet.store.session() as s:
            made = {d.sha256 for d in s.scalars(select(Delta))}
        assert patch.sha256 in made and {p.name for p in blobs_b.iterdir()} == made
        assert not {rel1.sha256, rel2.sha256} & made
        # After a restart of B the chunk server reads a delta job's patch by its id, from the bucket too.
        (blobs_b / patch.sha256).unlink()
        server_delta._cache.clear()
        assert server_delta.load_delta(fleet.store, j2.delta_id, blobs_b, storage(blobs_b)) == \
            (blobs_a / patch.sha256).read_bytes()
        assert (blobs_b / patch.sha256).is_file()
    finally:
        fleet.close()


def test_releases_made_through_the_api_and_the_cli_are_written_to_object_storage(s3, tmp_path, sqlite_url):
    # The API (fota api) and `fota release create` write the image to the bucket at creation; a
    # second API process with an empty blobs directory serves it on the blob route, from the bucket.
    from typer.testing import CliRunner
    from fota.cli import app as cli
    from fota.server.home import Home
    from fota.server.objectstore import S3Payloads
    from fota.server.releases import get_release
    from test_api import bearer, bundle_bytes, make_env
    endpoint, bucket = s3
    env = make_env(sqlite_url, tmp_path, url_key=KEY,
                   objects=S3Payloads(bucket, blobs_dir=tmp_path / "blobs", endpoint_url=endpoint))
    try:
        assert env.upload(env.admin, "1.1.0").status_code == 201
        rel = get_release(env.store, "1.1.0")
        assert _object(endpoint, bucket, rel.sha256) == bundle_bytes("1.1.0")
        dep = create_deployment(env.store, rel, device_ids=["dev-1"])
        env.blobs.rename(tmp_path / "first-blobs-elsewhere")  # the first API's machine
        other = tmp_path / "other-blobs"
        app = create_app(env.store, other, lambda: None, url_key=KEY,
                         objects=S3Payloads(bucket, blobs_dir=other, endpoint_url=endpoint))
        with AppServer(app) as server:
            url = sign_url(server.url, KEY, "dev-1", dep.jobs[0].id, rel.sha256, int(time.time()) + 60)
            r = _get(url, {"Range": "bytes=10-19"})
            assert r.status_code == 206 and r.content == bundle_bytes("1.1.0")[10:20]
            assert (other / rel.sha256).read_bytes() == bundle_bytes("1.1.0")  # cached
            missing = sign_url(server.url, KEY, "dev-1", dep.jobs[0].id, "ef" * 32, int(time.time()) + 60)
            assert _get(missing).status_code == 404  # in neither
    finally:
        env.client.close()
        env.store.dispose()
    home = Home(tmp_path / "home")
    runner = CliRunner()
    assert runner.invoke(cli, ["keys", "init", "--home", str(home.path)]).exit_code == 0
    cfg = home.config()
    cfg.update(s3_bucket=bucket, s3_endpoint_url=endpoint, s3_prefix="cli/")
    home.save_config(cfg)
    _release_hello_with_the_cli(runner, home, tmp_path, "1.2.0")
    store = home.store()
    try:
        rel = get_release(store, "1.2.0")
        assert _object(endpoint, bucket, f"cli/{rel.sha256}") == (home.blobs / rel.sha256).read_bytes()
    finally:
        store.dispose()
    # The bucket presigns the URLs too, unless s3_presign is false: then it only stores the blobs,
    # and devices get the URLs of the blob route (which reads from the bucket).
    assert isinstance(home.http_payloads(), S3Payloads) and home.object_store().prefix == "cli/"
    home.save_config({**cfg, "s3_presign": False, "http_url": "https://fota.example:8443"})
    assert isinstance(home.http_payloads(), HttpPayloads) and isinstance(home.object_store(), S3Payloads)
    # Storage unreachable: no release is made (the bucket is where every center looks for it).
    cfg.update(s3_endpoint_url="http://127.0.0.1:9")
    home.save_config(cfg)
    r = runner.invoke(cli, ["release", "create", str(tmp_path / "app"), "--version", "1.3.0", "--hardware", "unix",
                            "--home", str(home.path)])
    assert r.exit_code != 0 and "written to object storage" in str(r.exception), r.output
    store = home.store()
    try:
        with pytest.raises(Exception, match="no release"):
            get_release(store, "1.3.0")
    finally:
        store.dispose()


def test_a_deleted_releases_image_and_patches_leave_object_storage(s3, tmp_path, db_url):
    # Through the API (`fota release delete` in remote mode): the image and the patches from and
    # to it leave the bucket as well as the blobs directory; the other release's stay. Storage
    # unreachable at that moment: the release is deleted, and what was left behind is named.
    import boto3
    from botocore.config import Config
    from fota.server import delta as server_delta
    from fota.server.objectstore import S3Payloads
    from fota.server.release_delete import delete_release
    from fota.server.releases import get_release, read_blob
    from test_api import bearer, make_env
    endpoint, bucket = s3
    objects = S3Payloads(bucket, blobs_dir=tmp_path / "blobs", endpoint_url=endpoint, region="us-east-1",
                         prefix="fota/")
    env = make_env(db_url, tmp_path, objects=objects)
    try:
        first = os.urandom(30_000)
        for i, version in enumerate(("1.0.0", "1.1.0", "1.2.0")):
            image = first[:9_000 + i] + b"change" + first[9_000 + i:]
            r = env.upload(env.admin, version, data=image, filename="fw.bin")
            assert r.status_code == 201, r.text
        r1, r2, r3 = (get_release(env.store, v) for v in ("1.0.0", "1.1.0", "1.2.0"))
        patches = [server_delta.get_delta(env.store, env.blobs, base, target, 12, read_blob, remote=objects)
                   for base, target in ((r1, r2), (r2, r3), (r1, r3))]
        for blob in [r1.sha256, r2.sha256, r3.sha256] + [p.sha256 for p in patches]:
            assert _object(endpoint, bucket, f"fota/{blob}") == (env.blobs / blob).read_bytes()

        r = env.client.delete("/api/v1/releases/1.1.0", headers=bearer(env.admin))
        assert r.status_code == 200 and r.json()["object_storage"] and r.json()["failures"] == [], r.text
        gone = [r2.sha256, patches[0].sha256, patches[1].sha256]
        assert sorted(r.json()["blobs_removed"]) == sorted(gone) and r.json()["patches_removed"] == 2
        for blob in gone:
            assert _object(endpoint, bucket, f"fota/{blob}") is None and not (env.blobs / blob).exists()
        for blob in (r1.sha256, r3.sha256, patches[2].sha256):
            assert _object(endpoint, bucket, f"fota/{blob}") == (env.blobs / blob).read_bytes()

        # The storage unreachable: the database says deleted, the objects left behind are named.
        closed = boto3.client("s3", endpoint_url="http://127.0.0.1:9", region_name="us-east-1",
                              config=Config(retries={"max_attempts": 1}, connect_timeout=2,
                                            s3={"addressing_style": "path"}))
        unreachable = S3Payloads(bucket, blobs_dir=env.blobs, prefix="fota/", client=closed)
        out = delete_release(env.store, env.blobs, "1.2.0", unreachable, actor="test")
        assert [f.split(":")[0] for f in out["failures"]] == [f"object fota/{b}" for b in sorted(out["blobs_removed"])]
        assert r3.sha256 in out["blobs_removed"] and not (env.blobs / r3.sha256).exists()
        assert _object(endpoint, bucket, f"fota/{r3.sha256}") is not None  # left behind, and said so
        assert get_release(env.store, "1.2.0", deleted=True).deleted_at is not None
    finally:
        env.client.close()
        env.store.dispose()


def _release_hello_with_the_cli(runner, home, tmp_path, version: str) -> None:
    """`fota release create` of the hello app at `version` from a directory."""
    from fota.cli import app as cli
    from fota.examples import hello_files
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    for name, data in hello_files(version).items():
        (app_dir / name).write_bytes(data)
    r = runner.invoke(cli, ["release", "create", str(app_dir), "--version", version, "--hardware", "unix",
                            "--home", str(home.path)])
    assert r.exit_code == 0, r.output
