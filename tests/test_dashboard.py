"""The web dashboard over HTTP (FastAPI TestClient, SQLite and PostgreSQL): sign-in sessions,
CSRF, roles, the device list's filters and keyset pages, error codes in words, the audit.
The same pages in a real browser, with real devices: tests/test_dashboard_browser.py."""
from __future__ import annotations

import json
import re

from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from fota.error_codes import MEANINGS, explain
from fota.server import audit
from fota.server.api import create_app
from fota.server.auth import create_token, revoke_token
from fota.server.campaigns import create_campaign, start_campaign
from fota.server.dashboard.sessions import COOKIE
from fota.server.deployments import create_deployment
from fota.server.fleet import provision_device
from fota.server.releases import create_release
from fota.server.store import Device, Job, StatusEvent, Store, utcnow
from fota.server.store.models import AuditEvent
from fota.tools.bundle import pack_files
from fota.tools.signing import generate_private_key

KEY = generate_private_key()


class Env:
    def __init__(self, url, tmp_path):
        self.store = Store(url)
        self.app = create_app(self.store, tmp_path / "blobs", lambda: KEY)
        _, self.admin = create_token(self.store, "ops-admin", "admin")
        _, self.reader = create_token(self.store, "viewer", "read")
        for i in range(1, 8):
            provision_device(self.store, f"dev-{i}", "esp32" if i % 2 else "rp2040",
                             tags=["lab"] + (["floor-2"] if i <= 3 else []))
        with self.store.session() as s:
            s.execute(update(Device).where(Device.id.in_(["dev-1", "dev-2"])).values(online=True, version="1.0.0"))

    def client(self) -> TestClient:
        return TestClient(self.app, raise_server_exceptions=False, follow_redirects=False,
                          base_url="http://testserver")

    def sign_in(self, secret: str, client: TestClient | None = None) -> TestClient:
        client = client or self.client()
        page = client.get("/ui/login")
        nonce = re.search(r'name="login_nonce" value="([^"]+)"', page.text).group(1)
        r = client.post("/ui/login", data={"token": secret, "login_nonce": nonce})
        assert r.status_code == 303, r.text
        return client


@pytest.fixture
def env(db_url, tmp_path):
    e = Env(db_url, tmp_path)
    yield e
    e.store.dispose()


def _csrf(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def _campaign(env, name="roll", devices=("dev-1", "dev-3")):
    rel = create_release(env.store, env.app.state.blobs_dir, KEY, pack_files({"app.py": b"V = 2\n"}), "1.1.0",
                         ["esp32"])
    create_campaign(env.store, name, rel.version, {"filter": {"devices": list(devices)}, "waves": [100]})
    start_campaign(env.store, name)
    return rel


def test_pages_need_a_session_and_the_cookie_is_httponly_samesite_strict(env):
    client = env.client()
    for path in ("/ui/", "/ui/devices", "/ui/devices/dev-1", "/ui/devices/nope", "/ui/releases", "/ui/campaigns",
                 "/ui/campaigns/nope", "/ui/deployments/1"):
        r = client.get(path)
        assert r.status_code == 303 and r.headers["location"] == "/ui/login", path
    assert client.get("/ui/events?view=fleet").status_code == 401
    page = client.get("/ui/login")
    nonce = re.search(r'name="login_nonce" value="([^"]+)"', page.text).group(1)
    # a bearer token does not open a page: only the session cookie does
    assert client.get("/ui/", headers={"Authorization": f"Bearer {env.admin}"}).status_code == 303
    refused = client.post("/ui/login", data={"token": env.admin + "x", "login_nonce": nonce})
    assert refused.status_code == 401 and "sign-in refused" in refused.text
    nonce = re.search(r'name="login_nonce" value="([^"]+)"', refused.text).group(1)
    r = client.post("/ui/login", data={"token": env.admin, "login_nonce": nonce})
    assert r.status_code == 303
    cookie = next(h for h in r.headers.get_list("set-cookie") if h.startswith(COOKIE + "="))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie
    assert env.admin not in cookie  # the browser holds a session id, never the token
    page = client.get("/ui/")
    assert page.status_code == 200 and "ops-admin (admin)" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"


def test_sign_in_form_needs_its_own_nonce(env):
    client = env.client()
    client.get("/ui/login")
    # a form posted from elsewhere has no matching nonce: no session is opened
    r = client.post("/ui/login", data={"token": env.admin, "login_nonce": "guessed"})
    assert r.status_code == 403 and COOKIE not in r.headers.get("set-cookie", "")


def test_a_revoked_token_ends_its_session(env):
    client = env.sign_in(env.reader)
    assert client.get("/ui/").status_code == 200
    revoke_token(env.store, "viewer")
    assert client.get("/ui/").status_code == 303
    assert client.get("/ui/events?view=fleet").status_code == 401


def test_read_token_sees_no_buttons_and_gets_403_on_every_post(env):
    _campaign(env)
    client = env.sign_in(env.reader)
    page = client.get("/ui/campaigns/roll")
    assert page.status_code == 200 and 'class="act ' not in page.text and "data-confirm" not in page.text
    csrf = _csrf(page.text)  # the sign-out form's: a read session has one too
    for action in ("pause", "resume", "approve", "abort", "start"):
        r = client.post(f"/ui/campaigns/roll/{action}", data={"csrf": csrf})
        assert r.status_code == 403 and "needs an admin token" in r.text
    with env.store.session() as s:
        assert not s.scalars(select(AuditEvent).where(AuditEvent.action.like("campaign.%"))).all()


def test_admin_pause_needs_the_sessions_csrf_token_and_lands_in_the_audit_log(env):
    _campaign(env)
    client = env.sign_in(env.admin)
    page = client.get("/ui/campaigns/roll")
    assert 'data-confirm="Pause campaign roll?' in page.text and 'act-abort' in page.text
    csrf = _csrf(page.text)
    assert client.post("/ui/campaigns/roll/pause", data={}).status_code == 403
    assert client.post("/ui/campaigns/roll/pause", data={"csrf": csrf[:-2] + "xx"}).status_code == 403
    # a CSRF token of an earlier session is stale: signing in again gives a new one
    env.sign_in(env.admin, client)
    stale = client.post("/ui/campaigns/roll/pause", data={"csrf": csrf})
    assert stale.status_code == 403 and "stale or missing CSRF token" in stale.text
    fresh = _csrf(client.get("/ui/campaigns/roll").text)
    assert fresh != csrf
    r = client.post("/ui/campaigns/roll/pause", data={"csrf": fresh})
    assert r.status_code == 303 and r.headers["location"] == "/ui/campaigns/roll"
    page = client.get("/ui/campaigns/roll")
    assert "paused by an operator" in page.text and "act-resume" in page.text and "act-pause" not in page.text
    # approve is for a campaign waiting for one: refused (409), nothing recorded
    assert client.post("/ui/campaigns/roll/approve", data={"csrf": fresh}).status_code == 409
    events = audit.list_events(env.store, 10)
    assert [(e.actor, e.action, e.target) for e in events] == [("ops-admin", "campaign.pause", "campaign:roll")]
    assert events[0].detail["via"] == "dashboard"


def test_devices_filters_and_keyset_pages(env):
    client = env.sign_in(env.reader)
    def ids(html):
        table = html.split('id="devices"')[1].split("</table>")[0]
        return re.findall(r'href="/ui/devices/([^"]+)"', table)
    assert ids(client.get("/ui/devices").text) == [f"dev-{i}" for i in range(1, 8)]
    assert ids(client.get("/ui/devices?tag=floor-2").text) == ["dev-1", "dev-2", "dev-3"]
    assert ids(client.get("/ui/devices?hardware=rp2040").text) == ["dev-2", "dev-4", "dev-6"]
    assert ids(client.get("/ui/devices?online=1").text) == ["dev-1", "dev-2"]
    assert ids(client.get("/ui/devices?online=0&tag=floor-2").text) == ["dev-3"]
    assert ids(client.get("/ui/devices?version=1.0.0&desc=1").text) == ["dev-2", "dev-1"]
    assert ids(client.get("/ui/devices?q=dev-7").text) == ["dev-7"]
    assert ids(client.get("/ui/devices?sort=version&desc=1").text)[:2] == ["dev-2", "dev-1"]
    # pages of 50: 120 more devices, walked by the next-page links, each once, in order
    for i in range(120):
        provision_device(env.store, f"zz-{i:03d}", "esp32")
    seen, url = [], "/ui/devices?sort=hardware"
    while url:
        html = client.get(url).text
        seen += ids(html)
        nxt = re.search(r'rel="next" href="([^"]+)"', html)
        url = nxt.group(1).replace("&amp;", "&") if nxt else None
    with env.store.session() as s:
        expected = [d.id for d in s.scalars(select(Device))]
    expected.sort(key=lambda d: (env_hw(env, d), d))
    assert seen == expected
    # a cursor not of ours is the first page, not an error
    assert client.get("/ui/devices?after=garbage").status_code == 200
    from fota.server.dashboard.queries import encode_cursor
    assert ids(client.get(f"/ui/devices?sort=last_seen&after={encode_cursor('dev-3', 'dev-3')}").text)[0] == "dev-1"


def env_hw(env, device_id):
    with env.store.session() as s:
        return s.get(Device, device_id).hardware


def test_device_page_explains_error_codes_in_words_and_shows_the_audit(env):
    rel = create_release(env.store, env.app.state.blobs_dir, KEY, pack_files({"app.py": b"V = 2\n"}), "1.1.0",
                         ["esp32"])
    dep = create_deployment(env.store, rel, device_ids=["dev-1"])
    audit.record(env.store, "ops-admin", "deployment.create", f"deployment:{dep.id}", {})
    with env.store.session() as s:
        job = s.scalar(select(Job).where(Job.deployment_id == dep.id))
        job.state, job.code, job.reason = "failed", "E_HASH_MISMATCH", "sha256 abc != def"
        s.add(StatusEvent(device_id="dev-1", job_id=job.id, state="failed", code="E_HASH_MISMATCH",
                          reason="sha256 abc != def", boot=1, seq=3, payload={}))
        s.get(Device, "dev-1").inventory = {"slots": {"a": "1.0.0", "b": "0.9.0"}, "active": "a", "battery": 64}
    client = env.sign_in(env.reader)
    page = client.get("/ui/devices/dev-1").text
    assert MEANINGS["E_HASH_MISMATCH"][1] in page and "SHA-256 of the received image differs" in page
    assert "sha256 abc != def" in page and ">64%<" in page
    assert '<dd id="device-running">1.0.0</dd>' in page and "<dd>0.9.0</dd>" in page
    assert "deployment.create" in page and "ops-admin" in page
    assert client.get("/ui/devices/nope").status_code == 404
    deployment = client.get(f"/ui/deployments/{dep.id}").text
    assert "E_HASH_MISMATCH" in deployment and MEANINGS["E_HASH_MISMATCH"][1] in deployment
    assert 'class="act ' not in deployment  # a read token: no Cancel
    assert client.get("/ui/deployments/999").status_code == 404


def test_pages_escape_what_devices_report(env):
    with env.store.session() as s:
        s.get(Device, "dev-1").inventory = {"state": "<script>alert(1)</script>"}
    client = env.sign_in(env.reader)
    page = client.get("/ui/devices/dev-1").text
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_events_stream_sends_the_live_sections(env):
    _campaign(env)
    env.app.state.dashboard_interval = 0.05
    client = env.sign_in(env.reader)
    with client.stream("GET", "/ui/events?view=campaign&arg=roll") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        data = next(line for line in lines if line.startswith("data: {"))
    fragments = json.loads(data[len("data: "):])
    assert {"campaign-head", "campaign-waves", "campaign-failed", "campaign-clocks"} <= set(fragments)
    assert 'id="campaign-progress"' in fragments["campaign-head"]


def test_releases_say_whether_their_key_is_still_trusted_and_the_fleet_page_counts(env):
    rel = _campaign(env)
    trust = {"version": 2, "revoked": [], "certs": [{"body": json.dumps({"kid": rel.key_id})}]}
    env.app.state.trust_loader = lambda: trust
    client = env.sign_in(env.reader)
    row = client.get("/ui/releases").text.split("<tbody>")[1]
    assert "<td>1.1.0</td>" in row and "esp32" in row and rel.key_id in row and ">trusted<" in row
    trust = {"version": 3, "revoked": [rel.key_id], "certs": []}
    row = client.get("/ui/releases").text.split("<tbody>")[1]
    assert ">not trusted<" in row and "revoked in trust version 3" in row
    fleet = client.get("/ui/").text
    assert "2 online" in fleet and "5 offline" in fleet and "campaign roll" in fleet and "<svg" in fleet
    # A deleted release is not listed (fota release delete)
    from fota.server.release_delete import delete_release
    create_release(env.store, env.app.state.blobs_dir, KEY, pack_files({"app.py": b"V = 3\n"}), "1.2.0", ["esp32"])
    assert "<td>1.2.0</td>" in client.get("/ui/releases").text
    delete_release(env.store, env.app.state.blobs_dir, "1.2.0", actor="test")
    page = client.get("/ui/releases").text
    assert "<td>1.2.0</td>" not in page and "<td>1.1.0</td>" in page


def test_error_code_table_is_the_protocol_documents():
    from pathlib import Path
    doc = (Path(__file__).resolve().parent.parent / "docs/protocol.md").read_text()
    block = doc.split("<!-- codes:begin -->")[1].split("<!-- codes:end -->")[0]
    rows = re.findall(r"^\| `(E_[A-Z_]+)` \| ([^|]+) \| (.+) \|$", block, re.M)
    assert {c: (s.strip(), m.strip()) for c, s, m in rows} == MEANINGS
    from fota.device import protocol as P
    assert {v for k, v in vars(P).items() if k.startswith("E_")} == set(MEANINGS)
    assert explain(None) is None and "not a code" in explain("E_NEW")


def test_demo_keep_leaves_the_dashboard_running_with_a_read_only_sign_in():
    import os
    import signal
    import subprocess
    import sys
    import httpx
    from fota.server.broker import free_port
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fota.cli", "demo", "--devices", "1", "--keep", "--timeout", "90"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=dict(os.environ, COLUMNS="200", FOTA_DEMO_PORT=str(port)))
    lines = []
    try:
        url = secret = None
        for line in proc.stdout:
            lines.append(line)
            if m := re.search(r"dashboard: (http://127\.0\.0\.1:\d+/ui/)", line):
                url = m.group(1)
            if m := re.search(r"read-only token: (fota_\S+)", line):
                secret = m.group(1)
                break
        assert url and secret, "".join(lines)
        with httpx.Client(base_url=url.removesuffix("/ui/"), timeout=10) as client:
            page = client.get("/ui/login")
            nonce = re.search(r'name="login_nonce" value="([^"]+)"', page.text).group(1)
            assert client.post("/ui/login", data={"token": secret, "login_nonce": nonce}).status_code == 303
            fleet = client.get("/ui/")
            assert "1 online" in fleet.text and "(read)" in fleet.text and 'class="act ' not in fleet.text
            assert client.get("/api/v1/devices", headers={"Authorization": f"Bearer {secret}"}).json()[0]["version"] \
                == "1.1.0"
        os.killpg(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
        lines.append(rest)
        assert proc.returncode == 0, "".join(lines)
        assert "demo passed" in rest and "demo home kept at" in rest
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_campaign_brief_says_what_campaign_summary_says(env):
    from fota.server.campaigns import campaign_summary, pause_campaign
    from fota.server.dashboard.queries import campaign_brief, campaign_view
    from fota.server.store.models import CampaignDevice
    _campaign(env, devices=("dev-1", "dev-3", "dev-5", "dev-7"))
    now = utcnow()
    with env.store.session() as s:  # devices in several states, as the engine would leave them
        rows = {r.device_id: r for r in s.scalars(select(CampaignDevice))}
        rows["dev-1"].state, rows["dev-1"].code, rows["dev-1"].reason = "failed", "E_HEALTH", "boom"
        rows["dev-3"].state, rows["dev-3"].confirmed_at = "probation", now - timedelta(seconds=100)
        rows["dev-5"].state = "succeeded"
    pause_campaign(env.store, "roll")
    summary = campaign_summary(env.store, "roll", devices=False, now=now)
    brief = campaign_brief(env.store, "roll", now)
    assert {k: brief[k] for k in summary} == summary
    view = campaign_view(env.store, "roll", now)
    assert view["failed"] == [{"device": "dev-1", "wave": 1, "code": "E_HEALTH", "reason": "boom",
                               "meaning": "the new firmware failed its trial boots"}]
    assert view["clocks"] == [{"device": "dev-3", "left": 200.0}]  # probation 300 s by default
    assert view["in_flight"] == 1 and view["eta"] is None  # paused: no ETA
    # running again: the same ETA and probation ends as campaign_summary's
    from fota.server.campaigns import resume_campaign
    resume_campaign(env.store, "roll")
    with env.store.session() as s:  # a wave-1 device skipped; what resume changed set back to the same wave
        rows = {r.device_id: r for r in s.scalars(select(CampaignDevice))}
        rows["dev-7"].state, rows["dev-7"].reason = "skipped", "held by campaign other"
    summary = campaign_summary(env.store, "roll", devices=False, now=now)
    brief = campaign_brief(env.store, "roll", now)
    assert {k: brief[k] for k in summary} == summary
    assert summary["eta"] is not None and summary["skipped"] and summary["probation_ends_at"] is not None
    page = env.sign_in(env.reader).get("/ui/campaigns/roll").text
    assert "skipped: 1 held by campaign other" in page and "ETA <span" in page


def test_admin_cancels_a_deployment_from_its_page(env):
    rel = create_release(env.store, env.app.state.blobs_dir, KEY, pack_files({"app.py": b"V = 2\n"}), "1.1.0",
                         ["esp32"])
    dep = create_deployment(env.store, rel, device_ids=["dev-1", "dev-3"])
    client = env.sign_in(env.admin)
    page = client.get(f"/ui/deployments/{dep.id}").text
    assert f'data-confirm="Cancel deployment {dep.id}?' in page
    r = client.post(f"/ui/deployments/{dep.id}/cancel", data={"csrf": _csrf(page)})
    assert r.status_code == 303
    assert "cancelled" in client.get(f"/ui/deployments/{dep.id}").text
    [event] = audit.list_events(env.store, 10)
    assert (event.actor, event.action, event.detail["via"]) == ("ops-admin", "deployment.cancel", "dashboard")
    assert sorted(event.detail["withdrawn"]) == sorted(j.id for j in dep.jobs)
