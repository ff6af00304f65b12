"""The `esp32` slot backend over the emulated `esp32.Partition` (fota.testkit.boards.esp32), under
CPython and under the real MicroPython. Every step runs in its own process, as a board runs
between two resets: the flash and the OTA data live in files."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_micropython
from fota.tools import espimage

ROOT = Path(__file__).resolve().parent.parent
BOARDS = ROOT / "src" / "fota" / "testkit" / "boards"  # the emulations (tests/boards re-exports them)
APP_SIZE = 16 * 4096
CHUNK = 1000


def app_image(payload: int, chip_id: int = 0, seed: int = 0, hash_appended: bool = True) -> bytes:
    """An ESP app image (App Image Format): 24-byte header, two segments, checksum byte at the
    end of a 16-byte block, SHA-256 of all of it."""
    data = bytes((i * 131 + seed + (i >> 8)) & 0xFF for i in range(payload))
    return espimage.app_image([(espimage.DROM, data[:payload // 3]), (espimage.IRAM, data[payload // 3:])],
                              chip_id, hash_appended)


# The board's side, MicroPython-compatible. STEP names what this process does; images come as
# files from the test.
BOARD = r"""
import json
import hashlib
from binascii import hexlify
import esp32
from esp32 import Partition
from fota.device.slots import open_backend
from fota.device.slots.esp32 import running_slot

esp32.setup(FLASH, app_size=APP_SIZE, chip_id=0)
out = {}

def load(name):
    with open(name, "rb") as f:
        return f.read()

def sha(data):  # the manifest's sha256 of an image
    return hexlify(hashlib.sha256(data).digest()).decode()

def stream(be, slot, data, at, sizes):
    k = 0
    while at < len(data):
        n = sizes[k % len(sizes)]
        be.write(slot, at, data[at:at + n])
        at += n
        k += 1

def err(fn, *args):
    try:
        fn(*args)
        return "ok"
    except OSError as e:
        return "OSError %d" % e.args[0]
    except Exception as e:
        return type(e).__name__

def status():
    return {"running": Partition(Partition.RUNNING).info()[4], "boot": Partition(Partition.BOOT).info()[4],
            "ota_0": esp32.state("ota_0"), "ota_1": esp32.state("ota_1")}

def install(be, slot, name):
    data = load(name)
    be.begin(slot, len(data))
    stream(be, slot, data, 0, (CHUNK,))
    return err(be.finalize, slot, len(data), None, None, None, sha(data))

if STEP == "factory":
    # esptool's job: the first app in ota_0.
    data = load("factory.bin")
    p = Partition("ota_0")
    padded = data + b"\xff" * (-len(data) % 4096)
    p.writeblocks(0, padded)
    out["status"] = status()

elif STEP == "half":
    be = open_backend("esp32", ".", {"chip": "esp32"})
    out["running_slot"] = running_slot()
    out["capacity"] = be.capacity
    out["write_running"] = err(be.begin, running_slot(), 100)
    data = load("new.bin")
    be.begin("b", len(data))
    stream(be, "b", data[:6 * CHUNK], 0, (1, 999, 4097, 903))
    be.flush("b")
    out["status"] = status()

elif STEP == "resume":
    be = open_backend("esp32", ".", {"chip_id": 0})
    data = load("new.bin")
    start = be.resume("b", 6 * CHUNK)
    out["resume_at"] = start
    at = start - start % CHUNK      # the runner re-sends from a chunk boundary
    stream(be, "b", data, at, (CHUNK,))
    out["finalize"] = err(be.finalize, "b", len(data), None, None, None, sha(data))
    out["readback"] = be.read("b", 0, len(data)) == data
    pad = -len(data) % 4096
    out["padded"] = pad > 0 and be.read("b", len(data), pad) == b"\xff" * pad  # the last block's rest: erased
    out["status"] = status()

elif STEP == "resume_differs":
    # A byte below the resumed block changed on the flash: the bytes sent again over it differ.
    Partition("ota_1").writeblocks(0, b"\x00", 4050)
    be = open_backend("esp32", ".", {})
    data = load("new.bin")
    start = be.resume("b", 6 * CHUNK)
    stream(be, "b", data, start - start % CHUNK, (CHUNK,))
    try:
        be.finalize("b", len(data), None, None, None, sha(data))
        out["finalize"] = "ok"
    except Exception as e:
        out["finalize"] = "%s: %s" % (type(e).__name__, e)
    out["status"] = status()

elif STEP == "reset":
    out["booted"] = esp32.reset()
    out["running_slot"] = running_slot()
    out["status"] = status()

elif STEP == "confirm":
    open_backend("esp32", ".", {}).confirm()
    out["status"] = status()

elif STEP == "update_a":
    # From ota_1 the next update is ota_0: slot "a". The running image stays readable (delta base).
    be = open_backend("esp32", ".", {})
    out["base"] = be.read("b", 0, len(load("new.bin"))) == load("new.bin")
    out["finalize"] = install(be, "a", "third.bin")
    out["status"] = status()

elif STEP == "bad":
    be = open_backend("esp32", ".", {})
    out["bad_magic"] = install(be, "b", "bad_magic.bin")
    out["wrong_chip"] = install(be, "b", "wrong_chip.bin")
    out["short"] = install(be, "b", "short.bin")
    out["after_rejects"] = status()
    data = load("new.bin")
    be.begin("b", len(data))
    stream(be, "b", data, 0, (CHUNK,))
    Partition("ota_1").writeblocks(1, b"\x00", 7)  # a bit flipped on the flash after it was written
    out["corrupt"] = err(be.finalize, "b", len(data), None, None, None, sha(data))
    out["bad_checksum"] = install(be, "b", "bad_checksum.bin")  # passes our checks, not ESP-IDF's
    out["status"] = status()

elif STEP == "partition":
    # The emulation itself: the two writeblocks forms, ioctl, set_boot of an invalid image.
    p = Partition("ota_1")
    out["info"] = list(p.info())
    out["blocks"] = [p.ioctl(4, 0), p.ioctl(5, 0)]
    out["next"] = Partition(Partition.RUNNING).get_next_update().info()[4]
    out["find"] = [q.info()[4] for q in Partition.find(Partition.TYPE_APP)]
    p.writeblocks(2, b"\x0f" * 4096)
    p.writeblocks(2, b"\xf0" * 16, 0)          # no erase: NOR programming only clears bits
    buf = bytearray(16)
    p.readblocks(2, buf)
    out["no_erase"] = bytes(buf) == b"\x00" * 16
    p.writeblocks(2, b"\xf0" * 4096)           # erases first
    p.readblocks(2, buf, 8)
    out["erase"] = bytes(buf) == b"\xf0" * 16
    p.ioctl(6, 2)
    p.readblocks(2, buf)
    out["ioctl_erase"] = bytes(buf) == b"\xff" * 16
    out["set_boot_invalid"] = err(p.set_boot)
    out["unknown_label"] = err(Partition, "nvs_x")
    out["outside"] = err(p.readblocks, APP_SIZE // 4096, bytearray(1))
    out["status"] = status()

print("RESULT " + json.dumps(out))
"""


def cpython(script: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{ROOT / 'src'}{os.pathsep}{BOARDS}"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env=env, cwd=str(cwd))


def micropython(script: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_micropython(script, cwd=str(cwd), timeout=120,
                           env={"MICROPYPATH": f"{ROOT / 'src'}:{BOARDS}"})


RUNNERS = {"cpython": cpython, "micropython": micropython}


@pytest.fixture(params=sorted(RUNNERS))
def board(request, tmp_path):
    """step(name) runs one boot of the emulated board in a new process and returns its RESULT."""
    files = {
        "factory.bin": app_image(3 * 4096 + 100, seed=1),
        "new.bin": app_image(9 * 4096 + 777, seed=2),
        "third.bin": app_image(5 * 4096 + 5, seed=3),
        "wrong_chip.bin": app_image(2 * 4096, chip_id=9, seed=4),
        "short.bin": app_image(2 * 4096, seed=5)[:20],
    }
    bad = bytearray(app_image(2 * 4096, seed=6))
    bad[0] = 0xEA
    files["bad_magic.bin"] = bytes(bad)
    bad = bytearray(app_image(2 * 4096, seed=7, hash_appended=False))
    bad[-1] ^= 0x55  # the checksum byte
    files["bad_checksum.bin"] = bytes(bad)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    run = RUNNERS[request.param]

    def step(name: str) -> dict:
        script = f"FLASH = 'flash.bin'\nAPP_SIZE = {APP_SIZE}\nCHUNK = {CHUNK}\nSTEP = {name!r}\n" + BOARD
        proc = run(script, tmp_path)
        assert proc.returncode == 0, proc.stderr + proc.stdout
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        assert lines, proc.stdout
        return json.loads(lines[0][7:])

    step("factory")
    return step


def test_update_resume_trial_and_confirm(board):
    half = board("half")
    assert half["running_slot"] == "a"
    assert half["capacity"] == APP_SIZE
    assert half["write_running"] == "ImageError"
    assert half["status"] == {"running": "ota_0", "boot": "ota_0", "ota_0": "UNDEFINED", "ota_1": "UNDEFINED"}

    resumed = board("resume")
    assert resumed["resume_at"] == 4096          # 6000 bytes were flushed: one whole block kept
    assert resumed["finalize"] == "ok"
    assert resumed["readback"] is True and resumed["padded"] is True
    assert resumed["status"] == {"running": "ota_0", "boot": "ota_1", "ota_0": "UNDEFINED", "ota_1": "NEW"}

    first = board("reset")
    assert first["booted"] == "ota_1" and first["running_slot"] == "b"
    assert first["status"]["ota_1"] == "PENDING_VERIFY"
    assert board("confirm")["status"] == {"running": "ota_1", "boot": "ota_1", "ota_0": "UNDEFINED", "ota_1": "VALID"}
    again = board("reset")
    assert again["booted"] == "ota_1" and again["status"]["ota_1"] == "VALID"

    third = board("update_a")
    assert third["base"] is True
    assert third["finalize"] == "ok"
    assert third["status"] == {"running": "ota_1", "boot": "ota_0", "ota_0": "NEW", "ota_1": "VALID"}


def test_resume_checks_the_bytes_sent_again_against_the_flash(board):
    board("half")
    out = board("resume_differs")  # resumes at 4096; the chunk from 4000 is sent again
    # Found when the bytes came again, before the read-back hash would find it
    assert out["finalize"] == "ImageError: replayed bytes at 4000 differ from the flash"
    assert out["status"] == {"running": "ota_0", "boot": "ota_0", "ota_0": "UNDEFINED", "ota_1": "UNDEFINED"}


def test_reset_before_confirm_rolls_back(board):
    board("half")
    assert board("resume")["finalize"] == "ok"
    assert board("reset")["status"]["ota_1"] == "PENDING_VERIFY"
    back = board("reset")                      # the trial app never marked itself valid
    assert back["booted"] == "ota_0" and back["running_slot"] == "a"
    assert back["status"] == {"running": "ota_0", "boot": "ota_0", "ota_0": "UNDEFINED", "ota_1": "ABORTED"}
    assert board("reset")["booted"] == "ota_0"   # and it stays there


def test_finalize_refuses_bad_images(board):
    out = board("bad")
    assert out["bad_magic"] == "ImageError"
    assert out["wrong_chip"] == "ImageError"
    assert out["short"] == "ImageError"
    assert out["corrupt"] == "ImageError"
    assert out["bad_checksum"] == "OSError -5379"
    untouched = {"running": "ota_0", "boot": "ota_0", "ota_0": "UNDEFINED", "ota_1": "UNDEFINED"}
    assert out["after_rejects"] == untouched
    assert out["status"] == untouched


def test_partition_emulation(board):
    out = board("partition")
    assert out["info"] == [0, 0x11, 0x10000 + APP_SIZE, APP_SIZE, "ota_1", False]
    assert out["blocks"] == [APP_SIZE // 4096, 4096]
    assert out["next"] == "ota_1"
    assert out["find"] == ["ota_0", "ota_1"]
    assert out["no_erase"] is True
    assert out["erase"] is True
    assert out["ioctl_erase"] is True
    assert out["set_boot_invalid"] == "OSError -5379"   # -ESP_ERR_OTA_VALIDATE_FAILED
    assert out["unknown_label"] == "OSError 2"          # ENOENT
    assert out["outside"] == "OSError -260"             # -ESP_ERR_INVALID_SIZE
    assert out["status"]["boot"] == "ota_0"


@pytest.fixture
def emulated_esp32(monkeypatch):
    """The emulated `esp32` module imported in this process, and gone again afterwards."""
    monkeypatch.syspath_prepend(str(BOARDS))
    import esp32
    yield esp32
    for name in ("esp32", "fota.device.slots.esp32"):
        sys.modules.pop(name, None)


def test_executor_confirm_marks_the_image_valid(tmp_path, emulated_esp32):
    """The executor's confirm step cancels the bootloader's rollback before the boot record
    names the new slot active (CPython, in process)."""
    esp32 = emulated_esp32

    from fota.device import boot as bootrec
    from fota.device import core as C
    from fota.device import fsutil
    from fota.device.executor import Executor
    from fota.device.slots import open_backend

    esp32.setup(str(tmp_path / "flash.bin"), app_size=APP_SIZE)
    first = app_image(2000, seed=1)
    esp32.Partition("ota_0").writeblocks(0, first + b"\xff" * (4096 - len(first)))  # esptool's job
    backend = open_backend("esp32", str(tmp_path), {})
    new = app_image(3 * 4096 + 5, seed=2)
    backend.begin("b", len(new))
    backend.write("b", 0, new)
    backend.finalize("b", len(new), sha256=hashlib.sha256(new).hexdigest())
    assert esp32.reset() == "ota_1" and esp32.state("ota_1") == "PENDING_VERIFY"

    ex = Executor(backend, fsutil, str(tmp_path) + "/", lambda *a: None)
    ex.record = bootrec.new_record("1.0")
    bootrec.set_trial(ex.record, "job-1", "2.0")
    ex.slot = "a"

    class Core:
        inventory_extra: dict = {}
    ex.core = Core()
    ex.run((C.A_CONFIRM, {"job": "job-1"}))
    assert esp32.state("ota_1") == "VALID"
    assert ex.record["active"] == "b" and ex.slot == "b"
    assert esp32.reset() == "ota_1"


def test_boot_record_follows_the_bootloader(tmp_path, emulated_esp32):
    """The bootloader picks the partition before the agent runs (and rolls back a trial image
    reset before it was marked valid): the executor's boot selection follows it (CPython, in
    process). Before, it followed the boot record alone: after a rollback it went on "trying"
    slot b while slot a ran, and confirmed an image that did not run."""
    esp32 = emulated_esp32

    from fota.device import boot as bootrec
    from fota.device import fsutil
    from fota.device.executor import Executor, Reboot
    from fota.device.slots import open_backend

    esp32.setup(str(tmp_path / "flash.bin"), app_size=APP_SIZE)
    first = app_image(2000, seed=1)
    esp32.Partition("ota_0").writeblocks(0, first + b"\xff" * (4096 - len(first)))
    new = app_image(3 * 4096 + 5, seed=2)

    def install():  # into ota_1, set to boot next
        backend = open_backend("esp32", str(tmp_path), {})
        backend.begin("b", len(new))
        backend.write("b", 0, new)
        backend.finalize("b", len(new), sha256=hashlib.sha256(new).hexdigest())

    install()

    def executor():
        return Executor(open_backend("esp32", str(tmp_path), {}), fsutil, str(tmp_path) + "/", lambda *a: None)

    # set_boot happened, the trial was not recorded yet (a power cut in between): the agent
    # must not run the image its record does not name; it reboots without marking it valid.
    fsutil.write_json(str(tmp_path / "boot.json"), bootrec.new_record("1.0"))
    assert esp32.reset() == "ota_1"
    with pytest.raises(Reboot):
        executor().select("1.0", 3)
    assert esp32.reset() == "ota_0" and esp32.state("ota_1") == "ABORTED"
    ex = executor()
    assert ex.select("1.0", 3) is False and ex.slot == "a"

    # The trial recorded, its boot reset before the health check: the bootloader rolled back,
    # and the record reports the revert instead of booting slot b "on trial" again.
    install()
    record = bootrec.new_record("1.0")
    bootrec.set_trial(record, 9, "2.0")
    fsutil.write_json(str(tmp_path / "boot.json"), record)
    assert esp32.reset() == "ota_1"
    ex = executor()
    assert ex.select("1.0", 3) is True and ex.slot == "b"       # the trial boot
    assert esp32.reset() == "ota_0"                               # reset before it was marked valid
    ex = executor()
    assert ex.select("1.0", 3) is False and ex.slot == "a"
    assert ex.record["trial"] is None and ex.record["versions"]["b"] is None
    assert ex.record["report"]["state"] == "reverted" and ex.record["report"]["job"] == 9
    assert "bootloader rolled back" in ex.record["report"]["reason"]

    # Marked valid, reset before the record said so: the bootloader keeps it, so does the record.
    install()
    record = bootrec.new_record("1.0")
    bootrec.set_trial(record, 10, "2.0")
    record["trial"]["tries"] = 3  # as many as a trial may take: the bootloader has the say
    fsutil.write_json(str(tmp_path / "boot.json"), record)
    assert esp32.reset() == "ota_1"
    esp32.Partition.mark_app_valid_cancel_rollback()
    assert esp32.reset() == "ota_1"
    ex = executor()
    # the trial slot booted a second time: it was marked valid, so it is confirmed, not retried
    assert ex.select("1.0", 3) is False and ex.slot == "b" and ex.record["trial"] is None
    assert ex.record["active"] == "b" and ex.record["report"] == {"job": 10, "state": "confirmed", "code": None,
                                                                  "reason": None}
