"""The dashboard in a real browser: headless Chromium (the Debian package `chromium`) driven by
Playwright, on the API's HTTP server, with real MicroPython devices updating through the real
control center and Mosquitto (fota.testkit.fleet).

The screenshots go to docs/ (docs/dashboard.md and the README show them)."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from playwright import sync_api
from sqlalchemy import update

from fota.examples import hello_files
from fota.server.api import create_app
from fota.server.auth import create_token
from fota.server.campaigns import campaign_summary, create_campaign, start_campaign
from fota.server.deployments import create_deployment
from fota.server.releases import create_release
from fota.server.store import Device
from fota.testkit.appserver import AppServer
from fota.testkit.fleet import Fleet
from fota.tools.bundle import pack_files
from fota.tools.waiting import wait_until


DOCS = Path(__file__).resolve().parent.parent / "docs"
CHROMIUM = os.environ.get("FOTA_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
UPDATING = ["web-1", "web-2", "web-3"]
MISPROVISIONED = "web-bad"   # its board says hardware unix-b, the store says unix: it refuses the release


class World:
    """One fleet, one HTTP server, one browser for the module's tests (devices take a while to start)."""

    def __init__(self, tmp: Path, broker):
        # small chunks fetched one at a time: a download lasts long enough to watch it move
        self.fleet = Fleet(tmp, broker, f"sqlite:///{tmp / 'fota.db'}", chunk=256, campaign_interval=0.2)
        self.server = self.playwright = self.browser = None
        try:
            for d in UPDATING:
                self.fleet.add_device(d, max_inflight=256)
            self.fleet.add_device(MISPROVISIONED, hardware="unix-b")
            with self.fleet.store.session() as s:
                s.execute(update(Device).where(Device.id == MISPROVISIONED).values(hardware="unix", tags=["lab"]))
                s.execute(update(Device).where(Device.id.in_(UPDATING)).values(tags=["lab", "canary"]))
            self.fleet.wait_online(*UPDATING, MISPROVISIONED)
            files = dict(hello_files("1.1.0"))
            files["assets/blob.bin"] = os.urandom(320 * 1024)
            self.release = create_release(self.fleet.store, self.fleet.blobs, self.fleet.key, pack_files(files),
                                          "1.1.0", ["unix"])
            _, self.admin = create_token(self.fleet.store, "ops-admin", "admin")
            _, self.reader = create_token(self.fleet.store, "viewer", "read")
            app = create_app(self.fleet.store, self.fleet.blobs, lambda: self.fleet.key,
                             trust_loader=self.fleet.keyring.trust)
            app.state.dashboard_interval = 0.3
            self.server = AppServer(app).start()
            self.playwright = sync_api.sync_playwright().start()
            self.browser = self.playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        except BaseException:
            self.close()
            raise

    def page(self):
        context = self.browser.new_context(viewport={"width": 1280, "height": 900}, base_url=self.server.url)
        page = context.new_page()
        page.set_default_timeout(30_000)
        return page

    def sign_in(self, secret: str):
        page = self.page()
        page.goto("/ui/")
        assert page.url.endswith("/ui/login")  # not signed in: the sign-in form
        page.fill("input[name=token]", secret)
        page.click("button[type=submit]")
        page.wait_for_url("**/ui/")
        return page

    def close(self):
        for stop in (lambda: self.browser.close(), lambda: self.playwright.stop(), lambda: self.server.stop(),
                     lambda: self.fleet.close()):
            try:
                stop()
            except Exception:
                pass


@pytest.fixture(scope="module")
def world(tmp_path_factory, broker):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: install the Debian package chromium (./run test does)")
    w = World(tmp_path_factory.mktemp("dashboard"), broker)
    yield w
    w.close()


def _value(page, selector: str) -> float:
    return float(page.get_attribute(selector, "value"))


def test_sign_in_shows_the_fleet(world):
    page = world.sign_in(world.admin)
    assert page.inner_text("nav .who") == "ops-admin (admin)"
    counts = page.inner_text("#fleet-counts")
    assert "4 online" in counts and "0 offline" in counts and "4 devices" in counts
    assert page.locator("#fleet-counts svg").count() == 3  # by version, hardware, tag
    page.goto("/ui/devices?tag=lab")
    assert page.locator("#devices tbody tr").count() == len(UPDATING) + 1
    page.goto("/ui/devices?tag=canary")
    assert page.locator("#devices tbody tr").count() == len(UPDATING)
    page.screenshot(path=str(DOCS / "dashboard-devices.png"), full_page=True)
    page.context.close()


def test_failed_device_timeline_reads_its_error_in_words(world):
    dep = create_deployment(world.fleet.store, world.release, device_ids=[MISPROVISIONED])
    wait_until(lambda: world.fleet.job(dep.jobs[0].id).state == "failed", timeout=60, what="the job to fail")
    page = world.sign_in(world.reader)
    page.goto("/ui/devices?state=failed")
    page.click(f"#devices a:text('{MISPROVISIONED}')")
    page.wait_for_url(f"**/ui/devices/{MISPROVISIONED}")
    failed = page.locator("#timeline li.ev-failed").first
    assert "E_HW_MISMATCH" in failed.inner_text()
    assert failed.locator(".meaning").inner_text() == "device hardware type not in manifest `hw`"
    assert "unix-b" in failed.locator(".reason").inner_text()  # the device's own words too
    assert "device hardware type not in manifest" in page.inner_text("#device-job")
    page.screenshot(path=str(DOCS / "dashboard-device.png"), full_page=True)
    page.context.close()


def test_campaign_progress_moves_live_then_pause_stops_it(world):
    store = world.fleet.store
    create_campaign(store, "web-rollout", "1.1.0", {"filter": {"devices": UPDATING}, "waves": [100],
                                                    "probation": 0, "max_in_flight": 1})
    page = world.sign_in(world.admin)
    page.goto("/ui/campaigns/web-rollout")
    page.evaluate("window.notReloaded = true")
    start_campaign(store, "web-rollout")
    # the bar moves while the devices download, without a reload
    seen = []
    deadline = time.monotonic() + 90
    while len(set(seen)) < 3 and time.monotonic() < deadline:
        seen.append(_value(page, "#campaign-jobs-progress"))
        page.wait_for_timeout(300)
    values = sorted(set(seen))
    assert len(values) >= 3 and values[0] < values[-1], seen
    assert seen == sorted(seen)  # only forward
    assert page.evaluate("window.notReloaded") is True
    page.screenshot(path=str(DOCS / "dashboard-campaign.png"), full_page=True)

    # pause: asked for confirmation, then the campaign stops starting devices
    questions = []
    page.once("dialog", lambda dialog: (questions.append(dialog.message), dialog.accept()))
    page.click("button.act-pause")
    page.wait_for_selector("#campaign-head .st-paused")
    assert questions == ["Pause campaign web-rollout? No new device starts; devices in flight finish."]
    assert page.locator("button.act-resume").count() == 1 and page.locator("button.act-pause").count() == 0
    # the device in flight finishes; then nothing moves
    wait_until(lambda: not any(d["state"] in ("in_flight", "probation")
                               for d in campaign_summary(store, "web-rollout")["devices"]), timeout=90,
               what="the device in flight to settle")
    page.wait_for_timeout(1500)
    settled = _value(page, "#campaign-progress"), _value(page, "#campaign-jobs-progress")
    page.wait_for_timeout(4000)
    assert (_value(page, "#campaign-progress"), _value(page, "#campaign-jobs-progress")) == settled
    assert settled[0] < 1.0  # some devices were never started
    states = [d["state"] for d in campaign_summary(store, "web-rollout")["devices"]]
    assert "queued" in states and "succeeded" in states
    assert page.inner_text("#campaign-head").count("succeeded") == 1
    assert f"{states.count('succeeded')} of 3 devices succeeded" in page.inner_text("#campaign-head")
    page.screenshot(path=str(DOCS / "dashboard-campaign-paused.png"), full_page=True)
    fleet = page.context.new_page()
    fleet.goto("/ui/")
    assert "campaign web-rollout" in fleet.inner_text("#fleet-rollouts")
    fleet.screenshot(path=str(DOCS / "dashboard-fleet.png"), full_page=True)
    fleet.close()
    # the pause is in the audit log, by the token that clicked
    page.goto(f"/ui/devices/{UPDATING[0]}")
    assert "campaign.pause" in page.inner_text("#device-audit") and "ops-admin" in page.inner_text("#device-audit")
    page.context.close()


def test_read_token_sees_no_buttons_and_its_post_gets_403(world):
    page = world.sign_in(world.reader)
    page.goto("/ui/campaigns/web-rollout")
    assert page.inner_text("nav .who") == "viewer (read)"
    assert page.locator("button.act").count() == 0
    csrf = page.get_attribute("nav input[name=csrf]", "value")
    response = page.request.post("/ui/campaigns/web-rollout/resume", form={"csrf": csrf})
    assert response.status == 403 and "needs an admin token" in response.text()
    page.screenshot(path=str(DOCS / "dashboard-readonly.png"), full_page=True)
    assert campaign_summary(world.fleet.store, "web-rollout")["state"] == "paused"
    page.context.close()


def test_stale_csrf_token_is_refused(world):
    page = world.sign_in(world.admin)
    page.goto("/ui/campaigns/web-rollout")
    # the same browser signs in again in another tab: a new session, the first tab's forms are stale
    other = page.context.new_page()
    other.goto("/ui/login")
    other.fill("input[name=token]", world.admin)
    other.click("button[type=submit]")
    other.wait_for_url("**/ui/")
    page.once("dialog", lambda dialog: dialog.accept())
    with page.expect_navigation():
        page.click("button.act-resume")
    assert "stale or missing CSRF token" in page.inner_text("main")
    assert campaign_summary(world.fleet.store, "web-rollout")["state"] == "paused"
    page.context.close()
