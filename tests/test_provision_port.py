"""fota device provision --port: the real mpremote writes a device onto a board, here an emulated
one (tests/boards/rawrepl.py under the real micropython, behind a pty: the REPL's raw and
raw-paste modes, a directory as the board's filesystem); and the command lines it is given."""
from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fota.server.credentials import mosquitto_hash
from fota.tools import boardport
from fota.tools.boardfs import BOOT_PY, MAIN_PY, board_tree
from fota.tools.supervisor import find_micropython
from test_cli import assert_clean_error, fota, fota_in_process

sys.path.insert(0, str(Path(__file__).resolve().parent / "boards"))
from serial_board import EmulatedBoard  # noqa: E402

WIFI_PASSWORD = "correct-horse-battery"


@pytest.fixture
def home(tmp_path) -> Path:
    home = tmp_path / "home"
    assert fota_in_process(home, "keys", "init").returncode == 0  # setup: in the test's process
    return home


@pytest.fixture
def board(tmp_path, micropython):
    with EmulatedBoard(micropython, tmp_path / "board", "rp2") as b:
        yield b


def provision(home: Path, device: str, port: str, *args: str, board: str = "rp2", env: dict | None = None):
    return fota(home, "device", "provision", device, "--hardware", "picow", "--board", board, "--port", port,
                *args, timeout=300, env=env)


def board_config(board: EmulatedBoard) -> dict:
    return json.loads((board.root / "device" / "config.json").read_text())


def stored_device(home: Path, device: str):
    from fota.server.home import Home
    from fota.server.store.models import Device
    with Home.locate(home).store().session() as s:
        return s.get(Device, device)


def password_matches(stored_hash: str, password: str) -> bool:
    _, _, iterations, salt, _ = stored_hash.split("$")
    return mosquitto_hash(password, base64.b64decode(salt), int(iterations)) == stored_hash


def board_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() + ("/" if p.is_dir() else "") for p in root.rglob("*")}


@pytest.mark.parametrize("raw_paste", [True, False], ids=["raw-paste", "raw"])
def test_a_board_on_a_port_gets_the_device_and_boots_it(home, tmp_path, micropython, raw_paste):
    with EmulatedBoard(micropython, tmp_path / "board", "rp2", raw_paste=raw_paste) as board:
        (board.root / "boot.py").write_text("import webrepl\nwebrepl.start()\n")  # a previous owner's
        r = provision(home, "board-1", board.port, "--wifi", "home-net", "--tag", "lab",
                      env={"FOTA_WIFI_PASSWORD": WIFI_PASSWORD})
        assert r.returncode == 0, r.stdout + r.stderr
        assert board.events()[-1] == "reset"  # written, then hard-reset into the agent
    out = r.stdout + r.stderr
    assert "board-1 provisioned on" in out and "home-net" in out
    config = board_config(board)
    assert WIFI_PASSWORD not in out and config["broker"]["password"] not in out
    assert config["id"] == "board-1" and config["backend"] == "files"
    assert config["wifi"] == {"ssid": "home-net", "password": WIFI_PASSWORD}
    assert config["trust"] and len(bytes.fromhex(config["root"])) == 65 and config["enc_key"]
    assert (board.root / "main.py").read_text() == MAIN_PY
    assert (board.root / "boot.py").read_text() == BOOT_PY
    files = board_files(board.root)
    assert {"device/", "device/boot.json", "device/slots/a/app/app.py", "device/slots/b/", "lib/fota/",
            "lib/fota/device/runner.mpy", "main.py", "boot.py"} <= files
    assert not [f for f in files if f.startswith("lib/") and f.endswith(".py")]  # the agent as .mpy only
    # Registered with the password the board holds.
    stored = stored_device(home, "board-1")
    assert stored.tags == ["lab"] and password_matches(stored.password_hash, config["broker"]["password"])
    # The board's files are a device the real micropython loads: the agent from /lib's .mpy.
    script = ("import sys\nfrom fota.device import runner\n"
              "assert runner.__file__.endswith('.mpy'), runner.__file__\n"
              "dev = runner.Device(sys.argv[1])\nprint(dev.config['id'], dev.backend.__class__.__name__)\n")
    run = subprocess.run([find_micropython(), "-c", script, str(board.root / "device")], capture_output=True,
                         text=True, timeout=60, env={"MICROPYPATH": f"{board.root / 'lib'}:.frozen"})
    assert run.stdout.split() == ["board-1", "FilesBackend"], run.stdout + run.stderr


def test_the_port_writes_the_same_tree_as_the_image(home, tmp_path, board):
    """--port and --image: one tree (fota.tools.boardfs), the same files at the same paths."""
    from fota.tools.lfsimage import read_image
    assert provision(home, "board-1", board.port).returncode == 0
    image = tmp_path / "b.img"
    r = fota(home, "device", "provision", "board-2", "--hardware", "picow", "--board", "rp2", "--image", str(image))
    assert r.returncode == 0, r.stdout + r.stderr
    in_image = set(read_image(image.read_bytes()))
    on_board = {f for f in board_files(board.root) if not f.endswith("/")}
    assert in_image == on_board
    assert read_image(image.read_bytes())["lib/fota/device/core.mpy"] == \
        (board.root / "lib/fota/device/core.mpy").read_bytes()


def test_a_board_holding_another_device_is_refused_unless_forced(home, board):
    assert provision(home, "board-1", board.port).returncode == 0
    before = (board.root / "device" / "config.json").read_bytes()
    r = provision(home, "board-2", board.port)
    assert_clean_error(r, "'board-1'", "'board-2'", "--force")
    assert (board.root / "device" / "config.json").read_bytes() == before  # untouched
    assert stored_device(home, "board-2") is None  # nothing registered
    r = provision(home, "board-2", board.port, "--force")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "'board-1' on the board is replaced by 'board-2'" in r.stdout.replace("\n", " ")
    assert board_config(board)["id"] == "board-2"
    assert stored_device(home, "board-1") is not None  # the other device stays registered


def test_the_same_device_reprovisioned_gets_a_new_broker_password(home, board):
    assert provision(home, "board-1", board.port).returncode == 0
    first = board_config(board)
    # left by an older install: a source module shadows the .mpy of the same name on MicroPython
    (board.root / "lib/fota/device/core.py").write_text("raise ImportError('stale')\n")
    (board.root / "device/journal.json").write_text("{}")
    r = provision(home, "board-1", board.port)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "new broker password" in r.stdout.replace("\n", " ")
    second = board_config(board)
    assert second["broker"]["password"] != first["broker"]["password"]
    assert second["enc_key"] == first["enc_key"]  # the payload key is the device's, it stays
    assert password_matches(stored_device(home, "board-1").password_hash, second["broker"]["password"])
    assert not (board.root / "lib/fota/device/core.py").exists() and not (board.root / "device/journal.json").exists()
    assert (board.root / "lib/fota/device/core.mpy").exists()


def test_a_registered_device_on_a_fresh_board_needs_force(home, board, tmp_path):
    r = fota(home, "device", "provision", "board-1", "--hardware", "picow", "--board", "rp2",
             "--image", str(tmp_path / "x.img"))
    assert r.returncode == 0, r.stdout + r.stderr
    old_hash = stored_device(home, "board-1").password_hash
    assert_clean_error(provision(home, "board-1", board.port), "already registered", "--force")
    assert not (board.root / "device").exists()
    r = fota(home, "device", "provision", "board-1", "--hardware", "devkit", "--board", "rp2", "--port", board.port,
             "--force", timeout=300)
    assert_clean_error(r, "registered as hardware 'picow', not 'devkit'")
    assert stored_device(home, "board-1").password_hash == old_hash
    assert provision(home, "board-1", board.port, "--force").returncode == 0
    assert stored_device(home, "board-1").password_hash != old_hash


def test_an_unreachable_board_registers_nothing(home, tmp_path):
    r = provision(home, "board-1", str(tmp_path / "no-such-port"))
    assert_clean_error(r, "mpremote failed", "no-such-port")
    assert stored_device(home, "board-1") is None


def test_a_board_of_another_port_registers_nothing(home, tmp_path, micropython):
    with EmulatedBoard(micropython, tmp_path / "board", "esp32") as board:
        r = provision(home, "board-1", board.port)  # --board rp2
        assert_clean_error(r, "esp32 port, not rp2")
        assert stored_device(home, "board-1") is None
        assert not (board.root / "device").exists()


def test_a_full_board_registers_nothing(home, tmp_path, micropython):
    with EmulatedBoard(micropython, tmp_path / "board", "rp2", free=16 * 1024) as board:
        r = provision(home, "board-1", board.port)
        assert_clean_error(r, "16384 bytes free", "free some room")
        assert stored_device(home, "board-1") is None and not (board.root / "device").exists()


def test_esp32_backend_puts_backend_and_chip_into_the_config(home, tmp_path, micropython):
    with EmulatedBoard(micropython, tmp_path / "board", "esp32") as board:
        r = provision(home, "board-1", board.port, "--backend", "esp32", board="esp32s3")
        assert r.returncode == 0, r.stdout + r.stderr
        config = board_config(board)
        assert config["backend"] == "esp32" and config["chip"] == "esp32s3"
        assert not (board.root / "device/slots/a/app/app.py").exists()  # the firmware is the app
        # files is the default on an esp32 too
        assert provision(home, "board-1", board.port, board="esp32").returncode == 0
        assert board_config(board)["backend"] == "files" and "chip" not in board_config(board)


def test_backend_and_wifi_refusals_register_nothing(home, tmp_path):
    port = str(tmp_path / "unused")
    assert_clean_error(provision(home, "d", port, "--backend", "esp32"), "board rp2 supports files")
    assert_clean_error(provision(home, "d", port, "--backend", "zip", board="esp32"), "files or esp32")
    assert_clean_error(provision(home, "d", port, "--wifi", "net"), "--wifi-password", "FOTA_WIFI_PASSWORD")
    assert_clean_error(provision(home, "d", port, "--wifi", "net", "--wifi-password", "short"), "8 to 63")
    assert_clean_error(provision(home, "d", port, "--wifi", "x" * 33, "--wifi-password", ""), "1 to 32 bytes")
    assert_clean_error(fota(home, "device", "provision", "d", "--hardware", "h", "--board", "rp2"),
                       "--port PORT", "--image FILE")
    assert_clean_error(provision(home, "d", port, "--fs-size", "65536"), "go with --image")
    assert_clean_error(fota(home, "device", "provision", "d", "--hardware", "h", "--board", "rp2", "--image",
                            str(tmp_path / "d.img"), "--force"), "--force goes with --port")
    assert stored_device(home, "d") is None


def test_image_takes_wifi_and_the_esp32_backend(home, tmp_path):
    from fota.tools.lfsimage import read_image
    image = tmp_path / "e.img"
    r = fota(home, "device", "provision", "e-1", "--hardware", "devkit", "--board", "esp32", "--image", str(image),
             "--backend", "esp32", "--wifi", "shop-floor", "--fs-size", str(1 << 20),
             env={"FOTA_WIFI_PASSWORD": WIFI_PASSWORD})
    assert r.returncode == 0, r.stdout + r.stderr
    assert WIFI_PASSWORD not in r.stdout + r.stderr and "esp32 backend" in r.stdout
    config = json.loads(read_image(image.read_bytes())["device/config.json"])
    assert config["backend"] == "esp32" and config["chip"] == "esp32"
    assert config["wifi"] == {"ssid": "shop-floor", "password": WIFI_PASSWORD}


# ---- the command lines mpremote is given (no board) ----------------------------------------------

PROBE_FRESH = {"id": None, "platform": "rp2", "mpy": 6, "free": 1 << 20, "device": -1, "agent": -1, "lib": -1}
PROBE_HELD = dict(PROBE_FRESH, id="old", device=3000, agent=40000, lib=40000)


def test_mpremote_command_lines_for_a_fresh_board(tmp_path):
    stage = tmp_path / "stage"
    tree = {"device/config.json": b"{}", "device/slots/b/": b"", "lib/fota/__init__.mpy": b"M",
            "lib/fota/device/core.mpy": b"M", "main.py": b"", "boot.py": b""}
    steps = boardport.write_steps(stage, tree, PROBE_FRESH)
    assert steps == [
        ["fs", "mkdir", ":/device"], ["fs", "mkdir", ":/device/slots"], ["fs", "mkdir", ":/device/slots/b"],
        ["fs", "mkdir", ":/lib"], ["fs", "mkdir", ":/lib/fota"], ["fs", "mkdir", ":/lib/fota/device"],
        ["fs", "cp", "-f", f"{stage}/boot.py", ":/boot.py"],
        ["fs", "cp", "-f", f"{stage}/device/config.json", ":/device/config.json"],
        ["fs", "cp", "-f", f"{stage}/lib/fota/__init__.mpy", ":/lib/fota/__init__.mpy"],
        ["fs", "cp", "-f", f"{stage}/lib/fota/device/core.mpy", ":/lib/fota/device/core.mpy"],
        ["fs", "cp", "-f", f"{stage}/main.py", ":/main.py"],
    ]
    argv = boardport.mpremote_argv("/dev/ttyACM0", *steps[:2])
    assert argv == ["connect", "/dev/ttyACM0", "fs", "mkdir", ":/device", "+", "fs", "mkdir", ":/device/slots"]
    assert boardport.mpremote_argv("COM3", boardport.reset_step()) == ["connect", "COM3", "reset"]
    assert boardport.mpremote_argv("COM3", boardport.probe_step()) == ["connect", "COM3", "exec", boardport.PROBE_CODE]


def test_mpremote_command_lines_for_a_provisioned_board(tmp_path):
    """The old device and agent are removed first (no stale module); /lib is kept."""
    stage = tmp_path / "stage"
    steps = boardport.write_steps(stage, {"lib/fota/a.mpy": b"M", "device/x": b""}, PROBE_HELD)
    assert steps[:2] == [["fs", "rm", "-r", ":/device"], ["fs", "rm", "-r", ":/lib/fota"]]
    assert ["fs", "mkdir", ":/lib"] not in steps and ["fs", "mkdir", ":/lib/fota"] in steps


def test_secrets_are_on_no_command_line(home, board, monkeypatch):
    """What mpremote is run with (a command line is visible to every user of the machine) holds
    neither the broker password nor the Wi-Fi password: they travel in the staged files."""
    from typer.testing import CliRunner

    from fota.cli import app
    seen = []
    real_run = subprocess.run

    def recording_run(cmd, *args, **kw):
        if "mpremote" in cmd:  # subprocess.run is patched for everyone: mpy-cross runs too
            seen.append(list(cmd))
        return real_run(cmd, *args, **kw)
    monkeypatch.setattr(boardport.subprocess, "run", recording_run)
    r = CliRunner().invoke(app, ["device", "provision", "board-1", "--hardware", "picow", "--board", "rp2",
                                 "--port", board.port, "--wifi", "net"],
                           env={"FOTA_HOME": str(home), "FOTA_WIFI_PASSWORD": WIFI_PASSWORD})
    assert r.exit_code == 0, r.output
    assert [cmd[3:5] for cmd in seen] == [["connect", board.port]] * 3  # probe, write, reset
    assert all(cmd[:3] == [sys.executable, "-m", "mpremote"] for cmd in seen)
    text = "\n".join(" ".join(cmd) for cmd in seen)
    assert ":/device/config.json" in text
    assert WIFI_PASSWORD not in text and board_config(board)["broker"]["password"] not in text


def test_board_checks():
    ok = boardport.check_board(PROBE_FRESH, "rp2", 6, 1000, "d", force=False)
    assert ok == []
    with pytest.raises(boardport.BoardPortError, match="v5, the agent built for it is v6"):
        boardport.check_board(dict(PROBE_FRESH, mpy=5), "rp2", 6, 1000, "d", force=False)
    with pytest.raises(boardport.BoardPortError, match="free some room"):
        boardport.check_board(dict(PROBE_FRESH, free=8192), "rp2", 6, 100_000, "d", force=False)
    # what the write removes counts as room
    assert boardport.check_board(dict(PROBE_HELD, id="d", free=8192), "rp2", 6, 50_000, "d", force=False) == []
    with pytest.raises(boardport.BoardPortError, match="unreadable"):
        boardport.check_board(dict(PROBE_FRESH, id="?"), "rp2", 6, 1000, "d", force=False)
    assert boardport.check_board(dict(PROBE_FRESH, platform="esp32"), "esp32s3", 6, 1, "d", False) == []
    with pytest.raises(boardport.BoardPortError, match="not a fota probe"):
        boardport.parse_probe("Traceback (most recent call last):\nNameError: x\n")


def test_tree_room_is_counted_in_whole_blocks():
    from fota.tools.boardfs import tree_bytes
    # two files (a small one a block, a 5000-byte one two) and the directories a, a/b, a/b/c, e
    assert tree_bytes({"a/x": b"1", "a/b/c/y": bytes(5000), "e/": b""}) == (1 + 2 + 4) * 4096


def test_a_board_written_over_the_port_boots_its_main_py_and_updates(fleet, tmp_path, micropython):
    """A fleet device's tree written by the real mpremote onto the emulated board, then what the
    board's filesystem holds powered on as a Pico W (fota.testkit.boards.harness: its own
    main.py, its /lib .mpy and /device, under the real micropython with the emulated machine and
    network modules): it joins the Wi-Fi, comes online and installs a release."""
    import shutil

    from fota.device import protocol as P
    from fota.server.deployments import create_deployment
    from fota.testkit.boards.harness import EmulatedBoard as PoweredBoard
    from fota.testkit.fleet import bundle_of_size
    from fota.tools.boardfs import tree_bytes, write_tree
    from fota.tools.mpy import build_board_agent
    dev = "port-board"
    powered = PoweredBoard(tmp_path / "powered", chip=None, code_path=tmp_path / "powered" / "fs" / "lib",
                           settings={"wdt_max_ms": 8388})   # an RP2040's watchdog limit
    fleet.add_device(dev, start=False, trial_wdt_ms=8000,
                     wifi={"ssid": powered.wifi[0], "password": powered.wifi[1]})
    build_board_agent("rp2", tmp_path / "agent")
    tree = board_tree(fleet.root(dev), tmp_path / "agent")
    stage = write_tree(tree, tmp_path / "stage")
    with EmulatedBoard(micropython, tmp_path / "board", "rp2") as board:
        found = boardport.probe(board.port)
        assert found["id"] is None and found["platform"] == "rp2"
        boardport.check_board(found, "rp2", 6, tree_bytes(tree), dev, force=False)
        boardport.write(board.port, stage, tree, found)
        boardport.reset(board.port)
        assert boardport.probe(board.port)["id"] == dev
    assert (board.root / "main.py").read_text() == MAIN_PY
    shutil.copytree(board.root, powered.fs, dirs_exist_ok=True)   # over the harness's main.py
    try:
        powered.start()
        fleet.wait_online(dev)
        rel = fleet.release(bundle_of_size("2.0.0", 8_000), "2.0.0")
        job = create_deployment(fleet.store, rel, device_ids=[dev]).jobs[0].id
        assert fleet.wait_job(job, timeout=90).state == P.CONFIRMED, powered.log_text()[-3000:]
        fleet.wait_online(dev, version="2.0.0")
    finally:
        powered.stop()
    boot = json.loads((powered.device_dir / "boot.json").read_text())
    assert boot["versions"][boot["active"]] == "2.0.0"
    assert "[fota] Wi-Fi: joining" in powered.log_text()
    assert powered.resets == 1 and powered.halted == []   # machine.reset() into the new app


def test_the_wifi_password_is_asked_for_on_a_terminal_and_not_echoed(home, tmp_path):
    """Without --wifi-password or $FOTA_WIFI_PASSWORD, fota asks on its terminal (a pty here,
    its controlling terminal) with echo off; the password reaches the config, not the screen."""
    import os
    import pty
    import select

    from fota.tools.lfsimage import read_image
    image = tmp_path / "w.img"
    env = {k: v for k, v in os.environ.items() if k != "FOTA_WIFI_PASSWORD"}
    env.update(FOTA_HOME=str(home), COLUMNS="200")
    pid, master = pty.fork()
    if pid == 0:  # the child: fota on the pty
        os.execve(sys.executable, [sys.executable, "-m", "fota.cli", "device", "provision", "w-1", "--hardware",
                                   "picow", "--board", "rp2", "--image", str(image), "--wifi", "net"], env)
    screen = b""

    def read_until(needle: bytes, timeout: float = 60) -> None:
        nonlocal screen
        while needle not in screen:
            ready, _, _ = select.select([master], [], [], timeout)
            assert ready, screen
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the child ended
                chunk = b""
            assert chunk, screen
            screen += chunk
    read_until(b"Wi-Fi password for net")
    import termios

    from fota.tools.waiting import wait_until
    # typed once the prompt has turned echo off (as a person would, after the prompt appeared)
    wait_until(lambda: not termios.tcgetattr(master)[3] & termios.ECHO, timeout=30, what="echo never turned off")
    os.write(master, WIFI_PASSWORD.encode() + b"\n")
    read_until(b"write it at the filesystem")
    _, status = os.waitpid(pid, 0)
    os.close(master)
    assert os.waitstatus_to_exitcode(status) == 0, screen
    assert WIFI_PASSWORD.encode() not in screen
    config = json.loads(read_image(image.read_bytes())["device/config.json"])
    assert config["wifi"] == {"ssid": "net", "password": WIFI_PASSWORD}
