"""Campaigns end to end: control center (engine on its own clock) -> real Mosquitto -> real MicroPython devices."""
from __future__ import annotations

import os

from fota.examples import hello_files
from fota.server.campaigns import abort_campaign, campaign_summary, create_campaign, start_campaign
from fota.server.deployments import device_history
from fota.server.releases import create_release
from fota.server.store import Job
from fota.testkit.fleet import Fleet
from fota.tools.waiting import wait_until
from fota.tools.bundle import pack_files

from db_fixtures import on_one_database


def _release(fleet, version, padding=0, broken=False):
    files = hello_files(version, broken=broken)
    if padding:
        files["blob.bin"] = os.urandom(padding)
    return create_release(fleet.store, fleet.blobs, fleet.key, pack_files(files), version, ["unix"])


def _summary(fleet, name):
    return campaign_summary(fleet.store, name)


@on_one_database("postgres")
def test_canary_then_fleet_success_counts_only_after_health_and_probation(tmp_path, broker, db_url):
    fleet = Fleet(tmp_path, broker, db_url, campaign_interval=0.2)
    try:
        ids = ["cmp-1", "cmp-2", "cmp-3"]
        for d in ids:
            fleet.add_device(d)
        fleet.wait_online(*ids)
        _release(fleet, "1.1.0")
        create_campaign(fleet.store, "e2e", "1.1.0", {"waves": [{"devices": ["cmp-1"]}, 100], "probation": 2})
        start_campaign(fleet.store, "e2e")
        wait_until(lambda: _summary(fleet, "e2e")["state"] == "done", timeout=120, what="campaign done")
        summary = _summary(fleet, "e2e")
        assert [w["counts"] for w in summary["waves"]] == [{"succeeded": 1}, {"succeeded": 2}]
        rows = {d["device"]: d for d in summary["devices"]}
        for d in ids:
            assert fleet.running_version(d) == "1.1.0"
            history = device_history(fleet.store, d)
            confirmed = next(e for e in history if e.state == "confirmed")
            health = [e for e in history if e.state == "health" and e.version == "1.1.0"]
            assert health and health[0].payload["ok"] is True
            assert (health[0].boot, health[0].seq) > (confirmed.boot, confirmed.seq)
            # succeeded no sooner than the probation time after the confirmation was seen
            assert (rows[d]["updated_at"] - rows[d]["confirmed_at"]).total_seconds() >= 2
        # the fleet's wave started only after the canary's probation
        canary_ok = rows["cmp-1"]["updated_at"]
        with fleet.store.session() as s:
            later = [s.get(Job, rows[d]["job"]).created_at for d in ("cmp-2", "cmp-3")]
        assert all(t >= canary_ok for t in later)
    finally:
        fleet.close()


@on_one_database("sqlite")
def test_abort_mid_download_leaves_no_device_half_installed(tmp_path, broker, db_url):
    # Small chunks and a one-chunk window: the download takes long enough to abort in the middle.
    fleet = Fleet(tmp_path, broker, db_url, chunk=256, campaign_interval=0.2)
    try:
        ids = ["abt-1", "abt-2"]
        for d in ids:
            fleet.add_device(d, max_inflight=256)
        fleet.wait_online(*ids)
        _release(fleet, "1.1.0", padding=400_000)  # about 1,600 chunks, one at a time
        create_campaign(fleet.store, "stop", "1.1.0", {"waves": [100], "probation": 0})
        start_campaign(fleet.store, "stop")

        def downloading():
            rows = _summary(fleet, "stop")["devices"]
            return all(r["job"] and fleet.job(r["job"]).state == "downloading" for r in rows)
        wait_until(downloading, timeout=60, what="both devices mid-download")
        abort_campaign(fleet.store, "stop")
        wait_until(lambda: _summary(fleet, "stop")["state"] == "aborted", timeout=60, what="aborted")
        for row in _summary(fleet, "stop")["devices"]:
            d = row["device"]
            assert row["state"] == "cancelled", row
            job = fleet.job(row["job"])
            assert job.state == "cancelled" and "cancelled by job" in job.reason
            statuses = [s["state"] for s in fleet.spy.of(d, job.id)]
            assert statuses[-1] == "cancelled" and "rebooting" not in statuses
            record = fleet.boot_record(d)
            assert record["trial"] is None and record["active"] == "a" and record["versions"]["a"] == "1.0.0"
            assert fleet.running_version(d) == "1.0.0" and fleet.devices[d].reboots == 0
        fleet.wait_online(*ids)  # still connected, still on the old firmware
    finally:
        fleet.close()
