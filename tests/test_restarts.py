"""Never lose: broker restarts, control-center restarts and sleepy devices in the middle of a
deployment, with real Mosquitto (persistence on), real MicroPython devices and a real database.

Statuses are counted twice: every status a device generates carries (boot, seq), seq counting
1, 2, 3, ... per boot, so a gap in the stored sequence is a lost status; and a persistent spy
(its own broker session, re-subscribing after each reconnect) records what went over the
broker, which must equal what the database holds.
"""
from __future__ import annotations

import json
import os
import threading
import time

import pytest
from sqlalchemy import select

from fota.examples import hello_files
from fota.server.broker import SERVER_USER, Mosquitto
from fota.server.deployments import create_deployment, deployment_summary
from fota.server.releases import create_release
from fota.server.store import StatusEvent
from fota.testkit.brokerspy import BrokerSpy
from fota.testkit.center import CenterThread
from fota.testkit.faultproxy import FaultProxy
from fota.testkit.faults import status_gaps
from fota.testkit.fleet import Fleet
from fota.tools.waiting import wait_until
from fota.tools.bundle import pack_files
from fota.tools.supervisor import DeviceProcess
from conftest import BrokerInfo


@pytest.fixture
def persistent_broker(tmp_path):
    """A Mosquitto of our own, with persistence, that a test may stop and start again."""
    with Mosquitto(tmp_path / "mosquitto", auth=True, persistence=True) as m:
        info = BrokerInfo(m)
        info.add_user(SERVER_USER, "server-secret")
        yield info


def restart_broker(info: BrokerInfo, down: float, kill: bool = False) -> None:
    """Stop Mosquitto (it writes its persistence file), or kill -9 it (it keeps what its last
    autosave wrote, at most a second old), stay down `down` s, start it again."""
    if kill:
        info.broker.proc.kill()
        info.broker.proc.wait()
        info.broker.proc = None
    else:
        info.broker.stop()
    time.sleep(down)
    info.broker.start()


class SessionSpy(BrokerSpy):
    """Records every status over the broker, with a persistent session of its own (QoS 1), so it
    also gets what devices published while it was cut off by a broker restart."""

    def __init__(self, broker: BrokerInfo):
        self.statuses: list[tuple[str, dict]] = []
        self.lock = threading.Lock()
        super().__init__(broker, name="sspy", persistent=True, reconnect_delay=0.2)

    def _on_message(self, client, userdata, msg):
        with self.lock:
            self.statuses.append((msg.topic.split("/")[2], json.loads(msg.payload)))

    def keys(self, device):
        with self.lock:
            return {(s["boot"], s["seq"]) for d, s in self.statuses if d == device}


def stored(fleet, device) -> list[StatusEvent]:
    with fleet.store.session() as s:
        return list(s.scalars(select(StatusEvent).where(StatusEvent.device_id == device)
                              .order_by(StatusEvent.boot, StatusEvent.seq)))


def assert_no_status_lost(fleet, device, spy=None):
    """Per boot, the stored seqs have no gap; and they are what went over the broker."""
    if spy is not None:
        # The spy and the center are two sessions that reconnect on their own schedules: the
        # health report a device sends on reconnecting may reach one before the other. Both
        # must end up with the same statuses.
        try:
            wait_until(lambda: {(e.boot, e.seq) for e in stored(fleet, device)} == spy.keys(device),
                       timeout=15, what=f"{device}: the spy and the database agree")
        except AssertionError:
            pass  # the assertion below says what differs
    events = stored(fleet, device)
    # (boot, seq) gaps, as every fault bench counts them (a health report the device logged as
    # dropped unsent is no loss: the next connection sent a fresh one)
    lost = status_gaps(fleet, [device])["lost"]
    assert lost == [], f"{device}: statuses lost (device, boot, seq): {lost}"
    if spy is not None:
        assert {(e.boot, e.seq) for e in events} == spy.keys(device)
    return len(events)


def installs(fleet, device, job) -> int:
    """How often the device installed the job: its 'rebooting' statuses (one per install)."""
    return sum(1 for e in stored(fleet, device) if e.job_id == job and e.state == "rebooting")


def release(fleet, version, padding):
    files = hello_files(version)
    files["blob.bin"] = os.urandom(padding)
    return create_release(fleet.store, fleet.blobs, fleet.key, pack_files(files), version, ["unix"])


def deploy_to_new_devices(fleet, ids, version, **device_settings):
    """Add the devices, wait until they are online, deploy a 400 kB release to them: (release, job ids)."""
    for d in ids:
        fleet.add_device(d, **device_settings)
    fleet.wait_online(*ids)
    rel = release(fleet, version, 400_000)
    dep = create_deployment(fleet.store, rel, device_ids=ids)
    return rel, [j.id for j in dep.jobs]


def progressed(fleet, job_ids, fraction):
    """Every job has downloaded at least `fraction` of its image (as stored), or is past it."""
    def check():
        jobs = [fleet.job(j) for j in job_ids]
        return all(j.state not in ("pending", "sent") and (j.state != "downloading" or j.progress >= fraction)
                   for j in jobs)
    return check


def downloading(fleet, job_ids):
    return [j for j in job_ids if fleet.job(j).state == "downloading"]


@pytest.mark.parametrize("kill, cut", [(False, "download"), (True, "reboot")],
                         ids=["sigterm-mid-download", "sigkill-while-devices-reboot"])
def test_broker_restart_mid_deployment_loses_nothing(tmp_path, persistent_broker, sqlite_url, kill, cut):
    fleet = Fleet(tmp_path, persistent_broker, sqlite_url, chunk=1024, window=4)
    spy = SessionSpy(persistent_broker)
    persistent_broker.broker.save()  # as `fota serve` does once the center subscribed
    try:
        ids = ["brk-1", "brk-2", "brk-3"]
        rel, jobs = deploy_to_new_devices(fleet, ids, "1.1.0")
        if cut == "download":
            wait_until(progressed(fleet, jobs, 0.2), timeout=60, interval=0.02, what="20% downloaded")
            restart_broker(persistent_broker, down=2.0, kill=kill)
            mid = downloading(fleet, jobs)
            assert mid  # cut mid-download
        else:
            mid = []
            # The devices come back from their reboot (1 s) while the broker is down, and report
            # trial and confirmed right after it is back: before the center re-subscribed.
            for d in ids:
                fleet.devices[d].restart_delay = 1.0
            wait_until(lambda: all(any(s["state"] == "rebooting" for d2, s in spy.statuses if d2 == d) for d in ids),
                       timeout=60, interval=0.01, what="all rebooting")
            restart_broker(persistent_broker, down=1.0, kill=kill)
        for j in jobs:
            job = fleet.wait_job(j, timeout=120)
            assert job.state == "confirmed", (job.device_id, job.state, job.code, job.reason)
        fleet.wait_online(*ids, version="1.1.0")
        for j, d in zip(jobs, ids):
            assert fleet.running_version(d) == "1.1.0"
            assert fleet.devices[d].reboots == 1 and installs(fleet, d, j) == 1
            wait_until(lambda: any(e.job_id == j and e.state == "confirmed" for e in stored(fleet, d)),
                       timeout=30, what="confirmed stored")
            assert_no_status_lost(fleet, d, spy)
            # A crash may hand a device its command again (its acknowledgement came after the
            # broker's last save): refused as a duplicate, never run twice.
            assert {e.code for e in stored(fleet, d) if e.state == "rejected"} <= {"E_DUPLICATE_JOB"}
            if j in mid:  # connected at start, after the broker restart, after the reboot
                assert fleet.devices[d].log_text().count("connected as") == 3
            served = fleet.job(j).bytes_served
            # re-sent: chunks in flight at the fault, a few windows (window 4 x 1 KiB), never the image
            assert rel.size <= served <= rel.size + 4 * 4 * 1024
    finally:
        spy.close()
        close(fleet)


def close(fleet):
    """Fleet.close, except for a center a failing test left stopped."""
    for p in fleet.devices.values():
        p.stop()
    fleet.spy.close()
    if fleet.center.loop.is_running():
        fleet.center.stop()
    fleet.store.dispose()


THROTTLE = 100_000  # bytes/s to each device: the 400 KB image takes 4 s


def new_center(fleet, client_id):
    return CenterThread(fleet.store, fleet.broker.server_url, fleet.blobs, signer=fleet.signer,
                        keys_update=fleet.keyring.keys_update(), client_id=client_id, chunk=1024, window=4).start()


def test_center_restarts_mid_download_and_while_devices_report(tmp_path, persistent_broker, sqlite_url):
    """Stop the control center twice (mid-download; then while devices install, reboot and
    confirm, with a broker restart in between), start a new one on the same database and session."""
    session = f"center-{time.monotonic_ns()}"
    fleet = Fleet(tmp_path, persistent_broker, sqlite_url, client_id=session, chunk=1024, window=4)
    spy = SessionSpy(persistent_broker)
    # The devices reach the broker through a proxy that throttles the first download: unthrottled,
    # a device fetches the rest of the 400 KB image in well under the time a center takes to
    # stop, and the cut would land after the download instead of in its middle.
    proxy = FaultProxy(persistent_broker.port, throttle_down=THROTTLE).start_thread()
    try:
        ids = ["ctr-1", "ctr-2", "ctr-3"]
        rel, jobs = deploy_to_new_devices(fleet, ids, "1.2.0", port=proxy.port)

        # 1. mid-download: the devices stall and re-request; the new center serves from the database.
        wait_until(progressed(fleet, jobs, 0.2), timeout=60, interval=0.02, what="20% downloaded")
        fleet.center.stop()
        assert downloading(fleet, jobs)
        time.sleep(2.0)
        fleet.center = new_center(fleet, session)
        proxy.throttle_down = None  # the rest at full speed

        # 2. once every image is in, stop it again: the devices verify, install, reboot and
        #    confirm with nobody listening; their statuses wait in the center's broker session,
        #    through a broker restart, until the next center picks them up.
        def downloaded():
            return all(any(s["state"] in ("verifying", "installing") for d2, s in spy.statuses
                           if d2 == d and s.get("job") == j) for d, j in zip(ids, jobs))
        for d in ids:
            fleet.devices[d].restart_delay = 2.0  # a slow reboot: the center is gone by then
        wait_until(downloaded, timeout=90, interval=0.01, what="all downloaded")
        fleet.center.stop()
        stopped = len(spy.statuses)  # from here on, statuses are published with no center
        wait_until(lambda: all(any(s["state"] == "confirmed" for d2, s in spy.statuses if d2 == d) for d in ids),
                   timeout=60, what="devices confirm while the center is down")
        assert len(spy.statuses) - stopped >= len(ids)  # at least each device's 'confirmed'
        restart_broker(persistent_broker, down=1.0)
        # What the devices published that no center has stored yet: it waits in the session.
        waiting = sum(len(spy.keys(d) - {(e.boot, e.seq) for e in stored(fleet, d)}) for d in ids)
        assert waiting >= len(ids)
        fleet.center = new_center(fleet, session)

        for j, d in zip(jobs, ids):
            job = fleet.wait_job(j, timeout=60)
            assert job.state == "confirmed", (d, job.state, job.code, job.reason)
            assert fleet.running_version(d) == "1.2.0"
            assert fleet.devices[d].reboots == 1 and installs(fleet, d, j) == 1  # installed once
            assert_no_status_lost(fleet, d, spy)
        assert fleet.center.center.commands == 0  # the new centers re-sent no command
    finally:
        spy.close()
        close(fleet)
        proxy.stop_thread()


def test_sleepy_device_gets_its_queued_command_and_a_gone_one_times_out(tmp_path, broker, sqlite_url):
    # require_online=False: commands go to sleeping devices too, queued in their broker sessions.
    fleet = Fleet(tmp_path, broker, sqlite_url, require_online=False)
    try:
        sleepy, gone = "sleepy-1", "sleepy-gone"
        # A long chunk timeout: on a loaded machine a 3 s one re-requests windows that are merely
        # late, which would blur the "nothing fetched twice" check below.
        fleet.add_device(sleepy, chunk_timeout_ms=20000)
        fleet.add_device(gone, stall_timeout_ms=3000)
        fleet.wait_online(sleepy, gone)
        for d in (sleepy, gone):  # deep sleep: the process stops, the broker keeps the session
            fleet.devices[d].stop()
        wait_until(lambda: not fleet.device_row(sleepy).online and not fleet.device_row(gone).online,
                   what="both asleep (will message)")
        rel = release(fleet, "3.0.0", 20_000)
        waits = create_deployment(fleet.store, rel, device_ids=[sleepy], timeout=300)
        short = create_deployment(fleet.store, rel, device_ids=[gone], timeout=4)
        job, gone_job = waits.jobs[0].id, short.jobs[0].id
        wait_until(lambda: fleet.job(job).state == "sent" and fleet.job(gone_job).state == "sent",
                   what="commands sent to sleeping devices")

        # The device that never comes back: its job ends timed_out, and so does its deployment.
        j = wait_until(lambda: (j := fleet.job(gone_job)).state == "timed_out" and j, timeout=30, what="timed out")
        assert j.reason == "no final status within 4 s of the deployment's start (last state: sent)"
        assert deployment_summary(fleet.store, short.id)["state"] == "done"
        time.sleep(2.0)  # asleep for longer than a deployment step; the other job still waits
        assert fleet.job(job).state == "sent"
        assert deployment_summary(fleet.store, waits.id)["state"] == "active"

        # Wake up with the same persistent session: the queued command is delivered, once.
        fleet.devices[sleepy] = DeviceProcess(fleet.root(sleepy), heap=fleet.heap).start()
        j = fleet.wait_job(job, timeout=60)
        assert j.state == "confirmed", (j.state, j.code, j.reason)
        fleet.wait_online(sleepy, version="3.0.0")
        assert fleet.devices[sleepy].reboots == 1 and installs(fleet, sleepy, job) == 1
        # The command delivered at connect was acknowledged: the reboot's new connection did not
        # get it again (it would be refused as a duplicate).
        assert [e.code for e in stored(fleet, sleepy) if e.state == "rejected"] == []
        assert deployment_summary(fleet.store, waits.id)["state"] == "done"
        assert fleet.center.center.commands == 3  # two updates, and the cancel of the timed-out one
        assert rel.size <= fleet.job(job).bytes_served < rel.size + 2 * 8 * 2048  # nothing fetched twice

        # The gone device wakes after all: it gets its command and then the cancel the timeout
        # queued; it stops on its old firmware and the job stays timed_out.
        fleet.devices[gone] = DeviceProcess(fleet.root(gone), heap=fleet.heap).start()
        wait_until(lambda: [e for e in stored(fleet, gone) if e.job_id == gone_job and e.state == "cancelled"],
                   timeout=30, what="late device cancels")
        assert fleet.job(gone_job).state == "timed_out" and fleet.job(gone_job).bytes_served == 0
        assert fleet.running_version(gone) == "1.0.0" and fleet.devices[gone].reboots == 0
        assert_no_status_lost(fleet, sleepy)
    finally:
        close(fleet)
