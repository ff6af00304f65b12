# An emulation of MicroPython's `machine` module, the part a board runner uses: reset(), WDT,
# unique_id(), reset_cause(). For tests without hardware, under the real `micropython` (unix
# port) when fota.testkit.boards (or tests/boards, which re-exports it) is on MICROPYPATH: a .py
# on the path shadows the unix port's own
# built-in `machine`, which has neither reset() nor WDT. Never part of the agent.
#
# Written from the documentation, not from code:
# - MicroPython, machine module, "Reset related functions":
#   https://docs.micropython.org/en/latest/library/machine.html#reset-related-functions
#   reset() "resets the device in a manner similar to pushing the external RESET button";
#   reset_cause() returns one of PWRON_RESET, HARD_RESET, WDT_RESET, DEEPSLEEP_RESET,
#   SOFT_RESET; unique_id() "returns a byte string with a unique identifier of a board/SoC".
# - MicroPython, class WDT:
#   https://docs.micropython.org/en/latest/library/machine.WDT.html
#   WDT(id=0, timeout=5000): timeout in milliseconds; "once started it cannot be stopped or
#   reconfigured in any way"; feed() must be called in time or the system resets; on rp2040 the
#   maximum timeout is 8388 ms; on esp8266 the timeout cannot be chosen.
#
# Conventions shared with the harnesses that run an emulated board (agreed with the board
# end-to-end harness; keep in step):
#
#   machine.reset()   persists nothing itself: the process ends at once with exit status
#                     RESET_EXIT (4), a hard reset. The harness starts the process again, and the
#                     new process runs the emulated bootloader first (esp32.py
#                     reset()), as the board's ROM does. Nothing after the call runs.
#   machine.WDT       a watchdog thread (_thread, which the unix port has) checks the deadline
#                     every WDT_CHECK_MS; when it passes without a feed(), the emulated hardware
#                     resets the board: the thread writes "wdt" to the reset-cause file, then
#                     kills its own process with SIGKILL. It fires whatever the main thread does:
#                     a busy loop, a sleep, a blocking socket call, an app that catches every
#                     exception. The process's exit status is then -9 (SIGKILL), not 5, because
#                     the unix port gives a thread no way to end the process with a status of its
#                     choosing (no os._exit, no ffi in this build; micropython.schedule callbacks
#                     run on the scheduling thread; a SIGINT would unwind the main thread through
#                     every `finally`, which a hardware reset never runs). A harness therefore
#                     reads it as: status -9 and the reset-cause file says "wdt" -> a watchdog
#                     reset, WDT_EXIT (5) in its own accounting (wdt_exit_status() below does
#                     that mapping); status -9 otherwise -> a power cut.
#   reset-cause file  path: env FOTA_EMU_RESET_CAUSE, else "reset_cause" beside the board's
#                     settings file (env FOTA_EMULATED_BOARD), else "reset_cause" in the working
#                     directory. reset() writes "hard", the watchdog "wdt"; the next boot's
#                     `import machine` reads it for reset_cause() (missing: PWRON_RESET) and removes
#                     it, so a power cut later in that boot is not read as a watchdog reset. This
#                     is the emulated reset-reason register, not a file the agent sees or writes.
#   unique_id()       6 bytes (an ESP32's is its MAC): hex from env FOTA_EMU_UNIQUE_ID or the
#                     "unique_id" of the board settings, else a fixed default.
#   WDT limits        settings "wdt_max_ms" (an rp2040 board: 8388) makes a longer timeout raise
#                     ValueError, as the rp2 port does.
#
# MicroPython and CPython (the harness may import wdt_exit_status from here).
import os
import sys
import time
import json

PWRON_RESET = 1
HARD_RESET = 2
WDT_RESET = 3
DEEPSLEEP_RESET = 4
SOFT_RESET = 5

RESET_EXIT = 4        # exit status of machine.reset()
WDT_EXIT = 5          # what a harness counts a watchdog reset as (see wdt_exit_status)
WDT_CHECK_MS = 10     # how often the watchdog thread looks at the deadline
DEFAULT_UNIQUE_ID = b"\x24\x0a\xc4\x00\xf0\x7a"

try:
    _ticks_ms = time.ticks_ms
    _ticks_diff = time.ticks_diff
except AttributeError:  # CPython
    def _ticks_ms():
        return int(time.monotonic() * 1000)

    def _ticks_diff(a, b):
        return a - b


def _settings():
    path = os.getenv("FOTA_EMULATED_BOARD")
    if not path:
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _cause_path():
    path = os.getenv("FOTA_EMU_RESET_CAUSE")
    if path:
        return path
    board = os.getenv("FOTA_EMULATED_BOARD")
    if board and "/" in board:
        return board.rsplit("/", 1)[0] + "/reset_cause"
    return "reset_cause"


def _write_cause(text):
    path = _cause_path()
    try:
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.rename(path + ".tmp", path)
    except OSError:
        pass


def _read_cause():
    # Read once per boot (the first import), then cleared: what the previous process wrote is
    # this boot's cause, and a power cut later in this boot does not read as a watchdog reset.
    path = _cause_path()
    try:
        with open(path) as f:
            text = f.read().strip()
        os.remove(path)
    except OSError:
        return PWRON_RESET
    return {"hard": HARD_RESET, "wdt": WDT_RESET, "soft": SOFT_RESET}.get(text, PWRON_RESET)


_boot_cause = None


def reset_cause():
    global _boot_cause
    if _boot_cause is None:
        _boot_cause = _read_cause()
    return _boot_cause


def reset():
    """A hard reset: the process ends here with RESET_EXIT; nothing after the call runs."""
    _write_cause("hard")
    try:
        sys.stdout.flush()  # the serial console's output before the reset stays in the log
    except AttributeError:
        pass
    sys.exit(RESET_EXIT)


def soft_reset():
    raise NotImplementedError("soft_reset is not emulated: a soft reset does not load new firmware")


def unique_id():
    text = os.getenv("FOTA_EMU_UNIQUE_ID") or _settings().get("unique_id")
    if text:
        from binascii import unhexlify
        return unhexlify(text)
    return DEFAULT_UNIQUE_ID


def idle():
    time.sleep_ms(1) if hasattr(time, "sleep_ms") else time.sleep(0.001)


def _pid():
    if hasattr(os, "getpid"):  # CPython
        return os.getpid()
    with open("/proc/self/stat") as f:
        return int(f.read().split()[0])


def _hardware_reset():
    # The watchdog's reset: nothing of the program runs any more (no finally, no flush).
    _write_cause("wdt")
    try:
        print("[machine] WDT: not fed in time, resetting")
    except Exception:
        pass
    os.system("kill -9 %d" % _pid())
    while True:  # the signal is on its way
        time.sleep(1)


_wdt = None   # the one watchdog: a second WDT() returns the same timer, as the hardware has one


class _Watchdog:
    def __init__(self, timeout):
        self.timeout = timeout
        self._deadline = _ticks_ms() + timeout
        self.feeds = 0

    def feed(self):
        self._deadline = _ticks_ms() + self.timeout
        self.feeds += 1

    def _watch(self):
        while True:
            time.sleep_ms(WDT_CHECK_MS) if hasattr(time, "sleep_ms") else time.sleep(WDT_CHECK_MS / 1000)
            if _ticks_diff(_ticks_ms(), self._deadline) > 0:
                _hardware_reset()


def WDT(id=0, timeout=5000):
    """Start the watchdog (a function standing in for the class: the object it returns has
    feed(), as machine.WDT's has)."""
    global _wdt
    if _wdt is not None:
        return _wdt  # already started: cannot be reconfigured
    limit = _settings().get("wdt_max_ms")
    if limit is not None and timeout > limit:
        raise ValueError("timeout exceeds %d ms" % limit)
    if timeout < 1:
        raise ValueError("timeout must be positive")
    _wdt = _Watchdog(timeout)
    import _thread
    _thread.start_new_thread(_wdt._watch, ())
    return _wdt


def wdt_started():
    """Test helper: the running watchdog, or None."""
    return _wdt


def wdt_exit_status(returncode, cause_path):
    """For a harness (CPython): the exit status of an emulated board's process as the
    conventions above count it: WDT_EXIT for a watchdog reset (SIGKILL after "wdt" was written
    to the reset-cause file, which is then cleared), else returncode unchanged."""
    if returncode != -9:
        return returncode
    try:
        with open(cause_path) as f:
            fired = f.read().strip() == "wdt"
    except OSError:
        return returncode
    return WDT_EXIT if fired else returncode


if sys.implementation.name == "micropython":
    reset_cause()  # this boot's cause, taken from the register before anything can write it
