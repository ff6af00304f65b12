"""The HTTP API agrees with its own OpenAPI schema, and names and ids are checked where they enter.

The schemathesis run is sampled here (a few cases per operation, every check, SQLite and
PostgreSQL); `./run bench api_fuzz` runs the long one.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import update

from fota.server.campaigns import CampaignError, CampaignNotFound, create_campaign, get_campaign
from fota.server.deployments import DeploymentError, create_deployment, deployment_summary
from fota.server.fleet import FleetError, get_device, provision_device
from fota.server.releases import ReleaseError, create_release, get_release
from fota.server.store import Campaign, Release
from fota.server.store.models import AuditEvent
from fota.testkit.apifuzz import fuzz

from test_cli import assert_clean_error, fota_in_process
from test_api import API, KEY, bearer, bundle_bytes, env, lite, seed_release_and_deployment  # noqa: F401 (fixtures)

SAMPLED_EXAMPLES = 10  # per operation and phase; the coverage phase adds its own fixed cases

# Stored today, and the newline one broke the Location header; non-Latin-1 gave a 500 there
UNSAFE_VERSIONS = ["../../..", "1.0\n", "1.0\nX-Injected: 1", "\x1b[31m1.0", "1.0/../2.0", "版本1", "v 1",
                   ".hidden", "1.0\x00", "x" * 65, ""]


# ---- schemathesis, every check ---------------------------------------------------------------
def test_schemathesis_every_check_passes(db_url, tmp_path):
    """Whole schema (endpoints added later are covered), admin token, real database."""
    result = fuzz(db_url, tmp_path / "fuzz", SAMPLED_EXAMPLES, log=tmp_path / "schemathesis.log")
    summary = {k: result.get(k) for k in ("generated", "failing_cases", "server_errors", "failures", "errors")}
    assert result["ok"], f"{json.dumps(summary, indent=1)}\n{result['output_tail']}"
    assert result["operations"] >= 17 and result["generated"] > 300, summary


# ---- versions and names ----------------------------------------------------------------------
def test_unsafe_release_versions_are_refused_and_nothing_is_stored(env):
    seed_release_and_deployment(env)
    before = env.snapshot()
    for version in UNSAFE_VERSIONS:
        r = env.upload(env.admin, version)
        assert r.status_code == 422, (version, r.text)
        with pytest.raises(ReleaseError, match="invalid version"):
            create_release(env.store, env.blobs, KEY, bundle_bytes(), version, ["esp32"])
        with pytest.raises(ReleaseError, match="invalid min_version"):
            create_release(env.store, env.blobs, KEY, bundle_bytes(), "5.0.0", ["esp32"], min_version=version)
    for hardware in ("esp 32", "esp32\n", "../x", "x" * 65):
        assert env.upload(env.admin, "5.0.0", hardware=(hardware,)).status_code == 422, hardware
        with pytest.raises(ReleaseError, match="invalid hardware type"):
            create_release(env.store, env.blobs, KEY, bundle_bytes(), "5.0.0", [hardware])
    assert env.snapshot() == before


def test_semver_versions_are_accepted_and_located(lite):
    """Pre-release and build metadata fit; the Location header leads back to the release."""
    for version, hardware in (("1.2.0-rc.1+build.5", ["esp32"]), ("2026.12.04", ["esp32,rp2040"])):
        r = lite.upload(lite.admin, version, hardware=tuple(hardware))
        assert r.status_code == 201, r.text
        again = lite.client.get(r.headers["location"], headers=bearer(lite.reader))
        assert again.status_code == 200 and again.json()["version"] == version
    assert lite.client.get(f"{API}/releases/2026.12.04", headers=bearer(lite.reader)).json()["hardware"] == [
        "esp32", "rp2040"]


def test_cli_release_create_refuses_unsafe_versions(tmp_path):
    """`fota release create` in the test's process (test_cli runs it as a process)."""
    home = tmp_path / "home"
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "app.py").write_text('VERSION = "1.1.0"\n')
    assert fota_in_process(home, "keys", "init").returncode == 0
    for version in ("../../..", "1.1.0\n\x1b[2J"):
        assert_clean_error(fota_in_process(home, "release", "create", str(app_dir), "--version", version, "--hardware", "esp32"),
                           "invalid version")
    assert_clean_error(fota_in_process(home, "release", "create", str(app_dir), "--version", "1.1.0", "--hardware", "esp32",
                            "--min-version", "1.0\n"), "invalid min_version")
    assert_clean_error(fota_in_process(home, "release", "create", str(app_dir), "--version", "1.1.0", "--hardware", "esp 32"),
                       "invalid hardware type")
    assert "1.1.0" not in fota_in_process(home, "releases").stdout


def test_campaign_device_and_deployment_names_are_bounded(lite):
    store = lite.store
    seed_release_and_deployment(lite)
    for name in ("a/b", "a\nb", "é", "../x", "x" * 65, "12", ""):
        with pytest.raises(CampaignError, match="invalid campaign name"):
            create_campaign(store, name, "1.0.0")
        r = lite.client.post(f"{API}/campaigns", headers=bearer(lite.admin), json={"name": name, "release": "1.0.0"})
        assert r.status_code == 422, (name, r.text)
    assert create_campaign(store, "2026-spring", "1.0.0").name == "2026-spring"  # digits first, not all digits
    for tag in ("a b", "lab\n", "\x00", "x" * 65):
        with pytest.raises(FleetError, match="invalid tag"):
            provision_device(store, "dev-9", "esp32", tags=[tag])
        with pytest.raises(DeploymentError, match="invalid tag"):
            create_deployment(store, "1.0.0", tag=tag)
        with pytest.raises(CampaignError, match="invalid filter tags"):
            create_campaign(store, "tagged", "1.0.0", {"filter": {"tags": [tag]}})
        with pytest.raises(CampaignError, match="invalid wave tag"):
            create_campaign(store, "tagged", "1.0.0", {"waves": [{"tag": tag}]})
    with pytest.raises(FleetError, match="invalid hardware type"):
        provision_device(store, "dev-9", "esp32\x1b[0m")
    with pytest.raises(DeploymentError, match="invalid device id"):
        create_deployment(store, "1.0.0", device_ids=["dev-1\x00"])


def test_names_stored_before_the_rules_are_still_found(env):
    """A version or campaign name stored before these rules is looked up, not refused (NUL is)."""
    seed_release_and_deployment(env)
    create_campaign(env.store, "spring", "1.0.0")
    with env.store.session() as s:
        s.execute(update(Release).where(Release.version == "1.0.0").values(version="old 1.0"))
        s.execute(update(Campaign).where(Campaign.name == "spring").values(name="my spring"))
    assert get_release(env.store, "old 1.0").version == "old 1.0"
    assert get_campaign(env.store, "my spring").name == "my spring"
    assert create_deployment(env.store, "old 1.0", device_ids=["dev-1"]).release_id == 1
    for ref in ("old 1.0\x00", "\udcff", "x" * 65):
        with pytest.raises(ReleaseError, match="no release"):
            get_release(env.store, ref)
        with pytest.raises(CampaignNotFound):
            get_campaign(env.store, ref)


def test_campaign_spec_numbers_and_inventory_are_bounded(lite):
    """NaN, infinities (json accepts 1e400) and NUL passed the spec checks: 500s or unstorable JSONB."""
    seed_release_and_deployment(lite)
    bad_specs = [{"backoff": float("inf")}, {"rate": float("nan")}, {"max_in_flight": 2**70},
                 {"timeouts": {"download": 10**30}}, {"filter": {"inventory": {"fw": "a\x00b"}}},
                 {"filter": {"inventory": {"fw": [float("nan")]}}}, {"filter": {"inventory": {"a b": 1}}},
                 {"filter": {"versions": ["1.0\n"]}}, {"filter": {"devices": ["dev/1"]}},
                 {"window": {"cron": "0 2 * * *", "minutes": 60, "tz": "x" * 300}}]
    for spec in bad_specs:
        with pytest.raises(CampaignError):
            create_campaign(lite.store, "spec", "1.0.0", spec)
    body = '{"name": "spec", "release": "1.0.0", "spec": {"backoff": 1e400}}'
    r = lite.client.post(f"{API}/campaigns", headers={**bearer(lite.admin), "Content-Type": "application/json"},
                         content=body)
    assert r.status_code == 400 and "backoff" in r.json()["detail"], r.text


# ---- ids beyond the database's integers, control characters ----------------------------------
def test_out_of_range_ids_and_control_characters_are_not_server_errors(env):
    """An int beyond 64 bits was an OverflowError (SQLite), beyond 32 bits a PostgreSQL error; NUL too."""
    seed_release_and_deployment(env)
    create_campaign(env.store, "spring", "1.0.0")
    before = env.snapshot()
    admin = bearer(env.admin)
    for release in (2**70, 2**31, 0, -1):
        r = env.client.post(f"{API}/deployments", headers=admin, json={"release": release, "devices": ["dev-1"]})
        assert r.status_code == 422, r.text
    for release in ("99999999999999999999", "2147483648"):  # a version of digits is looked up as an id too
        r = env.client.post(f"{API}/deployments", headers=admin, json={"release": release, "devices": ["dev-1"]})
        assert r.status_code == 400 and "no release" in r.json()["detail"], r.text
        with pytest.raises(ReleaseError, match="no release"):
            get_release(env.store, release)
    r = env.client.post(f"{API}/deployments", headers=admin,
                        json={"release": "1.0.0", "devices": ["dev-1"], "timeout": 2**31})
    assert r.status_code == 422, r.text
    with pytest.raises(DeploymentError, match="timeout"):
        create_deployment(env.store, "1.0.0", device_ids=["dev-1"], timeout=2**40)
    assert env.client.get(f"{API}/deployments/{2**40}", headers=admin).status_code == 422
    with pytest.raises(DeploymentError, match="no deployment"):
        deployment_summary(env.store, 2**70)
    for ref in ("99999999999999999999", "²", "½"):
        with pytest.raises(CampaignNotFound):
            get_campaign(env.store, ref)
    assert env.client.get(f"{API}/campaigns/99999999999999999999", headers=admin).status_code == 404
    with pytest.raises(FleetError, match="no device"):
        get_device(env.store, "dev-1\x00")
    for path, params in ((f"{API}/devices", {"hardware": "esp32\x00"}), (f"{API}/devices", {"tag": "lab\x00"}),
                         (f"{API}/audit", {"actor": "x\x00"}), (f"{API}/audit", {"action": "\x00"}),
                         (f"{API}/releases/1.0%00", {}), (f"{API}/devices/dev-1%00", {}),
                         (f"{API}/campaigns/spring%00", {})):
        r = env.client.get(path, headers=admin, params=params)
        assert r.status_code == 422, (path, params, r.text)
    assert env.snapshot() == before


def test_upload_file_name_is_kept_printable_in_the_audit_log(env):
    """The upload's file name goes into the audit event (JSONB on PostgreSQL, which refuses NUL)."""
    boundary = "fota-boundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="version"\r\n\r\n3.0.0\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="hardware"\r\n\r\nesp32\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a\x00b\x1b.fotb"\r\n'
            f'Content-Type: application/octet-stream\r\n\r\n').encode() + bundle_bytes("3.0.0") + \
        f"\r\n--{boundary}--\r\n".encode()  # raw: httpx would escape the NUL as %00
    r = env.client.post(f"{API}/releases", content=body,
                        headers={**bearer(env.admin), "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 201, r.text
    with env.store.session() as s:
        [event] = s.query(AuditEvent).filter_by(action="release.create").all()
        assert event.detail["filename"] == "a?b?.fotb"


# ---- 405 and Allow ---------------------------------------------------------------------------
def test_405_allow_lists_the_methods_the_schema_documents(lite):
    schema = lite.client.get("/openapi.json").json()
    paths = {"/api/v1/releases": "1.0.0", "/api/v1/campaigns": None, "/api/v1/campaigns/{ref}/start": "x",
             "/api/v1/releases/{version}": "1.0.0", "/metrics": None}
    for template, value in paths.items():
        path = template.replace("{ref}", value or "").replace("{version}", value or "")
        documented = sorted(m.upper() for m in schema["paths"][template])
        for method in ("OPTIONS", "DELETE", "PATCH", "HEAD" if "GET" not in documented else "PUT"):
            if method in documented:  # DELETE /releases/{version}
                continue
            r = lite.client.request(method, path, headers=bearer(lite.admin))
            assert r.status_code == 405, (method, path, r.status_code)
            assert r.headers["allow"] == ", ".join(documented), (method, path, r.headers["allow"])


def test_schema_documents_every_status_an_endpoint_returns(lite):
    """The statuses the tests above rely on are in the schema (schemathesis checks the rest)."""
    paths = lite.client.get("/openapi.json").json()["paths"]
    assert "401" in paths["/metrics"]["get"]["responses"]
    post_release = paths["/api/v1/releases"]["post"]["responses"]
    assert {"201", "400", "401", "403", "413", "422", "503"} <= set(post_release)
    assert {"201", "400", "401", "403", "422"} <= set(paths["/api/v1/deployments"]["post"]["responses"])
    assert {"200", "401", "403", "404", "409", "422"} <= set(paths["/api/v1/releases/{version}"]["delete"]["responses"])
