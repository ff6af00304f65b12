"""The battery gate in the sans-IO core (CPython): an update that needs more battery than the
device has is postponed (E_LOW_BATTERY) before its download or before its install, survives a
restart, and goes on once the power reading is enough. docs/protocol.md §5.1."""
import hashlib
import json
import struct

import pytest

from fota.device import core as C
from fota.device import protocol as P
from fota.tools import signing
from test_core import SIGNING_KEY, Harness, cmd, make_update, new_core

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
