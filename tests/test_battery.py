"""The battery gate in the sans-IO core (CPython): an update that needs more battery than the
device has is postponed (E_LOW_BATTERY) before its download or before its install, survives a
restart, and goes on once the power reading is enough. docs/protocol.md §5.1."""
import hashlib
import json
import os
import struct
import time

import pytest

from fota.device import core as C
from fota.device import protocol as P
from fota.examples import hello_files
from fota.server.deployments import create_deployment, device_history
from fota.server.releases import create_release
from fota.testkit.fleet import Fleet
from fota.tools.waiting import wait_until
from fota.tools import signing
from fota.tools.bundle import pack_files
from test_core import SIGNING_KEY, Harness, cmd, make_update, new_core, transitions  # noqa: F401 (autouse)

IMAGE = bytes(range(256)) * 12 + b"tail"  # 13 chunks of 256


def update(job=1, min_battery=None, manifest_min=None, image=IMAGE):
    body = make_update(SIGNING_KEY, image, job=job, chunk=256, window=4)
    if manifest_min is not None:  # re-sign the manifest with a minimum of its own
        manifest = json.loads(body["manifest"])
        manifest["min_battery"] = manifest_min
        body["manifest"] = json.dumps(manifest, sort_keys=True)
        body["manifest_sig"] = signing.sign(SIGNING_KEY, body["manifest"].encode()).hex()
    if min_battery is not None:
        body["min_battery"] = min_battery
    return cmd(body)


def harness(battery, external=False):
    h = Harness(SIGNING_KEY)
    h.run(h.core.power(battery, external))
    h.published.clear()
    return h


def kinds(actions):
    return [a[0] for a in actions]


def test_low_battery_postpones_before_anything_is_written_then_resumes():
    h = harness(20)
    h.run(h.core.command(update(min_battery=50)))
    st = h.statuses()[-1]
    assert (st["state"], st["code"], st["battery"], st["min_battery"]) == ("postponed", P.E_LOW_BATTERY, 20, 50)
    assert "20%" in st["reason"] and "50%" in st["reason"]
    assert h.core.state == P.POSTPONED and h.began == 0 and h.requests() == []
    assert h.journal == {"cmd": h.journal["cmd"], "pos": 0, "postponed": True}
    assert h.state_saved["last_job"] == 1  # accepted: a redelivery is a duplicate
    # No deadline while postponed; readings still too low change nothing and report nothing.
    assert h.core.tick(10_000_000) == []
    assert h.core.power(49, False) == [h.core.inventory()]  # moved >= 5 points: inventory only
    assert h.core.power(48, False) == []
    assert h.core.state == P.POSTPONED and h.began == 0
    # Enough battery: the download starts from chunk 0.
    h.run(h.core.power(50, False))
    assert h.core.state == P.DOWNLOADING and h.began == 1
    assert h.requests()[0]["first"] == 0 and h.journal == {"cmd": h.journal["cmd"], "pos": 0}
    h.serve(IMAGE, 256)
    assert bytes(h.slot) == IMAGE and h.rebooted
    states = [s["state"] for s in h.statuses()]
    assert states[0] == "postponed" and states[-4:] == ["downloading", "verifying", "installing", "rebooting"]


def test_the_stricter_minimum_of_manifest_and_command_applies():
    h = harness(60)
    h.run(h.core.command(update(min_battery=30, manifest_min=70)))
    st = h.statuses()[-1]
    assert (st["state"], st["min_battery"]) == ("postponed", 70)
    h = harness(60)
    h.run(h.core.command(update(min_battery=65, manifest_min=10)))
    assert h.statuses()[-1]["min_battery"] == 65


@pytest.mark.parametrize("battery, external", [(5, True), (None, False), (80, False)])
def test_external_power_unmeasured_or_enough_battery_is_not_held_back(battery, external):
    h = harness(battery, external)
    h.run(h.core.command(update(min_battery=50)))
    assert h.core.state == P.DOWNLOADING and h.began == 1
    assert [s["state"] for s in h.statuses()] == ["downloading"]


def test_battery_dropping_during_the_download_holds_the_install():
    h = harness(90)
    h.run(h.core.command(update(min_battery=50)))
    # Half the image, then the battery drops: the download goes on, the install does not start.
    for i in range(6):
        h.run(h.core.chunk(struct.pack(">II", 1, i) + IMAGE[i * 256:(i + 1) * 256]))
    h.run(h.core.power(30, False))
    installs = []
    original = h.core.installed

    def spy_installed(*a):
        installs.append(a)
        return original(*a)
    h.core.installed = spy_installed
    h.serve(IMAGE, 256)
    assert bytes(h.slot) == IMAGE
    st = h.statuses()[-1]
    assert (st["state"], st["code"], st["bytes"], st["total"]) == ("postponed", P.E_LOW_BATTERY, len(IMAGE), len(IMAGE))
    assert installs == [] and not h.rebooted and h.trial is None
    assert h.journal["postponed"] and h.journal["pos"] == 13
    h.run(h.core.power(55, False))
    assert installs == [(None, None)] and h.rebooted and h.trial["job"] == 1
    assert [s["state"] for s in h.statuses()][-4:] == ["verifying", "postponed", "installing", "rebooting"]


def _restart(journal, hasher, battery):
    h = Harness(SIGNING_KEY, agent={"last_job": 1, "boot": 2})
    h.core = new_core(agent={"last_job": 1, "boot": 2})
    h.core.battery = battery
    h.published.clear()
    h.run(h.core.booted({"trial": None}, journal, hasher))
    h.run(h.core.connected_())
    return h


def test_postponed_jobs_survive_a_restart():
    # Postponed before the download: nothing in the slot yet.
    h = harness(10)
    h.run(h.core.command(update(min_battery=40)))
    h2 = _restart(h.journal, hashlib.sha256(), battery=10)
    assert h2.core.state == P.POSTPONED and h2.requests() == [] and h2.began == 0
    h2.run(h2.core.power(45, False))
    assert h2.core.state == P.DOWNLOADING and h2.began == 1 and h2.requests()[0]["first"] == 0
    # Postponed before the install: the slot holds the verified image, re-hashed at boot.
    h = harness(10)
    h.core.external = True
    h.run(h.core.command(update(min_battery=40)))
    h.run(h.core.power(10, False))
    h.serve(IMAGE, 256)
    assert h.core.state == P.POSTPONED
    h3 = _restart(h.journal, hashlib.sha256(IMAGE), battery=10)
    assert h3.core.state == P.POSTPONED and h3.requests() == []
    installs = []
    h3.core.installed = lambda *a: installs.append(a) or []
    h3.run(h3.core.power(100, False))
    assert installs == [(None, None)] and h3.statuses()[-1]["state"] == "installing"
    # ... and an image that changed in the slot meanwhile is not installed.
    h4 = _restart(h.journal, hashlib.sha256(IMAGE[:-1] + b"X"), battery=100)
    st = h4.statuses()[0]
    assert (st["state"], st["code"]) == ("failed", P.E_HASH_MISMATCH)
    assert h4.core.state == P.IDLE and h4.journal is None


def test_cancel_or_a_newer_update_ends_a_postponed_job():
    h = harness(10)
    h.run(h.core.command(update(job=1, min_battery=40)))
    h.run(h.core.command(cmd({"type": "cancel", "job": 2, "device": "d1", "target": 1})))
    st = h.statuses()[-1]
    assert (st["state"], st["job"]) == ("cancelled", 1) and h.core.state == P.IDLE and h.journal is None
    h.run(h.core.command(update(job=3, min_battery=40)))
    h.run(h.core.command(update(job=4)))
    assert [(s["job"], s["state"]) for s in h.statuses()[-3:]] == [(3, "postponed"), (3, "cancelled"), (4, "downloading")]


@pytest.mark.parametrize("bad", [101, -1, "50", True, 12.5])
def test_bad_minimums_are_refused(bad):
    h = harness(100)
    h.run(h.core.command(update(min_battery=bad)))
    st = h.statuses()[-1]
    assert (st["state"], st["code"]) == ("rejected", P.E_BAD_COMMAND) and "min_battery" in st["reason"]
    h = harness(100)
    h.run(h.core.command(update(manifest_min=bad)))
    st = h.statuses()[-1]
    assert (st["state"], st["code"]) == ("failed", P.E_BAD_MANIFEST) and "min_battery" in st["reason"]
    assert h.began == 0


def test_inventory_reports_power_and_its_changes():
    h = harness(None)
    inv = json.loads(h.core.inventory()[2])
    assert (inv["battery"], inv["external"]) == (None, False)
    assert kinds(h.core.power(50, False)) == [C.A_PUBLISH]   # now measured
    assert h.core.power(53, False) == []                     # < 5 points
    assert kinds(h.core.power(55, False)) == [C.A_PUBLISH]   # 5 points from the last report
    assert kinds(h.core.power(55, True)) == [C.A_PUBLISH]    # plugged in
    assert json.loads(h.core.power(55, False)[0][2])["external"] is False


# ---- end to end: a MicroPython device whose battery changes at run time ---------------------------

def set_power(root, battery, external=False):
    """What a board's fuel gauge would say: the unix port's power.json, replaced atomically."""
    tmp = root / "power.json.tmp"
    tmp.write_text(json.dumps({"battery": battery, "external": external}))
    os.replace(tmp, root / "power.json")


def test_device_postpones_until_its_battery_is_charged(tmp_path, broker, sqlite_url):
    # Small chunks, one at a time: the second device's download lasts long enough (seconds) to
    # drain its battery halfway.
    fleet = Fleet(tmp_path, broker, sqlite_url, chunk=256, window=1)
    try:
        low, drained = "batt-low", "batt-drain"
        for dev in (low, drained):
            fleet.add_device(dev, start=False, power_poll_ms=200)
        set_power(fleet.root(low), 15)
        set_power(fleet.root(drained), 90)
        for dev in (low, drained):
            fleet.devices[dev].start()
        fleet.wait_online(low, drained)
        wait_until(lambda: fleet.device_row(low).inventory.get("battery") == 15, what="battery in the inventory")
        files = hello_files("2.0.0")
        files["blob.bin"] = os.urandom(150_000)
        rel = create_release(fleet.store, fleet.blobs, fleet.key, pack_files(files), "2.0.0", ["unix"])

        # 1. Too low from the start: postponed, nothing downloaded or written.
        dep = create_deployment(fleet.store, rel, device_ids=[low], min_battery=40)
        job = dep.jobs[0].id
        j = wait_until(lambda: (j := fleet.job(job)).state == "postponed" and j, what="postponed")
        assert j.code == P.E_LOW_BATTERY and "15%" in j.reason and "40%" in j.reason
        set_power(fleet.root(low), 30)  # charging, not there yet
        wait_until(lambda: fleet.device_row(low).inventory.get("battery") == 30, what="battery 30 reported")
        time.sleep(0.5)
        assert fleet.job(job).state == "postponed" and fleet.job(job).bytes_served == 0
        assert not (fleet.root(low) / "slots" / "b" / "image.bin").exists()
        set_power(fleet.root(low), 45)
        j = fleet.wait_job(job, timeout=90)
        assert j.state == "confirmed", (j.state, j.code, j.reason)
        fleet.wait_online(low, version="2.0.0")
        assert fleet.devices[low].reboots == 1
        states = [e.state for e in device_history(fleet.store, low) if e.job_id == job]
        assert states[0] == "postponed" and states.count("postponed") == 1 and states[-1] == "confirmed"

        # 2. Drained during the download: the image is fetched and verified, the install waits.
        dep = create_deployment(fleet.store, rel, device_ids=[drained], min_battery=50)
        job = dep.jobs[0].id
        wait_until(lambda: fleet.job(job).state == "downloading" and fleet.job(job).progress >= 0.2,
                   timeout=60, interval=0.02, what="20% downloaded")
        set_power(fleet.root(drained), 20)
        j = wait_until(lambda: (j := fleet.job(job)).state == "postponed" and j, timeout=90, what="install postponed")
        assert j.code == P.E_LOW_BATTERY and j.progress == 1.0
        time.sleep(1.0)
        assert fleet.devices[drained].reboots == 0 and fleet.running_version(drained) == "1.0.0"
        assert not (fleet.root(drained) / "slots" / "b" / "app").exists()  # not installed
        set_power(fleet.root(drained), 20, external=True)  # plugged in
        j = fleet.wait_job(job, timeout=60)
        assert j.state == "confirmed", (j.state, j.code, j.reason)
        assert fleet.running_version(drained) == "2.0.0" and fleet.devices[drained].reboots == 1
        served = fleet.job(job).bytes_served
        assert served < rel.size + 4 * 512 * 2  # the image was not fetched twice
    finally:
        fleet.close()
