"""The board runner (fota.device.board) under the real MicroPython, with the board modules it
uses emulated from their documentation (fota.testkit.boards: machine.py, network.py): Wi-Fi
bring-up and back-off, machine.reset() on a reboot, the trial watchdog, bounded poll() steps,
the three app styles next to a real update through the real broker, the free-space refusal."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from conftest import run_micropython
from fota.examples import example_app_files, hello_files
from fota.server.deployments import create_deployment
from fota.server.releases import create_release
from fota.tools.bundle import pack_files
from fota.tools.supervisor import DeviceProcess
from fota.tools.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
BOARDS = ROOT / "src" / "fota" / "testkit" / "boards"  # the emulations (tests/boards re-exports them)
RESET_EXIT = 4
# The board runner's heap in these tests: the unix runner's default plus what the emulated
# board modules cost here (compiled from source at every boot, where a board has them built in)
# and board.py itself (~12 KB more than the unix runner on this 64-bit port, about half on a board).
BOARD_HEAP = "224K"


class BoardProcess(DeviceProcess):
    """A device directory run by the board runner (main.py: fota.device.board.main), restarted
    after machine.reset() (exit 4) and after a watchdog reset (SIGKILL; reset cause "wdt"), as
    the board's hardware would boot it again."""

    def __init__(self, root: Path, *, wlan: Path | None = None, **kwargs):
        super().__init__(root, **kwargs)
        self.wlan = wlan
        self.cause_path = Path(root) / "reset_cause"
        self.script = f"from fota.device.board import main\nmain({str(self.root)!r})"

    def arguments(self) -> list[str]:
        return ["-c", self.script]

    def environment(self) -> dict[str, str]:
        env = super().environment()
        env["MICROPYPATH"] = f"{BOARDS}:{self.code_path}:.frozen"
        env["FOTA_EMU_RESET_CAUSE"] = str(self.cause_path)
        env.pop("FOTA_EMULATED_BOARD", None)
        if self.wlan is not None:
            env["FOTA_EMU_WLAN"] = str(self.wlan)
        else:
            env.pop("FOTA_EMU_WLAN", None)
        return env

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
    proc = BoardProcess(root, wlan=wlan, heap=BOARD_HEAP)
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


def _hanging_app(version, style):
    files = hello_files(version)
    if style == "tick":
        files["app.py"] += b"\ndef tick():\n    while True:\n        pass  # hangs: never returns\n"
    else:  # an asyncio task that never awaits: the agent's task never runs again
        files["app.py"] += (b"\nimport asyncio\nasync def spin():\n    while True:\n        pass\n"
                            b"async def main(agent):\n    await asyncio.sleep_ms(50)\n    await spin()\n")
    return files


@pytest.mark.parametrize("style", ["tick", "asyncio"])
def test_app_hanging_on_trial_is_reset_by_the_watchdog_and_reverted(fleet, style):
    device = "brd-hang-" + style
    proc = _board(fleet, device, trial_wdt_ms=800, trial_settle_ms=3000, max_trial_boots=2)
    fleet.wait_online(device)
    job = _update(fleet, device, _hanging_app("1.1.0", style), "1.1.0")
    assert (job.state, job.code) == ("reverted", "E_HEALTH"), (job.state, job.code, job.reason)
    fleet.wait_online(device, version="1.0.0")
    # Two trial boots, each ended by the watchdog (SIGKILL after "wdt" in the reset cause).
    assert proc.watchdog_resets == 2, proc.exits
    assert "WDT: not fed in time" in proc.log_text()
    assert fleet.running_version(device) == "1.0.0"


@pytest.mark.parametrize("style", ["poll_app", "asyncio_app"])
def test_example_app_keeps_running_next_to_a_real_update(fleet, style):
    """Both example apps of docs/boards.md: the app's own loop calling agent.poll(), and the
    app's asyncio loop with the agent as a task. The app runs during the download, the Reboot
    leaves the app's loop for machine.reset(), and the new version confirms."""
    def files(version):
        f = example_app_files(style, version)
        f["app.py"] = f["app.py"].replace(b"REPORT_MS = 2000", b"REPORT_MS = 50")
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


def _swallowing_app(version):
    files = hello_files(version)
    files["app.py"] += (b"\ndef main(agent):\n    while True:\n        try:\n            agent.poll(10)\n"
                        b"        except Exception as e:  # a careless app: swallows the agent's Reboot\n"
                        b"            print('app swallowed', type(e).__name__)\n")
    return files


def test_app_loop_that_swallows_the_reboot_still_reboots(fleet):
    proc = _board(fleet, "brd-swallow", app_files=_swallowing_app("1.0.0"), trial_settle_ms=200)
    fleet.wait_online("brd-swallow")
    job = _update(fleet, "brd-swallow", _swallowing_app("1.1.0"), "1.1.0")
    assert (job.state, job.code) == ("confirmed", None), (job.reason, proc.log_text())
    log = proc.log_text()
    assert "app swallowed Reboot" in log and "the app's loop swallowed the reboot" in log
    assert proc.exits == [RESET_EXIT]


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


# ------------------------------------------------------------- esp32: the bootloader decides

ESP32_RECONCILE = r"""
import json, os, hashlib
from binascii import hexlify
import esp32
from esp32 import Partition
from fota.device import fsutil, boot as bootrec
from fota.device.executor import Executor
from fota.device.slots import open_backend

esp32.setup("flash.bin", app_size=APP_SIZE, chip_id=0)
here = os.getcwd() + "/"

def load(name):
    with open(name, "rb") as f:
        return f.read()

def power_on():
    # The ROM bootloader's choice, then the agent's boot selection.
    label = esp32.reset()
    be = open_backend("esp32", here, {"chip_id": 0})
    ex = Executor(be, fsutil, here, lambda *a: None)
    on_trial = ex.select("1.0.0", 3)
    return label, be, ex, on_trial

factory = load("factory.bin")
Partition("ota_0").writeblocks(0, factory + b"\xff" * (-len(factory) % 4096))
label, be, ex, on_trial = power_on()
new = load("new.bin")
be.begin("b", len(new))
be.write("b", 0, new)
be.finalize("b", len(new), None, None, None, hexlify(hashlib.sha256(new).digest()).decode())
bootrec.set_trial(ex.record, 7, "1.1.0")
ex._save_record()
label, be, ex, on_trial = power_on()
out = {"trial_boot": [label, on_trial, ex.slot]}
if CASE == "marked_valid":
    be.confirm()  # mark_app_valid_cancel_rollback(), then a reset before the record is written
label, be, ex, on_trial = power_on()
rec = fsutil.read_json(here + "boot.json")
out["after"] = [label, on_trial, ex.slot, rec["active"], rec["trial"], rec["report"], rec["versions"]]
print(json.dumps(out))
"""


CRASH_IN_THE_CRASH = """
from fota.device import board

class Device:  # the agent fails with a full heap, and so does its clean disconnect after it
    client = object()
    def boot(self):
        raise MemoryError("memory allocation failed, allocating 2057 bytes")
    def go_offline(self):
        raise MemoryError("memory allocation failed, allocating 64 bytes")

board.BoardDevice = lambda root: Device()
board.main("device")
"""


def test_an_agent_crash_resets_the_board_even_when_the_goodbye_fails_too(tmp_path):
    """A MemoryError (the heap full) crashes the agent, and the clean disconnect in the crash
    handler fails the same way: the board still resets (exit 4), instead of halting at the REPL
    with the exception (seen on an emulated ESP32 with a heap too small for a chunk)."""
    p = run_micropython(CRASH_IN_THE_CRASH, heap="256K", cwd=str(tmp_path),
                        env={"MICROPYPATH": f"{BOARDS}:{ROOT / 'src'}", "FOTA_EMU_RESET_CAUSE": str(tmp_path / "rc")})
    assert p.returncode == RESET_EXIT, p.stdout + p.stderr
    assert "agent crashed: MemoryError" in p.stdout + p.stderr


@pytest.mark.parametrize("case", ["rolled_back", "marked_valid"])
def test_esp32_boot_record_follows_what_the_bootloader_did(tmp_path, case):
    """A reset during the trial before mark_app_valid: the bootloader rolls back, and the record
    says reverted (not a trial of a slot that no longer runs). A reset after mark_app_valid but
    before the record said confirmed: the bootloader boots the new image as valid, and the record
    says confirmed (not a trial whose tries run out into a revert while the new image runs)."""
    from test_esp32_backend import APP_SIZE, app_image
    (tmp_path / "factory.bin").write_bytes(app_image(30000, seed=1))
    (tmp_path / "new.bin").write_bytes(app_image(40000, seed=2))
    script = ESP32_RECONCILE.replace("APP_SIZE", str(APP_SIZE)).replace("CASE", repr(case))
    p = run_micropython(script, heap="2M", env={"MICROPYPATH": f"{BOARDS}:{ROOT / 'src'}"}, cwd=str(tmp_path))
    assert p.returncode == 0, p.stdout + p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["trial_boot"] == ["ota_1", True, "b"]
    label, on_trial, slot, active, trial, report, versions = out["after"]
    if case == "rolled_back":
        assert (label, on_trial, slot, active, trial) == ("ota_0", False, "a", "a", None)
        assert (report["state"], report["code"], report["job"]) == ("reverted", "E_HEALTH", 7)
        assert "bootloader rolled back" in report["reason"] and versions["b"] is None
    else:
        assert (label, on_trial, slot, active, trial) == ("ota_1", False, "b", "b", None)
        assert (report["state"], report["job"]) == ("confirmed", 7) and versions["b"] == "1.1.0"


# ------------------------------------------------------------------ LittleFS and free space

LFS_MAIN = r"""
# The board's flash: a LittleFS (the ESP32's and RP2040's filesystem) on a block device kept in a
# file across resets; the provisioned device directory copied onto it at the first power-on.
import os

class FileBlocks:
    def __init__(self, path, blocks, size=4096):
        self.size = size
        self.blocks = blocks
        try:
            self.f = open(path, "r+b")
        except OSError:
            self.f = open(path, "w+b")
            blank = b"\xff" * size
            for _ in range(blocks):
                self.f.write(blank)
            self.f.flush()
    def readblocks(self, n, buf, off=0):
        self.f.seek(n * self.size + off)
        self.f.readinto(buf)
    def writeblocks(self, n, buf, off=None):
        self.f.seek(n * self.size + (off or 0))
        self.f.write(buf)
        self.f.flush()
    def ioctl(self, op, arg):
        if op == 4:
            return self.blocks
        if op == 5:
            return self.size
        return 0

def copytree(src, dst):
    os.mkdir(dst)
    for name in os.listdir(src):
        if name in ("device.log", "reset_cause"):  # the harness's, not the board's
            continue
        s, d = src + "/" + name, dst + "/" + name
        if os.stat(s)[0] & 0x4000:
            copytree(s, d)
        else:
            with open(s, "rb") as fi, open(d, "wb") as fo:
                fo.write(fi.read())

bd = FileBlocks(IMAGE, BLOCKS)
try:
    os.mount(os.VfsLfs2(bd), "/flash")
except OSError:
    os.VfsLfs2.mkfs(bd)
    os.mount(os.VfsLfs2(bd), "/flash")
if "device" not in os.listdir("/flash"):
    copytree(PROVISIONED, "/flash/device")
print("[board] LittleFS free:", os.statvfs("/flash")[4] * 4096)
from fota.device.board import main
main("/flash/device")
"""


class LittleFsBoard(BoardProcess):
    """The board runner with its device directory on a LittleFS of `blocks` 4 KiB blocks."""

    def __init__(self, root: Path, blocks: int, **kwargs):
        super().__init__(root, **kwargs)
        self.script = (LFS_MAIN.replace("IMAGE", repr(str(Path(root).parent / (Path(root).name + ".lfs"))))
                       .replace("BLOCKS", str(blocks)).replace("PROVISIONED", repr(str(root))))


def test_on_littlefs_an_update_that_does_not_fit_is_refused_E_SPACE_and_one_that_fits_installs(fleet):
    """The device directory on a 256 KiB LittleFS: a bundle whose image and unpacked files need
    more than the free space fails with E_SPACE before a byte is written (the old app keeps
    running); a smaller one downloads, unpacks, renames and confirms on the same filesystem."""
    fleet.add_device("brd-lfs", start=False)
    root = fleet.root("brd-lfs")
    proc = LittleFsBoard(root, blocks=64, heap="256K")  # LittleFS's caches live in the heap too
    fleet.devices["brd-lfs"] = proc
    proc.start()
    fleet.wait_online("brd-lfs")
    big = hello_files("2.0.0")
    big["blob.bin"] = os.urandom(120_000)  # ~120 KB image + ~120 KB unpacked > ~240 KB free
    job = _update(fleet, "brd-lfs", big, "2.0.0")
    assert (job.state, job.code) == ("failed", "E_SPACE"), (job.state, job.code, job.reason)
    assert "needs" in job.reason and "free space" in job.reason
    small = hello_files("1.1.0")
    small["blob.bin"] = os.urandom(30_000)
    job = _update(fleet, "brd-lfs", small, "1.1.0")
    assert (job.state, job.code) == ("confirmed", None), (job.reason, proc.log_text())
    fleet.wait_online("brd-lfs", version="1.1.0")
    assert proc.exits == [RESET_EXIT]
    assert "LittleFS free:" in proc.log_text()


FS_SCRIPT = r"""
import os, json
from fota.device import fsutil

class RAM:
    def __init__(self, blocks, size=512):
        self.size, self.blocks = size, blocks
        self.data = bytearray(blocks * size)
    def readblocks(self, n, buf, off=0):
        a = n * self.size + off
        buf[:] = self.data[a:a + len(buf)]
    def writeblocks(self, n, buf, off=None):
        a = n * self.size + (off or 0)
        self.data[a:a + len(buf)] = buf
    def ioctl(self, op, arg):
        return {4: self.blocks, 5: self.size}.get(op, 0)

out = {}
for kind in ("fat", "lfs"):
    if kind == "fat":
        bd = RAM(256)
        os.VfsFat.mkfs(bd)
        fs = os.VfsFat(bd)
    else:
        bd = RAM(64, 4096)
        os.VfsLfs2.mkfs(bd)
        fs = os.VfsLfs2(bd)
    os.mount(fs, "/" + kind)
    d = "/" + kind + "/dev"
    os.mkdir(d)
    # Does this filesystem rename over an existing file?
    with open(d + "/x", "w") as f: f.write("1")
    with open(d + "/y", "w") as f: f.write("2")
    try:
        os.rename(d + "/y", d + "/x")
        native = "atomic"
    except OSError:
        native = "refused"
    fsutil.write_json(d + "/state.json", {"v": 1})
    fsutil.write_json(d + "/state.json", {"v": 2})   # a replacement
    replaced = fsutil.read_json(d + "/state.json")
    # A FAT replacement cut between its remove and its rename: only the complete .tmp is left.
    with open(d + "/cut.json.tmp", "w") as f: json.dump({"v": 3}, f)
    recovered = fsutil.read_json(d + "/cut.json")
    out[kind] = {"rename_over": native, "replaced": replaced, "recovered": recovered,
                 "tmp_left": fsutil.exists(d + "/cut.json.tmp"), "after": fsutil.read_json(d + "/cut.json"),
                 "free": fsutil.free_bytes(d), "blocks_free": os.statvfs(d)[4] * os.statvfs(d)[1]}
    os.chdir(d)
    out[kind]["abspath"] = fsutil.abspath("device")
    os.chdir("/")
print(json.dumps(out))
"""


def test_fsutil_replaces_atomically_on_littlefs_and_fat_and_reads_free_space():
    """The same write_json on the two filesystems boards have, mounted in the unix port from
    MicroPython's own drivers: LittleFS and VfsFat both replace the old file (FAT by removing it
    first, inside the driver or in fsutil.replace), and a cut between that remove and the rename
    is recovered from the complete temporary file. Free space comes from os.statvfs; paths are
    absolute whatever the working directory."""
    p = run_micropython(FS_SCRIPT, heap="512K", env={"MICROPYPATH": str(ROOT / "src")})
    assert p.returncode == 0, p.stdout + p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["lfs"]["rename_over"] == "atomic", out
    for kind in ("fat", "lfs"):
        r = out[kind]
        assert r["replaced"] == {"v": 2}, (kind, r)
        assert r["recovered"] == {"v": 3} and r["after"] == {"v": 3} and not r["tmp_left"], (kind, r)
        assert r["free"] == r["blocks_free"] and 0 < r["free"] < 256 * 1024, (kind, r)
        assert r["abspath"] == f"/{kind}/dev/device", (kind, r)
