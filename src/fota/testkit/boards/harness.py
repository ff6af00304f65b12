"""An emulated board on this machine: its filesystem, its flash, its power and its resets (CPython).

EmulatedBoard plays the hardware around the agent. Every power-on and every reset starts one
real `micropython` process (the unix port standing in for the board's firmware) running
poweron.py, which runs the emulated bootloader (ESP32) and then the board's main.py, as the
firmware does. How the process ends says what the board did:

    exit 4 (RESET_EXIT)   machine.reset(): a hard reset          -> the bootloader runs again
    SIGKILL, reset_cause  the machine.WDT was not fed in time: its thread wrote "wdt" to the
      file says "wdt"     reset-cause file and killed the process (machine.py), counted as
                          exit 5 (WDT_EXIT)                      -> the bootloader runs again
    SIGKILL otherwise     a power cut (power_cut())              -> powered on again
    exit 6 (NO_APP_EXIT)  the bootloader found no app to boot    -> the board is bricked: halted
    anything else         main.py returned or raised: on a board the REPL waits -> halted
    exit 3 (REBOOT_EXIT)  the unix-port runner's reboot (fota.device.runner on a "linux"
                          platform) -> treated as a reset

Layout of the board's directory (root):

    fs/                   the board's filesystem: the process's working directory ('' on sys.path)
      device/             the device directory (config.json, boot.json, ...), as provisioned
      main.py             starts the agent on "device": provisioning's (fota.tools.boardfs.MAIN_PY)
    flash.bin             ESP32: the two OTA app partitions, ota_0 then ota_1 (esp32.py)
    flash.bin.ota.json    ESP32: the OTA data (which app boots, the image states)
    rom/                  the frozen modules of the firmware the bootloader booted (poweron.py)
    board.json            the settings poweron.py, machine.py and network.py read
    reset_cause           the emulated reset-reason register (machine.py)
    boots.jsonl           one line per power-on: partition booted, image states, firmware tag
    board.log             the processes' output
    wifi.json             the Wi-Fi the emulated network.WLAN sees (set_wifi)

A board may reach the broker through a fault proxy (link): a lost Wi-Fi then also silences its
connections, as the radio link going away does on a board (set_wifi).

The agent's code comes as .mpy (fota.tools.mpy.build_agent), on the import path as a board's
/lib or frozen modules would be.
"""
from __future__ import annotations

import json
from pathlib import Path

from fota.device.runner import REBOOT_EXIT
from fota.testkit.boards.firmware import firmware_tag
from fota.testkit.boards.machine import WDT_EXIT, wdt_exit_status
from fota.tools.supervisor import DeviceProcess
from fota.tools.boardfs import DEVICE_DIR, MAIN_PY  # a provisioned board's main.py, run as it is

EMULATIONS = Path(__file__).resolve().parent    # esp32.py, machine.py, network.py, poweron.py
MICROPYTHON_SIDE = ("esp32", "machine", "network", "poweron")
RESET_EXIT = 4
NO_APP_EXIT = 6
POWER_CUT = -9    # SIGKILL
RESTARTS = (RESET_EXIT, WDT_EXIT, REBOOT_EXIT, POWER_CUT)
ESP32_APP_SIZE = 0x180000   # ESP32_GENERIC-OTA: two 1.5 MiB app partitions
# The emulated board's heap. fota's DEFAULT_HEAP (160K) is the unix-port runner's; a board
# process also holds the emulations, which a real board has built in (C code, no heap): about
# 22 KiB before the agent starts (esp32, machine, network, poweron as .mpy, measured with
# gc.mem_free()). `./run bench board_heap` (a full firmware update of 256 KiB, then a delta, 3
# boards per heap) found every run passing at 192K and above with the esp32 backend's one
# preallocated block buffer (at 216K and above with a new 4 KiB buffer per block, which
# fragmented the heap into crash loops below that); 200K passed 11 runs of 11 over the
# measurements. 224K keeps a margin of 24-32 KiB above that floor.
BOARD_HEAP = "224K"


def build_emulations() -> Path:
    """The MicroPython-side emulations compiled to .mpy (cached by their sources' hash), as the
    agent is (fota.tools.mpy): on a board these modules are built into the firmware and cost no
    heap; loaded from source they would also leave the compiler's litter in the board's heap."""
    import hashlib
    import shutil
    import tempfile
    from fota.tools.mpy import BUILD, compile_module
    sources = [EMULATIONS / f"{name}.py" for name in MICROPYTHON_SIDE]
    digest = hashlib.sha256()
    for path in sources:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    out = BUILD.parent / "emulations" / digest.hexdigest()[:16]
    if (out / ".complete").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".emu-", dir=out.parent))
    for path in sources:
        compile_module(path, tmp / (path.stem + ".mpy"), name=path.name)
    (tmp / ".complete").write_text("ok\n")
    try:
        tmp.rename(out)
    except OSError:  # built concurrently: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return out


class EmulatedBoard(DeviceProcess):
    """One emulated board in `root`. chip: "esp32" (OTA partitions, whole firmware images) or
    None (a board with one firmware and app bundles on its filesystem: a Pico W).

    A DeviceProcess whose process is the board's firmware (poweron.py) and whose restarts follow
    the board's hardware (after_exit), not the unix-port supervisor's."""

    def __init__(self, root: Path, *, chip: str | None = "esp32", chip_id: int = 0, app_size: int = ESP32_APP_SIZE,
                 heap: str = BOARD_HEAP, code_path: Path | None = None, main_py: str = MAIN_PY,
                 max_restarts: int = 100, settings: dict | None = None, link=None,
                 wifi: tuple[str, str] = ("fota-lab", "emulated-wpa2")):
        if code_path is None:
            from fota.tools.mpy import build_agent
            code_path = build_agent()
        self.emulations = build_emulations()
        root = Path(root)
        super().__init__(root, heap=heap, code_path=code_path, max_restarts=max_restarts,
                         micropypath=f"{root / 'rom'}:{self.emulations}:{code_path}:.frozen")
        self.wifi = wifi   # the access point's (SSID, password): provision() gives the board the same
        self.wifi_drops = 0
        self.link = link   # a fota.testkit.faultproxy.FaultProxy the board reaches the broker through
        self.chip = chip
        for d in (self.fs, self.rom):
            d.mkdir(parents=True, exist_ok=True)
        board = {"chip": chip, "rom": str(self.rom), "boots": str(self.root / "boots.jsonl"),
                 "wifi": str(self.wifi_path), **(settings or {})}
        if chip is not None:
            board.update(flash=str(self.flash_path), app_size=app_size, chip_id=chip_id)
        self.app_size = app_size
        (self.root / "board.json").write_text(json.dumps(board, indent=1))
        (self.fs / "main.py").write_text(main_py)
        self.set_wifi(True)

    # ------------------------------------------------------------------------------ paths

    @property
    def fs(self) -> Path:
        return self.root / "fs"

    @property
    def device_dir(self) -> Path:
        return self.fs / DEVICE_DIR

    @property
    def rom(self) -> Path:
        return self.root / "rom"

    @property
    def flash_path(self) -> Path:
        return self.root / "flash.bin"

    @property
    def log_path(self) -> Path:
        return self.root / "board.log"

    @property
    def wifi_path(self) -> Path:
        return self.root / "wifi.json"

    # ------------------------------------------------------------------------- the factory

    def flash_factory_image(self, image: bytes) -> None:
        """What `esptool.py write_flash 0x10000 IMAGE` does on an erased board: the app in
        ota_0, ota_1 blank, no OTA data (both states UNDEFINED: ota_0 boots)."""
        if len(image) > self.app_size:
            raise ValueError("the image does not fit the partition")
        with open(self.flash_path, "wb") as f:
            f.write(image + b"\xff" * (2 * self.app_size - len(image)))
        Path(str(self.flash_path) + ".ota.json").unlink(missing_ok=True)

    # ------------------------------------------------------------------------------ power

    def arguments(self) -> list[str]:
        return ["-m", "poweron"]

    def environment(self) -> dict[str, str]:
        env = super().environment()
        env["FOTA_EMULATED_BOARD"] = str(self.root / "board.json")
        return env

    def cwd(self) -> Path:
        return self.fs

    def after_exit(self, code: int) -> bool:
        """How the process ended says what the board did (the module's docstring): a reset, a
        watchdog reset or a power cut boots it again; anything else halts it."""
        if self._stop.is_set():
            return False  # powered off: not something the board did
        code = wdt_exit_status(code, self.root / "reset_cause")
        self.exits.append(code)
        return code in RESTARTS and len(self.exits) <= self.max_restarts

    def power_cut(self) -> bool:
        """SIGKILL the running process: the board loses power; the loop powers it on again."""
        return self.kill(wait=True)

    @property
    def running(self) -> bool:
        """Powered and not halted."""
        return self.supervising

    # ------------------------------------------------------------------------------- Wi-Fi

    def set_wifi(self, up: bool) -> None:
        """The access point comes and goes: what the emulated network.WLAN sees (network.py).
        With a link (the board's broker connection through a fault proxy), a lost Wi-Fi also
        silences the board's connections (nothing flows, nothing resets them: the board must
        notice the lost link itself, or its socket timeout must); when it is back, the old
        connections are gone (the broker dropped them meanwhile)."""
        if self.link is not None and up:
            self.link.cut_all()
            self.link.unstall()
        ssid, password = self.wifi
        if not up:
            self.wifi_drops += 1  # latched by the emulated driver: network.py "drops"
        tmp = self.wifi_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"up": bool(up), "ssid": ssid, "password": password, "drops": self.wifi_drops}))
        tmp.replace(self.wifi_path)
        if self.link is not None and not up:
            self.link.stall(24 * 3600)

    # ------------------------------------------------------------------------- what is seen

    @property
    def resets(self) -> int:
        """machine.reset() calls (and the unix runner's reboots)."""
        return sum(1 for c in self.exits if c in (RESET_EXIT, REBOOT_EXIT))

    @property
    def reboots(self) -> int:
        return self.resets

    @property
    def wdt_resets(self) -> int:
        return self.exits.count(WDT_EXIT)

    @property
    def halted(self) -> list[int]:
        """Exit codes that halted the board (bricked, a crash to the REPL)."""
        return [c for c in self.exits if c not in RESTARTS]

    @property
    def boots(self) -> list[dict]:
        """One dict per power-on (poweron.py): label, states, version, behaviour; bricked."""
        path = self.root / "boots.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def ota_data(self) -> dict:
        """The emulated OTA data: {"boot", "running", "states": {"ota_0", "ota_1"}}."""
        return json.loads(Path(str(self.flash_path) + ".ota.json").read_text())

    def partition_image(self, label: str, size: int) -> bytes:
        """The first `size` bytes of an OTA partition."""
        with open(self.flash_path, "rb") as f:
            f.seek(0 if label == "ota_0" else self.app_size)
            return f.read(size)

    def running_firmware(self) -> dict | None:
        """The tag of the firmware in the running partition ({"version", "behaviour", ...})."""
        label = self.ota_data()["running"]
        return firmware_tag(self.partition_image(label, 64 * 1024))

    def boot_record(self) -> dict:
        return json.loads((self.device_dir / "boot.json").read_text())


def provision(board: EmulatedBoard, *, device_id: str, hardware: str, password: str, host: str, port: int,
              root_key: bytes, trust: dict, version: str = "1.0.0", app_files: dict[str, bytes] | None = None,
              **settings) -> Path:
    """Write the device directory onto the board's filesystem (what `fota device provision`
    writes onto a real one): an ESP32 board gets the esp32 backend, another the files backend
    with `app_files` as its factory app in slot a. settings: more config.json settings."""
    from fota.tools.devicedir import create_device_dir
    settings.setdefault("wifi", {"ssid": board.wifi[0], "password": board.wifi[1]})
    if board.chip is not None:
        settings.setdefault("backend", "esp32")
        settings.setdefault("chip", board.chip)
    return create_device_dir(board.device_dir, device_id=device_id, hardware=hardware, root_key=root_key,
                             trust=trust, host=host, port=port, password=password, app_files=app_files or {},
                             version=version, **settings)
