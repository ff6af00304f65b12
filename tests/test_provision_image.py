"""fota device provision --image: the LittleFS image of a board's filesystem opens with
littlefs-python and holds a tree that the real MicroPython unix port boots as a device."""
from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import pytest
from littlefs import LittleFS

from fota.server.credentials import mosquitto_hash
from fota.tools.boardfs import BOOT_PY
from fota.tools.lfsimage import MAIN_PY, ImageError, build_image, layout, read_image, write_command
from fota.tools.supervisor import find_micropython
from test_cli import assert_clean_error, fota, fota_in_process


def _provision(tmp_path: Path, board: str, *args: str):
    home = tmp_path / "home"
    assert fota_in_process(home, "keys", "init").returncode == 0  # setup: in the test's process
    image = tmp_path / f"{board}.img"
    r = fota(home, "device", "provision", "board-1", "--hardware", "picow", "--board", board,
             "--image", str(image), *args)
    assert r.returncode == 0, r.stdout + r.stderr
    return home, image, r.stdout.replace("\n", " ")


def _open(image: Path, block_size: int = 4096) -> LittleFS:
    data = image.read_bytes()
    fs = LittleFS(block_size=block_size, block_count=len(data) // block_size, mount=False)
    fs.context.buffer = bytearray(data)
    fs.mount()
    return fs


def test_rp2_image_holds_the_device_the_agent_and_main_py(tmp_path):
    home, image, out = _provision(tmp_path, "rp2")
    assert image.stat().st_size == 848 * 1024  # RPI_PICO_W's filesystem
    assert image.stat().st_mode & 0o077 == 0  # it holds the broker password
    # At the end of the 2 MiB flash, through the XIP base.
    assert "picotool load -v -t bin -o 0x1012c000" in out and str(image) in out
    fs = _open(image)
    assert sorted(fs.listdir("/")) == ["boot.py", "device", "lib", "main.py"]
    with fs.open("device/config.json", "r") as f:
        config = json.load(f)
    assert config["id"] == "board-1" and config["hardware"] == "picow"
    assert config["broker"]["user"] == "board-1" and len(config["broker"]["password"]) >= 16
    assert config["trust"] and len(bytes.fromhex(config["root"])) == 65
    assert config["enc_key"]  # the payload key, unwrapped for the device
    assert "a" in fs.listdir("device/slots") and "b" in fs.listdir("device/slots")
    agent = fs.listdir("lib/fota/device")
    assert "runner.mpy" in agent and "executor.mpy" in agent and not [n for n in agent if n.endswith(".py")]
    assert "sim.mpy" not in fs.listdir("lib/fota/device/slots")  # unix-only backend left out
    with fs.open("main.py", "r") as f:
        assert f.read() == MAIN_PY
    with fs.open("boot.py", "r") as f:  # a previous owner's boot.py would run before the agent
        assert f.read() == BOOT_PY
    assert config["backend"] == "files" and "wifi" not in config
    # The device is registered with the password the image holds.
    listing = fota(home, "devices").stdout
    assert "board-1" in listing
    from fota.server.home import Home
    from fota.server.store.models import Device
    with Home.locate(home).store().session() as s:
        stored = s.get(Device, "board-1").password_hash
    _, _, iterations, salt, _ = stored.split("$")
    assert mosquitto_hash(config["broker"]["password"], base64.b64decode(salt), int(iterations)) == stored


def test_esp32_image_size_and_esptool_command(tmp_path):
    _, image, out = _provision(tmp_path, "esp32", "--fs-size", str(1 << 20), "--block-size", "4096")
    assert image.stat().st_size == 1 << 20
    assert "esptool.py --chip esp32 --port PORT write_flash 0x200000" in out
    assert "config.json" in _open(image).listdir("device")


def test_unknown_board_is_refused_and_registers_nothing(tmp_path):
    home = tmp_path / "home"
    assert fota_in_process(home, "keys", "init").returncode == 0  # setup: in the test's process
    r = fota(home, "device", "provision", "d1", "--hardware", "x", "--board", "esp8266",
             "--image", str(tmp_path / "x.img"))
    assert_clean_error(r, "esp8266", "esp32, esp32s3, rp2")
    assert not (tmp_path / "x.img").exists()
    assert "d1" not in fota(home, "devices").stdout


def test_layouts_and_a_tree_that_does_not_fit():
    assert layout("esp32") == {"offset": 0x200000, "size": 0x200000, "chip": "esp32"}
    assert layout("rp2", 1408 * 1024)["offset"] == 0x200000 - 1408 * 1024  # RPI_PICO
    assert write_command("rp2", Path("f.img"), 1408 * 1024) == "picotool load -v -t bin -o 0x100a0000 f.img"
    with pytest.raises(ImageError, match="esp8266"):
        layout("esp8266")
    with pytest.raises(ImageError, match="fs-size"):
        build_image({"big.bin": bytes(64 * 1024)}, 8 * 4096)
    with pytest.raises(ImageError, match="multiple"):
        build_image({}, 4096 * 8 + 1)
    assert read_image(build_image({"d/e/": b"", "x/y.txt": b"hi"}, 16 * 4096)) == {"x/y.txt": b"hi"}


def test_extracted_tree_boots_under_the_unix_port(tmp_path):
    """The image's files, copied out, are a device the real micropython loads: the agent from
    the board's .mpy (no sources), the config through fsutil, the files backend's slots."""
    _, image, _ = _provision(tmp_path, "rp2")
    board = _extract(image.read_bytes(), tmp_path / "board")
    script = (
        "import sys\n"
        "from fota.device import fsutil, runner\n"
        "assert runner.__file__.endswith('.mpy'), runner.__file__\n"
        "root = sys.argv[1]\n"
        "cfg = fsutil.read_json(root + '/config.json')\n"
        "dev = runner.Device(root)\n"
        "print(cfg['id'], cfg['broker']['user'], dev.backend.__class__.__name__)\n"
    )
    r = subprocess.run([find_micropython(), "-c", script, str(board / "device")], capture_output=True,
                       text=True, timeout=60, env={"MICROPYPATH": f"{board / 'lib'}:.frozen"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.split() == ["board-1", "board-1", "FilesBackend"]


def _extract(data: bytes, into: Path) -> Path:
    for name, content in read_image(data).items():
        (into / name).parent.mkdir(parents=True, exist_ok=True)
        (into / name).write_bytes(content)
    (into / "device" / "slots" / "b").mkdir(parents=True, exist_ok=True)  # empty directories are not files
    return into


# The two kinds of board an image is made for: a Pico W (files backend: app bundles) and an
# ESP32 provisioned with --backend esp32 (whole firmware images in the OTA partitions).
IMAGE_BOARDS = {"rp2": {"hardware": "picow", "chip": None, "settings": {"trial_wdt_ms": 8000},
                        "board": {"wdt_max_ms": 8388}},   # an RP2040's watchdog takes at most 8388 ms
                "esp32": {"hardware": "esp32-devkit", "chip": "esp32",
                          "settings": {"backend": "esp32", "chip": "esp32"}, "board": {}}}


@pytest.mark.parametrize("kind", sorted(IMAGE_BOARDS))
def test_device_from_an_image_boots_its_own_main_py_and_completes_an_update(fleet, tmp_path, kind):
    """A board's LittleFS image of a fleet device, opened with littlefs-python and extracted onto
    an emulated board (fota.testkit.boards: every power-on a real micropython process with the
    emulated machine, network and, on an ESP32, esp32 modules): the image's own main.py starts
    the board runner from the image's /lib .mpy on the image's device directory; it joins the
    Wi-Fi, comes online and completes an update of its kind (a bundle on the Pico W, a firmware
    image on the ESP32), through machine.reset() and the trial boot."""
    from fota.device import protocol as P
    from fota.server.deployments import create_deployment
    from fota.server.releases import create_release
    from fota.testkit.boards.firmware import firmware_image
    from fota.testkit.boards.harness import EmulatedBoard
    from fota.testkit.fleet import bundle_of_size
    from fota.tools.lfsimage import image_tree
    from fota.tools.mpy import build_board_agent
    spec = IMAGE_BOARDS[kind]
    dev = f"from-image-{kind}"
    board = EmulatedBoard(tmp_path / "board", chip=spec["chip"], code_path=tmp_path / "board" / "fs" / "lib",
                          settings=spec["board"])
    fleet.add_device(dev, hardware=spec["hardware"], start=False,
                     wifi={"ssid": board.wifi[0], "password": board.wifi[1]}, **spec["settings"])
    build_board_agent(kind, tmp_path / "agent")
    data = build_image(image_tree(kind, fleet.root(dev), tmp_path / "agent"), layout(kind)["size"])
    _extract(data, board.fs)   # over the harness's main.py: the image's own runs
    assert (board.fs / "main.py").read_text() == MAIN_PY
    assert not list((board.fs / "lib").rglob("*.py"))   # the agent only as the image's .mpy
    if spec["chip"]:
        board.flash_factory_image(firmware_image("1.0.0"))   # esptool's job at the factory
    try:
        board.start()
        fleet.wait_online(dev)
        if spec["chip"]:
            rel = create_release(fleet.store, fleet.blobs, fleet.key, firmware_image("2.0.0"), "2.0.0",
                                 [spec["hardware"]], kind="image")
        else:
            rel = fleet.release(bundle_of_size("2.0.0", 8_000), "2.0.0", hardware=[spec["hardware"]])
        job = fleet.wait_job(create_deployment(fleet.store, rel, device_ids=[dev]).jobs[0].id, timeout=90)
        assert job.state == P.CONFIRMED, (job.state, job.code, job.reason, board.log_text()[-3000:])
        fleet.wait_online(dev, version="2.0.0")
    finally:
        board.stop()
    log = board.log_text()
    assert f"[fota] Wi-Fi: joining {board.wifi[0]}" in log and "Traceback" not in log, log[-3000:]
    assert board.resets == 1 and board.halted == [], board.exits   # machine.reset() into the trial boot
    boot = json.loads((board.fs / "device" / "boot.json").read_text())
    assert boot["versions"][boot["active"]] == "2.0.0" and boot["trial"] is None
    if spec["chip"]:
        ota = board.ota_data()
        assert ota["running"] == "ota_1" and ota["states"]["ota_1"] == "VALID"
        assert board.running_firmware()["version"] == "2.0.0"
    else:
        assert boot["active"] == "b" and (board.fs / "device" / "slots" / "b" / "app" / "app.py").exists()


def test_a_filesystem_too_small_for_the_tree_registers_nothing(tmp_path):
    home = tmp_path / "home"
    assert fota_in_process(home, "keys", "init").returncode == 0  # setup: in the test's process
    r = fota(home, "device", "provision", "d2", "--hardware", "x", "--board", "esp32", "--fs-size", str(8 * 4096),
             "--image", str(tmp_path / "x.img"))
    assert_clean_error(r, "does not fit", "--fs-size")
    assert not (tmp_path / "x.img").exists()
    assert "d2" not in fota(home, "devices").stdout
