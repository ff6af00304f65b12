"""Deployment limits on the server: --min-battery (sent in the signed command) and --timeout
(unfinished jobs end timed_out), in the store (SQLite and PostgreSQL) and in the CLI."""
from __future__ import annotations

import json
from datetime import timedelta

import pytest

from fota.examples import hello_files
from fota.server.deployments import (TIMED_OUT, DeploymentError, create_deployment, deployment_summary,
                                     expire_jobs)
from fota.server.fleet import provision_device
from fota.server.releases import create_release, update_command
from fota.server.store import Deployment, Job, Store
from fota.tools.bundle import pack_files
from fota.tools.keyring import Keyring
from test_cli import assert_clean_error, fota, fota_in_process


@pytest.fixture
def setup(tmp_path, db_url):
    store = Store(db_url)
    ring = Keyring(tmp_path / "keys")
    ring.init()
    signer = ring.signer()
    rel = create_release(store, tmp_path / "blobs", signer.key, pack_files(hello_files("2.0.0")), "2.0.0", ["unix"])
    for d in ("lim-1", "lim-2", "lim-3"):
        provision_device(store, d, "unix")
    yield store, rel, signer
    store.dispose()


def test_limits_are_stored_validated_and_the_battery_gate_is_signed_into_the_command(setup):
    store, rel, signer = setup
    dep = create_deployment(store, rel, device_ids=["lim-1"], min_battery=30, timeout=600)
    summary = deployment_summary(store, dep.id)
    assert (summary["min_battery"], summary["timeout"]) == (30, 600)
    plain = create_deployment(store, rel, device_ids=["lim-2"])
    assert (deployment_summary(store, plain.id)["min_battery"], deployment_summary(store, plain.id)["timeout"]) == (None, None)
    for bad in ({"min_battery": 101}, {"min_battery": -1}, {"min_battery": True}, {"timeout": 0}, {"timeout": 1.5}):
        with pytest.raises(DeploymentError):
            create_deployment(store, rel, device_ids=["lim-1"], **bad)
    body = json.loads(json.loads(update_command(7, "lim-1", rel, signer, min_battery=30))["body"])
    assert body["min_battery"] == 30
    assert "min_battery" not in json.loads(json.loads(update_command(7, "lim-1", rel, signer))["body"])


def test_expired_deployments_time_out_their_unfinished_jobs_only(setup):
    store, rel, _ = setup
    dep = create_deployment(store, rel, device_ids=["lim-1", "lim-2", "lim-3"], timeout=60)
    forever = create_deployment(store, rel, device_ids=["lim-1"])
    j1, j2, j3 = (j.id for j in dep.jobs)
    with store.session() as s:
        s.get(Job, j1).state = "confirmed"
        s.get(Job, j2).state = "postponed"
        created = s.get(Deployment, dep.id).created_at
    with store.session() as s:
        assert expire_jobs(s, created + timedelta(seconds=59)) == {}
    with store.session() as s:
        assert expire_jobs(s, created + timedelta(seconds=61)) == {dep.id: {j2, j3}}
    with store.session() as s:
        jobs = {j.id: j for j in s.query(Job)}
        assert jobs[j1].state == "confirmed"
        assert (jobs[j2].state, jobs[j3].state) == (TIMED_OUT, TIMED_OUT)
        assert jobs[j2].reason == "no final status within 60 s of the deployment's start (last state: postponed)"
        assert jobs[j3].reason.endswith("(last state: pending)")
        assert jobs[forever.jobs[0].id].state == "pending"
        # the postponed job's device holds the command: a cancel follows it; the never-sent
        # pending one needs none
        cancels = [(j.device_id, j.target_job, j.state) for j in jobs.values() if j.kind == "cancel"]
        assert cancels == [("lim-2", j2, "pending")]
    with store.session() as s:  # nothing left to expire
        assert expire_jobs(s, created + timedelta(seconds=3600)) == {}


def test_cli_deploy_with_min_battery_and_timeout(tmp_path):
    home = tmp_path / "home"
    assert fota_in_process(home, "keys", "init").returncode == 0  # setup: in the test's process
    app = tmp_path / "app"
    app.mkdir()
    (app / "app.py").write_bytes(hello_files("1.1.0")["app.py"])
    r = fota_in_process(home, "release", "create", str(app), "--version", "1.1.0", "--hardware", "unix")
    assert r.returncode == 0, r.stdout + r.stderr
    assert fota_in_process(home, "device", "add", "cli-b", "--hardware", "unix").returncode == 0
    assert_clean_error(fota(home, "deploy", "1.1.0", "--device", "cli-b", "--min-battery", "101"), "min-battery")
    assert_clean_error(fota(home, "deploy", "1.1.0", "--device", "cli-b", "--timeout", "0"), "timeout")
    r = fota(home, "deploy", "1.1.0", "--device", "cli-b", "--min-battery", "40", "--timeout", "900")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "battery >= 40%" in r.stdout and "timeout 900 s" in r.stdout
    store = Store(f"sqlite:///{home / 'fota.db'}")
    try:
        with store.session() as s:
            dep = s.query(Deployment).one()
            assert (dep.min_battery, dep.timeout_s) == (40, 900)
    finally:
        store.dispose()
