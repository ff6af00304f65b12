"""End to end on emulated boards: the real board runner under the real `micropython`, with the
emulated esp32/machine/network modules (fota.testkit.boards), against a real Mosquitto and the
real control center. Every reset is a new process that runs the emulated bootloader first
(fota.testkit.boards.harness, poweron.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from fota.device import protocol as P
from fota.examples import hello_files
from fota.server.deployments import create_deployment
from fota.server.fleet import provision_device
from fota.server.releases import create_release
from fota.testkit.boards.firmware import CRASHES, HANGS, HEALTHY, RAISES, firmware_image
from fota.testkit.boards.harness import EmulatedBoard, provision
from fota.testkit.faultproxy import FaultProxy
from fota.testkit.fleet import TEST_DEVICE_SETTINGS, Fleet
from fota.tools.bundle import pack_files as bundle
from fota.tools.waiting import wait_until

HW = "esp32-devkit"
PICO_HW = "rp2-pico-w"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, broker):
    """One control center (and its SQLite) for the module's boards."""
    tmp = tmp_path_factory.mktemp("boards")
    f = Fleet(tmp, broker, f"sqlite:///{tmp / 'fota.db'}")
    boards: list[EmulatedBoard] = []
    f.boards = boards
    yield f
    for b in boards:
        b.stop()
    f.close()


def add_board(fleet, device_id, *, chip="esp32", version="1.0.0", link=None, board_settings=None,
              **settings) -> EmulatedBoard:
    """Provision a device and power on its emulated board: an ESP32 flashed with a healthy
    factory firmware `version`, or (chip=None) a Pico W with the hello app in slot a."""
    hardware = HW if chip else PICO_HW
    _, password = provision_device(fleet.store, device_id, hardware)
    fleet.broker.add_user(device_id, password)
    board = EmulatedBoard(fleet.tmp / "boards" / device_id, chip=chip, link=link, settings=board_settings)
    provision(board, device_id=device_id, hardware=hardware, password=password, host=fleet.broker.host,
              port=link.port if link else fleet.broker.port, root_key=fleet.keyring.root_public(),
              trust=fleet.keyring.trust(), version=version, app_files=None if chip else hello_files(version),
              **{**TEST_DEVICE_SETTINGS, **settings})
    if chip:
        board.flash_factory_image(firmware_image(version))
    fleet.boards.append(board)
    return board.start()


def deploy(fleet, release, device_id, timeout=60):
    dep = create_deployment(fleet.store, release, device_ids=[device_id])
    return fleet.wait_job(dep.jobs[0].id, timeout=timeout)


def image_release(fleet, version, behaviour=HEALTHY, **kw):
    """A release of a firmware image, from a file named as MicroPython names an OTA build's app
    image (the kind follows from the .app-bin suffix)."""
    path = fleet.tmp / f"ESP32_GENERIC-OTA-v{version}.app-bin"
    path.write_bytes(firmware_image(version, behaviour, **kw))
    return create_release(fleet.store, fleet.blobs, fleet.key, path, version, [HW])


def test_full_firmware_update_confirms_in_the_new_partition(fleet):
    dev = "esp-full"
    board = add_board(fleet, dev)
    fleet.wait_online(dev)
    rel = image_release(fleet, "1.1.0")
    job = deploy(fleet, rel, dev)
    assert job.state == P.CONFIRMED, (job.state, job.code, job.reason, board.log_text()[-3000:])
    fleet.wait_online(dev, version="1.1.0")
    ota = board.ota_data()
    assert ota["running"] == ota["boot"] == "ota_1"
    assert ota["states"]["ota_1"] == "VALID"
    assert board.running_firmware()["version"] == "1.1.0"
    assert board.boots[-1]["label"] == "ota_1"
    assert board.resets == 1 and board.wdt_resets == 0 and board.halted == []


def test_delta_update_patches_from_the_running_partition(fleet):
    dev = "esp-delta"
    board = add_board(fleet, dev)
    fleet.wait_online(dev)
    base = image_release(fleet, "2.0.0")
    job = deploy(fleet, base, dev)   # the factory image is no release: the first update is whole
    assert (job.state, job.delta_id) == (P.CONFIRMED, None), (job.state, job.code, job.reason)
    wait_until(lambda: fleet.device_row(dev).inventory.get("image") == base.sha256, what="inventory image")

    new_image = firmware_image("2.1.0")
    rel = create_release(fleet.store, fleet.blobs, fleet.key, new_image, "2.1.0", [HW], kind="image")
    job = deploy(fleet, rel, dev)
    assert job.state == P.CONFIRMED, (job.state, job.code, job.reason, board.log_text()[-3000:])
    # Patched against 2.0.0 read from ota_1 (running), written into ota_0: a fraction on the wire.
    assert job.delta_id is not None and job.bytes_served < len(new_image) // 4, job.bytes_served
    fleet.wait_online(dev, version="2.1.0")
    ota = board.ota_data()
    assert ota["running"] == "ota_0" and ota["states"]["ota_0"] == "VALID"
    assert board.partition_image("ota_0", len(new_image)) == new_image
    assert board.partition_image("ota_1", base.size) == firmware_image("2.0.0")  # the fallback, kept
    assert board.boot_record()["images"]["a"] == {"sha256": rel.sha256, "size": len(new_image)}
    assert board.resets == 2 and board.halted == []


def test_files_backend_on_a_pico_w_board(fleet):
    dev = "pico-files"
    # An RP2040's watchdog takes at most 8388 ms (machine.py refuses more, as the rp2 port does);
    # on a Pico W the runner clamps its trial watchdog by sys.platform, which is "linux" here.
    board = add_board(fleet, dev, chip=None, board_settings={"wdt_max_ms": 8388}, trial_wdt_ms=8000)
    fleet.wait_online(dev)
    rel = create_release(fleet.store, fleet.blobs, fleet.key, bundle(hello_files("1.4.0")), "1.4.0", [PICO_HW])
    job = deploy(fleet, rel, dev)
    assert job.state == P.CONFIRMED, (job.state, job.code, job.reason, board.log_text()[-3000:])
    fleet.wait_online(dev, version="1.4.0")
    assert "hello app 1.4.0 started" in board.log_text()
    assert (board.device_dir / "slots" / "b" / "app" / "app.py").read_bytes() == hello_files("1.4.0")["app.py"]
    assert board.boot_record()["active"] == "b"
    assert board.resets == 1 and board.halted == [] and [set(b) for b in board.boots] == [{"at"}, {"at"}]


def assert_rolled_back(fleet, board, dev, job, *, factory="1.0.0"):
    """The trial image was abandoned by the bootloader and the boot record agrees."""
    assert job.state == P.REVERTED, (job.state, job.code, job.reason, board.log_text()[-3000:])
    assert "the bootloader rolled back" in job.reason, job.reason  # one trial boot, not three
    ota = board.ota_data()
    assert ota["running"] == ota["boot"] == "ota_0", ota
    assert ota["states"]["ota_1"] == "ABORTED", ota
    assert [b["label"] for b in board.boots][-3:] == ["ota_0", "ota_1", "ota_0"]
    assert board.running_firmware()["version"] == factory
    record = board.boot_record()
    assert record["active"] == "a" and record["trial"] is None, record
    assert record["versions"]["b"] is None   # nothing may boot, report or patch from the abandoned image
    fleet.wait_online(dev, version=factory)
    assert board.halted == []


@pytest.mark.parametrize("behaviour", [RAISES, CRASHES])
def test_failed_trial_is_rolled_back_by_the_bootloader(fleet, behaviour):
    dev = f"esp-{behaviour}"
    board = add_board(fleet, dev)
    fleet.wait_online(dev)
    rel = image_release(fleet, f"3.0.0-{behaviour}", behaviour)
    job = deploy(fleet, rel, dev)
    assert_rolled_back(fleet, board, dev, job)
    assert job.code == P.E_HEALTH
    assert board.wdt_resets == 0


def test_hang_in_trial_is_caught_by_the_watchdog_and_rolled_back(fleet):
    dev = "esp-hang"
    board = add_board(fleet, dev, trial_wdt_ms=1500)
    fleet.wait_online(dev)
    rel = image_release(fleet, "4.0.0", HANGS)
    job = deploy(fleet, rel, dev, timeout=90)
    assert_rolled_back(fleet, board, dev, job)
    assert board.wdt_resets == 1
    assert "hangs in tick()" in board.log_text()
    # The abandoned partition takes the next update, and the board runs it.
    job = deploy(fleet, image_release(fleet, "4.0.1"), dev)
    assert job.state == P.CONFIRMED, (job.state, job.code, job.reason)
    assert board.ota_data()["running"] == "ota_1" and board.ota_data()["states"]["ota_1"] == "VALID"
    fleet.wait_online(dev, version="4.0.1")
    assert board.wdt_resets == 1 and board.halted == []


def test_wifi_loss_mid_download_resumes_and_confirms(fleet):
    dev = "esp-wifi"
    image = firmware_image("5.0.0", code_size=320 * 1024)
    # The board's radio link: slow enough (64 KB/s) that the download takes seconds.
    with FaultProxy(fleet.broker.port, throttle_down=64 * 1024) as link:
        board = add_board(fleet, dev, link=link)
        fleet.wait_online(dev)
        rel = create_release(fleet.store, fleet.blobs, fleet.key, image, "5.0.0", [HW], kind="image")
        dep = create_deployment(fleet.store, rel, device_ids=[dev])
        job = dep.jobs[0].id

        def progressed():
            ds = [s for s in fleet.spy.of(dev, job) if s["state"] == "downloading"]
            return ds and ds[-1]["bytes"] >= rel.size * 0.3 and ds[-1]
        at_loss = wait_until(progressed, timeout=60, interval=0.02, what="30% downloaded")
        connections = link.connections
        board.set_wifi(False)
        lost_at, lost_wall = time.monotonic(), time.time()
        time.sleep(2.0)
        assert link.connections == connections  # no broker connection while the access point is gone
        board.set_wifi(True)
        back_wall = time.time()
        j = fleet.wait_job(job, timeout=90)
    assert j.state == P.CONFIRMED, (j.state, j.code, j.reason, board.log_text()[-3000:])
    # Resumed where it was, not from the start: what was asked for after the loss is at most the
    # rest of the image (and the chunk window in flight when the link went).
    after = [r for t, d, r in fleet.spy.requests if d == dev and t > lost_at and r["job"] == job]
    asked = sum(min(r["count"] * r["chunk"], rel.size - r["first"] * r["chunk"]) for r in after)
    assert after and min(r["first"] * r["chunk"] for r in after) >= at_loss["bytes"] - 8 * after[0]["chunk"]
    assert asked < rel.size - at_loss["bytes"] + 8 * after[0]["chunk"], (asked, at_loss["bytes"])
    assert board.partition_image("ota_1", len(image)) == image
    assert board.resets == 1 and board.wdt_resets == 0 and board.halted == []
    # The board joined the access point again, in the same boot, once it was back.
    joins = [int(line.split()[0]) / 1000 for line in
             (board.wifi_path.parent / (board.wifi_path.name + ".log")).read_text().splitlines()]
    trial_boot = board.boots[1]["at"] / 1000
    assert [t for t in joins if back_wall - 0.1 <= t < trial_boot], (joins, lost_wall, back_wall, trial_boot)


BOARD_SCRIPT = """
import json, time, machine
try:
    with open("runs.json") as f:
        runs = json.load(f)
except OSError:
    runs = []
runs.append(machine.reset_cause())
with open("runs.json", "w") as f:
    json.dump(runs, f)
if len(runs) == 1:
    machine.reset()
elif len(runs) == 2:
    machine.WDT(timeout=300)
    while True:
        time.sleep_ms(10)
"""


def test_harness_plays_resets_watchdog_and_the_bootloader(tmp_path):
    """The harness itself: machine.reset() and a starving watchdog start the board again through
    the bootloader; main.py returning halts it (the REPL)."""
    from fota.testkit.boards import machine as emulated_machine  # the reset-cause values
    board = EmulatedBoard(tmp_path / "b", main_py=BOARD_SCRIPT)
    board.flash_factory_image(firmware_image("9.0.0"))
    board.start()
    wait_until(lambda: not board.running, timeout=30, what="the board to halt")
    assert board.exits == [4, 5, 0]
    assert (board.resets, board.wdt_resets) == (1, 1)
    assert [(b["label"], b["version"]) for b in board.boots] == [("ota_0", "9.0.0")] * 3
    runs = json.loads((board.fs / "runs.json").read_text())
    assert runs == [emulated_machine.PWRON_RESET, emulated_machine.HARD_RESET, emulated_machine.WDT_RESET]
    assert (board.rom / "app.py").read_text().count('VERSION = "9.0.0"') == 1  # the frozen app of the image


def test_demo_on_emulated_esp32s_rolls_out_firmware_and_shows_a_rollback():
    r = subprocess.run([sys.executable, "-m", "fota.cli", "demo", "--board", "esp32", "--devices", "2",
                        "--timeout", "60"], capture_output=True, text=True, timeout=150,
                       env=dict(os.environ, COLUMNS="120"))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "demo passed: 2 emulated ESP32 board(s) confirmed firmware 1.1.0" in r.stdout
    assert "dev-01: the bootloader marked ota_0 ABORTED and booted ota_1 (firmware 1.1.0) again" in r.stdout
    assert "Traceback" not in out


def test_demo_refuses_a_board_it_cannot_emulate():
    r = subprocess.run([sys.executable, "-m", "fota.cli", "demo", "--board", "rp2"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0
    assert "--board must be unix or esp32, not 'rp2'" in r.stdout + r.stderr


def test_power_cut_mid_download_resumes_from_the_flash(fleet):
    dev = "esp-cut"
    image = firmware_image("6.0.0", code_size=192 * 1024)
    with FaultProxy(fleet.broker.port, throttle_down=96 * 1024) as link:
        board = add_board(fleet, dev, link=link)
        fleet.wait_online(dev)
        rel = create_release(fleet.store, fleet.blobs, fleet.key, image, "6.0.0", [HW], kind="image")
        job = create_deployment(fleet.store, rel, device_ids=[dev]).jobs[0].id

        def progressed():
            ds = [s for s in fleet.spy.of(dev, job) if s["state"] == "downloading"]
            return ds and ds[-1]["bytes"] >= rel.size * 0.4 and ds[-1]
        at_cut = wait_until(progressed, timeout=60, interval=0.02, what="40% downloaded")
        assert board.power_cut()
        cut_at = time.monotonic()
        j = fleet.wait_job(job, timeout=90)
    assert j.state == P.CONFIRMED, (j.state, j.code, j.reason, board.log_text()[-3000:])
    after = [r for t, d, r in fleet.spy.requests if d == dev and t > cut_at and r["job"] == job]
    # Whole blocks written before the cut are kept: the download goes on from the block that
    # holds the journal's position (written every window of chunks), not from the start.
    window = after[0]["count"] * after[0]["chunk"]
    resumed_at = min(r["first"] * r["chunk"] for r in after)
    assert resumed_at > 0 and resumed_at >= at_cut["bytes"] - window - 4096, (resumed_at, at_cut["bytes"], window)
    assert "resuming job" in board.log_text()
    assert board.partition_image("ota_1", len(image)) == image
    assert board.exits.count(-9) == 1 and board.resets == 1 and board.halted == []
    assert [b["label"] for b in board.boots] == ["ota_0", "ota_0", "ota_1"]
