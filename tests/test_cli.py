"""The `fota` command as an operator uses it: real processes, a real broker, real devices."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fota.examples import hello_files
from fota.tools.waiting import TimedOut, wait_until
from inproc import run_fota

FOTA = [sys.executable, "-m", "fota.cli"]


def fota(home: Path, *args: str, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "FOTA_HOME": str(home), "COLUMNS": "120", **(env or {})}
    return subprocess.run(FOTA + list(args), capture_output=True, text=True, timeout=timeout, env=env)


def fota_in_process(home: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """fota() run inside the test's process (inproc.run_fota): for polling, where the process is
    not the point and one a second would cost a core."""
    return run_fota(args, {**os.environ, "FOTA_HOME": str(home), "COLUMNS": "120", **(env or {})})


def background(home: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, FOTA_HOME=str(home))
    return subprocess.Popen(FOTA + list(args), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.stdout.read() if proc.stdout else ""


def wait_listed(home: Path, ready, what: str, *procs: subprocess.Popen, timeout: float = 30,
                interval: float = 0.3) -> None:
    """Poll `fota devices` (in the test's process) until ready(listing); else fail with `what`,
    the last listing and the output of procs (stopped, for the failure report)."""
    listing = [""]

    def listed():
        listing[0] = fota_in_process(home, "devices").stdout
        return ready(listing[0])

    try:
        wait_until(listed, timeout=timeout, interval=interval, what=what)
    except TimedOut:
        pytest.fail(f"{what}: {listing[0]}\n" + "\n".join(stop(p) for p in procs))


def assert_clean_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert "Traceback" not in out, out
    for needle in needles:
        assert needle in out, out


def _app_dir(tmp_path: Path, version: str) -> Path:
    d = tmp_path / f"app-{version}"
    d.mkdir()
    for name, data in hello_files(version).items():
        (d / name).write_bytes(data)
    return d


def test_clear_errors_without_tracebacks(tmp_path):
    """Refusals are one line and exit 1. Those only this test asserts run as a `fota` process;
    those test_cli_remote's operator cases assert too run in the test's process (quick)."""
    home = tmp_path / "home"
    app = _app_dir(tmp_path, "1.1.0")
    assert_clean_error(fota(home, "release", "create", str(app), "--version", "1.1.0", "--hardware", "unix"),
                       "no signing key", "fota keys init")
    assert fota(home, "keys", "init").returncode == 0
    assert_clean_error(fota(home, "keys", "init"), "already exist")
    quick = lambda *args: fota_in_process(home, *args)  # noqa: E731
    assert_clean_error(quick("release", "create", str(tmp_path / "nope"), "--version", "1", "--hardware", "x"),
                       "does not exist")
    assert_clean_error(quick("deploy", "9.9.9", "--device", "d1"), "9.9.9")
    assert quick("release", "create", str(app), "--version", "1.1.0", "--hardware", "unix").returncode == 0
    assert_clean_error(quick("release", "create", str(app), "--version", "1.1.0", "--hardware", "unix"),
                       "already exists")
    assert_clean_error(quick("deploy", "1.1.0", "--device", "ghost"), "ghost")
    assert_clean_error(quick("deploy", "1.1.0"), "--device")
    assert_clean_error(fota(home, "device", "add", "bad/id", "--hardware", "unix"), "bad/id")
    assert quick("device", "add", "esp-1", "--hardware", "esp32").returncode == 0
    assert_clean_error(quick("device", "rekey", "ghost"), "ghost")
    assert_clean_error(quick("device", "revoke", "ghost"), "ghost")
    assert_clean_error(quick("deploy", "1.1.0", "--device", "esp-1"), "esp32")
    assert_clean_error(quick("status"), "no deployments")
    assert_clean_error(fota(home, "device", "run", "nobody"), "no device directory")


def test_operator_flow_serve_devices_deploy_and_watch(tmp_path):
    home = tmp_path / "home"
    assert fota(home, "keys", "init").returncode == 0
    for dev in ("cli-1", "cli-2"):
        r = fota(home, "device", "add", dev, "--hardware", "unix", "--tag", "lab", "--unix-dir")
        assert r.returncode == 0, r.stderr
    serve = background(home, "serve")
    devices = [background(home, "device", "run", dev) for dev in ("cli-1", "cli-2")]
    try:
        wait_listed(home, lambda listing: listing.count("1.0.0") == 2 and listing.count("yes") == 2,
                    "devices did not come online", serve)
        app = _app_dir(tmp_path, "1.2.0")
        assert fota(home, "release", "create", str(app), "--version", "1.2.0", "--hardware", "unix").returncode == 0
        r = fota(home, "deploy", "1.2.0", "--tag", "lab")
        assert r.returncode == 0 and "2 device(s)" in r.stdout, r.stdout + r.stderr
        watch = fota(home, "status", "--watch", timeout=90)
        assert watch.returncode == 0, watch.stdout + watch.stderr
        assert "2 confirmed" in watch.stdout
        hist = fota(home, "history", "cli-1").stdout
        for state in ("downloading", "verifying", "installing", "rebooting", "trial", "confirmed"):
            assert state in hist
        time.sleep(0.5)
        assert fota(home, "devices").stdout.count("1.2.0") == 2
    finally:
        for p in devices:
            stop(p)
        stop(serve)


def test_demo_command_rolls_out_and_exits_zero():
    r = subprocess.run(FOTA + ["demo", "--devices", "3", "--timeout", "90"], capture_output=True, text=True,
                       timeout=180, env=dict(os.environ, COLUMNS="120"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "demo passed: 3 device(s) confirmed 1.1.0 after reboot" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr


def test_campaign_commands_roll_out_in_waves_and_watch(tmp_path):
    home = tmp_path / "home"
    assert fota(home, "keys", "init").returncode == 0
    for dev in ("wave-1", "wave-2", "wave-3"):
        assert fota(home, "device", "add", dev, "--hardware", "unix", "--tag", "lab", "--unix-dir").returncode == 0
    assert fota(home, "device", "add", "esp-9", "--hardware", "esp32", "--tag", "lab").returncode == 0
    serve = background(home, "serve")
    devices = [background(home, "device", "run", dev) for dev in ("wave-1", "wave-2", "wave-3")]
    try:
        wait_listed(home, lambda listing: listing.count("yes") == 3, "devices did not come online", serve)
        app = _app_dir(tmp_path, "1.3.0")
        assert fota(home, "release", "create", str(app), "--version", "1.3.0", "--hardware", "unix").returncode == 0
        assert_clean_error(fota(home, "campaign", "start", "nope"), "no campaign 'nope'")
        r = fota(home, "campaign", "create", "lab-rollout", "--release", "1.3.0", "--tag", "lab",
                 "--waves", "34,100", "--approval", "--probation", "1", "--online")
        assert r.returncode == 0 and "draft" in r.stdout, r.stdout + r.stderr
        assert_clean_error(fota(home, "campaign", "resume", "lab-rollout"), "cannot resume a campaign that is draft")
        assert fota(home, "campaign", "start", "lab-rollout").returncode == 0
        # wave 1 (one device) succeeds, then the campaign waits for approval
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            view = fota_in_process(home, "campaign", "status", "lab-rollout", "--devices").stdout
            if "waiting" in view:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"wave 1 never finished: {view}\n{stop(serve)}")
        assert "resume to start wave 2" in view and view.count("queued") == 2, view
        assert "esp-9" not in view  # an esp32 never gets a unix release
        assert fota(home, "campaign", "resume", "lab-rollout").returncode == 0
        watch = fota(home, "campaign", "status", "lab-rollout", "--watch", "--interval", "0.3", timeout=120)
        assert watch.returncode == 0, watch.stdout + watch.stderr
        assert "done" in watch.stdout and "3/3 succeeded" in watch.stdout
        listing = fota(home, "campaign", "list").stdout
        assert "lab-rollout" in listing and "100%" in listing
        assert fota(home, "devices").stdout.count("1.3.0") == 3  # every unix device, not the esp32
    finally:
        for p in devices:
            stop(p)
        stop(serve)
