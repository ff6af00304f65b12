# The boards of the power-cut harness (fota.powercut.harness): what each slot backend adds to
# the device, how a power-on starts it, and how the harness checks what a slot holds. MicroPython
# and CPython.
#
# The esp32 world imports the module `esp32` as the agent does: on a development machine the
# emulation in fota.testkit.boards (esp32.py), whose directory the caller (bench/powercut.py, the
# tests) puts on the import path; fota itself never imports the test kit.
import os
import hashlib
from binascii import hexlify

from fota.device import fsutil


def _sha_file(path, size=None):
    h = hashlib.sha256()
    done = 0
    with open(path, "rb") as f:
        while size is None or done < size:
            piece = f.read(1024 if size is None else min(1024, size - done))
            if not piece:
                break
            h.update(piece)
            done += len(piece)
    return hexlify(h.digest()).decode()


class Bricked(Exception):
    """The board cannot start a verified image (the bootloader found none, or runs a corrupt one)."""


# ---- worlds: what each slot backend's board adds ----------------------------------------------

class SimWorld:
    """The `sim` backend: a NOR flash file (flash.bin), slot a at 0, slot b at slot_size."""
    bootloader = False  # the agent picks the slot from its boot record

    def __init__(self, run):
        self.run = run

    def power_on(self):
        pass

    def attach(self, dev):
        dev.backend.flash.power = self.run.power

    def app_loader(self):
        return None

    def holds(self, dev, slot, version):
        """True if `slot` holds exactly the image of `version`."""
        s = self.run.s
        known = s.images.get(version)
        if not known:
            return False
        return _sha_backend(dev.backend, slot, known[0]) == known[1]

    def release(self, dev):
        dev.backend.flash.close()

    def check_end(self, dev, record):
        return []


def _sha_backend(backend, slot, size):
    h = hashlib.sha256()
    done = 0
    while done < size:
        piece = backend.read(slot, done, min(1024, size - done))
        if not piece:
            return None
        h.update(piece)
        done += len(piece)
    return hexlify(h.digest()).decode()


class Esp32World(SimWorld):
    """The `esp32` backend on the board's `esp32` module: the bootloader runs at every power-on
    (esp32.reset: NEW -> PENDING_VERIFY, PENDING_VERIFY -> ABORTED and the previous app)."""
    bootloader = True
    LABELS = {"a": "ota_0", "b": "ota_1"}
    BOOTABLE = ("VALID", "UNDEFINED", "PENDING_VERIFY")

    def __init__(self, run):
        SimWorld.__init__(self, run)
        import esp32  # the board module: the emulation (fota.testkit.boards) on a development machine
        self.esp32 = esp32
        self.running = None

    def _slot_of(self, label):
        return "a" if label == "ota_0" else "b"

    def power_on(self):
        esp32 = self.esp32
        board = self.run.s.board
        esp32.power = None  # the bootloader's own OTA data writes are not the device's operations
        esp32.setup(self.run.root + "/flash.bin", app_size=board["app_size"], chip_id=board["chip_id"])
        try:
            label = esp32.reset()
        except OSError as e:
            raise Bricked("the bootloader found no app to run (%s)" % e)
        self.running = self._slot_of(label)
        state = esp32.state(label)
        if state not in self.BOOTABLE:
            raise Bricked("the bootloader started %s in state %s" % (label, state))
        if self._version_in(self.running) is None:
            raise Bricked("the bootloader started %s, which holds no known image" % label)
        esp32.power = self.run.power

    def _holds(self, slot, version):
        known = self.run.s.images.get(version)
        if not known:
            return False
        part = self.esp32.Partition(self.LABELS[slot])
        h = hashlib.sha256()
        buf = bytearray(1024)
        done = 0
        while done < known[0]:
            n = min(1024, known[0] - done)
            if n < len(buf):
                buf = bytearray(n)
            part.readblocks(done // 4096, buf, done % 4096)
            h.update(buf)
            done += n
        return hexlify(h.digest()).decode() == known[1]

    def _version_in(self, slot):
        for version in self.run.s.images:
            if self._holds(slot, version):
                return version
        return None

    def attach(self, dev):
        pass

    def holds(self, dev, slot, version):
        return self._holds(slot, version)

    def release(self, dev):
        pass

    def check_end(self, dev, record):
        # The image the record runs must be committed with the bootloader: booted by it, and
        # valid (or flashed as is), or the next reset would roll it back.
        esp32 = self.esp32
        label = esp32.Partition(esp32.Partition.BOOT).info()[4]
        problems = []
        if self._slot_of(label) != record.get("active"):
            problems.append("the bootloader boots %s, the record says slot %s" % (label, record.get("active")))
        if esp32.state(label) not in ("VALID", "UNDEFINED"):
            problems.append("%s is %s at the end: the next reset rolls it back" % (label, esp32.state(label)))
        return problems


class FilesWorld(SimWorld):
    """The `files` backend: each slot an app directory (slots/x/app) and the bundle it was
    unpacked from (slots/x/image.bin, the base of a delta)."""

    def attach(self, dev):
        pass

    def app_loader(self):
        world = self

        def load(app_dir):
            # Stands in for importing the app: it starts only if its files are one release's.
            version = world._version_in(app_dir)
            if version is None:
                raise ImportError("the app in %s is no release's" % app_dir)
            return _App(version)
        return load

    def _version_in(self, app_dir):
        for version in self.run.s.files:
            want = self.run.s.files[version]
            try:
                names = os.listdir(app_dir)
            except OSError:
                return None
            if sorted(names) != sorted(want):
                continue
            if all(fsutil.exists(app_dir + "/" + n) and _sha_file(app_dir + "/" + n) == want[n] for n in want):
                return version
        return None

    def holds(self, dev, slot, version):
        return version is not None and self._version_in(dev.backend.app_dir(slot)) == version

    def release(self, dev):
        dev.backend.close()  # runner.main closes the slot files before a reset

    def check_end(self, dev, record):
        problems = []
        for slot, image in (record.get("images") or {}).items():
            path = dev.backend.root + "/" + slot + "/image.bin"
            if image and (not fsutil.exists(path) or _sha_file(path) != image["sha256"]):
                problems.append("the record names the image of slot %s (a delta base), the slot does not hold it" % slot)
        return problems


class _App:
    def __init__(self, version):
        self.VERSION = version


WORLDS = {"sim": SimWorld, "esp32": Esp32World, "files": FilesWorld}
