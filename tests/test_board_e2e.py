"""End to end on emulated boards: the real board runner under the real `micropython`, with the
emulated esp32/machine/network modules (fota.testkit.boards), against a real Mosquitto and the
real control center. Every reset is a new process that runs the emulated bootloader first
(fota.testkit.boards.harness, poweron.py)."""
from __future__ import annotations

import pytest

from fota.device import protocol as P
from fota.examples import hello_files
from fota.server.deployments import create_deployment
from fota.server.fleet import provision_device
from fota.server.releases import create_release
from fota.testkit.boards.firmware import HANGS, HEALTHY, RAISES, firmware_image
from fota.testkit.boards.harness import EmulatedBoard, provision
from fota.testkit.fleet import TEST_DEVICE_SETTINGS, Fleet
from fota.tools.bundle import pack_files as bundle
from fota.tools.waiting import wait_until

HW = "esp32-devkit"
PICO_HW = "rp2-pico-w"
# TEMPORARY until fota.device.board lands: the unix runner
MAIN_PY = "from fota.device.main import main\nmain(\"device\")\n"


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


def add_board(fleet, device_id, *, chip="esp32", version="1.0.0", **settings) -> EmulatedBoard:
    """Provision a device and power on its emulated board: an ESP32 flashed with a healthy
    factory firmware `version`, or (chip=None) a Pico W with the hello app in slot a."""
    hardware = HW if chip else PICO_HW
    _, password = provision_device(fleet.store, device_id, hardware)
    fleet.broker.add_user(device_id, password)
    board = EmulatedBoard(fleet.tmp / "boards" / device_id, chip=chip, main_py=MAIN_PY)
    provision(board, device_id=device_id, hardware=hardware, password=password, host=fleet.broker.host,
              port=fleet.broker.port, root_key=fleet.keyring.root_public(), trust=fleet.keyring.trust(),
              version=version, app_files=None if chip else hello_files(version),
              **{**TEST_DEVICE_SETTINGS, **settings})
    if chip:
        board.flash_factory_image(firmware_image(version))
    fleet.boards.append(board)
    return board.start()


def deploy(fleet, release, device_id, timeout=60):
    dep = create_deployment(fleet.store, release, device_ids=[device_id])
    return fleet.wait_job(dep.jobs[0].id, timeout=timeout)


def image_release(fleet, version, behaviour=HEALTHY, **kw):
    return create_release(fleet.store, fleet.blobs, fleet.key, firmware_image(version, behaviour, **kw), version,
                          [HW], kind="image")


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
    board = add_board(fleet, dev, chip=None)
    fleet.wait_online(dev)
    rel = create_release(fleet.store, fleet.blobs, fleet.key, bundle(hello_files("1.4.0")), "1.4.0", [PICO_HW])
    job = deploy(fleet, rel, dev)
    assert job.state == P.CONFIRMED, (job.state, job.code, job.reason, board.log_text()[-3000:])
    fleet.wait_online(dev, version="1.4.0")
    assert "hello app 1.4.0 started" in board.log_text()
    assert (board.device_dir / "slots" / "b" / "app" / "app.py").read_bytes() == hello_files("1.4.0")["app.py"]
    assert board.boot_record()["active"] == "b"
    assert board.resets == 1 and board.halted == [] and board.boots == [{}, {}]
