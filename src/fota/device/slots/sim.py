# The `sim` backend: a simulated NOR flash with the rules of the real thing.
#
# - erase works on whole sectors and sets every byte to the erased value (0xFF or 0x00);
# - a write must start and end on the write alignment and may only touch erased bytes
#   (NOR programming cannot set bits back: rewriting needs an erase first);
# - every erase and write is counted (`ops`), so tests can cut power before the Nth operation.
# The flash can be backed by a file so that a restarted device process finds its contents.
from fota.device import fsutil


class FlashError(Exception):
    pass


class SimFlash:
    """NOR flash model. With `path` the contents live in that file (never all in RAM, so a
    flash larger than the heap works on MicroPython); without, in a bytearray (`mem`)."""

    def __init__(self, size, sector=4096, align=4, erased=0xFF, path=None):
        if size % sector:
            raise ValueError("size must be a multiple of the sector size")
        self.size = size
        self.sector = sector
        self.align = align
        self.erased = erased
        self.path = path
        self.ops = 0
        self.mem = None
        self._f = None
        if path is None:
            self.mem = bytearray(bytes([erased]) * size)
            return
        if fsutil.exists(path):
            self._f = open(path, "r+b")
            self._f.seek(0, 2)
            if self._f.tell() != size:
                self._f.close()
                raise FlashError("flash file has the wrong size")
        else:
            self._f = open(path, "w+b")
            blank = bytes([erased]) * 256
            for _ in range(size // 256):
                self._f.write(blank)
            self._f.write(blank[:size % 256])
            self._f.flush()

    def close(self):
        if self._f is not None:
            self._f.close()
            self._f = None

    def read(self, offset, n):
        if self.mem is not None:
            return bytes(self.mem[offset:offset + n])
        self._f.seek(offset)
        return self._f.read(n)

    def _store(self, offset, data):
        if self.mem is not None:
            self.mem[offset:offset + len(data)] = data
        else:
            self._f.seek(offset)
            self._f.write(data)
            self._f.flush()

    def erase(self, sector_index):
        start = sector_index * self.sector
        if not 0 <= start < self.size:
            raise FlashError("erase of sector %d outside the flash" % sector_index)
        self.ops += 1
        blank = bytes([self.erased]) * min(256, self.sector)
        for at in range(start, start + self.sector, len(blank)):
            self._store(at, blank[:start + self.sector - at])  # never past the sector

    def write(self, offset, data):
        n = len(data)
        if offset % self.align or n % self.align:
            raise FlashError("write at %d of %d bytes is not %d-aligned" % (offset, n, self.align))
        if offset < 0 or offset + n > self.size:
            raise FlashError("write outside the flash")
        current = self.read(offset, n)
        for i in range(n):
            if current[i] != self.erased:
                raise FlashError("write to non-erased byte at %d" % (offset + i))
        self.ops += 1
        self._store(offset, data)


class SimBackend:
    """Two image slots (a at 0, b at slot_size) on one SimFlash; sequential streaming writes."""
    KINDS = ("image",)

    def __init__(self, flash, slot_size):
        if slot_size % flash.sector:
            raise ValueError("slot size must be a multiple of the sector size")
        self.flash = flash
        self.slot_size = slot_size
        self.capacity = slot_size
        self._tail = bytearray()   # bytes waiting for a full alignment unit
        self._tail_at = 0          # flash offset of the first tail byte
        self._erased_end = 0       # flash offset up to which this session erased
        self._reopen_at = None     # set when flush() programmed a padded partial unit

    def _base(self, slot):
        return 0 if slot == "a" else self.slot_size

    def app_dir(self, slot):
        return None

    def begin(self, slot, size):
        if size > self.slot_size:
            raise FlashError("image larger than the slot")
        base = self._base(slot)
        self._tail = bytearray()
        self._tail_at = base
        self._erased_end = base  # sectors are erased as the writes reach them
        self._reopen_at = None

    def resume(self, slot, offset):
        # The sector holding `offset` may already be partly programmed past it: keep its valid
        # prefix, erase it, and write the prefix back so writing can continue at `offset`.
        at = self._base(slot) + offset
        sector_start = at - at % self.flash.sector
        aligned = at - at % self.flash.align
        prefix = self.flash.read(sector_start, aligned - sector_start)
        partial = self.flash.read(aligned, at - aligned)
        self.flash.erase(sector_start // self.flash.sector)
        if prefix:
            self.flash.write(sector_start, prefix)
        self._erased_end = sector_start + self.flash.sector
        self._tail = bytearray(partial)
        self._tail_at = aligned

    def _program(self, at, data):
        end = at + len(data)
        while self._erased_end < end:
            self.flash.erase(self._erased_end // self.flash.sector)
            self._erased_end += self.flash.sector
        self.flash.write(at, data)

    def write(self, slot, offset, data):
        at = self._base(slot) + offset
        if self._reopen_at is not None:
            if at != self._reopen_at:
                raise FlashError("writes must be sequential")
            self._reopen_at = None
            self.resume(slot, offset)
        if at != self._tail_at + len(self._tail):
            raise FlashError("writes must be sequential")
        self._tail.extend(data)
        usable = len(self._tail) - len(self._tail) % self.flash.align
        if usable:
            self._program(self._tail_at, self._tail[:usable])
            self._tail = self._tail[usable:]
            self._tail_at += usable

    def flush(self, slot):
        # A partial alignment unit is programmed padded with the erased value; a later write
        # that continues inside it re-opens its sector first (see resume()).
        if self._tail:
            pad = self.flash.align - len(self._tail)
            self._program(self._tail_at, bytes(self._tail) + bytes([self.flash.erased]) * pad)
            self._reopen_at = self._tail_at + len(self._tail)
            self._tail = bytearray()

    def read(self, slot, offset, n):
        return self.flash.read(self._base(slot) + offset, n)

    def has_image(self, slot):
        return True  # the image stays in flash; the boot record says which one it is

    def finalize(self, slot, size, files=None, key=None, plain_size=None):
        self.flush(slot)
