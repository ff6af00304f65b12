# The `esp32` backend: whole firmware images in the ESP32's OTA app partitions, through
# MicroPython's `esp32.Partition` (an OTA-variant build such as ESP32_GENERIC-OTA: two app
# partitions ota_0 and ota_1). Slot "a" is ota_0, slot "b" is ota_1; the slot written is always
# the next update partition of the running one, never the running one.
#
# Rollback is the bootloader's (CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE): set_boot() marks the new
# image NEW, its first boot makes it PENDING_VERIFY, and a reset before confirm() (which marks it
# valid) makes the bootloader abandon it and boot the previous app.
import hashlib
from binascii import unhexlify

from esp32 import Partition

BLOCK = 4096          # flash sector: the erase unit, and the unit this backend programs
HASH_STEP = 16384     # bytes read back and hashed between two yields of finalize_steps
LABELS = {"a": "ota_0", "b": "ota_1"}
# The chip id field of the ESP app image header (esp_chip_id_t)
CHIP_IDS = {"esp32": 0x0000, "esp32s2": 0x0002, "esp32c3": 0x0005, "esp32s3": 0x0009,
            "esp32c2": 0x000C, "esp32c6": 0x000D, "esp32h2": 0x0010}


class ImageError(Exception):
    pass


def running_slot():
    """The fota slot ("a"/"b") of the partition that runs now."""
    label = Partition(Partition.RUNNING).info()[4]
    for slot in LABELS:
        if LABELS[slot] == label:
            return slot
    raise ImageError("running from %s, not an OTA partition" % label)


class Esp32Backend:
    """Writes are gathered into whole blocks; each full block is written with the 2-argument
    writeblocks(), which erases the block first. A partial block stays in RAM until it is full
    or finalize() pads it, so resume() continues from the start of the block holding its offset.

    One 4096-byte buffer, allocated once, holds the block being filled (and, at finalize, each
    piece read back for the hash): a board's heap is small, and a new 4 KiB buffer per block
    fragments it until no free run of 4 KiB is left (MemoryError in the middle of a download).
    """
    KINDS = ("image",)

    def __init__(self, chip_id=0):
        self.chip_id = chip_id
        self.capacity = min(Partition(LABELS[s]).info()[3] for s in LABELS)
        self._block = bytearray(BLOCK)
        self._view = memoryview(self._block)
        self._restart(None, 0)

    def _restart(self, part, at):
        self._part = part
        self._fill = 0             # bytes of the block buffer that hold data
        self._block_at = at        # slot offset of the block being filled (block aligned)
        self._kept_end = at        # after resume(): replayed bytes below this are on the flash
        self._bad = None           # a replayed byte differed from the flash: finalize() fails

    def _target(self, slot):
        part = Partition(LABELS[slot])
        nxt = Partition(Partition.RUNNING).get_next_update()
        if part.info()[4] != nxt.info()[4]:
            raise ImageError("slot %s (%s) is not the next update partition" % (slot, LABELS[slot]))
        return part

    def app_dir(self, slot):
        return None

    def begin(self, slot, size):
        part = self._target(slot)
        if size > part.info()[3]:
            raise ImageError("image larger than the partition")
        self._restart(part, 0)

    def resume(self, slot, offset):
        """Only whole blocks below `offset` are trusted: the block holding it is written again
        from its first byte."""
        start = offset - offset % BLOCK
        self._restart(self._target(slot), start)
        return start

    def write(self, slot, offset, data):
        data = memoryview(data)    # slices of a memoryview copy nothing
        if offset < self._kept_end:
            n = min(len(data), self._kept_end - offset)
            self._check_replay(offset, data[:n])
            data = data[n:]
            offset += n
            if not data:
                return
        if offset != self._block_at + self._fill:
            raise ImageError("writes must be sequential")
        done = 0
        while done < len(data):
            n = min(BLOCK - self._fill, len(data) - done)
            self._view[self._fill:self._fill + n] = data[done:done + n]
            self._fill += n
            done += n
            if self._fill == BLOCK:
                self._program()

    def _check_replay(self, offset, data):
        # Bytes sent again below the resumed block: already on the flash, compared, not written.
        # The block buffer is empty meanwhile (nothing is buffered below _kept_end).
        done = 0
        while done < len(data) and self._bad is None:
            n = min(BLOCK, len(data) - done)
            at = offset + done
            piece = self._view[:n]
            self._part.readblocks(at // BLOCK, piece, at % BLOCK)
            if piece != data[done:done + n]:
                self._bad = "replayed bytes at %d differ from the flash" % at
            done += n

    def _program(self):
        self._part.writeblocks(self._block_at // BLOCK, self._block)  # erases the block, then writes
        self._block_at += BLOCK
        self._fill = 0

    def flush(self, slot):
        # Whole blocks are written as soon as they are full; a resume trusts only those.
        pass

    def read(self, slot, offset, n):
        buf = bytearray(n)
        Partition(LABELS[slot]).readblocks(offset // BLOCK, buf, offset % BLOCK)
        return buf

    def has_image(self, slot):
        return True  # the image stays in its partition; the boot record says which one it is

    def finalize(self, slot, size, files=None, key=None, plain_size=None, sha256=None):
        for _ in self.finalize_steps(slot, size, files, key, plain_size, sha256):
            pass

    def _pad(self):
        # The rest of the last block erased (0xFF), in place: one byte set, then the filled run
        # copied after itself, doubling (no buffer of padding allocated).
        view = self._view
        at = self._fill
        view[at] = 0xFF
        k = 1
        while at + k < BLOCK:
            n = min(k, BLOCK - at - k)
            view[at + k:at + k + n] = view[at:at + n]
            k += n
        self._fill = BLOCK

    def finalize_steps(self, slot, size, files=None, key=None, plain_size=None, sha256=None):
        # finalize() as a generator: the read-back hash yields every HASH_STEP bytes, so that a
        # runner checks a 1.5 MiB image in bounded steps. sha256: the manifest's, of the image.
        # The core checked the streamed bytes against it; here the flash is read back and checked
        # against it too, before set_boot().
        if key is not None:
            raise ImageError("encrypted firmware images are not supported")
        if self._bad:
            raise ImageError(self._bad)
        if self._block_at + self._fill != size:
            raise ImageError("%d bytes written, the image has %d" % (self._block_at + self._fill, size))
        if self._fill:
            self._pad()
            self._program()
        part = Partition(LABELS[slot])
        view = self._view          # the block buffer is free now: it takes the read-back pieces
        part.readblocks(0, view[:24])
        if size < 24 or view[0] != 0xE9:
            raise ImageError("not an ESP app image (magic byte %d)" % view[0])
        chip = view[12] | (view[13] << 8)
        if chip != self.chip_id:
            raise ImageError("image for chip id %d, this board is %d" % (chip, self.chip_id))
        h = hashlib.sha256()
        done = since = 0
        while done < size:
            n = min(BLOCK, size - done)
            piece = view[:n]
            part.readblocks(done // BLOCK, piece)
            h.update(piece)
            done += n
            since += n
            if since >= HASH_STEP:
                since = 0
                yield
        if sha256 is None or h.digest() != unhexlify(sha256):
            raise ImageError("the flash does not hold the image written")
        self._target(slot).set_boot()  # OSError if ESP-IDF's own image check fails

    def booted_slot(self):
        """The slot the bootloader started (after its rollback, if any): the boot record follows
        it. None when it runs no OTA partition (a factory app): the agent still starts, and an
        install fails with a status instead (_target)."""
        try:
            return running_slot()
        except ImageError:
            return None

    def confirm(self):
        """The running app passed its health check: cancel the bootloader's rollback."""
        Partition.mark_app_valid_cancel_rollback()
