# Streaming decoder of delta patches (docs/delta.md): fed the patch chunk by chunk as it arrives,
# it reads the old image by offset (the running slot) and emits the new image in order.
#
# RAM: the inflate window (2**wbits bytes), two small buffers and the compressed bytes not yet
# consumed (at most one chunk plus LOW_WATER). Neither image is ever held in memory.
# Runs on MicroPython (deflate.DeflateIO) and CPython (zlib) alike.
import gc
import struct
import hashlib
from binascii import hexlify

MAGIC = b"FOTD"
FORMAT = 1             # deflate-coded records (what the encoder makes unless told otherwise)
RC_FORMAT = 2          # range-coded records with matches (fota.device.delta_rc)
FORMATS = (1, 2)       # what this decoder reads: the device's inventory says so (delta_formats)
HEADER = ">4sBBI32sI32s"
HEADER_SIZE = 78
# A record is four LEB128 varints: copy, diff and extra lengths, and the zigzag-coded seek of
# the old position; then diff bytes and extra bytes (docs/delta.md).
RECORD_FIELDS = 4
MIN_WBITS = 9          # zlib cannot produce raw deflate with a smaller window
MAX_WBITS = 15


class DeltaError(Exception):
    pass


def parse_header(data):
    """The 78-byte header as a dict; DeltaError if it is not one."""
    if len(data) < HEADER_SIZE:
        raise DeltaError("patch shorter than its header")
    magic, fmt, wbits, base_size, base_sha, new_size, new_sha = struct.unpack_from(HEADER, data, 0)
    if magic != MAGIC:
        raise DeltaError("not a delta patch (bad magic)")
    if fmt not in FORMATS:
        raise DeltaError("patch format %d not supported" % fmt)
    if not MIN_WBITS <= wbits <= MAX_WBITS:
        raise DeltaError("window 2**%d outside 2**%d..2**%d" % (wbits, MIN_WBITS, MAX_WBITS))
    return {"format": fmt, "wbits": wbits, "base_size": base_size, "base_sha256": hexlify(base_sha).decode(),
            "size": new_size, "sha256": hexlify(new_sha).decode()}


# Heap a device's job still needs free once format 2's decoder holds its state: a status or
# inventory publish (a 200-450 byte packet), the journal, a read of the base image (a 256-byte
# bytes object). With less, the decoder would finish allocating and something else fail: a
# MemoryError outside the decoder restarts the agent, which resumes the job and fails again at
# every boot. Below it the patch fails (E_DELTA) and the device keeps its firmware.
MIN_FREE = 2048

IN_BUF = 1536  # compressed bytes buffered (fixed: no allocation per chunk)
RC_IN_BUF = 512  # format 2: its decoder waits for at most 144 bytes (a record), not a deflate block

try:
    import deflate
    import io

    class _Source(io.IOBase):
        # DeflateIO pulls compressed bytes from here (one byte per call); push() refills it.
        def __init__(self):
            self.buf = bytearray(IN_BUF)
            self.start = 0
            self.end = 0

        def push(self, data):
            if self.start:  # move what is left to the front
                n = self.end - self.start
                self.buf[:n] = memoryview(self.buf)[self.start:self.end]
                self.start, self.end = 0, n
            self.buf[self.end:self.end + len(data)] = data
            self.end += len(data)

        def readinto(self, b):
            n = min(len(b), self.end - self.start)
            if n == 1:
                b[0] = self.buf[self.start]
            elif n:
                b[:n] = memoryview(self.buf)[self.start:self.start + n]
            self.start += n
            return n

    class _Inflater:
        def __init__(self, wbits):
            self.src = _Source()
            self.d = deflate.DeflateIO(self.src, deflate.RAW, wbits)

        def push(self, data):
            self.src.push(data)

        def available(self):
            return self.src.end - self.src.start

        def readinto(self, mv):
            try:
                return self.d.readinto(mv)
            except (OSError, EOFError, ValueError) as e:
                raise DeltaError("corrupt compressed stream (%r)" % (e,))

        def at_end(self):
            # Past the last record the stream must end: nothing more inflates.
            try:
                return not self.d.read(1) and self.available() == 0
            except (OSError, EOFError, ValueError):
                return False

except ImportError:  # CPython
    import zlib

    class _Inflater:
        def __init__(self, wbits):
            self.d = zlib.decompressobj(-wbits)
            self.pending = b""

        def push(self, data):
            self.pending += bytes(data)

        def available(self):
            return len(self.pending)

        def readinto(self, mv):
            try:
                out = self.d.decompress(self.pending, len(mv))
            except zlib.error as e:
                raise DeltaError("corrupt compressed stream (%s)" % e)
            self.pending = self.d.unconsumed_tail
            mv[:len(out)] = out
            return len(out)

        def at_end(self):
            return self.d.eof and not self.d.unused_data and not self.pending


class Patcher:
    """Applies one patch as it streams in.

    read_old(offset, n) -> bytes of the base image; write_new(data) gets the new image in order.
    expect: the signed facts the patch must agree with: base_sha256, base_size, sha256, size
    (hex digests); max_wbits: the largest window this device accepts; min_free: heap (bytes,
    MicroPython) that must stay free beside format 2's decoder, else the patch fails.
    """

    BUF = 256
    # Compressed bytes kept back until the last chunk arrived, so that inflating BUF output
    # bytes never runs out of input mid-call: a deflate block header is at most ~300 bytes and
    # one output byte costs at most 2 input bytes.
    LOW_WATER = 2 * BUF + 512

    def __init__(self, read_old, write_new, patch_size, expect, max_wbits=MAX_WBITS, min_free=0):
        self.read_old = read_old
        self.write_new = write_new
        self.patch_size = patch_size
        self.expect = expect
        self.max_wbits = max_wbits
        self.received = 0
        self.header = bytearray()
        self.inflater = None      # format 1: _Inflater; format 2: delta_rc.Decoder
        self.rc = None
        self.in_buf = IN_BUF      # compressed bytes the decoder buffers at most
        self.hasher = hashlib.sha256()
        self.out = 0              # new-image bytes written
        self.old = 0              # position in the old image
        self.copy_left = 0
        self.diff_left = 0
        self.extra_left = 0
        self.seek = 0
        self.fields = []          # record fields decoded so far
        self.value = 0            # the varint being decoded
        self.shift = 0
        self.one = bytearray(1)
        self.buf = bytearray(self.BUF)
        self.error = None
        self.min_free = min_free
        wbits = expect.get("wbits", 0)
        if expect.get("format") == RC_FORMAT and MIN_WBITS <= wbits <= max_wbits:
            # Format 2's state (7.7 KiB at 2**10: 13 tables, the window, two buffers) is taken
            # now, when the job begins, from the command's signed format and window (the header
            # must agree), not when the header arrives: by then the job's statuses, journal and
            # first chunks have left the free heap in holes too small for its tables
            # (docs/heap.md, "Delta update").
            try:
                self._decoder(wbits)
            except MemoryError as e:  # kept: the patch fails with it (E_DELTA at the install)
                self.error = "MemoryError: %s" % e

    def feed(self, data):
        """More patch bytes; DeltaError if they cannot be part of a valid patch."""
        if self.error:
            raise DeltaError(self.error)
        try:
            self._feed(data)
        except DeltaError as e:
            self.error = str(e)
            raise
        except Exception as e:  # e.g. the base cannot be read: the patch cannot be applied
            self.error = "%s: %s" % (type(e).__name__, e)
            raise DeltaError(self.error)

    def _feed(self, data):
        if self.received + len(data) > self.patch_size:
            raise DeltaError("patch longer than its %d bytes" % self.patch_size)
        mv = memoryview(data)
        if self.inflater is None:
            need = HEADER_SIZE - len(self.header)
            self.header.extend(mv[:need])
            self.received += min(need, len(mv))
            if len(self.header) < HEADER_SIZE:
                return
            self._start(parse_header(self.header))
            mv = mv[need:]
        while len(mv):
            take = min(self.in_buf - self.inflater.available(), len(mv))
            if not take:
                raise DeltaError("data after the last record")
            self.inflater.push(mv[:take])
            self.received += take
            mv = mv[take:]
            self._run()
        if self.received == self.patch_size:
            self._run()
            if self.out < self.size:
                raise DeltaError("patch ends after %d of %d bytes" % (self.out, self.size))

    def _run(self):
        final = self.received == self.patch_size
        if self.rc:
            step = self.rc.step
            while self.out < self.size and step(final):
                pass
            return
        while self.out < self.size and (final or self.inflater.available() > self.LOW_WATER):
            if not self._step():
                break

    def _start(self, h):
        e = self.expect
        if h["base_sha256"] != e["base_sha256"] or h["base_size"] != e["base_size"]:
            raise DeltaError("patch applies to base %s, not %s" % (h["base_sha256"][:16], e["base_sha256"][:16]))
        if h["sha256"] != e["sha256"] or h["size"] != e["size"]:
            raise DeltaError("patch produces %s, the manifest says %s" % (h["sha256"][:16], e["sha256"][:16]))
        if h["format"] != e.get("format", h["format"]):
            raise DeltaError("patch format %d, the command says %d" % (h["format"], e["format"]))
        if h["wbits"] > self.max_wbits:
            raise DeltaError("window 2**%d exceeds this device's 2**%d" % (h["wbits"], self.max_wbits))
        if h["wbits"] != e.get("wbits", h["wbits"]):
            raise DeltaError("window 2**%d, the command says 2**%d" % (h["wbits"], e["wbits"]))
        self.size = h["size"]
        self.base_size = h["base_size"]
        if h["format"] == RC_FORMAT:
            if self.rc is None:
                self._decoder(h["wbits"])
            self.inflater = self.rc
        else:
            gc.collect()  # the inflate window is the one large allocation
            self.inflater = _Inflater(h["wbits"])

    def _decoder(self, wbits):
        gc.collect()  # the decoder's state is the one large allocation
        from fota.device.delta_rc import Decoder
        self.in_buf = RC_IN_BUF
        self.rc = Decoder(self, RC_IN_BUF, wbits, DeltaError)
        mem_free = getattr(gc, "mem_free", None)  # MicroPython only
        if self.min_free and mem_free:
            gc.collect()
            free = mem_free()
            if free < self.min_free:
                self.rc = None
                raise MemoryError("%d bytes of heap left beside the decoder, %d needed" % (free, self.min_free))

    def _inflate(self, n):
        """Up to n (> 0) decompressed bytes into self.buf; 0 means the stream ran dry."""
        return self.inflater.readinto(memoryview(self.buf)[:n])

    def _step(self):
        """One unit of work; False when the compressed input ran out."""
        if self.copy_left:
            # Unchanged bytes: straight from the old image, nothing inflated.
            n = min(self.copy_left, self.BUF)
            self._emit(self._old(n), n)
            self.copy_left -= n
            return True
        if self.diff_left:
            n = self._inflate(min(self.diff_left, self.BUF))
            if not n:
                return False
            old = self._old(n)
            buf = self.buf
            for i in range(n):
                buf[i] = (old[i] + buf[i]) & 0xFF
            self._emit(buf, n)
            self.diff_left -= n
            return True
        if self.extra_left:
            n = self._inflate(min(self.extra_left, self.BUF))
            if not n:
                return False
            self._emit(self.buf, n)
            self.extra_left -= n
            return True
        return self._record_byte()

    def _old(self, n):
        data = self.read_old(self.old, n)
        if len(data) != n:
            raise DeltaError("cannot read the base image at %d" % self.old)
        self.old += n
        return data

    def _record_byte(self):
        # The previous record is done: move in the old image, then decode the next record's
        # varints a byte at a time.
        self.old += self.seek
        self.seek = 0
        if not self.inflater.readinto(self.one):
            return False
        b = self.one[0]
        self.value |= (b & 0x7F) << self.shift
        self.shift += 7
        if b & 0x80:
            if self.shift >= 35:
                raise DeltaError("record field longer than 5 bytes")
            return True
        self.fields.append(self.value)
        self.value = 0
        self.shift = 0
        if len(self.fields) < RECORD_FIELDS:
            return True
        copy, diff, extra, seek = self.fields
        self.fields = []
        seek = (seek >> 1) ^ -(seek & 1)  # zigzag
        if copy + diff + extra == 0 and seek == 0:
            raise DeltaError("empty record")
        if self.out + copy + diff + extra > self.size:
            raise DeltaError("record writes past the new image's %d bytes" % self.size)
        if self.old < 0 or self.old + copy + diff > self.base_size:
            raise DeltaError("record reads outside the base image")
        self.copy_left = copy
        self.diff_left = diff
        self.extra_left = extra
        self.seek = seek  # applied once copy and diff are done
        return True

    def _emit(self, buf, n):
        data = memoryview(buf)[:n]
        self.hasher.update(data)
        self.write_new(data)
        self.out += n

    def finish(self):
        """After the last byte: DeltaError unless the output is complete and matches the header."""
        if self.error:
            raise DeltaError(self.error)
        if self.inflater is None or self.out != self.size or self.received != self.patch_size:
            raise DeltaError("patch incomplete (%d of %d bytes out)" % (self.out, getattr(self, "size", 0)))
        if not self.inflater.at_end():
            raise DeltaError("data after the last record")
        digest = hexlify(self.hasher.digest()).decode()
        if digest != self.expect["sha256"]:
            raise DeltaError("patched image sha256 %s does not match %s" % (digest, self.expect["sha256"]))
        return digest
