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
from test_cli import assert_clean_error, fota


def _provision(tmp_path: Path, board: str, *args: str):
    home = tmp_path / "home"
    assert fota(home, "keys", "init").returncode == 0
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
    assert fota(home, "keys", "init").returncode == 0
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


def test_device_from_an_image_completes_an_update(fleet, tmp_path):
    """A board's image of a fleet device (its directory, the rp2 agent's .mpy), extracted and
    run by the real micropython against the fleet's broker and control center: it comes online
    and installs a release."""
    from fota.device import protocol as P
    from fota.server.deployments import create_deployment
    from fota.testkit.fleet import bundle_of_size
    from fota.tools.lfsimage import image_tree
    from fota.tools.mpy import build_board_agent
    from fota.tools.supervisor import DeviceProcess
    dev = "from-image"
    fleet.add_device(dev, start=False)
    build_board_agent("rp2", tmp_path / "agent")
    data = build_image(image_tree("rp2", fleet.root(dev), tmp_path / "agent"), layout("rp2")["size"])
    board = _extract(data, tmp_path / "board")
    fleet.devices[dev] = proc = DeviceProcess(board / "device", code_path=board / "lib").start()
    fleet.wait_online(dev)
    rel = fleet.release(bundle_of_size("2.0.0", 8_000), "2.0.0")
    job = create_deployment(fleet.store, rel, device_ids=[dev]).jobs[0].id
    assert fleet.wait_job(job, timeout=60).state == P.CONFIRMED, proc.log_path.read_text()
    boot = json.loads((board / "device" / "boot.json").read_text())
    assert boot["versions"][boot["active"]] == "2.0.0"


def test_a_filesystem_too_small_for_the_tree_registers_nothing(tmp_path):
    home = tmp_path / "home"
    assert fota(home, "keys", "init").returncode == 0
    r = fota(home, "device", "provision", "d2", "--hardware", "x", "--board", "esp32", "--fs-size", str(8 * 4096),
             "--image", str(tmp_path / "x.img"))
    assert_clean_error(r, "does not fit", "--fs-size")
    assert not (tmp_path / "x.img").exists()
    assert "d2" not in fota(home, "devices").stdout
