"""Kill -9 of real MicroPython agents: the exact states two kills left behind that the kill sweep
(bench/killsweep.py, 200+ kills; bench/tests/test_killsweep.py runs a sample) found, and the core's
side of the fix."""
from __future__ import annotations

import hashlib
import json
import os
import struct
import time

import pytest

from fota.device import boot as bootrec
from fota.device import core as C
from fota.device import protocol as P
from fota.server.deployments import create_deployment
from fota.server.releases import create_release, update_command
from fota.testkit.devices import verify_slot
from fota.testkit.faultproxy import FaultProxy
from fota.testkit.fleet import bundle_of_size
from fota.tools.waiting import wait_until

from conftest import both_interpreters
from test_core import Harness, cmd, make_update, new_core, transitions, trust_doc  # noqa: F401 (autouse)

OTHER_KEY = __import__("fota.tools.signing", fromlist=["x"]).generate_private_key()


# ---------------------------------------------------------------- the core (CPython, no I/O)

def _half_download(key, image):
    h = Harness(key)
    h.run(h.core.command(cmd(make_update(key, image, chunk=256, window=4))))
    for i in range(6):
        h.run(h.core.chunk(struct.pack(">II", 1, i) + image[i * 256:(i + 1) * 256]))
    assert h.journal["pos"] == 4
    return h.journal


def test_resume_without_a_readable_slot_downloads_the_job_again(key):
    image = os.urandom(4096)
    journal = _half_download(key, image)
    core = new_core(agent={"last_job": 1, "boot": 2})
    actions = core.booted({"trial": None}, journal, None)  # the runner could not re-hash the slot
    assert (C.A_BEGIN, len(image), None) in actions
    assert (C.A_JOURNAL, {"cmd": journal["cmd"], "pos": 0}) in actions
    h = Harness(key)
    h.core, h.slot, h.published = core, bytearray(), []
    h.run(core.connected_())
    assert h.requests()[0]["first"] == 0
    h.serve(image, 256)
    assert bytes(h.slot) == image and h.rebooted and h.trial["job"] == 1


def test_journalled_job_that_no_longer_verifies_is_reported_not_dropped(key):
    journal = _half_download(key, os.urandom(4096))
    # The trust document no longer certifies the key that signed the release.
    core = new_core(agent={"last_job": 1, "boot": 2}, trust=trust_doc(OTHER_KEY))
    actions = core.booted({"trial": None}, journal, hashlib.sha256())
    assert (C.A_JOURNAL, None) in actions
    statuses = [json.loads(a[2]) for a in actions if a[0] == C.A_PUBLISH and a[1] == P.STATUS]
    assert [(s["job"], s["state"], s["code"]) for s in statuses] == [(1, P.FAILED, P.E_UNKNOWN_KEY)]
    assert core.state == P.IDLE and core.job is None


def test_accepted_update_persists_its_journal_before_the_job_id(key):
    """A kill between persisting the job id and the journal lost the job: the redelivered
    command was a duplicate and nothing was in progress. The journal (holding the command) now
    goes first; a kill between the two resumes it, and the redelivery stays a duplicate."""
    image = os.urandom(2048)
    core = new_core()
    core.booted({"trial": None})
    core.connected_()
    command = cmd(make_update(key, image, job=7))
    actions = core.command(command)
    kinds = [a[0] for a in actions]
    at = kinds.index(C.A_STATE)
    assert kinds[:at + 1] == [C.A_BEGIN, C.A_JOURNAL, C.A_STATE] and actions[at][1]["last_job"] == 7
    journal = actions[1][1]
    # killed right after the journal: agent.json still says job 6
    again = new_core(agent={"last_job": 6, "boot": 2})
    boot = again.booted({"trial": None}, journal, hashlib.sha256())
    assert boot[0] == (C.A_STATE, {"last_job": 7, "boot": 2, "time": again.time, "epoch": 0})
    assert again.state == P.DOWNLOADING and again.job.id == 7
    again.connected_()
    st = [json.loads(a[2]) for a in again.command(command) if a[0] == C.A_PUBLISH]
    assert [(s["state"], s["code"]) for s in st] == [(P.REJECTED, P.E_DUPLICATE_JOB)]
    assert again.state == P.DOWNLOADING and again.job.id == 7  # not superseded by itself


def test_a_job_the_agent_failed_at_three_times_in_a_row_ends_E_CRASH_at_the_next_boot(key):
    journal = _half_download(key, os.urandom(4096))
    # Two failures at this checkpoint: the job resumes (a third try).
    again = new_core(agent={"last_job": 1, "boot": 2})
    again.booted({"trial": None}, dict(journal, crash=[P.MAX_CRASHES - 1, 4, "MemoryError: x"]), hashlib.sha256())
    assert again.state == P.DOWNLOADING and again.job.id == 1
    # The third: the next boot ends the job instead of resuming it into the same failure.
    core = new_core(agent={"last_job": 1, "boot": 3})
    actions = core.booted({"trial": None}, dict(journal, crash=[P.MAX_CRASHES, 4, "MemoryError: x"]),
                          hashlib.sha256())
    assert (C.A_JOURNAL, None) in actions and not any(a[0] == C.A_BEGIN for a in actions)
    statuses = [json.loads(a[2]) for a in actions if a[0] == C.A_PUBLISH and a[1] == P.STATUS]
    assert [(s["job"], s["state"], s["code"]) for s in statuses] == [(1, P.FAILED, P.E_CRASH)]
    assert "3 times in a row at chunk 4" in statuses[0]["reason"] and "MemoryError: x" in statuses[0]["reason"]
    assert core.state == P.IDLE and core.job is None


@pytest.fixture(scope="module")
def key():
    from test_core import SIGNING_KEY
    return SIGNING_KEY


# ---------------------------------------------------------------- real agents, exact kill states

@pytest.fixture
def proxy(broker):
    """A fault proxy in front of the broker, throttled to 100 KB/s towards the device."""
    p = FaultProxy(broker.port, throttle_down=100_000).start_thread()
    yield p
    p.stop_thread()


def _restart(fleet, dev):
    """A new supervisor on the same device directory (the old one was stopped)."""
    proc = fleet.process(fleet.root(dev))
    fleet.devices[dev] = proc
    return proc.start()


@both_interpreters
def test_kill_after_unpacking_before_the_trial_mark_still_completes_the_job(fleet, proxy):
    """A kill after the files backend unpacked the bundle and deleted image.bin, before the trial
    was marked, leaves a journal whose slot cannot be re-read. The job used to stay 'installing'
    forever; now the agent downloads it again and confirms."""
    dev = "kill-unpacked"
    # Through a throttled proxy: at full speed the 600 KB download can end (and the journal
    # go) before the test has seen it start and stopped the agent.
    fleet.add_device(dev, port=proxy.port)
    fleet.wait_online(dev)
    rel = create_release(fleet.store, fleet.blobs, fleet.key, bundle_of_size("4.0.0", 600_000), "4.0.0", ["unix"])
    dep = create_deployment(fleet.store, rel, device_ids=[dev])
    job = dep.jobs[0].id
    wait_until(lambda: any(s["state"] == P.DOWNLOADING for s in fleet.spy.of(dev, job)), what="download start")
    fleet.devices[dev].stop()
    root = fleet.root(dev)
    assert (root / "journal.json").exists()
    (root / "slots" / "b" / "image.bin").unlink()  # what finalize() does last
    proxy.throttle_down = None
    _restart(fleet, dev)
    j = fleet.wait_job(job, timeout=60)
    assert j.state == P.CONFIRMED, (j.state, j.code, j.reason)
    assert "starting the download over" in fleet.devices[dev].log_text()
    assert verify_slot(root, "b", json.loads(rel.manifest)) == []
    assert fleet.running_version(dev) == "4.0.0" and not (root / "journal.json").exists()


@both_interpreters
def test_kill_between_trial_mark_and_journal_delete_leaves_the_fallback_slot_alone(fleet):
    """The state a kill leaves between A_SET_TRIAL and deleting the journal, on the sim flash
    backend: the trial boot used to resume the journal into the *other* slot (the one it falls
    back to), erasing a sector of it, and kept the journal for a later boot."""
    dev = "kill-marked"
    slot = 64 * 1024
    fleet.add_device(dev, hardware="sim-board", backend="sim", capacity=slot)
    fleet.wait_online(dev)
    fleet.devices[dev].stop()
    root = fleet.root(dev)
    image = os.urandom(20_000)
    rel = create_release(fleet.store, fleet.blobs, fleet.key, image, "5.0.0", ["sim-board"], kind="image")
    job = 4242  # not a control-center job: the statuses are checked on the wire
    old_firmware = os.urandom(slot)
    with open(root / "flash.bin", "r+b") as f:
        f.write(old_firmware)                  # slot a: what the device falls back to
        f.seek(slot)
        f.write(image)                         # slot b: the verified, installed image
    body = json.loads(json.loads(update_command(job, dev, rel, fleet.signer))["body"])
    (root / "journal.json").write_text(json.dumps({"cmd": body, "pos": 4}))
    record = json.loads((root / "boot.json").read_text())
    bootrec.set_trial(record, job, "5.0.0", 0)
    (root / "boot.json").write_text(json.dumps(record))
    agent = json.loads((root / "agent.json").read_text())
    agent["last_job"] = job
    (root / "agent.json").write_text(json.dumps(agent))

    _restart(fleet, dev)
    wait_until(lambda: any(s["state"] == P.CONFIRMED for s in fleet.spy.of(dev, job)), timeout=30,
               what="confirmed")
    time.sleep(0.3)
    rec = fleet.boot_record(dev)
    assert rec["active"] == "b" and rec["trial"] is None
    assert not (root / "journal.json").exists()
    flash = (root / "flash.bin").read_bytes()
    assert flash[:slot] == old_firmware  # the fallback slot is untouched
    assert verify_slot(root, "b", json.loads(rel.manifest), capacity=slot) == []
    # Restarting again does not resume the finished job.
    fleet.devices[dev].kill(wait=True)
    wait_until(lambda: fleet.devices[dev].starts >= 2 and fleet.device_row(dev).online, timeout=30,
               what="restart")
    time.sleep(0.5)
    assert [s for s in fleet.spy.of(dev, job) if s["state"] not in (P.TRIAL, P.CONFIRMED)] == []
    assert (root / "flash.bin").read_bytes()[:slot] == old_firmware


def test_command_queued_while_offline_is_acknowledged_once_handled(fleet):
    """A persistent session hands its queued command over while the agent is still subscribing,
    before the runner has a client: it was never acknowledged, so every later connection got it
    again (a rejected E_DUPLICATE_JOB each time, and ~2 KB of every cut-short connection)."""
    dev = "queued-cmd"
    fleet.add_device(dev)
    fleet.wait_online(dev)
    fleet.devices[dev].stop()
    wait_until(lambda: not fleet.device_row(dev).online, timeout=30, what="offline")
    rel = create_release(fleet.store, fleet.blobs, fleet.key, bundle_of_size("6.0.0", 8_000), "6.0.0", ["unix"])
    center = fleet.center.center
    center.require_online = False  # send now, into the broker's queue for the offline device
    dep = create_deployment(fleet.store, rel, device_ids=[dev])
    job = dep.jobs[0].id
    wait_until(lambda: fleet.job(job).state == "sent", timeout=30, what="command queued")
    _restart(fleet, dev)
    assert fleet.wait_job(job, timeout=60).state == P.CONFIRMED
    for _ in range(2):  # two more connections of the same session
        fleet.devices[dev].kill(wait=True)
        wait_until(lambda: fleet.device_row(dev).online, timeout=30, what="back online")
        time.sleep(0.5)
    assert [s for s in fleet.spy.of(dev, job) if s["state"] == "rejected"] == []


# An app whose tick() fails (a MemoryError in the real case: the app and the agent share the heap)
# whenever a download is journalled: the agent fails at the same checkpoint at every boot.
FAILS_WHILE_DOWNLOADING = b"""
import os
VERSION = "1.0.0"
def start():
    print("hungry app started")
def tick():
    try:
        os.stat(JOURNAL)
    except OSError:
        return
    raise MemoryError("the app's buffer while a download runs")
"""


@both_interpreters
def test_an_agent_that_fails_at_the_same_point_at_every_boot_ends_the_job_not_a_restart_loop(fleet):
    """The agent fails three times in a row at the same checkpoint (here its app's tick raises
    MemoryError while the download is journalled): the third restart ends the job failed E_CRASH
    with the error in its reason, the device keeps running 1.0.0 and stays online, and a later
    update (the app no longer failing) goes through."""
    dev = "crash-loop"
    fleet.add_devices([dev], start=False, max_restarts=20)
    root = fleet.root(dev)
    app = [p for p in root.rglob("app.py") if "slots" in str(p)]
    assert app, list(root.rglob("*"))
    for p in app:
        p.write_bytes(FAILS_WHILE_DOWNLOADING.replace(b"JOURNAL", repr(str(root / "journal.json")).encode()))
    fleet.devices[dev].start()
    fleet.wait_online(dev)
    rel = create_release(fleet.store, fleet.blobs, fleet.key, bundle_of_size("1.1.0", 48 * 1024), "1.1.0", ["unix"])
    job = create_deployment(fleet.store, rel, device_ids=[dev]).jobs[0]
    j = fleet.wait_job(job.id, timeout=120)
    log = fleet.devices[dev].log_text()
    assert (j.state, j.code) == ("failed", P.E_CRASH), (j.state, j.code, j.reason, log[-3000:])
    assert "3 times in a row" in j.reason and "MemoryError" in j.reason, j.reason
    assert log.count("agent failure") == P.MAX_CRASHES, log[-3000:]
    fleet.wait_online(dev, version="1.0.0")
    assert not (root / "journal.json").exists()
