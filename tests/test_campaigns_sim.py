"""A campaign over simulated devices (fota.sim: the device's own UpdateCore and boot selector per
device, real Mosquitto, real SQLite, the real ControlCenter stepping the campaign on its clock),
some of whose new image fails its health check: thresholds pause the waves, resume accepts."""
from __future__ import annotations

import os
import time

from sqlalchemy import func, select

from fota.device import protocol as P
from fota.server.campaigns import CampaignStateError, campaign_summary, create_campaign, resume_campaign, start_campaign
from fota.server.releases import create_release
from fota.server.store import Job, StatusEvent, Store
from fota.sim import FailurePlan, SimFleet, device_ids, provision
from fota.testkit.center import CenterThread
from fota.tools.waiting import wait_until
from fota.tools.keyring import Keyring
from test_sim import SimThread, _online, add_users
from db_fixtures import on_one_database


@on_one_database("sqlite")
def test_campaign_over_simulated_fleet_pauses_on_failures_and_finishes(tmp_path, broker, db_url):
    keyring = Keyring(tmp_path / "keys")
    keyring.init()
    signer = keyring.signer()
    store = Store(db_url)
    center = CenterThread(store, broker.server_url, tmp_path / "blobs", signer=signer,
                          keys_update=keyring.keys_update(), campaign_interval=0.2).start()
    ids = device_ids(40, "simcmp")
    passwords = provision(store, ids)
    add_users(broker, passwords)
    fleet = SimFleet.build(passwords, host=broker.host, port=broker.port, root_key=keyring.root_public(),
                           trust=keyring.trust(), plan=FailurePlan(unhealthy=0.1, seed=3))
    sim = SimThread(fleet).start()
    try:
        wait_until(lambda: _online(store, ids), timeout=60, what="simulated devices online")
        bad = {i for i, d in fleet.devices.items() if d.profile.unhealthy}
        assert len(bad) == 4
        create_release(store, tmp_path / "blobs", signer.key, os.urandom(8 * 1024), "2.0.0", ["sim"], kind="image")
        # more than 10 % of a wave failing pauses the campaign; 90 % must succeed to advance
        create_campaign(store, "simwaves", "2.0.0", {"waves": [10, 50, 100], "failure": 10, "success": 90,
                                                     "probation": 1, "max_in_flight": 8, "retries": 0})
        start_campaign(store, "simwaves")
        pauses = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            summary = campaign_summary(store, "simwaves")
            if summary["state"] == "done":
                break
            if summary["state"] == "paused":
                pauses.append(summary)
                current = summary["wave"]
                # paused: nothing of a later wave was started, and nothing new starts
                later = [d for d in summary["devices"] if d["wave"] > current]
                assert all(d["job"] is None for d in later)
                with store.session() as s:
                    jobs = s.scalar(select(func.count()).select_from(Job).where(Job.kind == "update"))
                time.sleep(1.0)
                with store.session() as s:
                    assert s.scalar(select(func.count()).select_from(Job).where(Job.kind == "update")) == jobs
                try:
                    resume_campaign(store, "simwaves")
                except CampaignStateError:
                    # every device settled while it was paused: done, nothing to resume (docs/campaigns.md §6)
                    assert campaign_summary(store, "simwaves")["state"] == "done"
            time.sleep(0.2)
        summary = campaign_summary(store, "simwaves")
        assert summary["state"] == "done", summary["reason"]
        rows = {d["device"]: d for d in summary["devices"]}
        # a device whose new image failed its health check reverted: failed, never success
        assert {i for i, d in rows.items() if d["state"] == "failed"} == bad
        assert all(rows[i]["code"] == P.E_HEALTH and rows[i]["job_state"] == "reverted" for i in bad)
        assert {i for i, d in rows.items() if d["state"] == "succeeded"} == set(ids) - bad
        assert fleet.versions() == {"2.0.0": 36, "1.0.0": 4}
        # every pause names the threshold that stopped it; at least one was the failure threshold
        assert all("(threshold 10%)" in p["reason"] or "below its success threshold" in p["reason"]
                   for p in pauses), [p["reason"] for p in pauses]
        assert any("(threshold 10%)" in p["reason"] for p in pauses)
        # success came from a health report of the new version after the confirmation
        with store.session() as s:
            healthy = set(s.scalars(select(StatusEvent.device_id).where(
                StatusEvent.state == "health", StatusEvent.version == "2.0.0")))
        assert set(ids) - bad <= healthy
    finally:
        sim.stop()
        center.stop()
        store.dispose()
