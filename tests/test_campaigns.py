"""Campaigns against the real database (SQLite and PostgreSQL) and the real Mosquitto.

The control center runs for real (sender, ingestion); devices are scripted (tests/scripted.py)
and answer through the broker. The engine is stepped by the test with an injected clock, so
minutes of pacing, probation and back-off take no wall time.
"""
from __future__ import annotations

import secrets
import time
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select

from fota.examples import hello_files
from fota.server.campaigns import (
    CampaignEngine,
    CampaignError,
    abort_campaign,
    campaign_summary,
    create_campaign,
    pause_campaign,
    resume_campaign,
    start_campaign,
)
from fota.server.campaigns import states as S
from fota.server.campaigns.pacing import window_open
from fota.server.campaigns.spec import CampaignSpec, Window, version_key
from fota.server.releases import create_release
from fota.server.store import Campaign, CampaignDevice, Deployment, Job, StatusEvent, Store
from fota.testkit.center import CenterThread
from fota.tools.waiting import wait_until
from fota.tools.bundle import pack_files
from fota.tools.keyring import Keyring
from scripted import ScriptedDevices


class Clock:
    def __init__(self, start: datetime):
        self.now = start

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


class Rig:
    def __init__(self, tmp_path, broker, db_url):
        self.store = Store(db_url)
        keyring = Keyring(tmp_path / "keys")
        keyring.init()
        self.key = keyring.signer().key
        self.blobs = tmp_path / "blobs"
        self.center = CenterThread(self.store, broker.server_url, self.blobs, signer=keyring.signer(),
                                   campaign_interval=None, poll_interval=0.05).start()
        self.devices = ScriptedDevices(broker, self.store, prefix=f"c{secrets.token_hex(3)}")
        self.engine = CampaignEngine(self.store)
        self.clock = Clock(datetime.now(timezone.utc).replace(microsecond=0))

    def release(self, version="2.0.0", hardware=("unix",), **kw):
        return create_release(self.store, self.blobs, self.key, pack_files(hello_files(version)), version,
                              list(hardware), **kw)

    def tick(self, times=1):
        for _ in range(times):
            self.engine.tick(self.clock.now)

    def drive(self, predicate, timeout=40.0, what="campaign condition"):
        """Tick (without moving the clock) until predicate() holds: statuses travel the broker."""
        def step():
            self.tick()
            return predicate()
        return wait_until(step, timeout=timeout, interval=0.1, what=what)

    def row(self, campaign, device_id) -> CampaignDevice:
        with self.store.session() as s:
            return s.scalars(select(CampaignDevice).join(Campaign).where(
                Campaign.name == campaign, CampaignDevice.device_id == device_id)).one()

    def state(self, campaign, device_id) -> str:
        return self.row(campaign, device_id).state

    def campaign(self, name) -> Campaign:
        with self.store.session() as s:
            return s.scalars(select(Campaign).where(Campaign.name == name)).one()

    def jobs(self, device_id=None, kind="update") -> list[Job]:
        with self.store.session() as s:
            query = select(Job).where(Job.kind == kind).order_by(Job.id)
            if device_id:
                query = query.where(Job.device_id == device_id)
            return list(s.scalars(query))

    def close(self):
        self.devices.close()
        self.center.stop()
        self.store.dispose()


@pytest.fixture
def rig(tmp_path, broker, db_url):
    r = Rig(tmp_path, broker, db_url)
    yield r
    r.close()


def _deployment_state(rig, campaign) -> str:
    with rig.store.session() as s:
        return s.scalar(select(Deployment.state).join(Campaign, Campaign.deployment_id == Deployment.id)
                        .where(Campaign.name == campaign))


# ---------------------------------------------------------------- waves and probation

def test_wave_advances_only_after_confirmed_and_probation(rig):
    rig.release()
    canary = rig.devices.add("canary")
    rest = [rig.devices.add(f"d{i}") for i in range(3)]
    quiet = rig.devices.add("quiet", behaviour="nohealth")
    create_campaign(rig.store, "probe", "2.0.0",
                    {"waves": [{"devices": [canary]}, {"devices": rest}, 100], "probation": 600})
    start_campaign(rig.store, "probe", now=rig.clock.now)
    rig.drive(lambda: rig.state("probe", canary) == S.PROBATION, what="canary confirmed")
    assert rig.jobs(canary)[0].state == "confirmed"
    # Confirmed and healthy, but within its probation: the next wave has not started.
    rig.tick(5)
    time.sleep(0.3)
    assert all(rig.state("probe", d) == S.QUEUED for d in rest + [quiet])
    assert all(not rig.jobs(d) for d in rest)
    rig.clock.advance(599)
    rig.tick()
    assert rig.state("probe", canary) == S.PROBATION
    assert rig.campaign("probe").wave == 0
    # Between waves no job is open: the campaign's deployment is done; the next wave's jobs make
    # it active again (it is what shows, and only an active deployment's commands are re-sent).
    assert _deployment_state(rig, "probe") == "done"
    rig.clock.advance(2)
    rig.tick()
    assert _deployment_state(rig, "probe") == "active"
    rig.drive(lambda: all(rig.state("probe", d) == S.PROBATION for d in rest), what="wave 2 confirmed")
    assert rig.state("probe", canary) == S.SUCCEEDED
    assert rig.state("probe", quiet) == S.QUEUED  # wave 3 waits for wave 2's probation
    rig.clock.advance(601)
    rig.drive(lambda: rig.state("probe", quiet) == S.PROBATION, what="wave 3 confirmed")
    rig.clock.advance(601)
    rig.tick(3)
    # No health report after its confirmation: never counted as a success.
    assert rig.state("probe", quiet) == S.PROBATION
    assert rig.campaign("probe").state == S.RUNNING
    summary = campaign_summary(rig.store, "probe")
    assert [w["counts"] for w in summary["waves"]] == [{"succeeded": 1}, {"succeeded": 3}, {"probation": 1}]


def test_unhealthy_and_reverted_devices_count_as_failed(rig):
    rig.release()
    bad = rig.devices.add("bad", behaviour="unhealthy")
    back = rig.devices.add("back", behaviour="revert")
    create_campaign(rig.store, "health", "2.0.0", {"waves": [100], "failure": 100, "probation": 60})
    start_campaign(rig.store, "health", now=rig.clock.now)
    rig.drive(lambda: rig.state("health", bad) == S.FAILED and rig.state("health", back) == S.FAILED)
    assert (rig.row("health", bad).code, rig.row("health", back).code) == ("E_HEALTH", "E_HEALTH")
    assert "unhealthy" in rig.row("health", bad).reason
    # a revert is not retried: the release is bad for that device
    assert len(rig.jobs(back)) == 1


def test_probation_orders_health_reports_of_another_epoch_by_arrival(rig):
    """A device whose counters start over during probation (a new epoch: its (boot, seq) begin
    again, below the confirmation's) is judged on the reports it sends after the confirmation."""
    rig.release()
    well = rig.devices.add("well", behaviour="nohealth")
    sick = rig.devices.add("sick", behaviour="nohealth")
    # Sent before the campaign, in an epoch of its own: not after the confirmation, never counted
    # (it ran 2.0.0 once, unhealthy, then 1.0.0 again).
    rig.devices.start_over(well, 41)
    rig.devices.report_health(well, False, version="2.0.0")
    rig.devices.report_health(well, True)
    wait_until(lambda: _health_reports(rig, well) == 2, timeout=10, what="old reports stored")
    rig.devices.start_over(well, 5)  # the campaign's statuses: epoch 5 (well), none sent (sick)
    create_campaign(rig.store, "epochs", "2.0.0", {"waves": [100], "failure": 100, "probation": 60})
    start_campaign(rig.store, "epochs", now=rig.clock.now)
    rig.drive(lambda: all(rig.state("epochs", d) in (S.PROBATION, S.FAILED) for d in (well, sick)),
              what="both confirmed")
    assert (rig.state("epochs", well), rig.state("epochs", sick)) == (S.PROBATION, S.PROBATION)
    assert rig.row("epochs", well).confirm_seq == 6  # (1, 6): downloading ... confirmed
    for device_id, ok in ((well, True), (sick, False)):
        rig.devices.start_over(device_id, 7)
        rig.devices.report_health(device_id, ok)  # (epoch 7, boot 1, seq 1)
    wait_until(lambda: (_health_reports(rig, well), _health_reports(rig, sick)) == (3, 1), timeout=10,
               what="the new epoch's reports stored")
    rig.tick()
    assert rig.state("epochs", sick) == S.FAILED and rig.row("epochs", sick).code == "E_HEALTH"
    assert rig.state("epochs", well) == S.PROBATION
    rig.clock.advance(61)
    rig.tick()
    assert rig.state("epochs", well) == S.SUCCEEDED


def _health_reports(rig, device_id) -> int:
    with rig.store.session() as s:
        return s.scalar(select(func.count()).select_from(StatusEvent).where(
            StatusEvent.device_id == device_id, StatusEvent.state == "health"))


# ---------------------------------------------------------------- failure thresholds

def test_failure_threshold_pauses_and_resume_accepts_the_failures(rig):
    rig.release()
    wave1 = [rig.devices.add("f1", "fail"), rig.devices.add("f2", "revert"), rig.devices.add("ok1")]
    wave2 = [rig.devices.add(f"w{i}") for i in range(3)]
    create_campaign(rig.store, "pause", "2.0.0",
                    {"waves": [{"devices": wave1, "success": 70, "failure": 50}, 100], "retries": 0,
                     "probation": 0, "on_failure": "pause"})
    start_campaign(rig.store, "pause", now=rig.clock.now)
    rig.drive(lambda: rig.campaign("pause").state == S.PAUSED, what="threshold pause")
    c = rig.campaign("pause")
    assert "2 of 3 devices failed" in c.reason and "threshold 50%" in c.reason
    rig.drive(lambda: rig.state("pause", wave1[2]) == S.SUCCEEDED, what="in-flight device finishes")
    rig.clock.advance(3600)
    rig.tick(5)
    assert all(rig.state("pause", d) == S.QUEUED for d in wave2) and not any(rig.jobs(d) for d in wave2)
    with pytest.raises(CampaignError):
        pause_campaign(rig.store, "pause")  # already paused: the table refuses it
    resume_campaign(rig.store, "pause")
    rig.drive(lambda: rig.campaign("pause").state == S.DONE, what="campaign done after resume")
    assert all(rig.state("pause", d) == S.SUCCEEDED for d in wave2)


def test_failure_threshold_aborts_cancels_downloads_and_lets_installs_finish(rig):
    rig.release()
    failing = rig.devices.add("fail", "hw")  # a permanent error: failed at once, no retry
    stalled = rig.devices.add("stall", "stall")
    installing = rig.devices.add("install", "install")
    rig.devices.hold(failing)
    create_campaign(rig.store, "abort", "2.0.0",
                    {"waves": [{"devices": [failing, stalled, installing]}, 100], "failure": 0,
                     "on_failure": "abort", "retries": 3, "timeouts": {"install": 120}})
    later = rig.devices.add("later")
    start_campaign(rig.store, "abort", now=rig.clock.now)
    rig.drive(lambda: rig.jobs(stalled)[0].state == "downloading" and rig.jobs(installing)[0].state == "installing"
              and rig.row("abort", installing).step == "install", what="one download, one install")
    rig.devices.release(failing)
    rig.drive(lambda: rig.campaign("abort").state == S.ABORTING, what="threshold abort")
    assert "aborting" in rig.campaign("abort").reason
    # The stalled download gets the protocol's cancel command and reports cancelled.
    rig.drive(lambda: rig.state("abort", stalled) == S.CANCELLED, what="download cancelled")
    [job] = rig.jobs(stalled)
    assert job.state == "cancelled"
    assert [c.target_job for c in rig.jobs(stalled, kind="cancel")] == [job.id]
    # A device past its download is never cancelled: it finishes (here: times out).
    assert not rig.jobs(installing, kind="cancel") and not rig.devices.jobs_of(installing, "cancel")
    assert rig.state("abort", installing) == S.IN_FLIGHT
    assert rig.campaign("abort").state == S.ABORTING
    assert rig.state("abort", later) == S.CANCELLED and not rig.jobs(later)
    assert rig.state("abort", failing) == S.FAILED and len(rig.jobs(failing)) == 1
    rig.clock.advance(121)
    rig.drive(lambda: rig.campaign("abort").state == S.ABORTED, what="aborted")
    assert rig.row("abort", installing).code == "E_TIMEOUT"


def test_operator_abort_of_a_draft_and_of_a_running_campaign(rig):
    rig.release()
    d = rig.devices.add("x", "stall")
    create_campaign(rig.store, "draft", "2.0.0")
    assert abort_campaign(rig.store, "draft").state == S.ABORTED
    with pytest.raises(CampaignError, match="cannot start a campaign that is aborted"):
        start_campaign(rig.store, "draft")
    create_campaign(rig.store, "run", "2.0.0", {"waves": [100]})
    start_campaign(rig.store, "run", now=rig.clock.now)
    rig.drive(lambda: rig.devices.current.get(d, (0, ""))[1] == "downloading", what="download")
    abort_campaign(rig.store, "run", now=rig.clock.now)
    rig.drive(lambda: rig.campaign("run").state == S.ABORTED, what="aborted")
    assert rig.state("run", d) == S.CANCELLED


def test_abort_completes_even_if_devices_never_answer_again(rig):
    """A device silent from the start, and one that confirmed and then fell silent (no health
    report: its statuses lost, or its counters started over), do not hold an abort: it ends within
    the bound docs/campaigns.md gives (download + install + 2 x confirm timeouts + probation)."""
    rig.release()
    silent = rig.devices.add("silent", "silent")
    quiet = rig.devices.add("quiet", "nohealth")
    spec = {"waves": [100], "failure": 100, "probation": 600,
            "timeouts": {"download": 900, "install": 300, "confirm": 300}}
    create_campaign(rig.store, "hush", "2.0.0", spec)
    start_campaign(rig.store, "hush", now=rig.clock.now)
    rig.drive(lambda: rig.state("hush", quiet) == S.PROBATION and rig.jobs(silent)[0].state == "sent",
              what="one confirmed, one sent")
    abort_campaign(rig.store, "hush", now=rig.clock.now)
    rig.clock.advance(600)
    rig.tick(3)
    assert rig.campaign("hush").state == S.ABORTING  # both still within their bounds
    rig.clock.advance(900 + 300 + 2 * 300 + 600 - 600)
    rig.tick(2)
    assert rig.campaign("hush").state == S.ABORTED
    assert (rig.state("hush", silent), rig.row("hush", silent).code) == (S.FAILED, "E_TIMEOUT")
    row = rig.row("hush", quiet)
    assert (row.state, row.code) == (S.FAILED, "E_TIMEOUT") and "no health report" in row.reason
    assert [c.target_job for c in rig.jobs(silent, kind="cancel")] == [rig.jobs(silent)[0].id]


def test_an_attempt_is_bounded_even_when_its_step_keeps_changing(rig):
    """Each step has its timeout, and a change of step restarts it: a job that goes back and
    forth between steps is still not waited for longer than the steps' timeouts together."""
    rig.release()
    dev = rig.devices.add("flap", "silent")
    create_campaign(rig.store, "flap", "2.0.0", {"waves": [100], "failure": 100, "retries": 0,
                                                 "timeouts": {"download": 300, "install": 300, "confirm": 300}})
    start_campaign(rig.store, "flap", now=rig.clock.now)
    rig.drive(lambda: rig.jobs(dev) and rig.jobs(dev)[0].state == "sent", what="job sent")
    job_id = rig.jobs(dev)[0].id
    for n in range(6):  # 6 x 200 s: within each step's 300 s, beyond the 900 s of all three
        with rig.store.session() as s:
            s.get(Job, job_id).state = ("downloading", "verifying")[n % 2]
        rig.clock.advance(200)
        rig.tick()
        if rig.state("flap", dev) != S.IN_FLIGHT:
            break
    row = rig.row("flap", dev)
    assert (row.state, row.code) == (S.FAILED, "E_TIMEOUT") and "attempt not finished within 900 s" in row.reason


# ---------------------------------------------------------------- pacing

def test_rate_limit_counts_starts_per_minute(rig):
    rig.release()
    ids = [rig.devices.add(f"r{i}", "silent") for i in range(10)]
    create_campaign(rig.store, "rate", "2.0.0", {"waves": [100], "rate": 3, "max_in_flight": 100})
    start_campaign(rig.store, "rate", now=rig.clock.now)
    rig.tick(5)
    assert len(rig.jobs()) == 3
    rig.clock.advance(30)
    rig.tick(3)
    assert len(rig.jobs()) == 3  # still the same minute
    rig.clock.advance(31)
    rig.tick(3)
    assert len(rig.jobs()) == 6
    starts = sorted(j.created_at for j in rig.jobs())
    for i, t in enumerate(starts):  # never more than 3 in any 60 s
        assert sum(1 for u in starts[i:] if u - t < timedelta(seconds=60)) <= 3
    assert {j.device_id for j in rig.jobs()} <= set(ids)


def test_rate_grows_while_no_device_fails(rig):
    rig.release()
    for i in range(12):
        rig.devices.add(f"g{i}", "silent")
    create_campaign(rig.store, "grow", "2.0.0", {"waves": [100], "rate": 2, "rate_growth": 2, "max_rate": 5,
                                                 "failure": 100, "max_in_flight": 100,
                                                 "timeouts": {"download": 3600}})
    start_campaign(rig.store, "grow", now=rig.clock.now)
    rig.tick(3)
    assert len(rig.jobs()) == 2
    rig.clock.advance(60)
    rig.tick(3)
    assert rig.campaign("grow").rate == 4 and len(rig.jobs()) == 6
    rig.clock.advance(60)
    rig.tick(3)
    assert rig.campaign("grow").rate == 5 and len(rig.jobs()) == 11
    # a failure within the minute: back to the base rate
    with rig.store.session() as s:
        row = s.scalars(select(CampaignDevice).where(CampaignDevice.state == S.IN_FLIGHT)).first()
        row.state, row.code, row.updated_at = S.FAILED, "E_INSTALL", rig.clock.now
    rig.clock.advance(60)
    rig.tick()
    assert rig.campaign("grow").rate == 2


def test_maintenance_window_respected(rig):
    rig.release()
    for i in range(3):
        rig.devices.add(f"m{i}", "silent")
    rig.clock.now = datetime(2026, 11, 27, 0, 30, tzinfo=timezone.utc)  # 01:30 in Berlin (UTC+1)
    create_campaign(rig.store, "night", "2.0.0",
                    {"waves": [100], "rate": 1, "timeouts": {"download": 86400 * 2},
                     "window": {"cron": "0 2 * * *", "minutes": 60, "tz": "Europe/Berlin"}})
    start_campaign(rig.store, "night", now=rig.clock.now)
    rig.tick(3)
    assert rig.jobs() == [] and not campaign_summary(rig.store, "night", now=rig.clock.now)["window_open"]
    rig.clock.now = datetime(2026, 11, 27, 1, 5, tzinfo=timezone.utc)  # 02:05 Berlin: open
    rig.tick(3)
    assert len(rig.jobs()) == 1
    rig.clock.now = datetime(2026, 11, 27, 1, 30, tzinfo=timezone.utc)
    rig.tick(3)
    assert len(rig.jobs()) == 2
    rig.clock.now = datetime(2026, 11, 27, 2, 10, tzinfo=timezone.utc)  # 03:10 Berlin: closed
    rig.tick(3)
    assert len(rig.jobs()) == 2
    rig.clock.now = datetime(2026, 11, 28, 1, 0, tzinfo=timezone.utc)  # next night, 02:00 Berlin
    rig.tick(3)
    assert len(rig.jobs()) == 3
    assert all(j.created_at.astimezone(timezone(timedelta(hours=1))).hour == 2 for j in rig.jobs())


def test_window_open_follows_the_zone_across_daylight_saving():
    window = Window("0 2 * * *", 60, "Europe/Berlin")
    summer = datetime(2026, 7, 1, 0, 30, tzinfo=timezone.utc)  # 02:30 CEST
    winter = datetime(2026, 12, 1, 0, 30, tzinfo=timezone.utc)  # 01:30 CET
    assert window_open(window, summer) and not window_open(window, winter)
    assert window_open(window, datetime(2026, 12, 1, 1, 0, tzinfo=timezone.utc))  # exactly 02:00 CET
    assert not window_open(window, datetime(2026, 12, 1, 2, 0, tzinfo=timezone.utc))  # 03:00: closed


def test_timeouts_retry_with_back_off_then_fail(rig):
    rig.release()
    stalled = rig.devices.add("stall", "stall")
    stuck = rig.devices.add("stuck", "install")
    create_campaign(rig.store, "retry", "2.0.0",
                    {"waves": [100], "retries": 1, "backoff": 30, "failure": 100,
                     "timeouts": {"download": 60, "install": 90}})
    start_campaign(rig.store, "retry", now=rig.clock.now)
    rig.drive(lambda: rig.devices.current.get(stalled, (0, ""))[1] == "downloading"
              and rig.devices.current.get(stuck, (0, ""))[1] == "installing", what="both busy")
    rig.drive(lambda: rig.row("retry", stuck).step == "install", what="install step seen")
    rig.clock.advance(61)
    rig.tick()
    row = rig.row("retry", stalled)
    assert (row.state, row.code, row.attempts) == (S.RETRY, "E_TIMEOUT", 1)
    first = rig.jobs(stalled)[0]
    assert (first.state, first.code) == ("failed", "E_TIMEOUT")
    rig.drive(lambda: rig.devices.jobs_of(stalled, "cancel"), what="cancel command delivered")
    rig.clock.advance(10)
    rig.tick(3)
    assert len(rig.jobs(stalled)) == 1  # back-off: 30 s
    rig.clock.advance(21)
    # Due now: started at the next tick that finds the device row unlocked (the engine skips a row
    # the center's intake holds locked, as it ingests the cancel's statuses, until a later tick).
    rig.drive(lambda: len(rig.jobs(stalled)) == 2, what="the retry after the back-off")
    second = rig.jobs(stalled)[1]
    assert second.id > rig.jobs(stalled, kind="cancel")[0].id  # job ids keep increasing per device
    rig.drive(lambda: rig.devices.jobs_of(stalled) == [first.id, second.id], what="second attempt sent")
    rig.clock.advance(40)
    rig.tick()
    assert rig.state("retry", stuck) == S.FAILED and rig.row("retry", stuck).code == "E_TIMEOUT"
    assert not rig.devices.jobs_of(stuck, "cancel")  # past the download: never cancelled
    rig.drive(lambda: rig.row("retry", stalled).step == "download")
    rig.clock.advance(61)
    rig.tick()
    assert (rig.state("retry", stalled), rig.row("retry", stalled).attempts) == (S.FAILED, 2)


# ---------------------------------------------------------------- targeting

@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
def test_late_joining_device_picked_up_only_when_dynamic(rig, dynamic):
    rig.release()
    first = rig.devices.add("first", tags=["field"])
    create_campaign(rig.store, "late", "2.0.0", {"filter": {"tags": ["field"]}, "waves": [100],
                                                 "probation": 0, "dynamic": dynamic})
    start_campaign(rig.store, "late", now=rig.clock.now)
    rig.drive(lambda: rig.state("late", first) == S.SUCCEEDED)
    assert rig.campaign("late").state == (S.RUNNING if dynamic else S.DONE)
    newcomer = rig.devices.add("new", tags=["field"])
    rig.devices.add("other", tags=["lab"])
    rig.tick(3)
    if not dynamic:
        assert not rig.jobs(newcomer)
        return
    rig.drive(lambda: rig.state("late", newcomer) == S.SUCCEEDED, what="late joiner updated")
    summary = campaign_summary(rig.store, "late")
    assert {d["device"] for d in summary["devices"]} == {first, newcomer}


def test_hardware_min_version_and_filters_respected(rig):
    rig.release(min_version="1.0.0")
    ok = rig.devices.add("ok", version="1.2.0", inventory={"region": "eu"})
    old = rig.devices.add("old", version="0.9.0", inventory={"region": "eu"})
    esp = rig.devices.add("esp", hardware="esp32", inventory={"region": "eu"})
    us = rig.devices.add("us", inventory={"region": "us"})
    offline = rig.devices.add("off", online=False, inventory={"region": "eu"})
    create_campaign(rig.store, "hw", "2.0.0", {"filter": {"inventory": {"region": "eu"}, "online": True},
                                               "waves": [100], "probation": 0})
    start_campaign(rig.store, "hw", now=rig.clock.now)
    rig.drive(lambda: rig.campaign("hw").state == S.DONE)
    summary = {d["device"]: d for d in campaign_summary(rig.store, "hw")["devices"]}
    assert set(summary) == {ok, old, esp}
    assert summary[ok]["state"] == S.SUCCEEDED
    assert summary[old]["state"] == S.SKIPPED and "at least 1.0.0" in summary[old]["reason"]
    # another hardware type: shown as skipped with the reason, never driven
    assert summary[esp]["state"] == S.SKIPPED and summary[esp]["reason"] == "hardware esp32 not in the release's unix"
    for device in (old, esp, us, offline):
        assert not rig.jobs(device) and not rig.devices.jobs_of(device)
    with pytest.raises(CampaignError, match="is for hardware unix"):
        create_campaign(rig.store, "esp-only", "2.0.0", {"filter": {"hardware": ["esp32"]}})


def test_two_campaigns_never_drive_the_same_device(rig):
    rig.release("2.0.0")
    rig.release("2.1.0")
    a = rig.devices.add("a", "stall")
    b = rig.devices.add("b", "stall")
    create_campaign(rig.store, "older", "2.0.0", {"filter": {"devices": [a]}, "waves": [100]})
    create_campaign(rig.store, "newer", "2.1.0", {"waves": [100]})
    start_campaign(rig.store, "older", now=rig.clock.now)
    rig.tick()
    start_campaign(rig.store, "newer", now=rig.clock.now)
    rig.drive(lambda: rig.state("newer", b) == S.IN_FLIGHT)
    row = rig.row("newer", a)
    assert row.state == S.SKIPPED and "held by campaign" in row.reason and "older" in row.reason
    assert [j.device_id for j in rig.jobs()] == [a, b]  # one job each, from one campaign each


def test_spec_validation_gives_precise_errors():
    for bad, message in [({"waves": []}, "non-empty"), ({"waves": [50, 10]}, "must not decrease"),
                         ({"window": {"cron": "61 * * * *", "minutes": 5}}, "not a valid cron"),
                         ({"window": {"cron": "0 2 * * *", "minutes": 5, "tz": "Mars/Base"}}, "time zone"),
                         ({"rate": -1}, "rate"), ({"on_failure": "explode"}, "on_failure"),
                         ({"filter": {"colour": "red"}}, "unknown filter"), ({"speed": 1}, "unknown campaign")]:
        with pytest.raises(CampaignError, match=message):
            CampaignSpec.parse(bad)
    assert version_key("1.10.0") > version_key("1.9.2") > version_key("1.9")


def test_two_engines_ticking_at_once_never_double_drive_a_device(rig):
    """Two workers step the same campaign concurrently: row locks keep each device to one job."""
    import threading
    rig.release()
    ids = [rig.devices.add(f"p{i}") for i in range(16)]
    create_campaign(rig.store, "pair", "2.0.0", {"waves": [25, 100], "max_in_flight": 5, "probation": 0})
    start_campaign(rig.store, "pair", now=rig.clock.now)
    engines = [CampaignEngine(rig.store), CampaignEngine(rig.store)]
    stop = threading.Event()
    errors = []

    def work(engine):
        while not stop.is_set():
            try:
                engine.tick(rig.clock.now)
            except Exception as exc:  # noqa: BLE001 (reported by the assertion below)
                errors.append(exc)
            time.sleep(0.02)

    threads = [threading.Thread(target=work, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    try:
        peak = 0
        deadline = time.monotonic() + 60
        while rig.campaign("pair").state != S.DONE and time.monotonic() < deadline:
            with rig.store.session() as s:
                in_flight = s.scalar(select(func.count()).where(CampaignDevice.state == S.IN_FLIGHT))
            peak = max(peak, in_flight)
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not errors, errors
    assert rig.campaign("pair").state == S.DONE
    assert sorted(j.device_id for j in rig.jobs()) == sorted(ids)  # exactly one job per device
    assert peak <= 5


def test_campaign_state_tables_match_the_docs():
    import re
    from pathlib import Path
    doc = (Path(__file__).resolve().parent.parent / "docs" / "campaigns.md").read_text()
    block = doc.split("<!-- campaign-transitions:begin -->")[1].split("<!-- campaign-transitions:end -->")[0]
    assert re.findall(r"\| `(\w+)` \| `(\w+)` \| `(\w+)` \|", block) == [tuple(t) for t in S.TRANSITIONS]
    section = doc.split("## 3. A device in a campaign")[1].split("## 4.")[0]
    assert re.findall(r"^\| `(\w+)` \|", section, re.M) == list(S.DEVICE_STATES)
    assert {f for f, _, _ in S.TRANSITIONS} | {t for _, _, t in S.TRANSITIONS} == set(S.STATES)


ENGINE_LOOP = """
import sys, time
from fota.server.campaigns import CampaignEngine
from fota.server.store import Store
engine = CampaignEngine(Store(sys.argv[1]))
print("ticking", flush=True)
while True:
    engine.tick()
    time.sleep(0.05)
"""


def test_engine_process_killed_mid_campaign_loses_nothing(rig):
    """The engine keeps no state of its own: kill -9 one engine process, the next carries on."""
    import os
    import signal
    import subprocess
    import sys
    rig.release()
    ids = [rig.devices.add(f"k{i}") for i in range(12)]
    create_campaign(rig.store, "kill", "2.0.0", {"waves": [25, 50, 100], "max_in_flight": 3, "probation": 0})
    start_campaign(rig.store, "kill")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))

    def engine():
        proc = subprocess.Popen([sys.executable, "-c", ENGINE_LOOP, rig.store.url], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout.readline().strip() == "ticking"
        return proc

    def succeeded():
        return sum(1 for d in ids if rig.state("kill", d) == S.SUCCEEDED)

    first = engine()
    try:
        wait_until(lambda: succeeded() >= 4, timeout=60, what="first engine at work")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    assert rig.campaign("kill").state == S.RUNNING and succeeded() < len(ids)
    second = engine()
    try:
        wait_until(lambda: rig.campaign("kill").state == S.DONE, timeout=60, what="second engine finishes")
    finally:
        second.send_signal(signal.SIGKILL)
        second.wait(10)
    assert succeeded() == len(ids)
    assert sorted(j.device_id for j in rig.jobs()) == sorted(ids)  # one job each: nothing started twice
