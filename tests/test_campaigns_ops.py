"""Campaigns as an operator meets them (issue 15): refused targets, the preview, thresholds in
words, the window's edges, a paused campaign that settled, and the status's clocks and filters.

Real database (SQLite and PostgreSQL), real Mosquitto and control center; scripted devices; the
engine is stepped with the test's clock (tests/test_campaigns.py's Rig).
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from fota.server.campaigns import (
    CampaignError,
    abort_campaign,
    campaign_summary,
    create_campaign,
    pause_campaign,
    preview_campaign,
    start_campaign,
)
from fota.server.campaigns import states as S
from fota.server.campaigns.pacing import window_open
from fota.server.campaigns.spec import CampaignSpec, Window
from test_campaigns import rig  # noqa: F401  (test_campaigns' fixture, used here as it is)


def test_unknown_device_or_tag_is_refused_unless_dynamic(rig):
    rig.release()
    known = rig.devices.add("known", tags=["field"])
    for spec, message in [({"filter": {"tags": ["nope"]}}, "no device has tag 'nope'"),
                          ({"filter": {"devices": [known, "ghost"]}}, "unknown device(s): ghost"),
                          ({"waves": [{"devices": ["ghost"]}, 100]}, "unknown device(s): ghost"),
                          ({"waves": [{"tag": "nope"}, 100]}, "no device has tag 'nope'")]:
        with pytest.raises(CampaignError, match=message.replace("(", r"\(").replace(")", r"\)")):
            create_campaign(rig.store, "bad", "2.0.0", spec)
        with pytest.raises(CampaignError, match="no device has tag|unknown device"):
            preview_campaign(rig.store, "bad", "2.0.0", spec)
    assert rig.jobs() == [] and not campaign_summary_exists(rig, "bad")
    # dynamic: it waits for devices that appear later; the preview says what is not there yet
    preview = preview_campaign(rig.store, "later", "2.0.0", {"filter": {"tags": ["nope"]}, "dynamic": True})
    assert preview["targeted"] == 0 and preview["unknown"] == ["no device has tag 'nope'"]
    create_campaign(rig.store, "later", "2.0.0", {"filter": {"tags": ["nope"]}, "dynamic": True})


def campaign_summary_exists(rig, name) -> bool:
    try:
        campaign_summary(rig.store, name)
    except CampaignError:
        return False
    return True


def test_preview_counts_targets_skips_with_reasons_and_wave_sizes(rig):
    rig.release(min_version="1.0.0")
    fresh = [rig.devices.add(f"u{i}", tags=["lab"]) for i in range(4)]
    sleepy = rig.devices.add("sleepy", tags=["lab"], online=False)
    esp = [rig.devices.add(f"e{i}", hardware="esp32", tags=["lab"]) for i in range(2)]
    current = rig.devices.add("cur", version="2.0.0", tags=["lab"])
    old = rig.devices.add("old", version="0.9.0", tags=["lab"])
    rig.devices.add("elsewhere", tags=["shop"])  # not matching the filter: not in the preview at all
    spec = {"filter": {"tags": ["lab"]}, "waves": [{"devices": [fresh[0]]}, 50, 100], "probation": 0}
    preview = preview_campaign(rig.store, "lab", "2.0.0", spec)
    assert preview == {
        "targeted": 5, "offline": 1, "unknown": [],
        "skipped": [{"reason": "hardware esp32 not in the release's unix", "devices": 2},
                    {"reason": "already runs 2.0.0", "devices": 1},
                    {"reason": "runs 0.9.0, the release needs at least 1.0.0", "devices": 1}],
        # the group takes its device; 50 % of 5 is 3 (ceil) including it; the last wave the rest
        "waves": [{"wave": 1, "devices": 1}, {"wave": 2, "devices": 2}, {"wave": 3, "devices": 2}]}
    create_campaign(rig.store, "lab", "2.0.0", spec)
    draft = campaign_summary(rig.store, "lab")
    assert draft["preview"] == preview and draft["skipped"] == []
    start_campaign(rig.store, "lab", now=rig.clock.now)
    summary = campaign_summary(rig.store, "lab")
    assert summary["preview"] is None
    assert summary["skipped"] == preview["skipped"]  # what the preview said is what start did
    assert [w["total"] for w in summary["waves"]] == [w["devices"] for w in preview["waves"]]
    rows = {d["device"]: d for d in summary["devices"]}
    assert all(rows[e]["state"] == S.SKIPPED for e in esp) and rows[current]["state"] == S.SKIPPED
    assert rows[old]["state"] == S.SKIPPED and rows[sleepy]["state"] == S.QUEUED
    rig.drive(lambda: rig.state("lab", fresh[0]) == S.SUCCEEDED, what="the first wave's device updated")
    assert not any(rig.jobs(e) for e in esp)


def test_failure_alone_lowers_the_success_threshold_so_tolerated_failures_go_on(rig):
    assert [(w.success, w.failure) for w in CampaignSpec.parse({"failure": 25}).waves] == [(75, 25)] * 4
    assert [(w.success, w.failure) for w in CampaignSpec.parse({}).waves] == [(100, 0)] * 4
    assert [(w.success, w.failure) for w in CampaignSpec.parse({"failure": 25, "success": 100}).waves] == \
        [(100, 25)] * 4  # both given: as given
    rig.release()
    wave1 = [rig.devices.add("bad", "revert")] + [rig.devices.add(f"ok{i}") for i in range(3)]
    wave2 = [rig.devices.add("w2")]
    create_campaign(rig.store, "tolerant", "2.0.0",
                    {"waves": [{"devices": wave1}, 100], "failure": 25, "probation": 0, "retries": 0})
    start_campaign(rig.store, "tolerant", now=rig.clock.now)
    # 1 of 4 failed: not more than 25 %, and 3 of 4 succeeded meets 75 %: wave 2 starts, all done
    rig.drive(lambda: rig.campaign("tolerant").state == S.DONE, what="campaign done despite one revert")
    assert rig.state("tolerant", wave1[0]) == S.FAILED and rig.state("tolerant", wave2[0]) == S.SUCCEEDED


def test_six_field_quartz_cron_is_refused_with_the_five_field_form():
    with pytest.raises(CampaignError, match=r"has 6 field\(s\); it needs 5 .*'0 2 \* \* \*'"):
        CampaignSpec.parse({"window": {"cron": "0 0 2 * * ?", "minutes": 60}})
    with pytest.raises(CampaignError, match=r"has 7 field\(s\)"):
        CampaignSpec.parse({"window": {"cron": "0 0 2 * * ? 2027", "minutes": 60}})
    with pytest.raises(CampaignError, match=r"has 4 field\(s\)"):
        CampaignSpec.parse({"window": {"cron": "0 2 * *", "minutes": 60}})
    assert CampaignSpec.parse({"window": {"cron": "0 2 * * *", "minutes": 60}}).window.cron == "0 2 * * *"
    assert CampaignSpec.parse({"window": {"cron": "@daily", "minutes": 60}}).window.cron == "@daily"


def test_window_edges_are_exact():
    window = Window("0 2 * * *", 60, "Europe/Berlin")
    opens = datetime(2026, 12, 1, 1, 0, tzinfo=timezone.utc)  # 02:00 CET
    for before in (1, 0.5, 0.3, 0.001, 0.000001):
        assert not window_open(window, opens - timedelta(seconds=before)), before
    assert window_open(window, opens) and window_open(window, opens + timedelta(microseconds=1))
    assert window_open(window, opens + timedelta(minutes=60, microseconds=-1))
    assert not window_open(window, opens + timedelta(minutes=60))


def test_no_device_starts_before_the_window_opens(rig):
    rig.release()
    devices = [rig.devices.add(f"n{i}", "silent") for i in range(2)]
    opens = datetime(2026, 12, 1, 1, 0, tzinfo=timezone.utc)  # 02:00 in Berlin
    rig.clock.now = opens - timedelta(seconds=2)
    create_campaign(rig.store, "edge", "2.0.0", {"waves": [100], "timeouts": {"download": 86400},
                                                 "window": {"cron": "0 2 * * *", "minutes": 60,
                                                            "tz": "Europe/Berlin"}})
    start_campaign(rig.store, "edge", now=rig.clock.now)
    for before in (1, 0.5, 0.3, 0.001):  # the engine's steps just before the opening
        rig.clock.now = opens - timedelta(seconds=before)
        rig.tick()
        assert rig.jobs() == [], before
    view = campaign_summary(rig.store, "edge", now=rig.clock.now)
    assert view["window_open"] is False and view["window_opens_at"] == opens
    rig.clock.now = opens
    rig.tick()
    jobs = rig.jobs()
    assert sorted(j.device_id for j in jobs) == sorted(devices) and all(j.created_at >= opens for j in jobs)


def test_aborted_campaign_has_no_window_to_wait_for(rig):
    rig.release()
    rig.devices.add("a", "silent")
    rig.clock.now = datetime(2026, 12, 1, 0, 0, tzinfo=timezone.utc)  # 01:00 Berlin: closed
    create_campaign(rig.store, "closed", "2.0.0",
                    {"waves": [100], "window": {"cron": "0 2 * * *", "minutes": 60, "tz": "Europe/Berlin"}})
    start_campaign(rig.store, "closed", now=rig.clock.now)
    assert campaign_summary(rig.store, "closed", now=rig.clock.now)["window_open"] is False
    abort_campaign(rig.store, "closed", now=rig.clock.now)
    rig.tick()
    view = campaign_summary(rig.store, "closed", now=rig.clock.now)
    assert view["state"] == S.ABORTED and view["window_open"] is None and view["window_opens_at"] is None


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_paused_campaign_whose_devices_all_settled(rig, dynamic):
    rig.release()
    devices = [rig.devices.add(f"p{i}") for i in range(2)]
    create_campaign(rig.store, "settle", "2.0.0", {"waves": [100], "probation": 0, "dynamic": dynamic})
    start_campaign(rig.store, "settle", now=rig.clock.now)
    rig.tick()
    assert all(rig.state("settle", d) == S.IN_FLIGHT for d in devices)
    pause_campaign(rig.store, "settle")
    rig.drive(lambda: all(rig.state("settle", d) == S.SUCCEEDED for d in devices), what="devices finish")
    rig.tick()
    c = rig.campaign("settle")
    if dynamic:  # new devices may still join: it waits for the operator
        assert c.state == S.PAUSED and c.finished_at is None
        return
    assert c.state == S.DONE and c.finished_at == rig.clock.now
    assert c.reason == "every device settled while paused (paused by an operator)"


def test_paused_campaign_with_devices_left_stays_paused(rig):
    rig.release()
    first = rig.devices.add("first")
    later = rig.devices.add("later")
    create_campaign(rig.store, "left", "2.0.0", {"waves": [{"devices": [first]}, 100], "probation": 0})
    start_campaign(rig.store, "left", now=rig.clock.now)
    rig.tick()
    pause_campaign(rig.store, "left")
    rig.drive(lambda: rig.state("left", first) == S.SUCCEEDED, what="first device finishes")
    rig.tick(3)
    assert rig.campaign("left").state == S.PAUSED and rig.state("left", later) == S.QUEUED


def test_status_has_time_stamps_probation_left_eta_and_device_filters(rig):
    rig.release()
    done = [rig.devices.add(f"s{i}") for i in range(2)]
    slow = [rig.devices.add(f"q{i}", "silent") for i in range(2)]
    create_campaign(rig.store, "clocks", "2.0.0",
                    {"waves": [{"devices": done + slow[:1]}, 100], "probation": 600, "failure": 100, "success": 100,
                     "timeouts": {"download": 86400}})
    start = rig.clock.now
    start_campaign(rig.store, "clocks", now=start)
    rig.drive(lambda: all(rig.state("clocks", d) == S.PROBATION for d in done), what="on probation")
    confirmed = rig.row("clocks", done[0]).confirmed_at
    now = rig.clock.advance(60)
    view = campaign_summary(rig.store, "clocks", now=now)
    assert view["created_at"] is not None and view["started_at"] == start and view["finished_at"] is None
    assert view["probation_ends_at"] == confirmed + timedelta(seconds=600)
    assert view["waves"][0]["probation_ends_at"] == view["probation_ends_at"]
    assert view["waves"][1]["probation_ends_at"] is None
    rows = {d["device"]: d for d in view["devices"]}
    assert rows[done[0]]["probation_ends_at"] == confirmed + timedelta(seconds=600)
    assert rows[slow[0]]["probation_ends_at"] is None
    assert view["eta"] is None  # nothing settled yet: no pace to go by
    rig.clock.advance(600)
    rig.drive(lambda: all(rig.state("clocks", d) == S.SUCCEEDED for d in done), what="probation over")
    now = rig.clock.now
    view = campaign_summary(rig.store, "clocks", now=now)
    # 2 settled in (now - start), 2 left: as long again
    assert view["eta"] == now + (now - start) * 2 / 2
    only = campaign_summary(rig.store, "clocks", now=now, device_states=[S.SUCCEEDED])["devices"]
    assert sorted(d["device"] for d in only) == sorted(done)
    wave2 = campaign_summary(rig.store, "clocks", now=now, device_wave=2)["devices"]
    assert [d["device"] for d in wave2] == [slow[1]]
    both = campaign_summary(rig.store, "clocks", now=now, device_states=[S.IN_FLIGHT, S.QUEUED], device_wave=1)
    assert [d["device"] for d in both["devices"]] == [slow[0]]
    assert both["counts"][S.SUCCEEDED] == 2  # the counts stay whole
    pause_campaign(rig.store, "clocks")
    assert campaign_summary(rig.store, "clocks", now=now)["eta"] is None  # paused: no estimate
