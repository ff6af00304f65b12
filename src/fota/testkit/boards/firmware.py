"""Synthetic ESP32 firmware images for the emulated boards (CPython).

On a real ESP32 an OTA image is the whole firmware: MicroPython's interpreter with the frozen
modules of the app, as an ESP app image (`.app-bin` of an ESP32_GENERIC-OTA build). On the
emulated board the unix port's interpreter stands in for the interpreter, so an image here only
has to be an ESP app image that the agent and the emulated bootloader accept, and to say which
app it freezes. That is its tag: the first segment (the flash-mapped data segment, DROM) starts
with MARK, a 4-byte little-endian length and a JSON object {"version", "behaviour", "app"}, where
"app" is the source of the frozen `app` module. The emulated board's power-on (poweron.py) reads
the tag of the partition the bootloader booted and puts that module where the firmware's frozen
modules are (the "rom" directory on the board process's import path).

The rest is an ordinary ESP app image (fota.tools.espimage). The second segment (IRAM) is filler
standing for the interpreter's code: the same bytes for every version (unless `code_seed`
differs) but its last KiB, so that two versions differ in about a KiB (what a delta sends).
"""
from __future__ import annotations

import json
import random

from fota.tools import espimage

MARK = b"FOTA-EMULATED-FIRMWARE\0"
DROM, IRAM = espimage.DROM, espimage.IRAM   # the data segment (the tag) and the code
# What the frozen app does: runs (healthy), raises in start() (its health check fails at once),
# raises in tick() once running (crashes), or never returns from tick() (hangs).
HEALTHY, RAISES, CRASHES, HANGS = "healthy", "raises", "crashes", "hangs"
BEHAVIOURS = (HEALTHY, RAISES, CRASHES, HANGS)

# The frozen app of each behaviour, in the board runner's `tick()` style.
_APP = '''# The frozen app of an emulated firmware image (fota.testkit.boards.firmware): {behaviour}.
VERSION = "{version}"
BEHAVIOUR = "{behaviour}"


def start():
    if BEHAVIOUR == "raises":
        raise RuntimeError("app %s: sensor init failed" % VERSION)
    print("firmware app", VERSION, "started")


def tick():
    if BEHAVIOUR == "crashes":
        raise RuntimeError("app %s: crashed in its loop" % VERSION)
    if BEHAVIOUR == "hangs":
        print("firmware app", VERSION, "hangs in tick()")
        import time
        while True:  # never returns to the agent: only the watchdog ends this
            time.sleep_ms(50)
'''


def app_source(version: str, behaviour: str = HEALTHY) -> str:
    if behaviour not in BEHAVIOURS:
        raise ValueError(f"behaviour must be one of {', '.join(BEHAVIOURS)}, not {behaviour!r}")
    return _APP.format(version=version, behaviour=behaviour)


def firmware_image(version: str, behaviour: str = HEALTHY, *, chip_id: int = 0, code_size: int = 48 * 1024,
                   code_seed: int = 0) -> bytes:
    """An ESP app image (hash appended) whose frozen app is app_source(version, behaviour)."""
    tag = json.dumps({"version": version, "behaviour": behaviour,
                      "app": app_source(version, behaviour)}).encode()
    data = MARK + len(tag).to_bytes(4, "little") + tag
    data += bytes(-len(data) % 4)  # segments are word-aligned
    code = random.Random(code_seed).randbytes(code_size - code_size % 4)
    # The last KiB of the code stands for what changed between two versions.
    changed = min(1024, len(code))
    code = code[:len(code) - changed] + random.Random(f"{code_seed}/{version}").randbytes(changed)
    return espimage.app_image([(DROM, data), (IRAM, code)], chip_id)


def firmware_tag(image: bytes) -> dict | None:
    """The tag of an image firmware_image() made ({"version", "behaviour", "app"}), else None."""
    at = 24 + 8
    if len(image) < at + len(MARK) + 4 or image[0] != 0xE9 or image[at:at + len(MARK)] != MARK:
        return None
    at += len(MARK)
    n = int.from_bytes(image[at:at + 4], "little")
    return json.loads(image[at + 4:at + 4 + n])
