# What an emulated board does from power-on to its main.py, as one `micropython` process (the
# unix port standing in for the board's firmware). fota.testkit.boards.harness starts it on every
# power-on and every reset:
#
#   micropython -m poweron      cwd: the board's filesystem; MICROPYPATH: rom, this directory,
#                               the agent; FOTA_EMULATED_BOARD: the board's settings (board.json)
#
# 1. An ESP32 (settings "flash"): the second-stage bootloader picks the app, with the rollback
#    rules of the emulated esp32 module (esp32.reset(): NEW -> PENDING_VERIFY, PENDING_VERIFY ->
#    ABORTED and back to the previous app). On a real board the image it boots IS the firmware:
#    the interpreter with its frozen modules. Here the interpreter is this process, and the
#    image's tag (fota.testkit.boards.firmware) says which frozen `app` module it holds: it is
#    written into the rom directory, which stands for the firmware's frozen modules ('.frozen'
#    on a board's sys.path). No bootable app: exit NO_APP_EXIT (the board is bricked).
#    Another board (a Pico W: the `files` backend) has one firmware and no OTA partitions.
# 2. Each boot is appended to the boots file (JSON lines) for the tests.
# 3. boot.py, then main.py, from the filesystem, as MicroPython's firmware runs them. The board
#    runner ends the process with machine.reset() (exit 4); a watchdog that was not fed kills
#    it after writing "wdt" to the reset-cause register (machine.py). An uncaught exception ends
#    it with exit 1: on a board, the REPL.
import os
import sys
import json
import time

NO_APP_EXIT = 6


def log(*args):
    print("[board]", *args)


def read_tag(part):
    """The firmware tag of an image (JSON after the marker in its first segment), else None."""
    mark = b"FOTA-EMULATED-FIRMWARE\0"
    head = bytearray(32 + len(mark) + 4)
    part.readblocks(0, head)
    if head[0] != 0xE9 or bytes(head[32:32 + len(mark)]) != mark:
        return None
    at = 32 + len(mark)
    n = head[at] | (head[at + 1] << 8) | (head[at + 2] << 16) | (head[at + 3] << 24)
    tag = bytearray(n)
    part.readblocks(0, tag, at + 4)
    return json.loads(tag)


def bootloader(settings, boot):
    import esp32
    esp32.setup(settings["flash"], app_size=settings["app_size"], chip_id=settings["chip_id"])
    try:
        label = esp32.reset()
    except OSError:
        log("bootloader: no valid app in ota_0 or ota_1")
        boot["bricked"] = True
        return False
    boot["label"] = label
    boot["states"] = {"ota_0": esp32.state("ota_0"), "ota_1": esp32.state("ota_1")}
    tag = read_tag(esp32.Partition(label))
    frozen = settings["rom"] + "/app.py"
    try:
        os.remove(frozen)
    except OSError:
        pass
    if tag is not None:
        boot["version"] = tag["version"]
        boot["behaviour"] = tag["behaviour"]
        with open(frozen, "w") as f:
            f.write(tag["app"])
    log("bootloader: booting", label, boot["states"], "firmware", boot.get("version"), boot.get("behaviour"))
    return True


def run_file(name):
    try:
        f = open(name)
    except OSError:
        return
    with f:
        source = f.read()
    exec(source, {"__name__": "__main__"})


def power_on():
    # The reset reason is latched at power-on, before anything of this boot can run: machine.py
    # reads its register when first imported (a watchdog reset, a hard reset, else power-on).
    try:
        import machine  # noqa: F401
    except ImportError:
        pass
    with open(os.getenv("FOTA_EMULATED_BOARD")) as f:
        settings = json.load(f)
    boot = {"at": time.time_ns() // 1000000}  # Unix ms: when it powered on
    ok = bootloader(settings, boot) if settings.get("flash") else True
    with open(settings["boots"], "a") as f:
        f.write(json.dumps(boot) + "\n")
    if not ok:
        sys.exit(NO_APP_EXIT)
    run_file("boot.py")
    run_file("main.py")


power_on()
