# An emulation of MicroPython's `esp32` module (its `Partition` class only) for tests without
# hardware. Importable as `esp32` under CPython and under the real `micropython` (unix port) when
# this directory (fota.testkit.boards) or tests/boards (which re-exports it) is on the import
# path (sys.path / MICROPYPATH). Never part of the agent. How a board process uses it: poweron.py.
#
# Written from the documentation, not from code:
# - MicroPython, esp32 module, "Flash partitions":
#   https://docs.micropython.org/en/latest/library/esp32.html#flash-partitions
#   (docs/library/esp32.rst): Partition(id, block_size=4096) with id a label or BOOT/RUNNING;
#   Partition.find(type=TYPE_APP, subtype=0xff, label=None, block_size=4096); info() ->
#   (type, subtype, addr, size, label, encrypted); readblocks/writeblocks/ioctl implement the
#   extended block protocol of vfs.AbstractBlockDev: writeblocks(block, buf) erases the blocks
#   it writes, writeblocks(block, buf, offset) does not (the "3- and 4-argument" forms, counting
#   self); ioctl(6, block) erases one block, 4 = block count, 5 = block size; set_boot();
#   get_next_update(); Partition.mark_app_valid_cancel_rollback().
#   MicroPython's ports/esp32/esp32_partition.c (read for facts only, nothing copied): an ESP-IDF
#   error code e is raised as OSError(-e); a label, or a next update partition, that does not
#   exist raises OSError(ENOENT); set_boot is esp_ota_set_boot_partition.
# - ESP-IDF, Over The Air Updates, "App rollback" and "Rollback Process":
#   https://docs.espressif.com/projects/esp-idf/en/stable/esp32/api-reference/system/ota.html#app-rollback
#   esp_ota_set_boot_partition verifies the image first (ESP_ERR_OTA_VALIDATE_FAILED) and marks
#   it ESP_OTA_IMG_NEW; at the next boot the bootloader turns NEW into PENDING_VERIFY and boots
#   it; if it boots again while PENDING_VERIFY (no esp_ota_mark_app_valid_cancel_rollback in
#   between) the image becomes ABORTED and the previous valid app boots. Images flashed by a
#   programmer have no OTA data entry (UNDEFINED) and boot as valid.
# - ESP-IDF, App Image Format:
#   https://docs.espressif.com/projects/esp-idf/en/stable/esp32/api-reference/system/app_image_format.html
#   24-byte header: magic 0xE9, segment count, ..., chip id (uint16 LE at offset 12),
#   hash_appended (offset 23); segments of (load address, length, data); a checksum byte (XOR of
#   the segment data, seeded with 0xEF) in the last byte of a 16-byte-aligned block; then the
#   SHA-256 of everything before it when hash_appended is 1.
#
# - ESP-IDF, Over The Air Updates, "OTA Data Partition": the OTA data is two flash sectors,
#   erased and written independently so that a power failure while one is written leaves the
#   other; a counter tells which is newer. So set_boot (esp_ota_set_boot_partition) and
#   mark_app_valid_cancel_rollback change the boot choice and the image states atomically: a
#   power cut leaves the old OTA data or the new, never a mix.
#
# Power cuts (the power-cut harness, fota.powercut, only): `power`, when set, is its
# fota.device.slots.sim.Power. Every flash write (writeblocks, with or without its erase), block
# erase (ioctl 6), set_boot and mark_app_valid_cancel_rollback is then one persistent operation
# it may cut before, or in the middle of: a torn writeblocks has erased its blocks (the
# 2-argument form) and programmed the first half of the buffer; a torn erase has erased the
# first half of the block; a torn set_boot or mark_app_valid completes (the OTA data write is
# atomic, above) and power fails right after.
#
# State lives in two files so that it survives a process restart (a reboot of the emulated
# board): the flash image `path` (ota_0 then ota_1) and `path + ".ota.json"` (the OTA data: which
# partition boots, which one runs, the image states). Flash writes behave as NOR flash does:
# programming only clears bits, so a write onto bytes that were not erased corrupts them.
import json
import os

BOOT = 0
RUNNING = 1
TYPE_APP = 0
TYPE_DATA = 1

ERASE = 4096                  # flash sector: the erase unit
BASE = 0x10000                # ota_0's address in ESP32_GENERIC-OTA's partition table
ESP_ERR_OTA_VALIDATE_FAILED = 0x1503
ENOENT = 2
ESP_ERR_INVALID_SIZE = 0x104
LABELS = ("ota_0", "ota_1")
SUBTYPES = {"ota_0": 0x10, "ota_1": 0x11}

_board = None
power = None   # the power-cut harness's Power (see above); None otherwise


def _step(kind):
    # True: tear the operation (the caller does half of it, then power.fail()).
    return power is not None and power.step(kind)


class _Board:
    def __init__(self, path, app_size, chip_id):
        if app_size % ERASE:
            raise ValueError("app_size must be a multiple of 4096")
        self.path = path
        self.app_size = app_size
        self.chip_id = chip_id
        self.blank = b"\xff" * ERASE    # an erased sector, and program()'s buffer: allocated once
        self.piece = bytearray(256)
        size = 2 * app_size
        try:
            self.f = open(path, "r+b")
            self.f.seek(0, 2)
            if self.f.tell() != size:
                raise ValueError("flash file has the wrong size")
        except OSError:
            self.f = open(path, "w+b")
            blank = b"\xff" * ERASE
            for _ in range(size // ERASE):
                self.f.write(blank)
            self.f.flush()
        try:
            with open(path + ".ota.json") as f:
                self.ota = json.load(f)
        except OSError:
            # As flashed by esptool: the app in ota_0, no OTA data entries.
            self.ota = {"boot": "ota_0", "running": "ota_0",
                        "states": {"ota_0": "UNDEFINED", "ota_1": "UNDEFINED"}}
            self.save()

    def save(self):
        tmp = self.path + ".ota.tmp"
        with open(tmp, "w") as f:
            json.dump(self.ota, f)
        os.rename(tmp, self.path + ".ota.json")

    def start(self, label):
        return LABELS.index(label) * self.app_size

    def read(self, at, n):
        self.f.seek(at)
        return self.f.read(n)

    def program(self, at, data):
        # In pieces, through one buffer: on a board this is the flash driver's C code, which
        # takes nothing from the MicroPython heap; the emulation runs inside that heap, so it
        # allocates as little as it can (the agent's heap measurements stay the agent's).
        piece = self.piece
        for done in range(0, len(data), 256):
            n = min(256, len(data) - done)
            view = memoryview(piece)[:n]
            self.f.seek(at + done)
            self.f.readinto(view)
            for i in range(n):
                piece[i] &= data[done + i]
            self.f.seek(at + done)
            self.f.write(view)
        self.f.flush()

    def erase(self, at, n):
        if at % ERASE or n % ERASE:
            raise OSError(-ESP_ERR_INVALID_SIZE)
        self.f.seek(at)
        for _ in range(n // ERASE):
            self.f.write(self.blank)
        self.f.flush()

    def fill(self, at, n):
        # Bytes of a sector caught in a torn erase: erased (0xFF), the rest of the sector kept.
        self.f.seek(at)
        self.f.write(b"\xff" * n)
        self.f.flush()

    def valid_image(self, label):
        """The checks of esp_image_verify this emulation makes: header, chip, segments,
        checksum, appended SHA-256; the image must fit its partition."""
        start = self.start(label)
        end = start + self.app_size
        head = self.read(start, 24)
        if head[0] != 0xE9 or head[12] | (head[13] << 8) != self.chip_id:
            return False
        at = start + 24
        check = 0xEF
        for _ in range(head[1]):
            if at + 8 > end:
                return False
            seg = self.read(at, 8)
            n = seg[4] | (seg[5] << 8) | (seg[6] << 16) | (seg[7] << 24)
            at += 8
            if at + n > end:
                return False
            done = 0
            while done < n:
                piece = self.read(at + done, min(1024, n - done))
                for b in piece:
                    check ^= b
                done += len(piece)
            at += n
        at += 15 - (at - start) % 16   # the checksum is the last byte of a 16-byte block
        if at >= end or self.read(at, 1)[0] != check:
            return False
        at += 1
        if head[23] == 1:
            import hashlib
            h = hashlib.sha256()
            done = start
            while done < at:
                h.update(self.read(done, min(1024, at - done)))
                done += min(1024, at - done)
            if at + 32 > end or self.read(at, 32) != h.digest():
                return False
        return True


def setup(path, app_size=0x180000, chip_id=0):
    """Attach the emulated board to its flash file (created blank, app in ota_0, if missing).
    Called by every process that plays the board, before the first Partition."""
    global _board
    if _board is not None:
        _board.f.close()
    _board = _Board(path, app_size, chip_id)


def board():
    if _board is None:
        raise OSError(ENOENT)
    return _board


def state(label):
    """The OTA image state of a partition (test helper): UNDEFINED, NEW, PENDING_VERIFY, VALID,
    ABORTED."""
    return board().ota["states"][label]


def reset():
    """A reboot: the bootloader's choice of the app to run. Returns the label it runs."""
    b = board()
    ota = b.ota
    target = ota["boot"]
    st = ota["states"][target]
    if st == "PENDING_VERIFY":
        st = "ABORTED"      # booted once and never marked valid: the trial failed
    elif st == "NEW":
        st = "PENDING_VERIFY"
    ota["states"][target] = st
    if st in ("ABORTED", "INVALID") or not b.valid_image(target):
        # Back to the previous app: the other partition, if it holds a valid one.
        other = LABELS[1 - LABELS.index(target)]
        if ota["states"][other] in ("VALID", "UNDEFINED") and b.valid_image(other):
            target = other
            ota["boot"] = other
        else:
            raise OSError(ENOENT)  # bricked: no app the bootloader can run
    ota["running"] = target
    b.save()
    return target


class Partition:
    BOOT = BOOT
    RUNNING = RUNNING
    TYPE_APP = TYPE_APP
    TYPE_DATA = TYPE_DATA

    def __init__(self, id, block_size=4096):
        b = board()
        if id == RUNNING:
            id = b.ota["running"]
        elif id == BOOT:
            id = b.ota["boot"]
        if id not in LABELS:
            raise OSError(ENOENT)
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError("invalid block size")
        self.label = id
        self.block_size = block_size

    def __eq__(self, other):
        return isinstance(other, Partition) and other.label == self.label

    def __repr__(self):
        return "<Partition type=0, subtype=%d, address=%d, size=%d, label=%s, encrypted=0>" % (
            SUBTYPES[self.label], BASE + board().start(self.label), board().app_size, self.label)

    @staticmethod
    def find(type=TYPE_APP, subtype=0xFF, label=None, block_size=4096):
        if type != TYPE_APP:
            return []
        return [Partition(n, block_size) for n in LABELS
                if (label is None or label == n) and subtype in (0xFF, SUBTYPES[n])]

    def info(self):
        b = board()
        return (TYPE_APP, SUBTYPES[self.label], BASE + b.start(self.label), b.app_size, self.label, False)

    def _span(self, block, n, offset):
        at = block * self.block_size + offset
        if block < 0 or offset < 0 or at + n > board().app_size:
            raise OSError(-ESP_ERR_INVALID_SIZE)
        return board().start(self.label) + at

    def readblocks(self, block, buf, offset=0):
        at = self._span(block, len(buf), offset)
        buf[:] = board().read(at, len(buf))

    def writeblocks(self, block, buf, offset=None):
        b = board()
        at = self._span(block, len(buf), 0 if offset is None else offset)
        torn = _step("writeblocks" if offset is None else "writeblocks+offset")
        if offset is None:
            # Without an offset the blocks written are erased first.
            b.erase(at, len(buf))
        if torn:
            b.program(at, memoryview(buf)[:len(buf) // 2])
            power.fail("writeblocks of %d bytes in %s" % (len(buf), self.label))
        b.program(at, buf)

    def ioctl(self, cmd, arg):
        if cmd == 4:
            return board().app_size // self.block_size
        if cmd == 5:
            return self.block_size
        if cmd == 6:
            at = self._span(arg, self.block_size, 0)
            if _step("erase"):
                board().fill(at, self.block_size // 2)
                power.fail("erase of block %d in %s" % (arg, self.label))
            board().erase(at, self.block_size)
            return 0
        if cmd in (1, 2, 3):
            return 0
        return None

    def set_boot(self):
        b = board()
        if not b.valid_image(self.label):
            raise OSError(-ESP_ERR_OTA_VALIDATE_FAILED)
        torn = _step("set_boot")
        b.ota["boot"] = self.label
        b.ota["states"][self.label] = "NEW"
        b.save()
        if torn:
            power.fail("set_boot of " + self.label)

    def get_next_update(self):
        return Partition(LABELS[1 - LABELS.index(self.label)], self.block_size)

    @staticmethod
    def mark_app_valid_cancel_rollback():
        b = board()
        torn = _step("mark_app_valid")
        b.ota["states"][b.ota["running"]] = "VALID"
        b.save()
        if torn:
            power.fail("mark_app_valid_cancel_rollback")
