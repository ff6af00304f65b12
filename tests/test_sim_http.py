"""Simulated devices over transport http: the session's real Mosquitto, a real SQLite store, the
real ControlCenter and the center's blob route on a real uvicorn server (fota.server.blobhttp);
the devices fetch with the device's own HTTP client (fota.device.http.Fetch) driven by asyncio."""
from __future__ import annotations

import os

import pytest
from sqlalchemy import select

from fota.device import protocol as P
from fota.server.api import create_app
from fota.server.broker import free_port
from fota.server.deployments import create_deployment
from fota.server.kek import Kek
from fota.server.payloadurls import HttpPayloads
from fota.server.releases import create_release
from fota.server.store import Device, Store
from fota.sim import SimFleet, device_ids, provision
from fota.testkit.appserver import AppServer
from fota.testkit.center import CenterThread
from fota.testkit.faultproxy import FaultProxy
from fota.tools.keyring import Keyring
from fota.tools.waiting import wait_until
from test_sim import SimThread, _all_terminal, _online

CHUNK = 2048
HTTP = ("mqtt", "http")


@pytest.fixture
def http_setup(tmp_path, broker, sqlite_url):
    """make(n, prefix, proxy=None, **device settings) -> (fleet, ids); release(version, size)."""
    keyring = Keyring(tmp_path / "keys")
    keyring.init()
    signer = keyring.signer()
    store = Store(sqlite_url)
    key = Kek.generate().url_key
    port = free_port()
    app = create_app(store, tmp_path / "blobs", lambda: signer.key, url_key=key)
    server = AppServer(app, port=port).start()
    started = []
    centers = {}

    def center(front):
        # One center per URL base: the proxy's, or the server's own.
        if front not in centers:
            centers[front] = CenterThread(store, broker.server_url, tmp_path / "blobs", signer=signer, chunk=CHUNK,
                                          keys_update=keyring.keys_update(),
                                          http=HttpPayloads(f"http://127.0.0.1:{front}", key, 3600)).start()
        return centers[front].center

    def make(n, prefix, proxy=None, **settings):
        front = port
        if proxy is not None:
            fp = FaultProxy(port, **proxy).start_thread()
            started.append(fp)
            front = fp.port
        c = center(front)
        ids = device_ids(n, prefix)
        passwords = provision(store, ids)
        broker.add_users(passwords)
        fleet = SimFleet.build(passwords, host=broker.host, port=broker.port, root_key=keyring.root_public(),
                               trust=keyring.trust(), **settings)
        started.append(SimThread(fleet).start())
        wait_until(lambda: _online(store, ids), timeout=60, what=f"{n} simulated devices online")
        fleet.center = c
        fleet.proxy = fp if proxy is not None else None
        return fleet, ids

    def release(version, size):
        return create_release(store, tmp_path / "blobs", signer.key, os.urandom(size), version, ["sim"],
                              kind="image")

    yield store, make, release, app
    for thing in reversed(started):
        thing.stop_thread() if isinstance(thing, FaultProxy) else thing.stop()
    for c in centers.values():
        c.stop()
    server.stop()
    store.dispose()


def _inventories(store, ids):
    with store.session() as s:
        return {d.id: d.inventory for d in s.scalars(select(Device).where(Device.id.in_(ids)))}


def test_http_deployment_over_simulated_devices_fetches_over_http(http_setup):
    """A deployment with transport http: devices that declare http fetch the image from the blob
    route (no chunk through the broker), those that do not pull chunks; all confirm."""
    store, make, release, app = http_setup
    size = 16 * 1024
    chunks = size // CHUNK
    fleet, ids = make(30, "simhttp", transports=HTTP)
    old, old_ids = make(5, "simmqtt")
    inv = _inventories(store, ids + old_ids)
    assert all(inv[i]["transports"] == ["mqtt", "http"] for i in ids), inv[ids[0]]
    assert all(inv[i]["transports"] == ["mqtt"] for i in old_ids), inv[old_ids[0]]
    center = fleet.center
    chunks0 = center.chunks
    dep = create_deployment(store, release("2.0.0", size), device_ids=ids + old_ids, transport="http")
    states = wait_until(lambda: _all_terminal(store, dep.id), timeout=120, what="all jobs terminal")
    assert set(states.values()) == {P.CONFIRMED}, states
    for d in fleet.devices.values():
        assert d.running_version() == "2.0.0" and d.boots == 2
        # every chunk came over http, once, on one keep-alive connection's one ranged GET
        assert (d.fetched, d.chunks) == (chunks, 0), d.id
        counts = d.http_counts()
        assert counts["requests"] == 1 and counts["connections"] == 1, (d.id, counts)
        assert size <= counts["bytes_received"] < size + 1024, (d.id, counts)
    for d in old.devices.values():
        assert d.running_version() == "2.0.0" and d.fetched == 0 and d.chunks >= chunks
    # the center published chunks only for the devices without http
    assert chunks * len(old_ids) <= center.chunks - chunks0 < 2 * chunks * len(old_ids)
    served = [e for e in app.state.blob_log if e["device"] in fleet.devices]
    assert len(served) == len(ids) and {e["status"] for e in served} == {206}
    assert {e["range"] for e in served} == {f"bytes=0-{size - 1}"}
    summary = fleet.summary()
    assert summary["http_chunks"] == chunks * len(ids) and summary["chunks"] == 0 and not summary["http_errors"]


def test_http_download_cut_midway_resumes_from_the_next_chunk(http_setup):
    """Every blob connection is cut after 20,000 bytes: each device resumes with a ranged GET
    from its next chunk on a new connection, takes every chunk once, and confirms."""
    store, make, release, app = http_setup
    size = 48 * 1024
    chunks = size // CHUNK
    fleet, ids = make(4, "simcut", proxy={"cut_after_down": 20_000}, transports=HTTP)
    dep = create_deployment(store, release("2.0.0", size), device_ids=ids, transport="http")
    states = wait_until(lambda: _all_terminal(store, dep.id), timeout=120, what="all jobs terminal")
    assert set(states.values()) == {P.CONFIRMED}, states
    assert fleet.proxy.cuts >= 2 * len(ids)
    for d in fleet.devices.values():
        counts = d.http_counts()
        assert d.fetched == chunks and d.chunks == 0, d.id  # no chunk taken twice, none over MQTT
        assert d.http_failures >= 2 and counts["connections"] >= 3, (d.id, counts, d.http_failures)
        # a resume reads on from its chunk, it does not start over: under 20 KB lost per cut
        assert counts["bytes_received"] < size + 20_000 * d.http_failures, (d.id, counts)
        ranges = [e["range"] for e in app.state.blob_log if e["device"] == d.id]
        starts = [int(r.split("=")[1].split("-")[0]) for r in ranges]
        assert starts[0] == 0 and len(starts) >= 3 and all(s % CHUNK == 0 for s in starts), ranges
        assert starts == sorted(starts) and len(set(starts)) == len(starts), ranges
