"""Command expiry and boot epochs, end to end: control center, real Mosquitto, real MicroPython
devices (docs/protocol.md §4 step 7, §6 `epoch`, §9)."""
from __future__ import annotations

import time

import pytest

from fota.device import protocol as P
from fota.examples import hello_files
from fota.server.deployments import create_deployment, device_history
from fota.server.releases import create_release
from fota.testkit.fleet import Fleet
from fota.tools.waiting import wait_until
from fota.tools.bundle import pack_files
from fota.tools.supervisor import DeviceProcess

TTL = 2  # s: the center's command TTL in these tests


def _release(fleet, version):
    return create_release(fleet.store, fleet.blobs, fleet.key, pack_files(hello_files(version)), version, ["unix"])


@pytest.fixture
def sleepy_fleet(tmp_path, broker, sqlite_url):
    # require_online=False: the command goes to the sleeping device's broker session at once.
    f = Fleet(tmp_path, broker, sqlite_url, command_ttl=TTL, require_online=False)
    yield f
    f.close()


def test_a_device_asleep_past_the_command_ttl_still_gets_its_update(sleepy_fleet):
    """The queued command expired while the device slept: the device refuses it (E_EXPIRED,
    by its clock), the center signs the job again, and the fresh copy is taken and confirmed."""
    fleet = sleepy_fleet
    dev = "sleepy-1"
    fleet.add_device(dev)
    fleet.wait_online(dev)
    fleet.devices[dev].stop()  # asleep: its persistent session keeps what is published
    wait_until(lambda: not fleet.device_row(dev).online, what=f"{dev} offline")
    dep = create_deployment(fleet.store, _release(fleet, "2.0.0"), device_ids=[dev])
    job = dep.jobs[0].id
    fleet.wait_job(job, states=("sent",))
    time.sleep(TTL + 1.5)  # exp = time + TTL, in whole seconds
    fleet.devices[dev] = DeviceProcess(fleet.root(dev), heap=fleet.heap).start()  # wakes up
    assert fleet.wait_job(job, timeout=60).state == "confirmed"
    refused = [s for s in fleet.spy.of(dev, job) if s["state"] == "rejected"]
    assert [s["code"] for s in refused] == [P.E_EXPIRED], fleet.spy.of(dev, job)
    assert fleet.running_version(dev) == "2.0.0"
    fleet.wait_online(dev, version="2.0.0")


def test_a_reprovisioned_device_whose_counters_start_over_is_heard(fleet):
    """Flash erased and provisioned again with the same id: boot and seq start over, in a new
    epoch; its statuses are stored (not taken for duplicates) and its new job is confirmed."""
    dev = "reprov-1"
    fleet.add_device(dev)
    fleet.wait_online(dev)
    first = create_deployment(fleet.store, _release(fleet, "2.0.0"), device_ids=[dev])
    assert fleet.wait_job(first.jobs[0].id).state == "confirmed"
    fleet.wait_online(dev, version="2.0.0")
    before = {(e.epoch, e.boot, e.seq) for e in device_history(fleet.store, dev)}
    (old_epoch,) = {epoch for epoch, _, _ in before}
    assert old_epoch != 0

    fleet.reprovision(dev)
    fleet.wait_online(dev, version="1.0.0")
    second = create_deployment(fleet.store, _release(fleet, "2.1.0"), device_ids=[dev])
    assert fleet.wait_job(second.jobs[0].id).state == "confirmed"
    after = [(e.epoch, e.boot, e.seq) for e in device_history(fleet.store, dev)
             if (e.epoch, e.boot, e.seq) not in before]
    (new_epoch,) = {epoch for epoch, _, _ in after}
    assert new_epoch not in (0, old_epoch)
    # the counters did start over: without the epoch these would have been duplicates
    assert {(b, s) for _, b, s in after} & {(b, s) for _, b, s in before}


def test_the_agent_keeps_its_epoch_across_boots_and_picks_a_new_one_when_erased(tmp_path):
    """§10: the epoch is chosen with the agent state (first start, or agent.json gone) and kept
    with the boot counter; every status carries it."""
    import json
    from fota.device import core as C
    from fota.device.runner import Device
    from fota.tools.devicedir import create_device_dir
    from fota.tools.keyring import Keyring
    ring = Keyring(tmp_path / "keys")
    ring.init()
    root = create_device_dir(tmp_path / "dev", device_id="ep-1", hardware="unix", root_key=ring.root_public(),
                             trust=ring.trust(), host="127.0.0.1", port=1, password="pw",
                             app_files=hello_files("1.0.0"), version="1.0.0")

    def start():
        device = Device(str(root), app_loader=lambda app_dir: None)
        device.boot()
        agent = json.loads((root / "agent.json").read_text())
        statuses = [json.loads(a[2]) for a in device.core.connected_(0) if a[0] == C.A_PUBLISH and a[1] == P.STATUS]
        assert {(s["epoch"], s["boot"]) for s in statuses} == {(agent["epoch"], agent["boot"])}
        return agent["epoch"], agent["boot"]

    first, boot = start()
    assert 1 <= first <= P.MAX_EPOCH and boot == 1
    assert start() == (first, 2)
    (root / "agent.json").unlink()  # erased: counters start over, in a new epoch
    again, boot = start()
    assert boot == 1 and again != first
