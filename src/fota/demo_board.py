"""`fota demo --board esp32`: the demo on emulated ESP32s, whole firmware images and a rollback.

Everything runs on this machine in a throw-away fota home, as `fota demo` does, but the devices
are emulated ESP32 boards (fota.testkit.boards): each one a real `micropython` process running
the board runner, with the emulated `esp32.Partition` (two OTA app partitions in a flash file,
ESP-IDF's image states and rollback), `machine` (reset, watchdog) and `network` (Wi-Fi). Every
reset starts the process again through the emulated bootloader.

1. N boards flashed with firmware 1.0.0 come online;
2. firmware 1.1.0 (an ESP app image, signed) goes to all of them: written into the next OTA
   partition, trial boot, confirmed (the image is marked valid);
3. firmware 1.2.0, whose app fails at start, goes to the first board (as a delta from 1.1.0):
   its trial boot resets before the image is marked valid, the bootloader abandons it (ABORTED)
   and boots 1.1.0 again, and the device reports the revert.
Exits 0 once all of that happened.

The emulations live in the test kit, never in the agent; this command is the one shipped module
that loads them (docs/boards.md, "Demo on emulated ESP32s").
"""
from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from fota.device import protocol as P
from fota.demo import DemoError, run_in_home, wait as _wait, watch

HARDWARE = "esp32"
BOARDS = ("esp32",)


def run_board_demo(board: str = "esp32", devices: int = 3, timeout: float = 120.0, keep: bool = False,
                   console: Console | None = None, heap: str | None = None) -> int:
    """heap: each board process's MicroPython heap (default: the harness's BOARD_HEAP)."""
    if board not in BOARDS:
        raise ValueError(f"no emulated board {board!r}; boards: {', '.join(BOARDS)}")
    console = console or Console()
    return run_in_home("fota-demo-esp32-", lambda root: _demo(root, devices, timeout, console, heap),
                       f"{devices} emulated ESP32 board(s) confirmed firmware 1.1.0; "
                       "the faulty 1.2.0 was rolled back by the bootloader on dev-01", keep, console)


def boards_table(boards: dict) -> Table:
    """One row per board: what its bootloader runs and the state of each OTA partition."""
    table = Table(title="emulated ESP32 boards", title_justify="left")
    for col in ("device", "running", "firmware", "ota_0", "ota_1", "resets", "watchdog"):
        table.add_column(col)
    for dev, b in boards.items():
        ota = b.ota_data()
        fw = b.running_firmware() or {}
        table.add_row(dev, ota["running"], fw.get("version", "?"), ota["states"]["ota_0"], ota["states"]["ota_1"],
                      str(b.resets), str(b.wdt_resets))
    return table


async def _deploy_and_watch(console, store, release, ids, timeout) -> tuple:
    """(deployment, its rows once every board finished)."""
    from fota.server.deployments import create_deployment
    dep = create_deployment(store, release, device_ids=ids)
    console.print(f"deployment {dep.id}: {release.version} to {', '.join(ids)}")
    return dep, await watch(console, store, dep.id, timeout, "board")


def _job(store, job_id):
    from fota.server.store import Job
    with store.session() as s:
        return s.get(Job, job_id)


async def _demo(root: Path, n: int, timeout: float, console: Console, heap: str | None) -> None:
    from fota.server.app import control_center
    from fota.server.fleet import list_devices, provision_device
    from fota.server.home import Home
    from fota.server.releases import create_release
    from fota.testkit.boards.firmware import RAISES, firmware_image
    from fota.testkit.boards.harness import BOARD_HEAP, EmulatedBoard, provision

    home = Home(root / "home")
    home.keyring.init()
    key = home.keyring.signer().key
    home.config()
    store = home.store()
    ids = [f"dev-{i:02d}" for i in range(1, n + 1)]
    host, port = home.device_broker
    boards: dict[str, EmulatedBoard] = {}
    for dev in ids:
        row, password = provision_device(store, dev, HARDWARE, tags=("demo",), kek=home.kek())
        board = EmulatedBoard(root / "boards" / dev, chip="esp32", heap=heap or BOARD_HEAP)
        provision(board, device_id=dev, hardware=HARDWARE, password=password, host=host, port=port,
                  root_key=home.keyring.root_public(), trust=home.keyring.trust(), cadata=home.broker_cadata(),
                  enc_key=home.kek().device_key(dev, row.enc_key).hex(), version="1.0.0")
        board.flash_factory_image(firmware_image("1.0.0"))  # esptool's job at the factory
        boards[dev] = board
    console.print(f"provisioned {n} emulated ESP32 boards (ESP32_GENERIC-OTA layout: two 1.5 MiB app "
                  f"partitions), firmware 1.0.0 in ota_0 (home {home.path})")

    def versions():
        return {d.id: (d.online, d.version) for d in list_devices(store)}

    async with control_center(home) as center:
        console.print(f"Mosquitto and control center up: devices {host}:{port}")
        try:
            for b in boards.values():
                b.start()
            await _wait(lambda: all(versions().get(i) == (True, "1.0.0") for i in ids), 30,
                        "the boards to come online on 1.0.0")
            console.print(f"{n} boards online on firmware 1.0.0")

            good = create_release(store, home.blobs, key, firmware_image("1.1.0"), "1.1.0", [HARDWARE], kind="image")
            console.print(f"signed firmware 1.1.0: an ESP app image of {good.size} bytes (key {good.key_id})")
            _, rows = await _deploy_and_watch(console, store, good, ids, timeout)
            bad = [r for r in rows if r[1] != P.CONFIRMED]
            if bad:
                raise DemoError("; ".join(f"{d} ended {st} ({code}: {reason})" for d, st, _, code, reason in bad))
            await _wait(lambda: all(versions().get(i) == (True, "1.1.0") for i in ids), 30,
                        "the boards to report 1.1.0")
            console.print(boards_table(boards))

            victim = ids[0]
            faulty = create_release(store, home.blobs, key, firmware_image("1.2.0", RAISES), "1.2.0", [HARDWARE],
                                    kind="image")
            console.print(f"signed firmware 1.2.0, whose app fails at start; deployed to {victim} only")
            dep, rows = await _deploy_and_watch(console, store, faulty, [victim], timeout)
            (_, state, _, code, reason), = rows
            job = _job(store, dep.jobs[0].id)
            if job.delta_id is not None:
                console.print(f"{victim} got 1.2.0 as a delta of 1.1.0 (read from its running partition): "
                              f"{job.bytes_served} bytes sent for a {faulty.size}-byte image")
            if state != P.REVERTED:
                raise DemoError(f"{victim} ended {state} ({code}: {reason}), not reverted")
            ota = boards[victim].ota_data()
            back = (boards[victim].running_firmware() or {}).get("version")
            aborted = [label for label, st in ota["states"].items() if st == "ABORTED"]
            if back != "1.1.0" or not aborted:
                raise DemoError(f"{victim}'s bootloader runs {back} with states {ota['states']}")
            await _wait(lambda: versions().get(victim) == (True, "1.1.0"), 30, f"{victim} to report 1.1.0 again")
            console.print(f"{victim}: {reason}")
            console.print(f"{victim}: the bootloader marked {aborted[0]} ABORTED and booted {ota['running']} "
                          f"(firmware {back}) again")
            console.print(boards_table(boards))
        finally:
            for b in boards.values():
                b.stop()
    store.dispose()
