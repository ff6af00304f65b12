"""The operators' HTTP API: bearer tokens, roles, audit log (FastAPI TestClient on SQLite and PostgreSQL)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update
from typer.testing import CliRunner

from fota.device import ecdsa
from fota.server import audit
from fota.server.api import create_app
from fota.server.auth import AuthError, create_token, hash_secret, revoke_token, verify_token
from fota.server.broker import free_port
from fota.server.fleet import provision_device
from fota.server.home import Home
from fota.server.store import Base, Deployment, Device, Job, Release, StatusEvent, Store, utcnow
from fota.server.store.models import ApiToken, AuditEvent
from fota.testkit.broker import accepted
from fota.tools.bundle import pack_files
from fota.tools.signing import generate_private_key, public_key_bytes

from test_cli import stop

API = "/api/v1"
KEY = generate_private_key()
COUNTED = (Release, Device, Deployment, Job, StatusEvent, ApiToken, AuditEvent)


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def bundle_bytes(version: str = "1.1.0") -> bytes:
    return pack_files({"app.py": f'VERSION = "{version}"\n'.encode()})


@dataclass
class Env:
    store: Store
    blobs: Path
    client: TestClient
    admin: str  # secrets
    reader: str

    def snapshot(self) -> dict:
        """Row counts of every table, and the blob files: equal snapshots = nothing changed."""
        with self.store.session() as s:
            counts = {m.__tablename__: s.scalar(select(func.count()).select_from(m)) for m in COUNTED}
        blobs = sorted(p.name for p in self.blobs.iterdir()) if self.blobs.exists() else []
        return {"rows": counts, "blobs": blobs}

    def upload(self, secret: str | None, version: str = "1.1.0", data: bytes | None = None,
               filename: str = "app.fotb", hardware: tuple[str, ...] = ("esp32",)) -> httpx.Response:
        headers = bearer(secret) if secret else {}
        return self.client.post(f"{API}/releases", headers=headers,
                                files={"file": (filename, bundle_bytes(version) if data is None else data)},
                                data={"version": version, "hardware": list(hardware)})


def make_env(url: str, tmp_path: Path, **app_kwargs) -> Env:
    store = Store(url)
    blobs = tmp_path / "blobs"
    app = create_app(store, blobs, lambda: KEY, **app_kwargs)
    _, admin = create_token(store, "ops-admin", "admin")
    _, reader = create_token(store, "viewer", "read")
    provision_device(store, "dev-1", "esp32", tags=["lab"])
    provision_device(store, "dev-2", "esp32", tags=["lab", "floor-2"])
    provision_device(store, "dev-3", "rp2040", tags=["lab"])
    return Env(store, blobs, TestClient(app, raise_server_exceptions=False), admin, reader)


def env_fixture(url: str, tmp_path: Path):
    """The body of an Env fixture: make_env, then close its client and its store."""
    e = make_env(url, tmp_path)
    yield e
    e.client.close()
    e.store.dispose()


@pytest.fixture
def env(db_url, tmp_path):
    yield from env_fixture(db_url, tmp_path)


@pytest.fixture
def lite(sqlite_url, tmp_path):
    yield from env_fixture(sqlite_url, tmp_path)


def admin_requests(env: Env) -> list[tuple[str, str, dict]]:
    """(method, path, request kwargs) of every admin endpoint, with valid bodies."""
    return [
        ("POST", f"{API}/releases", {"files": {"file": ("app.fotb", bundle_bytes("9.0.0"))},
                                     "data": {"version": "9.0.0", "hardware": ["esp32"]}}),
        ("POST", f"{API}/deployments", {"json": {"release": "1.0.0", "devices": ["dev-1"]}}),
        ("POST", f"{API}/deployments/1/cancel", {}),
        ("GET", f"{API}/audit", {}),
        ("GET", f"{API}/tokens", {}),
        ("POST", f"{API}/tokens", {"json": {"name": "ci", "role": "read"}}),
        ("POST", f"{API}/tokens/viewer/revoke", {}),
        ("DELETE", f"{API}/releases/1.0.0", {}),
        ("POST", f"{API}/release-prune", {"json": {"keep": 1}}),
        ("POST", f"{API}/release-gc", {"json": {}}),
        ("POST", f"{API}/devices/dev-3/rekey", {}),
        ("POST", f"{API}/devices/dev-3/revoke", {}),
    ]


def read_requests() -> list[str]:
    return [f"{API}/devices", f"{API}/devices/dev-1", f"{API}/devices/dev-1/history", f"{API}/releases",
            f"{API}/releases/1.0.0", f"{API}/deployments/1", f"{API}/deployments", f"{API}/whoami"]


def seed_release_and_deployment(env: Env) -> None:
    """Release 1.0.0 and deployment 1 (to dev-1), so that the admin requests above are valid."""
    assert env.upload(env.admin, "1.0.0").status_code == 201
    assert env.client.post(f"{API}/deployments", headers=bearer(env.admin),
                           json={"release": "1.0.0", "devices": ["dev-1"]}).status_code == 201


def assert_401(response: httpx.Response, needle: str = "") -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.headers["content-type"].startswith("application/json")
    assert needle in response.json()["detail"]


# ---- authentication ------------------------------------------------------------------------------
def test_no_token_is_401_and_changes_nothing(env):
    seed_release_and_deployment(env)
    before = env.snapshot()
    for method, path, kwargs in admin_requests(env):
        assert_401(env.client.request(method, path, **kwargs), "missing bearer token")
        # another scheme is no bearer token either
        assert_401(env.client.request(method, path, headers={"Authorization": "Basic b3BzOnB3"}, **kwargs))
    for path in read_requests():
        assert_401(env.client.get(path), "missing bearer token")
    assert env.snapshot() == before


def test_wrong_token_is_401(env):
    seed_release_and_deployment(env)
    before = env.snapshot()
    with env.store.session() as s:
        stored_hash = s.scalar(select(ApiToken.token_hash).where(ApiToken.name == "ops-admin"))
    wrong = ["fota_" + "A" * 43, env.admin[:-1], env.admin + "x", "not-a-fota-token", stored_hash,
             "fota_" + stored_hash, "x" * 5000]
    for secret in wrong:
        for method, path, kwargs in admin_requests(env):
            assert_401(env.client.request(method, path, headers=bearer(secret), **kwargs), "invalid token")
        assert_401(env.client.get(f"{API}/devices", headers=bearer(secret)), "invalid token")
    assert env.snapshot() == before


def test_expired_token_is_401(env):
    seed_release_and_deployment(env)
    token, secret = create_token(env.store, "temp-admin", "admin", ttl_seconds=3600)
    assert env.client.get(f"{API}/devices", headers=bearer(secret)).status_code == 200
    with env.store.session() as s:
        s.execute(update(ApiToken).where(ApiToken.id == token.id)
                  .values(expires_at=utcnow() - timedelta(seconds=1)))
    before = env.snapshot()
    for method, path, kwargs in admin_requests(env):
        assert_401(env.client.request(method, path, headers=bearer(secret), **kwargs), "token expired")
    assert_401(env.client.get(f"{API}/devices", headers=bearer(secret)), "token expired")
    assert env.snapshot() == before
    with pytest.raises(AuthError, match="expired"):
        verify_token(env.store, secret)


def test_revoked_token_is_401(env):
    seed_release_and_deployment(env)
    assert env.client.get(f"{API}/audit", headers=bearer(env.admin)).status_code == 200
    revoke_token(env.store, "ops-admin", actor="test")
    before = env.snapshot()
    for method, path, kwargs in admin_requests(env):
        assert_401(env.client.request(method, path, headers=bearer(env.admin), **kwargs), "token revoked")
    assert_401(env.client.get(f"{API}/devices", headers=bearer(env.admin)), "token revoked")
    assert env.snapshot() == before
    with pytest.raises(AuthError, match="already revoked"):
        revoke_token(env.store, "ops-admin")
    with pytest.raises(AuthError, match="no token"):
        revoke_token(env.store, "nobody")


def test_read_token_cannot_change_anything(env):
    seed_release_and_deployment(env)
    before = env.snapshot()
    for method, path, kwargs in admin_requests(env):
        response = env.client.request(method, path, headers=bearer(env.reader), **kwargs)
        assert response.status_code == 403, (path, response.text)
        assert "admin" in response.json()["detail"]
    # the same requests with the admin token are valid (the 403 was the role, not the body)
    r = env.client.post(f"{API}/deployments", headers=bearer(env.admin),
                        json={"release": "1.0.0", "devices": ["dev-1"]})
    assert r.status_code == 201
    after = env.snapshot()
    assert after["rows"]["deployments"] == before["rows"]["deployments"] + 1
    before["rows"]["deployments"] += 1
    before["rows"]["jobs"] += 1
    before["rows"]["audit_events"] += 1
    assert after == before


def test_whoami_newest_deployments_and_tokens_for_remote_mode(env):
    """What `fota` in remote mode needs beyond the rest: who am I, the latest deployment, tokens."""
    who = env.client.get(f"{API}/whoami", headers=bearer(env.reader)).json()
    assert who == {"name": "viewer", "role": "read", "expires_at": None}
    assert env.client.get(f"{API}/deployments", headers=bearer(env.reader)).json() == []
    seed_release_and_deployment(env)
    r = env.client.post(f"{API}/deployments", headers=bearer(env.admin), json={"release": "1.0.0", "tag": "lab"})
    newest = env.client.get(f"{API}/deployments", params={"limit": 1}, headers=bearer(env.reader)).json()
    assert [(d["id"], d["release"]) for d in newest] == [(r.json()["id"], "1.0.0")]

    r = env.client.post(f"{API}/tokens", headers=bearer(env.admin), json={"name": "ci", "role": "read", "ttl": 60})
    assert r.status_code == 201 and r.headers["location"] == f"{API}/tokens/ci", r.text
    created = r.json()
    assert created["state"] == "active" and created["expires_at"] is not None
    assert verify_token(env.store, created["secret"]).name == "ci"  # the secret works, and is stored hashed
    with env.store.session() as s:
        assert s.scalar(select(ApiToken.token_hash).where(ApiToken.name == "ci")) == hash_secret(created["secret"])
    again = env.client.post(f"{API}/tokens", headers=bearer(env.admin), json={"name": "ci", "role": "admin"})
    assert again.status_code == 400 and "already exists" in again.json()["detail"]
    listed = env.client.get(f"{API}/tokens", headers=bearer(env.admin)).json()
    assert [t["name"] for t in listed] == ["ops-admin", "viewer", "ci"] and all("secret" not in t for t in listed)
    r = env.client.post(f"{API}/tokens/ci/revoke", headers=bearer(env.admin))
    assert r.status_code == 200 and r.json()["state"] == "revoked"
    assert env.client.post(f"{API}/tokens/ci/revoke", headers=bearer(env.admin)).status_code == 409
    assert env.client.post(f"{API}/tokens/nobody/revoke", headers=bearer(env.admin)).status_code == 404
    assert_401(env.client.get(f"{API}/whoami", headers=bearer(created["secret"])), "revoked")
    events = [(e.actor, e.action, e.target) for e in audit.list_events(env.store, 10)]
    assert ("ops-admin", "token.create", "token:ci") in events and ("ops-admin", "token.revoke", "token:ci") in events


def test_release_upload_takes_counter_min_version_and_encryption(sqlite_url, tmp_path):
    from fota.server.kek import Kek
    kek = Kek(os.urandom(32))
    e = make_env(sqlite_url, tmp_path, kek_loader=lambda: kek)
    try:
        r = e.client.post(f"{API}/releases", headers=bearer(e.admin), files={"file": ("app.fotb", bundle_bytes())},
                          data={"version": "1.1.0", "hardware": ["esp32"], "counter": "7", "min_version": "1.0.0",
                                "encrypt": "true"})
        assert r.status_code == 201, r.text
        manifest = json.loads(r.json()["manifest"])
        assert r.json()["security_counter"] == 7 and manifest["counter"] == 7
        with e.store.session() as s:
            rel = s.scalar(select(Release).where(Release.version == "1.1.0"))
            assert rel.min_version == "1.0.0" and rel.enc_key is not None
        image = e.client.post(f"{API}/releases", headers=bearer(e.admin), files={"file": ("fw.bin", b"\x00" * 64)},
                              data={"version": "1.2.0", "hardware": ["esp32"], "encrypt": "true"})
        assert image.status_code == 400 and "only bundles can be encrypted" in image.json()["detail"]
    finally:
        e.client.close()
        e.store.dispose()
    plain = make_env(f"sqlite:///{tmp_path / 'plain.db'}", tmp_path / "plain")  # no key-encryption key
    try:
        r = plain.upload(plain.admin)
        assert r.status_code == 201
        r = plain.client.post(f"{API}/releases", headers=bearer(plain.admin),
                              files={"file": ("app.fotb", bundle_bytes("1.3.0"))},
                              data={"version": "1.3.0", "hardware": ["esp32"], "encrypt": "true"})
        assert r.status_code == 400 and "key-encryption key" in r.json()["detail"]
    finally:
        plain.client.close()
        plain.store.dispose()


# ---- admin actions and the audit log -------------------------------------------------------------
def test_admin_creates_release_and_deployment_audited(env):
    r = env.upload(env.admin, "1.1.0", hardware=("esp32", "esp32s3,rp2040"))
    assert r.status_code == 201, r.text
    release = r.json()
    assert r.headers["location"] == f"{API}/releases/1.1.0"
    assert (release["version"], release["kind"], release["hardware"]) == ("1.1.0", "bundle",
                                                                          ["esp32", "esp32s3", "rp2040"])
    assert release["security_counter"] == 0
    data = bundle_bytes("1.1.0")
    assert release["sha256"] == hashlib.sha256(data).hexdigest() and release["size"] == len(data)
    assert (env.blobs / release["sha256"]).read_bytes() == data
    # signed with the key of the loader
    assert ecdsa.verify(public_key_bytes(KEY), release["manifest"].encode(), bytes.fromhex(release["signature"]))

    image = os.urandom(3000)
    r = env.upload(env.admin, "2.0.0-img", data=image, filename="fw.bin")
    assert r.status_code == 201, r.text
    assert r.json()["kind"] == "image" and r.json()["size"] == 3000

    r = env.client.post(f"{API}/deployments", headers=bearer(env.admin), json={"release": "1.1.0", "tag": "lab"})
    assert r.status_code == 201, r.text
    dep = r.json()
    assert r.headers["location"] == f"{API}/deployments/{dep['id']}"
    # dev-3 is an rp2040 with tag lab: targeted as well, 1.1.0 is built for rp2040 too
    assert sorted(j["device"] for j in dep["jobs"]) == ["dev-1", "dev-2", "dev-3"]
    assert dep["counts"] == {"pending": 3} and dep["release"] == "1.1.0"
    r = env.client.post(f"{API}/deployments", headers=bearer(env.admin),
                        json={"release": "2.0.0-img", "devices": ["dev-2"]})
    assert r.status_code == 201, r.text
    second = r.json()["id"]

    events = audit.list_events(env.store)
    assert [(e.actor, e.action, e.target) for e in reversed(events)] == [
        ("ops-admin", "release.create", "release:1.1.0"),
        ("ops-admin", "release.create", "release:2.0.0-img"),
        ("ops-admin", "deployment.create", f"deployment:{dep['id']}"),
        ("ops-admin", "deployment.create", f"deployment:{second}"),
    ]
    assert events[-1].detail["sha256"] == release["sha256"] and events[-1].detail["id"] == release["id"]
    assert events[1].detail == {"release": "1.1.0", "target": {"tag": "lab"},
                                "devices": ["dev-1", "dev-2", "dev-3"]}
    for e in events:
        assert e.at.tzinfo is not None and utcnow() - e.at < timedelta(minutes=1)

    r = env.client.get(f"{API}/audit", headers=bearer(env.admin), params={"limit": 2})
    assert r.status_code == 200
    assert [(e["actor"], e["action"]) for e in r.json()] == [("ops-admin", "deployment.create")] * 2
    r = env.client.get(f"{API}/audit", headers=bearer(env.admin), params={"action": "release.create"})
    assert [e["target"] for e in r.json()] == ["release:2.0.0-img", "release:1.1.0"]


# ---- device accounts ------------------------------------------------------------------------------
def _account_home(tmp_path: Path, url: str, **config) -> Home:
    home = Home(tmp_path / "home")
    cfg = home.config()
    cfg.update(database_url=url, **config)
    home.save_config(cfg)
    return home


def _password_file(home: Home) -> dict[str, str]:
    """The managed Mosquitto's device accounts: user -> hash."""
    text = (home.broker_dir / "passwords").read_text()
    return dict(line.split(":", 1) for line in text.splitlines() if line)


def _session(port: int, user: str, password: str):
    """A device's MQTT connection, kept open (no reconnect within the test)."""
    import paho.mqtt.client as mqtt

    from fota.tools.waiting import wait_until
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=user)
    client.username_pw_set(user, password)
    client.reconnect_delay_set(300, 300)
    client.connect("127.0.0.1", port)
    client.loop_start()
    wait_until(client.is_connected, timeout=5, what=f"{user} connected")
    return client


def test_device_rekey_and_revoke_are_audited_and_reach_the_homes_broker(db_url, tmp_path):
    """POST /devices/{id}/rekey and /revoke (admin): the registry changes, the token's name is the
    actor in the audit log, and the home's Mosquitto password file is rewritten from the registry:
    with no broker running the answer says when it takes effect; with one, it is reloaded and the
    old password (then the device) is refused. An unknown device is 404 and changes nothing."""
    import bcrypt

    from fota.server.accounts import broker_sync
    from fota.server.broker import Mosquitto
    from fota.tools.waiting import wait_until
    home = _account_home(tmp_path, db_url)
    e = make_env(db_url, tmp_path, broker_sync=lambda store: broker_sync(home, store))
    admin = bearer(e.admin)
    broker = None
    try:
        _, pw1 = provision_device(e.store, "acc-1", "unix")
        _, pw2 = provision_device(e.store, "acc-2", "unix")
        home.sync_broker_passwords(e.store)
        before = _password_file(home)

        r = e.client.post(f"{API}/devices/acc-1/rekey", headers=admin)
        assert r.status_code == 200, r.text
        body = r.json()
        new1 = body["password"]
        assert body["device"] == "acc-1" and new1 != pw1 and len(new1) >= 20
        pid_file = str(home.broker_dir / "mosquitto.pid")
        assert body["broker"] == {"kind": "mosquitto", "applied": False, "file": str(home.broker_dir / "passwords"),
                                  "reloaded": [], "not_reloaded": [pid_file], "refused": [], "missing": [],
                                  "note": body["broker"]["note"], "error": None}
        assert "no managed Mosquitto runs" in body["broker"]["note"] and "'fota serve'" in body["broker"]["note"]
        with e.store.session() as s:
            stored = s.get(Device, "acc-1").password_bcrypt
        assert bcrypt.checkpw(new1.encode(), stored.encode())
        after = _password_file(home)
        assert after["acc-1"] != before["acc-1"] and after["acc-2"] == before["acc-2"]

        # with the home's broker running: reloaded, the old password refused, the new one taken
        cfg = home.config()
        broker = Mosquitto(home.broker_dir, port=cfg["broker_port"], service_port=cfg["broker_service_port"],
                           auth=True).start()
        port = cfg["broker_port"]
        assert accepted(port, "acc-1", new1) and not accepted(port, "acc-1", pw1)
        r = e.client.post(f"{API}/devices/acc-2/rekey", headers=admin)
        assert r.status_code == 200 and r.json()["broker"]["applied"] is True, r.text
        assert r.json()["broker"]["reloaded"] == [pid_file] and r.json()["broker"]["note"] is None
        new2 = r.json()["password"]
        wait_until(lambda: not accepted(port, "acc-2", pw2), timeout=5, what="acc-2's old password refused")
        assert accepted(port, "acc-2", new2)

        # a device connected at the revoke is disconnected at the reload; another stays connected
        sessions = {dev: _session(port, dev, pw) for dev, pw in (("acc-1", new1), ("acc-2", new2))}
        r = e.client.post(f"{API}/devices/acc-1/revoke", headers=admin)
        assert r.status_code == 200, r.text
        assert "password" not in r.json() and r.json()["broker"]["applied"] is True
        wait_until(lambda: not sessions["acc-1"].is_connected(), timeout=5, what="acc-1 disconnected at the reload")
        assert sessions["acc-2"].is_connected()
        for client in sessions.values():  # (a CONNECT as acc-2 below would take its client id over)
            client.disconnect()
            client.loop_stop()
        wait_until(lambda: not accepted(port, "acc-1", new1), timeout=5, what="acc-1 refused after the revoke")
        assert accepted(port, "acc-2", new2)
        assert "acc-1" not in _password_file(home)
        with e.store.session() as s:
            revoked = s.get(Device, "acc-1")
            assert (revoked.password_hash, revoked.password_bcrypt) == (None, None)
            assert revoked.hardware == "unix"  # the registry entry stays
        assert e.client.get(f"{API}/devices/acc-1", headers=admin).status_code == 200

        events = [(x.actor, x.action, x.target) for x in reversed(audit.list_events(e.store))]
        assert events == [("ops-admin", "device.rekey", "device:acc-1"), ("ops-admin", "device.rekey", "device:acc-2"),
                          ("ops-admin", "device.revoke", "device:acc-1")]
        assert not any(pw in json.dumps([x.detail for x in audit.list_events(e.store)]) for pw in (new1, new2))

        # an unknown device: 404, nothing changed, nothing audited; a malformed id: 422
        snapshot, accounts = e.snapshot(), _password_file(home)
        for action in ("rekey", "revoke"):
            r = e.client.post(f"{API}/devices/ghost/{action}", headers=admin)
            assert r.status_code == 404 and r.json()["detail"] == "no device 'ghost'", r.text
            assert e.client.post(f"{API}/devices/bad%20id/{action}", headers=admin).status_code == 422
            r = e.client.post(f"{API}/devices/acc-2/{action}", headers=bearer(e.reader))
            assert r.status_code == 403 and "admin" in r.json()["detail"]
        assert e.snapshot() == snapshot and _password_file(home) == accounts
        assert accepted(port, "acc-2", new2)
    finally:
        if broker is not None:
            broker.stop()
        e.client.close()
        e.store.dispose()


def test_device_account_answers_say_what_the_api_process_could_not_do(sqlite_url, tmp_path):
    """Where the API's process cannot put the change in force, the answer says so and what to do:
    an app made without a home, a broker fota does not manage, a NATS cluster whose configs fota
    did not write, and a password file it cannot write (the registry change stands: 200)."""
    from fota.server.accounts import broker_sync
    homes = {"none": None,
             "external": _account_home(tmp_path / "ext", sqlite_url, broker_url="mqtt://fota-server:pw@127.0.0.1:1"),
             "nats": _account_home(tmp_path / "nats", sqlite_url,
                                   broker_url="nats://fota-server:pw@127.0.0.1:1,nats://fota-server:pw@127.0.0.1:2"),
             "mosquitto": _account_home(tmp_path / "broken", sqlite_url)}
    homes["mosquitto"].broker_dir.write_text("not a directory")  # the password file cannot be written
    notes = {"none": "knows no home", "external": "change the device's account at that broker",
             "nats": "fota broker nats-config", "mosquitto": None}
    for kind, home in homes.items():
        e = make_env(sqlite_url.replace("fota.db", f"fota-{kind}.db"), tmp_path / kind,
                     **({"broker_sync": lambda store, home=home: broker_sync(home, store)} if home else {}))
        try:
            r = e.client.post(f"{API}/devices/dev-1/revoke", headers=bearer(e.admin))
            assert r.status_code == 200, r.text
            report = r.json()["broker"]
            assert report["kind"] == kind and report["applied"] is False and report["file"] is None, report
            if notes[kind]:
                assert notes[kind] in report["note"] and report["error"] is None, report
            else:
                assert str(home.broker_dir) in report["error"] and report["note"] is None, report
            with e.store.session() as s:  # the registry change stands, audited
                assert s.get(Device, "dev-1").password_hash is None
            assert [x.action for x in audit.list_events(e.store)] == ["device.revoke"]
        finally:
            e.client.close()
            e.store.dispose()


def test_service_errors_are_400_or_404_and_change_nothing(env):
    seed_release_and_deployment(env)
    before = env.snapshot()
    admin = bearer(env.admin)
    cases = [
        (env.upload(env.admin, "1.0.0"), 400, "already exists"),
        (env.upload(env.admin, "3.0.0", data=b""), 400, "empty"),
        (env.upload(env.admin, "3.0.0", data=b"FOTB\x01garbage"), 400, "invalid bundle"),
        (env.client.post(f"{API}/deployments", headers=admin, json={"release": "7.7.7", "devices": ["dev-1"]}),
         400, "7.7.7"),
        (env.client.post(f"{API}/deployments", headers=admin, json={"release": "1.0.0", "devices": ["ghost"]}),
         400, "ghost"),
        (env.client.post(f"{API}/deployments", headers=admin, json={"release": "1.0.0", "devices": ["dev-3"]}),
         400, "rp2040"),
        (env.client.post(f"{API}/deployments", headers=admin, json={"release": "1.0.0", "tag": "nope"}),
         400, "nope"),
        (env.client.get(f"{API}/deployments/999", headers=admin), 404, "999"),
        (env.client.get(f"{API}/devices/ghost", headers=admin), 404, "ghost"),
        (env.client.get(f"{API}/devices/ghost/history", headers=admin), 404, "ghost"),
        (env.client.get(f"{API}/releases/0.0.1", headers=admin), 404, "0.0.1"),
    ]
    for response, status, needle in cases:
        assert response.status_code == status, response.text
        assert needle in response.json()["detail"], response.text
    # Rules of form, which the OpenAPI schema states too: 422 (body validation)
    for r in (env.client.post(f"{API}/deployments", headers=admin, json={"release": "1.0.0", "devices": "dev-1"}),
              env.client.post(f"{API}/deployments", headers=admin, json={"release": "1.0.0"}),
              env.client.post(f"{API}/deployments", headers=admin,
                              json={"release": "1.0.0", "devices": ["dev-1"], "tag": "lab"}),
              env.upload(env.admin, "3.0.0", hardware=(",",))):
        assert r.status_code == 422, r.text
    assert env.snapshot() == before


def test_release_delete_is_admin_404_unknown_409_in_use_and_audited(env):
    seed_release_and_deployment(env)  # 1.0.0, deployed to dev-1: active
    assert env.upload(env.admin, "1.1.0").status_code == 201
    admin = bearer(env.admin)
    rel_1_0 = env.client.get(f"{API}/releases/1.0.0", headers=admin).json()
    before = env.snapshot()
    r = env.client.delete(f"{API}/releases/1.0.0", headers=admin)
    assert r.status_code == 409 and r.json()["detail"].startswith("release 1.0.0 is in use by deployment 1 (active)")
    r = env.client.delete(f"{API}/releases/9.9.9", headers=admin)
    assert r.status_code == 404 and r.json()["detail"] == "no release '9.9.9'", r.text
    assert env.snapshot() == before

    r = env.client.delete(f"{API}/releases/1.1.0", headers=admin)
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["version"], out["patches_removed"], out["failures"], out["object_storage"]) == ("1.1.0", 0, [], False)
    assert out["blobs_removed"] == [hashlib.sha256(bundle_bytes("1.1.0")).hexdigest()]
    assert out["deleted_at"] and env.snapshot()["blobs"] == [rel_1_0["sha256"]]
    assert [x["version"] for x in env.client.get(f"{API}/releases", headers=admin).json()] == ["1.0.0"]
    listed = env.client.get(f"{API}/releases", headers=admin, params={"deleted": "true"}).json()
    assert [(x["version"], x["deleted_at"] is not None) for x in listed] == [("1.0.0", False), ("1.1.0", True)]
    r = env.client.get(f"{API}/releases/1.1.0", headers=admin)
    assert r.status_code == 404 and "it was deleted at" in r.json()["detail"]
    assert env.client.get(f"{API}/releases/1.1.0", headers=admin, params={"deleted": True}).json()["deleted_at"]
    r = env.client.delete(f"{API}/releases/1.1.0", headers=admin)
    assert r.status_code == 404 and r.json()["detail"].startswith("no release '1.1.0': it was deleted at"), r.text
    for path, body in (("deployments", {"release": "1.1.0", "devices": ["dev-1"]}),
                       ("campaigns", {"name": "spring", "release": "1.1.0"}),
                       ("campaign-previews", {"name": "spring", "release": "1.1.0"})):
        r = env.client.post(f"{API}/{path}", headers=admin, json=body)
        assert r.status_code == 400 and "no release '1.1.0': it was deleted" in r.json()["detail"], (path, r.text)
    events = audit.list_events(env.store, action="release.delete")
    assert [(e.actor, e.target) for e in events] == [("ops-admin", "release:1.1.0")]


def test_release_prune_is_admin_keeps_running_and_in_use_releases_and_dry_run_changes_nothing(env):
    for version in ("1.0.0", "1.1.0", "1.2.0", "1.3.0"):
        assert env.upload(env.admin, version).status_code == 201
    with env.store.session() as s:  # dev-1 runs 1.0.0; dev-3 (rp2040) runs "1.2.0", not this esp32 release
        s.execute(update(Device).where(Device.id == "dev-1").values(version="1.0.0"))
        s.execute(update(Device).where(Device.id == "dev-3").values(version="1.2.0"))
    admin = bearer(env.admin)
    r = env.client.post(f"{API}/deployments", headers=admin, json={"release": "1.1.0", "devices": ["dev-2"]})
    dep = r.json()["id"]
    before = env.snapshot()
    for body in ({"keep": 0}, {"keep": 1, "dry": True}, {"keep": "all"}):
        r = env.client.post(f"{API}/release-prune", headers=admin, json=body)
        assert r.status_code == 422, r.text
    r = env.client.post(f"{API}/release-prune", headers=bearer(env.reader), json={"keep": 1})
    assert r.status_code == 403 and "admin" in r.json()["detail"]
    r = env.client.post(f"{API}/release-prune", headers=admin, json={"keep": 1, "dry_run": True})
    assert r.status_code == 200, r.text
    dry = r.json()
    assert env.snapshot() == before
    assert dry["deleted"] == [{"version": "1.2.0", "hardware": ["esp32"], "kind": "bundle"}]
    assert [(k["version"], k["why"]) for k in dry["kept"]] == [
        ("1.0.0", ["running on 1 device(s)"]), ("1.1.0", [f"in use by deployment {dep} (active)"]),
        ("1.3.0", ["the newest bundle for esp32"])]
    assert (dry["keep"], dry["dry_run"], dry["blobs_removed"], dry["failures"]) == (1, True, [], [])

    r = env.client.post(f"{API}/release-prune", headers=admin, json={"keep": 1})
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["deleted"], out["kept"], out["dry_run"]) == (dry["deleted"], dry["kept"], False)
    assert out["blobs_removed"] == [hashlib.sha256(bundle_bytes("1.2.0")).hexdigest()]
    assert [x["version"] for x in env.client.get(f"{API}/releases", headers=admin).json()] == [
        "1.0.0", "1.1.0", "1.3.0"]
    assert [(e.actor, e.target) for e in audit.list_events(env.store, action="release.delete")] == [
        ("ops-admin", "release:1.2.0")]
    (event,) = audit.list_events(env.store, action="release.prune")
    assert event.actor == "ops-admin" and event.detail["deleted"] == ["1.2.0"] and event.detail["in_use"] == ["1.1.0"]
    # the default keep (3) deletes nothing more here
    r = env.client.post(f"{API}/release-prune", headers=admin, json={})
    assert r.status_code == 200 and r.json()["keep"] == 3 and r.json()["deleted"] == []
    assert r.json()["gc"] == {"dry_run": False, "grace": 3600, "files": [], "objects": [], "young": 0,
                              "object_storage": False, "failures": []}


def test_release_gc_is_admin_and_removes_only_old_blobs_nothing_names(env):
    """POST /release-gc (and the gc of POST /release-prune): the API's blobs directory swept of the
    blobs no live release and no patch names, once `grace` seconds old; dry_run only lists."""
    assert env.upload(env.admin, "1.0.0").status_code == 201
    left = b"left behind by a delete " * 50
    sha = hashlib.sha256(left).hexdigest()
    (env.blobs / sha).write_bytes(left)
    os.utime(env.blobs / sha, (time.time() - 7200, time.time() - 7200))
    admin = bearer(env.admin)
    before = env.snapshot()
    for body in ({"grace": -1}, {"grace": "soon"}, {"dry": True}):
        assert env.client.post(f"{API}/release-gc", headers=admin, json=body).status_code == 422, body
    assert env.client.post(f"{API}/release-prune", headers=admin, json={"grace": -1}).status_code == 422
    r = env.client.post(f"{API}/release-gc", headers=bearer(env.reader), json={})
    assert r.status_code == 403 and "admin" in r.json()["detail"]
    r = env.client.post(f"{API}/release-gc", headers=admin, json={"dry_run": True, "grace": 10_000})
    assert r.status_code == 200 and r.json()["files"] == [] and r.json()["young"] == 1, r.text
    r = env.client.post(f"{API}/release-prune", headers=admin, json={"dry_run": True})
    assert r.status_code == 200 and r.json()["gc"]["files"] == [{"sha256": sha, "size": len(left)}], r.text
    assert env.snapshot() == before and audit.list_events(env.store, action="release.gc") == []

    r = env.client.post(f"{API}/release-gc", headers=admin, json={})
    assert r.status_code == 200, r.text
    assert r.json() == {"dry_run": False, "grace": 3600, "files": [{"sha256": sha, "size": len(left)}],
                        "objects": [], "young": 0, "object_storage": False, "failures": []}
    assert env.snapshot()["blobs"] == [hashlib.sha256(bundle_bytes("1.0.0")).hexdigest()]
    (event,) = audit.list_events(env.store, action="release.gc")
    assert (event.actor, event.target, event.detail["files"], event.detail["file_bytes"]) == (
        "ops-admin", "blobs", 1, len(left))


def test_deployment_cancel_is_audited_and_refused_where_it_cannot_apply(env):
    seed_release_and_deployment(env)
    admin = bearer(env.admin)
    with env.store.session() as s:
        [job] = s.scalars(select(Job).where(Job.deployment_id == 1)).all()
    r = env.client.post(f"{API}/deployments/1/cancel", headers=admin)
    assert r.status_code == 200, r.text
    body = r.json()
    # never sent (dev-1 never came online): withdrawn, no cancel command needed
    assert (body["state"], body["counts"], body["withdrawn"], body["cancelling"], body["finishing"]) == (
        "cancelled", {"cancelled": 1}, [job.id], [], [])
    with env.store.session() as s:
        assert s.scalar(select(func.count()).select_from(Job).where(Job.kind == "cancel")) == 0
    [event] = audit.list_events(env.store, action="deployment.cancel")
    assert (event.actor, event.target, event.detail["withdrawn"]) == ("ops-admin", "deployment:1", [job.id])
    r = env.client.post(f"{API}/campaigns", headers=admin, json={"name": "spring", "release": "1.0.0"})
    assert r.status_code == 201, r.text
    with env.store.session() as s:
        campaign_deployment = s.scalar(select(Deployment.id).order_by(Deployment.id.desc()))
    before = env.snapshot()
    for path, status, needle in [(f"{API}/deployments/1/cancel", 409, "is cancelled: nothing to cancel"),
                                 (f"{API}/deployments/999/cancel", 404, "no deployment 999"),
                                 (f"{API}/deployments/{campaign_deployment}/cancel", 409,
                                  "use 'fota campaign abort spring'")]:
        r = env.client.post(path, headers=admin)
        assert r.status_code == status and needle in r.json()["detail"], r.text
    assert env.snapshot() == before


def test_history_shows_what_took_effect_and_marks_the_rest_on_request(env):
    from fota.device import protocol
    from fota.server.ingest import Incoming, write_batch
    seed_release_and_deployment(env)
    with env.store.session() as s:
        [job] = s.scalars(select(Job.id).where(Job.deployment_id == 1)).all()

    def status(device, seq, state, **fields):
        msg = {"job": job, "state": state, "boot": 1, "seq": seq, "version": "1.0.0", **fields}
        return Incoming(protocol.STATUS, device, msg, utcnow())
    with env.store.session() as s:
        write_batch(s, [status("dev-1", 1, "downloading"), status("dev-1", 2, "failed", code="E_TIMEOUT"),
                        status("dev-1", 3, "confirmed"), status("dev-2", 1, "confirmed")], {})
    def history(device, **params):
        r = env.client.get(f"{API}/devices/{device}/history", headers=bearer(env.reader), params=params)
        return [(e["state"], e["ignored"]) for e in r.json()["statuses"]]
    assert history("dev-1") == [("downloading", None), ("failed", None)]
    assert history("dev-1", ignored="true") == [("downloading", None), ("failed", None), ("confirmed", "job_ended")]
    assert history("dev-2") == []
    assert history("dev-2", ignored="true") == [("confirmed", "other_device")]


def test_action_and_audit_event_share_a_transaction(lite, monkeypatch):
    """If the audit event cannot be written, the release is not created either."""
    before = lite.snapshot()

    def broken(*args, **kwargs):
        raise RuntimeError("audit log unavailable")

    monkeypatch.setattr(audit, "_event", broken)
    assert lite.upload(lite.admin, "5.0.0").status_code == 500
    r = lite.client.post(f"{API}/deployments", headers=bearer(lite.admin),
                         json={"release": "5.0.0", "devices": ["dev-1"]})
    assert r.status_code == 400  # no such release: it was rolled back
    after = lite.snapshot()
    # the blob is content-addressed and may stay; no row does
    assert after["rows"] == before["rows"]


def test_signing_key_unavailable_is_503(sqlite_url, tmp_path):
    store = Store(sqlite_url)
    _, admin = create_token(store, "ops", "admin")

    def no_key():
        raise FileNotFoundError("keys/signing.pem")

    client = TestClient(create_app(store, tmp_path / "blobs", no_key))
    r = client.post(f"{API}/releases", headers=bearer(admin), files={"file": ("a.fotb", bundle_bytes())},
                    data={"version": "1.0.0", "hardware": "esp32"})
    assert r.status_code == 503 and "signing key" in r.json()["detail"]
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(Release)) == 0
        assert s.scalar(select(func.count()).select_from(AuditEvent)) == 0
    store.dispose()


def test_upload_size_limit(sqlite_url, tmp_path):
    env = make_env(sqlite_url, tmp_path, max_upload_bytes=4096)
    before = env.snapshot()
    r = env.upload(env.admin, "1.0.0", data=os.urandom(5000), filename="fw.bin")
    assert r.status_code == 413 and "4096" in r.json()["detail"]
    # a body far over the limit is refused from its Content-Length, token or not
    r = env.upload(None, "1.0.0", data=os.urandom(200_000), filename="fw.bin")
    assert r.status_code == 413
    # and one without a Content-Length (chunked) is cut off while it is read
    boundary = "b0undary"

    def chunked():
        yield (f'--{boundary}\r\nContent-Disposition: form-data; name="version"\r\n\r\n1.0.0\r\n'
               f'--{boundary}\r\nContent-Disposition: form-data; name="hardware"\r\n\r\nesp32\r\n'
               f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="fw.bin"\r\n\r\n').encode()
        for _ in range(100):
            yield os.urandom(1000)
        yield f"\r\n--{boundary}--\r\n".encode()

    r = env.client.post(f"{API}/releases", content=chunked(),
                        headers={**bearer(env.admin), "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413 and "content-length" not in r.request.headers
    assert env.snapshot() == before
    assert env.upload(env.admin, "1.0.0", data=os.urandom(4000), filename="fw.bin").status_code == 201
    env.store.dispose()


# ---- tokens --------------------------------------------------------------------------------------
def test_tokens_are_stored_hashed(env):
    seed_release_and_deployment(env)
    token, secret = create_token(env.store, "ci-bot", "read", ttl_seconds=600, actor="cli:test")
    assert secret.startswith("fota_") and len(secret) >= 48
    assert env.client.get(f"{API}/releases", headers=bearer(secret)).status_code == 200
    with env.store.session() as s:
        row = s.get(ApiToken, token.id)
        assert row.token_hash == hashlib.sha256(secret.encode()).hexdigest() == hash_secret(secret)
        assert row.last_used_at is not None
        # the secret (or its random part) appears in no column of any table
        dump = repr([s.execute(select(table)).all() for table in Base.metadata.sorted_tables])
    assert "ci-bot" in dump  # the dump is real
    for secret_ in (secret, env.admin, env.reader):
        assert secret_ not in dump and secret_[len("fota_"):] not in dump
    if env.store.engine.url.get_backend_name() == "sqlite":
        db = Path(env.store.engine.url.database)
        raw = b"".join(p.read_bytes() for p in (db, db.with_name(db.name + "-wal")) if p.exists())
        assert b"ci-bot" in raw
        for secret_ in (secret, env.admin, env.reader):
            assert secret_.encode() not in raw
    assert "fota_" not in repr(token) and row.token_hash not in repr(token)


def test_token_rules(sqlite_url):
    store = Store(sqlite_url)
    try:
        create_token(store, "ops", "admin")
        with pytest.raises(AuthError, match="already exists"):
            create_token(store, "ops", "read")
        revoke_token(store, "ops")
        with pytest.raises(AuthError, match="already exists"):  # names are never reused
            create_token(store, "ops", "admin")
        for bad_name in ("", "cli:alice", "a b", "x" * 65, "-x"):
            with pytest.raises(AuthError, match="invalid token name"):
                create_token(store, bad_name, "read")
        with pytest.raises(AuthError, match="role"):
            create_token(store, "root", "superuser")
        for ttl in (0, -5, True):
            with pytest.raises(AuthError, match="ttl"):
                create_token(store, "short", "read", ttl_seconds=ttl)
        with pytest.raises(AuthError):
            verify_token(store, None)
    finally:
        store.dispose()


# ---- reads -----------------------------------------------------------------------------------------
def test_get_endpoints_with_read_token(env):
    seed_release_and_deployment(env)
    with env.store.session() as s:
        device = s.get(Device, "dev-1")
        device.inventory = {"version": "1.0.0", "free": 1234}
        device.version = "1.0.0"
        s.add(StatusEvent(device_id="dev-1", job_id=1, state="downloading", progress=0.5, boot=1, seq=1,
                          payload={"state": "downloading"}))
        s.add(StatusEvent(device_id="dev-1", job_id=1, state="installing", progress=1.0, boot=1, seq=2,
                          payload={"state": "installing"}))
    read = bearer(env.reader)

    r = env.client.get(f"{API}/devices", headers=read)
    assert r.status_code == 200
    assert [d["id"] for d in r.json()] == ["dev-1", "dev-2", "dev-3"]
    assert "password_hash" not in r.json()[0] and "inventory" not in r.json()[0]
    r = env.client.get(f"{API}/devices", headers=read, params={"tag": "floor-2"})
    assert [d["id"] for d in r.json()] == ["dev-2"]
    r = env.client.get(f"{API}/devices", headers=read, params={"hardware": "rp2040"})
    assert [d["id"] for d in r.json()] == ["dev-3"]

    r = env.client.get(f"{API}/devices/dev-1", headers=read)
    assert r.status_code == 200
    assert r.json()["inventory"] == {"version": "1.0.0", "free": 1234} and r.json()["version"] == "1.0.0"
    assert "password_hash" not in r.json()

    r = env.client.get(f"{API}/devices/dev-1/history", headers=read)
    assert [(e["state"], e["seq"], e["job_id"]) for e in r.json()["statuses"]] == \
        [("downloading", 1, 1), ("installing", 2, 1)]
    assert r.json()["next_cursor"] is None
    assert env.client.get(f"{API}/devices/dev-2/history", headers=read).json() == {"statuses": [],
                                                                                  "next_cursor": None}

    r = env.client.get(f"{API}/releases", headers=read)
    assert [x["version"] for x in r.json()] == ["1.0.0"] and "blob_path" not in r.json()[0]
    assert env.client.get(f"{API}/releases/1.0.0", headers=read).json()["kind"] == "bundle"

    r = env.client.get(f"{API}/deployments/1", headers=read)
    assert r.status_code == 200
    body = r.json()
    assert body["release"] == "1.0.0" and body["target"] == {"devices": ["dev-1"]}
    assert [(j["device"], j["state"]) for j in body["jobs"]] == [("dev-1", "pending")]


def test_openapi_documents_the_bearer_scheme(lite):
    spec = lite.client.get("/openapi.json").json()
    assert {f"{API}/devices", f"{API}/releases", f"{API}/deployments", f"{API}/audit"} <= set(spec["paths"])
    assert any(s.get("scheme") == "bearer" for s in spec["components"]["securitySchemes"].values())
    assert "multipart/form-data" in spec["paths"][f"{API}/releases"]["post"]["requestBody"]["content"]
    assert lite.client.get("/docs").status_code == 200


# ---- CLI ---------------------------------------------------------------------------------------------
def _cli(home: Path, *args: str):
    from fota.cli import app
    result = CliRunner().invoke(app, list(args), env={"FOTA_HOME": str(home), "COLUMNS": "200"})
    return result


def test_cli_tokens_and_audit_events(tmp_path):
    home = tmp_path / "home"
    result = _cli(home, "token", "create", "alice", "--role", "admin", "--ttl", "3600")
    assert result.exit_code == 0, result.output
    secret = next(w for w in result.output.split() if w.startswith("fota_"))
    assert _cli(home, "token", "create", "bob", "--role", "read").exit_code == 0
    assert _cli(home, "token", "create", "alice", "--role", "read").exit_code != 0

    from fota.server.home import Home
    store = Store(Home.locate(home).database_url)
    try:
        assert verify_token(store, secret).name == "alice"
        listing = _cli(home, "token", "list").output
        assert "alice" in listing and "bob" in listing and "fota_" not in listing

        assert _cli(home, "device", "add", "dev-9", "--hardware", "esp32", "--tag", "lab").exit_code == 0
        assert _cli(home, "token", "revoke", "alice").exit_code == 0
        assert "revoked" in _cli(home, "token", "list").output
        with pytest.raises(AuthError, match="revoked"):
            verify_token(store, secret)

        events = list(reversed(audit.list_events(store)))
        actor = audit.cli_actor()
        assert actor.startswith("cli:")
        assert [(e.actor, e.action, e.target) for e in events] == [
            (actor, "token.create", "token:alice"),
            (actor, "token.create", "token:bob"),
            (actor, "device.add", "device:dev-9"),
            (actor, "token.revoke", "token:alice"),
        ]
        assert events[0].detail["role"] == "admin" and events[0].detail["expires_at"]
        assert events[2].detail == {"hardware": "esp32", "tags": ["lab"]}
    finally:
        store.dispose()


def test_cli_release_and_deploy_are_audited(tmp_path):
    home = tmp_path / "home"
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "app.py").write_text('VERSION = "1.1.0"\n')
    assert _cli(home, "keys", "init").exit_code == 0
    result = _cli(home, "release", "create", str(app_dir), "--version", "1.1.0", "--hardware", "esp32")
    assert result.exit_code == 0, result.output
    assert _cli(home, "device", "add", "dev-1", "--hardware", "esp32").exit_code == 0
    result = _cli(home, "deploy", "1.1.0", "--device", "dev-1")
    assert result.exit_code == 0, result.output

    from fota.server.home import Home
    store = Store(Home.locate(home).database_url)
    try:
        events = list(reversed(audit.list_events(store)))
        assert [(e.actor, e.action) for e in events] == [(audit.cli_actor(), "release.create"),
                                                         (audit.cli_actor(), "device.add"),
                                                         (audit.cli_actor(), "deployment.create")]
        assert events[0].target == "release:1.1.0" and events[2].detail["devices"] == ["dev-1"]
    finally:
        store.dispose()
    result = _cli(home, "deployment", "cancel", "1")
    assert result.exit_code == 0, result.output
    assert "deployment 1 cancelled: 1 job(s) not sent, 0 cancel command(s) queued" in result.output
    result = _cli(home, "deployment", "cancel", "1")
    assert result.exit_code == 1 and "deployment 1 is cancelled: nothing to cancel" in str(result.exception)
    store = Store(Home.locate(home).database_url)
    try:
        [event] = audit.list_events(store, action="deployment.cancel")
        assert (event.actor, event.target, event.detail["withdrawn"]) == (audit.cli_actor(), "deployment:1", [1])
    finally:
        store.dispose()


def test_fota_api_command_serves_the_api(tmp_path):
    home = tmp_path / "home"
    result = _cli(home, "token", "create", "viewer", "--role", "read")
    secret = next(w for w in result.output.split() if w.startswith("fota_"))
    port = free_port()
    env = dict(os.environ, FOTA_HOME=str(home))
    proc = subprocess.Popen([sys.executable, "-m", "fota.cli", "api", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}{API}/devices"
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.get(url, headers=bearer(secret), timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, "the API did not start"
                time.sleep(0.1)
        assert r.status_code == 200 and r.json() == []
        assert httpx.get(url, timeout=2).status_code == 401
        assert httpx.get(f"http://127.0.0.1:{port}/docs", timeout=2).status_code == 200
    finally:
        stop(proc)
