"""The agent in a small heap: a full update at 32 KiB on the 32-bit build with the agent frozen in
(real Mosquitto, the real interpreter), the chunk window sized from the free heap, and chunks read
one at a time into the MQTT client's reused buffer without a message being overwritten while it
waits in the inbox. A smoke test at the target, not a measurement: bench e2e searches the
smallest heap (docs/heap.md)."""
from __future__ import annotations

import json
import os

import pytest

from fota.device import protocol as P
from fota.device.runner import Device, chunk_for_heap, inflight_for_heap, wbits_for_heap
from fota.examples import hello_files
from fota.server.deployments import create_deployment
from fota.server.releases import create_release
from fota.tools.bundle import pack_files
from fota.tools.waiting import TimedOut


@pytest.mark.parametrize("interpreter", ["32-frozen"], indirect=True)
def test_a_full_update_confirms_in_32_kib_and_the_small_heap_asks_for_a_smaller_window(fleet):
    small, large = "heap-32k", "heap-big"
    fleet.add_devices([small], heap="32K")
    fleet.add_devices([large])  # the fleet's default heap
    fleet.wait_online(small, large)
    files = hello_files("1.1.0")
    files["blob.bin"] = os.urandom(64 * 1024)  # incompressible: 32+ chunks of 2 KiB travel
    bundle = pack_files(files)
    rel = create_release(fleet.store, fleet.blobs, fleet.key, bundle, "1.1.0", ["unix"])
    dep = create_deployment(fleet.store, rel, device_ids=[small, large])
    for job in dep.jobs:
        log = fleet.devices[job.device_id].log_text
        try:
            j = fleet.wait_job(job.id, timeout=120)
        except TimedOut:
            pytest.fail(f"{job.device_id}: no outcome; its log:\n{log()[:3000]}")
        assert j.state == "confirmed", (job.device_id, j.state, j.code, j.reason, log()[-3000:])
    fleet.wait_online(small, large, version="1.1.0")
    for d in (small, large):
        assert "MemoryError" not in fleet.devices[d].log_text(), fleet.devices[d].log_text()[-2000:]

    def requested(device):
        return [r for _, dev, r in fleet.spy.requests if dev == device]
    small_reqs, large_reqs = requested(small), requested(large)
    assert small_reqs and large_reqs
    chunk, large_chunk = small_reqs[0]["chunk"], large_reqs[0]["chunk"]
    # Each asks for the chunk size its heap allows (inventory `chunk`): 4 KiB in 32 KiB, 8 KiB in
    # the fleet's heap. The large heap has 16 KiB in flight (DEFAULT_MAX_INFLIGHT); the 32 KiB
    # heap at most half of its heap, and every chunk still arrives (confirmed).
    assert (chunk, large_chunk) == (4096, P.MAX_CHUNK_SIZE)
    assert max(r["count"] * large_chunk for r in large_reqs) == P.DEFAULT_MAX_INFLIGHT
    small_window = max(r["count"] for r in small_reqs)
    assert 1 <= small_window and small_window * chunk <= 32 * 1024 // 2, small_reqs
    assert small_window * chunk < P.DEFAULT_MAX_INFLIGHT
    total = sum(r["count"] for r in small_reqs)
    assert total >= -(-len(bundle) // chunk), (total, len(bundle))


def test_the_default_window_follows_the_free_heap_within_its_bounds():
    sizes = [inflight_for_heap(free) for free in range(0, 200 * 1024, 512)]
    assert sizes == sorted(sizes)                       # more heap, never a smaller window
    assert min(sizes) == 8192 and max(sizes) == P.DEFAULT_MAX_INFLIGHT
    assert inflight_for_heap(20 * 1024) <= 20 * 1024 // 2
    assert inflight_for_heap(None) == P.DEFAULT_MAX_INFLIGHT  # CPython: no heap limit to follow


def test_the_chunk_size_a_device_asks_for_follows_the_free_heap():
    sizes = [chunk_for_heap(free) for free in range(0, 200 * 1024, 512)]
    assert sizes == sorted(sizes)                       # more heap, never a smaller chunk
    assert min(sizes) == P.DEFAULT_CHUNK_SIZE and max(sizes) == P.MAX_CHUNK_SIZE
    assert chunk_for_heap(16 * 1024) == P.DEFAULT_CHUNK_SIZE  # 28..30 KiB heaps: the old buffer size
    assert chunk_for_heap(17 * 1024) == 4096                  # 31..32 KiB heaps on 32-frozen
    assert chunk_for_heap(None) == P.MAX_CHUNK_SIZE     # CPython: no heap limit to follow


def test_the_default_delta_window_follows_the_free_heap_within_its_bounds():
    wbits = [wbits_for_heap(free) for free in range(0, 200 * 1024, 512)]
    assert wbits == sorted(wbits)                       # more heap, never a smaller window
    assert min(wbits) == 9 and max(wbits) == P.DELTA_WBITS
    assert all(1 << w <= max(free // 16, 512) for w, free in zip(wbits, range(0, 200 * 1024, 512)))
    assert wbits_for_heap(19 * 1024) == 10             # a 36 KiB heap on the 32-bit build at boot
    assert wbits_for_heap(None) == P.DELTA_WBITS        # CPython: no heap limit to follow


def test_a_configured_delta_window_overrides_the_heap_default_and_0_still_means_no_deltas(tmp_path):
    for configured in (11, 0):
        device = _device(tmp_path / str(configured), delta_wbits=configured)
        device.boot()
        assert device.core.delta_wbits == configured
        assert json.loads(device.core.inventory()[2])["delta_wbits"] == configured  # what the center reads


def test_a_configured_max_inflight_overrides_the_heap_default(tmp_path):
    device = _device(tmp_path, max_inflight=2048)
    device.boot()
    assert device.core.settings.max_inflight == 2048


def _device(tmp_path, **settings) -> Device:
    from fota.tools.devicedir import create_device_dir
    from fota.tools.signing import public_key_bytes
    from test_core import ROOT_KEY, TRUST
    root = create_device_dir(tmp_path / "dev", device_id="inbox-1", hardware="unix",
                             root_key=public_key_bytes(ROOT_KEY), trust=TRUST, host="127.0.0.1", port=1,
                             password="pw", app_files={"app.py": b"VERSION = '1.0.0'\n"}, version="1.0.0",
                             **settings)
    return Device(str(root), app_loader=lambda d: None)


def test_a_message_that_waits_in_the_inbox_is_a_copy_of_the_reused_buffer(tmp_path):
    """The client hands a large payload as a view of the buffer it reads the next one into. Only
    the chunk poll() reads for the core to take at once stays a view; a chunk queued behind
    another, one that arrives while a publish waits for its PUBACK, and any command are copies."""
    device = _device(tmp_path)
    data, cmd = device._data_topic, device._cmd_topic
    buf = bytearray(b"A" * 2056)
    view = memoryview(buf)

    device._borrow = True                      # poll(): read one, dispatch it at once
    device._on_message(data, view, 0)
    assert device.inbox[-1][1] is view
    device._on_message(data, view, 0)          # a second one behind it: copied
    device._on_message(cmd, view, 7)           # a command: copied (parsed as bytes)
    device._borrow = False                     # a publish waiting for its PUBACK: copied
    device._on_message(data, view, 0)
    buf[:] = b"B" * len(buf)                   # the client reads the next payload
    kept = [m[1] for m in device.inbox[1:]]
    assert all(isinstance(p, bytes) and p == b"A" * 2056 for p in kept), [type(p) for p in kept]
    assert device.inbox[2][0] == cmd and device.inbox[2][2] == 7


def test_a_step_that_read_a_message_says_more_may_wait_so_the_asyncio_loop_does_not_sleep(tmp_path):
    """A step reads one message; the rest wait in the socket, where the inbox does not show them.
    The board runner's busy() (the asyncio runner's cue to step again at once) is true after a
    step that read one, and false after one that read nothing or lost the connection."""
    from fota.device.board import BoardDevice

    class OneAtATime:
        def __init__(self, waiting):
            self.waiting = waiting
            self.payload_buffer = device.payload_buffer

        def check_msg(self, timeout_ms=0, limit=0):
            assert limit == 1
            if not self.waiting:
                return 0
            self.waiting -= 1
            return 1  # a PUBLISH the device does not subscribe to: nothing for the inbox

        def close(self):
            pass

    device = _device(tmp_path)
    device.boot()
    device.client = OneAtATime(2)
    busy = []
    for _ in range(3):
        device.poll(0)
        busy.append(BoardDevice.busy(device))
    assert busy == [True, True, False]
    device.client = OneAtATime(1)
    device.poll(0)
    assert BoardDevice.busy(device)
    device._drop_connection()
    assert not BoardDevice.busy(device)
