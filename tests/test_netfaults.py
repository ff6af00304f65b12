"""Network faults between real MicroPython devices and the real Mosquitto.

The devices connect through fota.testkit.faultproxy (their config.json points at the proxy);
the control center talks to the broker directly. Cuts every few KiB, a stall longer than the
device's stall deadline, and a throttled link.
"""
from __future__ import annotations

import json
import os
import time

import pytest

from fota.device import core as C
from fota.device import protocol as P
from fota.examples import hello_files
from fota.server.deployments import create_deployment
from fota.server.releases import create_release
from fota.testkit.devices import verify_slot
from fota.testkit.faultproxy import FaultProxy
from fota.testkit.faults import status_gaps
from fota.testkit.fleet import Fleet
from fota.tools.waiting import wait_until
from fota.tools.bundle import pack_files

from test_core import SIGNING_KEY, cmd, make_update, new_core

SIM_SLOT = 128 * 1024


@pytest.fixture
def proxy(broker):
    p = FaultProxy(broker.port).start_thread()
    yield p
    p.stop_thread()


def _add_via_proxy(fleet, proxy, device_id, **settings):
    """Provision a device whose broker address is the proxy, then start it."""
    return fleet.add_device(device_id, port=proxy.port, backoff_ms=100, **settings)


def _bundle(version, size):
    files = dict(hello_files(version))
    files["assets/blob.bin"] = os.urandom(size)
    return pack_files(files)


def _never_bad(fleet, device):
    """No status of the device reports a wrong hash, a failed install or a revert."""
    bad = [s for s in fleet.spy.of(device)
           if s.get("code") in (P.E_HASH_MISMATCH, P.E_INSTALL, P.E_BAD_BUNDLE)
           or s["state"] in (P.FAILED, P.REVERTED)]
    assert not bad, bad


@pytest.mark.parametrize("budget", [{"cut_after_down": 3072}, {"cut_after": 4096}],
                         ids=["down-3KiB", "total-4KiB"])
def test_update_completes_through_a_cut_every_few_kib_and_installs_the_exact_release(fleet, proxy, budget):
    files_dev, sim_dev = "cut-files", "cut-sim"
    _add_via_proxy(fleet, proxy, files_dev)
    _add_via_proxy(fleet, proxy, sim_dev, hardware="sim-board", backend="sim", capacity=SIM_SLOT)
    fleet.wait_online(files_dev, sim_dev)
    bundle_rel = create_release(fleet.store, fleet.blobs, fleet.key, _bundle("1.1.0", 40_000), "1.1.0", ["unix"])
    image_rel = create_release(fleet.store, fleet.blobs, fleet.key, os.urandom(40_000), "1.1.1", ["sim-board"],
                               kind="image")
    start = (proxy.bytes_up, proxy.bytes_down, proxy.cuts)
    for name, value in budget.items():
        setattr(proxy, name, value)  # from now on every connection is cut after that budget
    deps = [create_deployment(fleet.store, bundle_rel, device_ids=[files_dev]),
            create_deployment(fleet.store, image_rel, device_ids=[sim_dev])]
    jobs = [d.jobs[0].id for d in deps]
    for job_id in jobs:
        j = fleet.wait_job(job_id, timeout=180)
        assert j.state == P.CONFIRMED, (j.state, j.code, j.reason)
    fleet.wait_online(files_dev, version="1.1.0", timeout=60)
    fleet.wait_online(sim_dev, version="1.1.1", timeout=60)
    up, down, cuts = (proxy.bytes_up - start[0], proxy.bytes_down - start[1], proxy.cuts - start[2])

    image_bytes = bundle_rel.size + image_rel.size
    assert cuts >= image_bytes // 4096  # the transfer really went through many cut connections
    for dev, rel in ((files_dev, bundle_rel), (sim_dev, image_rel)):
        rec = fleet.boot_record(dev)
        assert rec["active"] == "b" and rec["versions"]["b"] == rel.version and rec["trial"] is None
        assert verify_slot(fleet.root(dev), "b", json.loads(rel.manifest)) == []
        _never_bad(fleet, dev)
        states = [s["state"] for s in fleet.spy.of(dev, deps[0 if dev == files_dev else 1].jobs[0].id)]
        assert states.index(P.VERIFYING) < states.index(P.INSTALLING) < states.index(P.CONFIRMED)
        assert fleet.devices[dev].reboots == 1  # one reboot into the new slot; cuts cost none
    # Nothing lost: no (boot, seq) gap in what the center stored, but for the health reports the
    # devices logged as dropped unsent (superseded by the next connection's).
    gaps = status_gaps(fleet, [files_dev, sim_dev])
    assert gaps["lost"] == [], gaps
    served = sum(fleet.job(j).bytes_served for j in jobs)
    # What the faults cost, against the image bytes (printed; shown with pytest -s).
    print(f"\n{budget}: images {image_bytes} B, cuts {cuts}, proxy->devices {down} B "
          f"({down / image_bytes:.2f}x), devices->proxy {up} B ({up / image_bytes:.2f}x), "
          f"center served {served} B ({served / image_bytes:.2f}x)")
    assert down >= image_bytes and served >= image_bytes


def test_stall_longer_than_the_deadline_fails_with_e_timeout_and_keeps_the_firmware(fleet, proxy):
    dev = "stall-1"
    # stall deadline 3 s: the link goes silent for 8 s once 8000 bytes reached the device
    _add_via_proxy(fleet, proxy, dev, stall_timeout_ms=3000, chunk_timeout_ms=1000)
    fleet.wait_online(dev)
    rel = create_release(fleet.store, fleet.blobs, fleet.key, _bundle("1.2.0", 60_000), "1.2.0", ["unix"])
    # The stall point counts from the device's live connection: its only open one (a stray second
    # connection through this proxy would move the point and let the download through unstalled).
    live = [s for s in proxy.sessions if not s.closed]
    assert len(live) == 1, [(s.number, s.up, s.down, s.closed) for s in proxy.sessions]
    proxy.stall_for = 8.0
    proxy.stall_after = live[0].down + 8000
    t0 = time.monotonic()
    dep = create_deployment(fleet.store, rel, device_ids=[dev])
    j = fleet.wait_job(dep.jobs[0].id, timeout=60)
    sessions = [(s.number, s.up, s.down, s.stalled, s.closed) for s in proxy.sessions]
    assert (j.state, j.code) == (P.FAILED, P.E_TIMEOUT), (j.state, j.code, j.reason, proxy.stall_after, sessions)
    assert "no chunk for 3000 ms" in j.reason
    assert proxy.stalls == 1 and proxy.cuts == 0  # stalled, never cut
    assert time.monotonic() - t0 >= 3.0
    failed = [s for s in fleet.spy.of(dev, j.id) if s["state"] == P.FAILED]
    assert len(failed) == 1 and 0 < failed[0]["bytes"] < rel.size  # it stopped part-way
    # The device keeps its firmware: same slot, nothing on trial, no reboot, still reachable.
    rec = fleet.boot_record(dev)
    assert rec["active"] == "a" and rec["trial"] is None and rec["versions"]["b"] is None
    assert fleet.running_version(dev) == "1.0.0" and fleet.devices[dev].reboots == 0
    assert not (fleet.root(dev) / "journal.json").exists()
    assert not (fleet.root(dev) / "slots" / "b" / "app").exists()
    wait_until(lambda: fleet.device_row(dev).online, timeout=30, what="device online after the stall")
    assert fleet.device_row(dev).version == "1.0.0"


def test_throttled_link_still_completes(fleet, proxy):
    dev = "slow-1"
    rate = 16_000
    proxy.throttle_up = proxy.throttle_down = rate
    _add_via_proxy(fleet, proxy, dev)
    fleet.wait_online(dev)
    rel = create_release(fleet.store, fleet.blobs, fleet.key, _bundle("1.3.0", 32_000), "1.3.0", ["unix"])
    dep = create_deployment(fleet.store, rel, device_ids=[dev])
    j = fleet.wait_job(dep.jobs[0].id, timeout=120)
    assert j.state == P.CONFIRMED, (j.state, j.code, j.reason)
    assert verify_slot(fleet.root(dev), "b", json.loads(rel.manifest)) == []
    _never_bad(fleet, dev)
    # The download really went at the throttled rate: first to last downloading status.
    times = [t for t, d, s in fleet.spy.statuses if d == dev and s.get("job") == j.id]
    states = [s["state"] for t, d, s in fleet.spy.statuses if d == dev and s.get("job") == j.id]
    download = times[states.index(P.VERIFYING)] - times[0]
    assert download >= 0.8 * rel.size / rate, download
    assert proxy.cuts == 0


def test_core_stall_deadline_adds_up_across_reconnects():
    """Connections that each break after 300 ms without a chunk: the 1 s deadline still ends the
    job (it used to restart with every connection, so the device retried for ever)."""
    core = new_core(settings=C.Settings(chunk_timeout=100, stall_timeout=1000))
    core.booted({"trial": None})
    core.tick(0)
    core.connected_()
    core.command(cmd(make_update(SIGNING_KEY, b"x" * 4096)))
    now, failed, connections = 0, [], 1
    while not failed and connections <= 10:
        for _ in range(3):  # 300 ms connected, no chunk
            now += 100
            failed += [a for a in core.tick(now) if a[0] == C.A_PUBLISH and '"failed"' in a[2]]
        if not failed:
            core.disconnected()
            now += 5000  # offline time does not count
            core.tick(now)
            core.connected_()
            connections += 1
    assert failed and json.loads(failed[0][2])["code"] == P.E_TIMEOUT
    assert connections == 4  # 4 x 300 ms > 1000 ms connected


def test_link_that_never_carries_a_whole_chunk_ends_with_e_timeout(tmp_path, broker, sqlite_url, proxy):
    """Chunks of 4 KiB through a link cut every 1800 bytes: no chunk ever arrives whole, not even
    once the device halved them to 2 KiB (§5). The device reports E_TIMEOUT after its stall
    deadline of connected time and keeps its firmware."""
    fleet = Fleet(tmp_path, broker, sqlite_url, chunk=4096)
    try:
        dev = "tiny-link"
        _add_via_proxy(fleet, proxy, dev, stall_timeout_ms=1000, chunk_timeout_ms=500)
        fleet.wait_online(dev)
        rel = create_release(fleet.store, fleet.blobs, fleet.key, _bundle("1.4.0", 20_000), "1.4.0", ["unix"])
        proxy.cut_after_down = 1800  # the command (~1.1 KB) gets through, a 2 KiB chunk never
        dep = create_deployment(fleet.store, rel, device_ids=[dev])
        j = fleet.wait_job(dep.jobs[0].id, timeout=120)
        assert (j.state, j.code) == (P.FAILED, P.E_TIMEOUT), (j.state, j.code, j.reason)
        assert proxy.cuts >= 3
        proxy.cut_after_down = None
        assert fleet.running_version(dev) == "1.0.0" and fleet.boot_record(dev)["trial"] is None
        wait_until(lambda: fleet.device_row(dev).online, timeout=30, what="device back online")
    finally:
        fleet.close()


def test_core_stall_deadline_is_checked_when_connections_die_before_any_tick():
    """A link cut right after the chunk request: the runner never gets to tick the core while
    connected. The deadline is then reached at a reconnect, not after endless reconnects."""
    core = new_core(settings=C.Settings(chunk_timeout=100, stall_timeout=1000))
    core.booted({"trial": None})
    core.tick(0)
    core.connected_(0)
    core.command(cmd(make_update(SIGNING_KEY, b"x" * 4096)))
    now, failed, connections = 0, [], 1
    while not failed and connections <= 100:
        now += 40                       # 40 ms of handshake + request, then the cut
        core.disconnected(now)
        now += 500                      # offline: does not count
        connections += 1
        failed = [a for a in core.connected_(now) if a[0] == C.A_PUBLISH and '"failed"' in a[2]]
    assert failed and json.loads(failed[0][2])["code"] == P.E_TIMEOUT
    assert connections == 27            # the first connection whose start sees > 1000 ms stalled
    assert core.state == P.FAILED or core.state == P.IDLE
