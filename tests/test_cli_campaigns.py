"""`fota campaign …` as an operator meets it (issue 15), through the real entry point
(fota.cli.main, run in the test's process: inproc.run_fota; test_cli.py runs the campaign commands
as a `fota` process), on SQLite and PostgreSQL (the home's database_url from FOTA_DATABASE_URL),
locally on the home and remotely through a `fota api` process (test_cli_remote.Center)."""
from __future__ import annotations

import os
import re
from datetime import datetime, timezone
from pathlib import Path

import pytest

from fota.server.campaigns import abort_campaign, create_campaign, start_campaign
from fota.server.campaigns import states as S
from fota.server.campaigns.spec import CampaignSpec
from test_campaigns import Rig
from inproc import run_fota
from test_cli import _app_dir, assert_clean_error
from test_cli_remote import Center
from db_fixtures import on_one_database


class Cli:
    """`fota` with a home whose database is the test's."""

    def __init__(self, tmp_path: Path, db_url: str):
        self.home = tmp_path / "home"
        self.env = {**os.environ, "FOTA_HOME": str(self.home), "FOTA_DATABASE_URL": db_url, "COLUMNS": "250"}

    def __call__(self, *args: str):
        return run_fota(args, self.env)


class RemoteCli:
    """`fota` on a laptop through the API of a control center on the test's database; the
    commands that only work on the server's home (keys, device) run there."""

    SERVER_SIDE = ("keys", "device")

    def __init__(self, tmp_path: Path, db_url: str):
        self.center = Center(tmp_path, db_url, in_process=True)  # keys made, `fota api` listening

    def __call__(self, *args: str):
        return (self.center.local if args[0] in self.SERVER_SIDE else self.center.remote)(*args)


@pytest.fixture(params=["local", "remote"])
def cli(request, tmp_path, db_url):
    """`fota` with the keys made, locally or remotely."""
    if request.param == "remote":
        c = RemoteCli(tmp_path, db_url)
        yield c
        c.center.close()
        return
    c = Cli(tmp_path, db_url)
    assert c("keys", "init").returncode == 0
    yield c


@on_one_database("sqlite")
def test_create_refuses_unknown_targets_and_lone_window_options_and_previews(cli, tmp_path):
    for dev in ("u-1", "u-2", "u-3"):
        assert cli("device", "add", dev, "--hardware", "unix", "--tag", "lab").returncode == 0
    assert cli("device", "add", "esp-1", "--hardware", "esp32", "--tag", "lab").returncode == 0
    app = _app_dir(tmp_path, "2.0.0")
    assert cli("release", "create", str(app), "--version", "2.0.0", "--hardware", "unix").returncode == 0
    create = ("campaign", "create", "spring", "--release", "2.0.0")
    assert_clean_error(cli(*create, "--tag", "nope"), "no device has tag 'nope'")
    assert_clean_error(cli(*create, "--device", "u-1", "--device", "ghost"), "unknown device(s): ghost")
    assert_clean_error(cli(*create, "--window-minutes", "30"), "--window-minutes need(s) --window-cron")
    assert_clean_error(cli(*create, "--window-tz", "Europe/Berlin"), "--window-tz need(s) --window-cron")
    assert_clean_error(cli(*create, "--window-cron", "0 0 2 * * ?"), "has 6 field(s)", "'0 2 * * *'")
    assert "spring" not in cli("campaign", "list").stdout  # nothing was created

    r = cli(*create, "--tag", "lab", "--waves", "50,100", "--dry-run")
    assert r.returncode == 0, r.stdout + r.stderr
    out = " ".join(r.stdout.split())
    assert "nothing created" in out and "targets 3 device(s) (3 offline now" in out and "waves: 2, 1" in out
    assert "skips 1 device(s) matching the filter: 1 hardware esp32 not in the release's unix" in out
    assert "spring" not in cli("campaign", "list").stdout

    r = cli(*create, "--tag", "lab", "--waves", "50,100", "--failure", "10", "--window-cron", "0 2 * * *")
    assert r.returncode == 0, r.stdout + r.stderr
    out = " ".join(r.stdout.split())
    assert "a wave goes on once 90% of its devices succeeded; more than 10% failed: pause" in out
    assert "targets 3 device(s)" in out and "hardware esp32 not in the release's unix" in out
    status = " ".join(cli("campaign", "status", "spring").stdout.split())
    assert "draft" in status and "if started now: targets 3 device(s)" in status and "created 20" in status
    assert "needs 90% ok, >10% failed: pause" in status
    assert_clean_error(cli("campaign", "status", "spring", "--state", "lost"), "unknown device state(s) lost")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # help reads no database
@pytest.mark.parametrize("cli", ["local"], indirect=True)  # help is not remote
def test_create_help_explains_every_option_with_the_defaults_that_matter(cli):
    from click import Option
    from typer.main import get_command

    from fota.campaign_cli import HELP_DEFAULTS, campaign_app
    command = get_command(campaign_app).commands["create"]
    assert all(p.help for p in command.params if isinstance(p, Option)), \
        [p.name for p in command.params if isinstance(p, Option) and not p.help]
    spec = CampaignSpec()
    assert HELP_DEFAULTS == {"failure": spec.waves[0].failure, "on_failure": spec.on_failure,
                             "max_in_flight": spec.max_in_flight, "rate_growth": spec.rate_growth,
                             "probation": spec.probation, "retries": spec.retries, "backoff": spec.backoff,
                             **spec.timeouts}
    text = " ".join(cli("campaign", "create", "--help").stdout.split())
    for needle in ("--max-in-flight <int> devices with an update job out at once (default: 10)",
                   "(default: 300)", "--failure <float> more than this % of a wave failed",
                   "(default: 0: the first failure)", "(default: 100 - --failure, so 100)",
                   "--max-rate", "--retries <int> further attempts", "--timeout-download <int> seconds",
                   "--timeout-install <int> seconds", "--timeout-confirm <int> seconds", "5-field cron"):
        assert needle in text, needle


@on_one_database("postgres")
def test_status_shows_clocks_probation_eta_skips_and_filters_devices(tmp_path, broker, db_url, cli):
    rig = Rig(tmp_path, broker, db_url)
    try:
        rig.release()
        fast = [rig.devices.add(f"ok{i}") for i in range(2)]
        bad = rig.devices.add("bad", "hw")
        slow = rig.devices.add("slow", "silent")
        esp = rig.devices.add("esp", hardware="esp32")
        create_campaign(rig.store, "clocks", "2.0.0",
                        {"waves": [{"devices": fast + [bad]}, 100], "probation": 600, "failure": 100,
                         "success": 100, "timeouts": {"download": 86400}})
        start_campaign(rig.store, "clocks", now=rig.clock.now)
        rig.drive(lambda: all(rig.state("clocks", d) == S.PROBATION for d in fast)
                  and rig.state("clocks", bad) == S.FAILED, what="on probation and one failed")
        r = cli("campaign", "status", "clocks")
        out = " ".join(r.stdout.split())
        assert r.returncode == 0, r.stdout + r.stderr
        assert re.search(r"created 20\S+ \S+ UTC \(\d+s ago\), started 20\S+ \S+ UTC \(\d+s ago\), finished -", out)
        assert re.search(r"2 device\(s\) on probation, the last until 20\S+ \S+ UTC \(in 9m\d\ds\)", out), out
        assert re.search(r"ETA 20\S+ \S+ UTC \(in [^)]+\) at the pace so far", out), out
        assert "skipped: 1 hardware esp32 not in the release's unix" in out
        assert "outside its window" not in out
        table = cli("campaign", "status", "clocks", "--state", "probation").stdout
        assert all(d in table for d in fast) and bad not in table and slow not in table
        assert re.search(r"probation\W+1\W+\d+\W+confirmed\W+9m\d\ds", table), table
        table = cli("campaign", "status", "clocks", "--wave", "2").stdout
        assert slow in table and esp not in table and not any(d in table for d in fast)
        table = cli("campaign", "status", "clocks", "--devices", "--state", "failed", "--state", "skipped").stdout
        assert bad in table and esp in table and "E_HW_MISMATCH" in table and slow not in table

        # a window closed now: said while the campaign may still start devices, not once aborted
        hour = (datetime.now(timezone.utc).hour + 12) % 24
        create_campaign(rig.store, "night", "2.0.0", {"filter": {"devices": [slow]},
                                                      "window": {"cron": f"0 {hour} * * *", "minutes": 60}})
        start_campaign(rig.store, "night")
        assert "outside its window (opens 20" in " ".join(cli("campaign", "status", "night").stdout.split())
        abort_campaign(rig.store, "night")
        rig.tick()
        out = " ".join(cli("campaign", "status", "night").stdout.split())
        assert "aborted" in out and "outside its window" not in out and re.search(r"finished 20\S+ \S+ UTC", out)
    finally:
        rig.close()
