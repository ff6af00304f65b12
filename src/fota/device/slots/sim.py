# The `sim` backend: a simulated NOR flash with the rules of the real thing.
#
# - erase works on whole sectors and sets every byte to the erased value (0xFF or 0x00);
# - a write must start and end on the write alignment and may only touch erased bytes
#   (NOR programming cannot set bits back: rewriting needs an erase first);
# - every erase and write is counted (`ops`); with a `Power` attached, power can be cut before
#   the Nth persistent operation of the device (flash and files counted together), or in its middle.
# The flash can be backed by a file so that a restarted device process finds its contents.
from fota.device import fsutil


class FlashError(Exception):
    pass


class PowerCut(BaseException):
    """A simulated power cut. A BaseException, so no `except Exception` in the device code can
    swallow it: a real cut stops the CPU wherever it is."""


def _weak(value, target):
    # A cell caught mid-change: half of its bits (the low nibble) reached `target`, the rest
    # kept `value`. Programming and erasing both move bits one way, so this is a state a torn
    # operation really leaves: neither the old byte nor the new one.
    return (target & 0x0F) | (value & 0xF0)


class Power:
    """The power supply of a simulated device: counts persistent operations (flash erase and
    write, file replace and remove; numbered from 1 over a whole run, across reboots) and cuts
    power before each operation whose number is in `cuts`. With `mid` the operation is torn
    instead: it starts, and power fails half-way (see SimFlash.erase/write, fsutil.write_json);
    `mid` may also be a collection of operation numbers: only those are torn, other cuts fall
    before their operation.
    `log` (a list, if set) gets one (kind, label()) entry per operation.
    Once cut, the power stays off (`down`) until the simulation powers the device on again:
    an operation attempted meanwhile (a `with` block closing a file while the cut unwinds)
    raises PowerCut without being counted or done."""

    def __init__(self, cuts=(), mid=False, log=None, label=None):
        self.ops = 0
        self.cuts = cuts
        self.mid = mid
        self.log = log
        self.label = label
        self.down = False

    def fail(self, what):
        """The torn operation's caller, once it left the operation half done."""
        self.down = True
        raise PowerCut("in the middle of " + what)

    def step(self, kind):
        """Called before an operation: raises PowerCut (cut before it), returns True (tear it:
        the caller leaves it half done, then calls fail()) or False (it completes)."""
        if self.down:
            raise PowerCut("no power (%s)" % kind)
        self.ops += 1
        if self.log is not None:
            self.log.append((kind, self.label() if self.label else None))
        if self.ops in self.cuts:
            self.down = True
            if self.mid is True or (self.mid and self.ops in self.mid):
                return True
            raise PowerCut("before operation %d (%s)" % (self.ops, kind))
        return False


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
        self.power = None  # a Power: counts operations and cuts power (simulation only)
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
        if self.power is not None and self.power.step("erase"):
            # Torn erase: the first half of the sector is erased, one alignment unit after it
            # is half erased, the rest keeps its old contents.
            half = start + self.sector // 2
            self._fill(start, half)
            old = self.read(half, self.align)
            self._store(half, bytes([_weak(b, self.erased) for b in old]))
            raise PowerCut("in the middle of erasing sector %d" % sector_index)
        self._fill(start, start + self.sector)

    def _fill(self, start, end):
        blank = bytes([self.erased]) * min(256, end - start)
        for at in range(start, end, len(blank)):
            self._store(at, blank[:end - at])  # never past `end`

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
        if self.power is not None and self.power.step("write"):
            # Torn write: the first half (whole alignment units) is programmed, the next unit
            # half programmed, the rest stays erased.
            done = (n // 2) - (n // 2) % self.align
            if done:
                self._store(offset, data[:done])
            self._store(offset + done, bytes([_weak(self.erased, b) for b in data[done:done + self.align]]))
            raise PowerCut("in the middle of writing %d bytes at %d" % (n, offset))
        self._store(offset, data)


class SimBackend:
    """Two image slots (a at 0, b at slot_size) on one SimFlash; sequential streaming writes.

    Whole alignment units are programmed as soon as they are complete; a partial unit at the
    end waits in RAM until more bytes come or finalize() pads it. Sectors are erased when the
    writes reach them, so nothing already programmed is ever erased again in a session.
    """
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
        self._kept_end = 0         # after resume(): replayed bytes below this are already on the flash
        self._bad = None           # a replayed byte differed from the flash: finalize() fails

    def _base(self, slot):
        return 0 if slot == "a" else self.slot_size

    def app_dir(self, slot):
        return None

    def _restart(self, at):
        self._tail = bytearray()
        self._tail_at = at
        self._erased_end = at      # sectors are erased as the writes reach them
        self._kept_end = at
        self._bad = None

    def begin(self, slot, size):
        if size > self.slot_size:
            raise FlashError("image larger than the slot")
        self._restart(self._base(slot))

    def resume(self, slot, offset):
        """After a restart: continue an image whose first `offset` bytes were flushed. Returns the
        offset writing really continues from: the start of the sector holding `offset`.

        Only whole sectors below `offset` are trusted. The sector holding it may hold a torn write
        or a torn erase, or bytes past `offset` programmed before the cut; NOR cannot program them
        again without erasing the sector, and erasing it would destroy its valid first part, which
        a second cut before it was written back would lose for good. So the sector is erased and
        written again from its first byte when the writes reach it. The caller sends the image
        again from a chunk boundary at or below the returned offset; replayed bytes below it are
        compared with the flash, not written."""
        at = self._base(slot) + offset
        start = at - at % self.flash.sector
        self._restart(start)
        return start - self._base(slot)

    def _program(self, at, data):
        end = at + len(data)
        while self._erased_end < end:
            self.flash.erase(self._erased_end // self.flash.sector)
            self._erased_end += self.flash.sector
        self.flash.write(at, data)

    def write(self, slot, offset, data):
        at = self._base(slot) + offset
        if at < self._kept_end:
            n = min(len(data), self._kept_end - at)
            if self.flash.read(at, n) != bytes(data[:n]) and self._bad is None:
                self._bad = "replayed bytes at %d differ from the flash" % (at - self._base(slot))
            data = data[n:]
            at += n
            if not data:
                return
        if at != self._tail_at + len(self._tail):
            raise FlashError("writes must be sequential")
        self._tail.extend(data)
        usable = len(self._tail) - len(self._tail) % self.flash.align
        if usable:
            self._program(self._tail_at, self._tail[:usable])
            self._tail = self._tail[usable:]
            self._tail_at += usable

    def flush(self, slot):
        # Whole units are already programmed (write() does it at once). A partial unit stays in
        # RAM: programming it padded would need an erase of its sector to continue it, and a
        # resume trusts only the sectors below the journal's offset anyway.
        pass

    def read(self, slot, offset, n):
        return self.flash.read(self._base(slot) + offset, n)

    def has_image(self, slot):
        return True  # the image stays in flash; the boot record says which one it is

    def finalize(self, slot, size, files=None, key=None, plain_size=None, sha256=None):
        if self._bad:
            raise FlashError(self._bad)
        if self._tail:
            pad = self.flash.align - len(self._tail)
            self._program(self._tail_at, bytes(self._tail) + bytes([self.flash.erased]) * pad)
            self._tail_at += len(self._tail)
            self._tail = bytearray()
