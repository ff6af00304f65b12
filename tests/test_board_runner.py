"""The board runner (fota.device.board) under the real MicroPython, with the board modules it
uses emulated from their documentation (tests/boards/machine.py, tests/boards/network.py): Wi-Fi
bring-up and back-off, machine.reset() on a reboot, the trial watchdog, bounded poll() steps,
the three app styles next to a real update through the real broker, the free-space refusal."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import run_micropython
from fota.examples import example_app_files, hello_files
from fota.server.deployments import create_deployment
from fota.server.releases import create_release
from fota.tools.bundle import pack_files
from fota.tools.supervisor import DeviceProcess, find_micropython
from fota.tools.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
BOARDS = ROOT / "tests" / "boards"
RESET_EXIT = 4


class BoardProcess(DeviceProcess):
    """A device directory run by the board runner (main.py: fota.device.board.main), restarted
    after machine.reset() (exit 4) and after a watchdog reset (SIGKILL; reset cause "wdt"), as
    the board's hardware would boot it again."""

    def __init__(self, root: Path, *, wlan: Path | None = None, **kwargs):
        super().__init__(root, **kwargs)
        self.wlan = wlan
        self.cause_path = Path(root) / "reset_cause"

    def _spawn(self) -> subprocess.Popen:
        env = dict(os.environ)
        env["MICROPYPATH"] = f"{BOARDS}:{self.code_path}:.frozen"
        env["FOTA_EMU_RESET_CAUSE"] = str(self.cause_path)
        env.pop("FOTA_EMULATED_BOARD", None)
        if self.wlan is not None:
            env["FOTA_EMU_WLAN"] = str(self.wlan)
        else:
            env.pop("FOTA_EMU_WLAN", None)
        log = open(self.log_path, "ab")
        try:
            return subprocess.Popen([find_micropython(), "-X", f"heapsize={self.heap}", "-c",
                                     f"from fota.device.board import main\nmain({str(self.root)!r})"],
                                    env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    process_group=0)
        finally:
            log.close()

    @property
    def resets(self) -> int:
        return self.exits.count(RESET_EXIT)

    @property
    def watchdog_resets(self) -> int:
        return self.exits.count(-9)


def _board(fleet, device_id, *, app_files=None, wlan=None, **settings) -> BoardProcess:
    """A device of the fleet (provisioned, broker account) run by the board runner."""
    fleet.add_device(device_id, start=False, **settings)
    root = fleet.root(device_id)
    if app_files is not None:
        app = root / "slots" / "a" / "app"
        for p in app.iterdir():
            p.unlink()
        for name, data in app_files.items():
            (app / name).write_bytes(data)
    proc = BoardProcess(root, wlan=wlan, heap=fleet.heap)
    fleet.devices[device_id] = proc
    return proc.start()


def _release(fleet, files, version):
    return create_release(fleet.store, fleet.blobs, fleet.key, pack_files(files), version, ["unix"])


def _update(fleet, device_id, files, version, timeout=90):
    rel = _release(fleet, files, version)
    dep = create_deployment(fleet.store, rel, device_ids=[device_id])
    return fleet.wait_job(dep.jobs[0].id, timeout=timeout)


# ---------------------------------------------------------------------------------- updates

def test_tick_app_updated_reset_by_machine_reset_and_watchdog_fed_on_trial(fleet):
    """The agent owns the loop (the app's tick()); the reboot is machine.reset(); the trial boot
    arms the watchdog and the agent feeds it for longer than its timeout."""
    proc = _board(fleet, "brd-tick", trial_wdt_ms=1500, trial_settle_ms=200)
    fleet.wait_online("brd-tick")
    job = _update(fleet, "brd-tick", hello_files("1.1.0"), "1.1.0")
    assert (job.state, job.code) == ("confirmed", None), (job.reason, proc.log_text())
    fleet.wait_online("brd-tick", version="1.1.0")
    assert proc.resets == 1  # the reboot into the new slot: machine.reset(), exit 4
    log = proc.log_text()
    assert "trial boot: watchdog armed, 1500 ms" in log
    # Fed: the trial boot outlives its watchdog's timeout several times over.
    time.sleep(4)
    assert proc.watchdog_resets == 0 and proc.exits == [RESET_EXIT], (proc.exits, log)
    assert proc.pid is not None
    assert fleet.running_version("brd-tick") == "1.1.0"


def _hanging_app(version):
    files = hello_files(version)
    files["app.py"] += b"\ndef tick():\n    while True:\n        pass  # hangs: never returns\n"
    return files


def test_app_hanging_on_trial_is_reset_by_the_watchdog_and_reverted(fleet):
    proc = _board(fleet, "brd-hang", trial_wdt_ms=800, trial_settle_ms=3000, max_trial_boots=2)
    fleet.wait_online("brd-hang")
    job = _update(fleet, "brd-hang", _hanging_app("1.1.0"), "1.1.0")
    assert (job.state, job.code) == ("reverted", "E_HEALTH"), (job.state, job.code, job.reason)
    fleet.wait_online("brd-hang", version="1.0.0")
    # Two trial boots, each ended by the watchdog (SIGKILL after "wdt" in the reset cause).
    assert proc.watchdog_resets == 2, proc.exits
    assert "WDT: not fed in time" in proc.log_text()
    assert fleet.running_version("brd-hang") == "1.0.0"


@pytest.mark.parametrize("style", ["poll_app", "asyncio_app"])
def test_example_app_keeps_running_next_to_a_real_update(fleet, style):
    """Both example apps of docs/boards.md: the app's own loop calling agent.poll(), and the
    app's asyncio loop with the agent as a task. The app runs during the download, the Reboot
    leaves the app's loop for machine.reset(), and the new version confirms."""
    def files(version):
        f = example_app_files(style, version)
        f["app.py"] = f["app.py"].replace(b"REPORT_MS = 2000", b"REPORT_MS = 100")
        f["blob.bin"] = os.urandom(60000)  # a download of some length
        return f

    device = "brd-" + style.replace("_", "-")
    proc = _board(fleet, device, app_files=files("1.0.0"), trial_wdt_ms=3000, trial_settle_ms=300)
    fleet.wait_online(device)
    job = _update(fleet, device, files("1.1.0"), "1.1.0")
    assert (job.state, job.code) == ("confirmed", None), (job.reason, proc.log_text())
    fleet.wait_online(device, version="1.1.0")
    log = proc.log_text()
    assert f"{style} 1.0.0 started" in log and f"{style} 1.1.0 started" in log
    wait_until(lambda: f"{style} 1.1.0: " in proc.log_text(), timeout=10, what="the new app's report")
    reports = [line for line in proc.log_text().splitlines() if line.startswith(f"{style} 1.0.0: ")]
    counts = [int(line.split(": ")[1].split()[0]) for line in reports]
    assert len(counts) >= 2 and counts == sorted(counts) and counts[-1] > counts[0], reports
    assert proc.exits == [RESET_EXIT], proc.exits


# ---------------------------------------------------------------------------------- Wi-Fi

def _write_ap(path: Path, **ap) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(ap))
    tmp.replace(path)


def _joins(path: Path) -> list[int]:
    log = Path(str(path) + ".log")
    return [int(line.split()[0]) for line in log.read_text().splitlines()] if log.exists() else []


def test_wifi_back_off_then_join_then_rejoin_after_link_loss(fleet, tmp_path):
    wlan = tmp_path / "wifi.json"
    _write_ap(wlan, up=False)
    proc = _board(fleet, "brd-wifi", wlan=wlan, wifi={"ssid": "lab", "password": "pw", "backoff_ms": 200})
    time.sleep(4.5)
    joins = _joins(wlan)
    # Back-off, no busy loop: the n-th wait is in [d/2, d] with d = 200 ms * 2**(n-1), so in
    # 4.5 s there are a handful of attempts, each wait at least as long as the one before.
    assert 3 <= len(joins) <= 8, joins
    gaps = [b - a for a, b in zip(joins, joins[1:])]
    assert all(later >= earlier - 60 for earlier, later in zip(gaps, gaps[1:])), gaps
    assert proc.watchdog_resets == 0 and not proc.exits
    _write_ap(wlan, up=True, ssid="lab", password="pw")
    fleet.wait_online("brd-wifi", timeout=60)
    assert "Wi-Fi up" in proc.log_text()
    before = len(_joins(wlan))
    _write_ap(wlan, up=False)
    wait_until(lambda: "Wi-Fi lost" in proc.log_text(), timeout=10, what="the link loss noticed")
    _write_ap(wlan, up=True, ssid="lab", password="pw")
    wait_until(lambda: proc.log_text().count("connected as brd-wifi") >= 2, timeout=60,
               what="the broker reached again over the new link")
    assert len(_joins(wlan)) > before
    assert not proc.exits


def test_wrong_wifi_password_is_retried_with_back_off(fleet, tmp_path):
    wlan = tmp_path / "wifi.json"
    _write_ap(wlan, up=True, ssid="lab", password="right")
    proc = _board(fleet, "brd-wpw", wlan=wlan, wifi={"ssid": "lab", "password": "wrong", "backoff_ms": 300})
    time.sleep(3)
    joins = _joins(wlan)
    assert 2 <= len(joins) <= 6, joins
    assert "Wi-Fi join failed" in proc.log_text()
    assert "connected as" not in proc.log_text()


# ------------------------------------------------------------------------------ poll() steps

POLL_BOUND = r"""
import json, time
from fota.device.board import BoardDevice
dev = BoardDevice(ROOT, app_loader=lambda d: None)
dev.boot()
steps = []
t_end = time.ticks_add(time.ticks_ms(), 3000)
while time.ticks_diff(t_end, time.ticks_ms()) > 0:
    t = time.ticks_ms()
    dev.poll(50)
    steps.append(time.ticks_diff(time.ticks_ms(), t))
print(json.dumps({"steps": len(steps), "longest": max(steps), "failures": dev._failures}))
"""


def test_poll_steps_stay_bounded_while_the_broker_is_unreachable(tmp_path):
    """Offline, a step makes at most one connection attempt and never sleeps through the
    back-off: with a back-off of seconds, every step still returns within its own timeout
    (plus a refused connect), and the agent keeps stepping (the app keeps ticking)."""
    from fota.tools.devicedir import create_device_dir
    from fota.tools.signing import public_key_bytes
    from test_core import ROOT_KEY, TRUST
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens: every attempt is refused at once
    root = create_device_dir(tmp_path / "dev", device_id="off-1", hardware="unix",
                             root_key=public_key_bytes(ROOT_KEY), trust=TRUST,
                             host="127.0.0.1", port=port, password="pw",
                             app_files={"app.py": b"VERSION = '1.0.0'\n"}, version="1.0.0")
    config = json.loads((root / "config.json").read_text())
    config["broker"]["backoff_ms"] = 4000
    (root / "config.json").write_text(json.dumps(config))
    p = run_micropython(POLL_BOUND.replace("ROOT", repr(str(root))),
                        env={"MICROPYPATH": f"{BOARDS}:{ROOT / 'src'}"})
    assert p.returncode == 0, p.stdout + p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    # One attempt at once, the second one due after 2..4 s of back-off: at most 2 in 3 s.
    assert 1 <= out["failures"] <= 2, out
    assert out["steps"] >= 20, out          # stepping on, not sleeping the back-off away
    assert out["longest"] < 1000, out       # no step waits out the back-off
