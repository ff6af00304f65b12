# Delta patch format 2 (docs/delta.md §5): the records of format 1 coded with an adaptive binary
# range coder (LZMA's scheme) and context models, decoded as the patch streams in.
#
# 32-bit MicroPython keeps ints below 2**30 unboxed: the range stays below 2**30 (RANGE_INIT) and
# probabilities are 12-bit, so range, code and bound = (range >> 12) * p are all small ints.
# RAM: the probability table (PROBS 16-bit entries, 7.7 KiB), the window (2**wbits bytes of the
# new image), the compressed input not yet used (a 512-byte buffer) and a 256-byte work buffer.
# The encoder is fota.server.delta_rc; it imports the layout below.
from array import array

try:
    from micropython import const
except ImportError:  # CPython
    def const(x):
        return x

PROB_BITS = const(12)
PROB_INIT = const(2048)          # p = P(bit is 0) in 1/4096ths
ADAPT_SHIFT = const(5)
RANGE_INIT = const(0x3FFFFFFF)
RANGE_TOP = const(0x400000)      # below 2**22 a byte is shifted in: range stays < 2**30

# A number (record field, match length or distance): its bit length n in a 6-bit tree, the
# TOP_BITS bits below the leading one in a tree per n, the rest as direct bits.
LEN_TREE_BITS = const(6)
TOP_BITS = const(2)
TOP_OFFSET = const(64)
TOP_STRIDE = const(4)
MAX_NUMBER_BITS = const(30)
NUMBER_SIZE = const(64 + 31 * 4)
FIELD_BASE = const(0)                         # copy, diff, extra, zigzag(seek)
FLAG_A = const(4 * NUMBER_SIZE)               # diff byte nonzero? by (out & 3, last 4 flags)
FLAG_B = const(FLAG_A + 64)                   # ... by (last 2 flags, old byte)
REP_BASE = const(FLAG_B + 1024)               # nonzero diff = last one in its lane? (lane, 2 hits)
VALUE_BASE = const(REP_BASE + 16)             # nonzero diff value: a bit tree per lane (out & 3)
EXTRA_CONTEXT_BITS = const(1)
EXTRA_BASE = const(VALUE_BASE + 4 * 256)      # extra byte: a bit tree per top bit of the last byte
MATCH_FLAG = const(EXTRA_BASE + (1 << EXTRA_CONTEXT_BITS) * 256)  # extra: match or literal? (after a match?)
REP_FLAG = const(MATCH_FLAG + 2)              # base match at the last base match's displacement?
WIN_FLAG = const(REP_FLAG + 1)                # if not: a match in the window (or in the base)?
MATCH_LEN = const(WIN_FLAG + 1)               # match length - MIN_MATCH (a number)
MATCH_DIST = const(MATCH_LEN + NUMBER_SIZE)   # base match: zigzag(source - predicted source)
WIN_DIST = const(MATCH_DIST + NUMBER_SIZE)    # window match: distance back - 1
MIN_MATCH = const(2)
PROBS = const(WIN_DIST + NUMBER_SIZE)

BUF = const(256)
# Compressed bytes that one unit of work may consume at most (one bit shifts in at most one byte):
# a record is 4 fields of at most 6 + 30 bits, a diff byte 10 bits, an extra byte 9, a match 2
# bits and 2 fields.
RECORD_IN = const(4 * (LEN_TREE_BITS + MAX_NUMBER_BITS))
BYTE_IN = const(10)
MATCH_IN = const(3 + 2 * (LEN_TREE_BITS + MAX_NUMBER_BITS))
LOW_WATER = const(RECORD_IN)


def adapt(p, b):
    """The probability after coding bit b with it (shared with the encoder)."""
    if b:
        return p - (p >> ADAPT_SHIFT)
    return p + ((4096 - p) >> ADAPT_SHIFT)


class Decoder:
    """The format-2 body: push() compressed bytes, step() decodes one unit of work.

    patcher supplies read_old(offset, n), _emit(buf, n), size and base_size and gets DeltaError
    raised through it. One instance per patch."""

    def __init__(self, patcher, in_buf, wbits, error):
        self.p = patcher
        self.win = bytearray(1 << wbits)   # the last 2**wbits bytes of the new image
        self.wmask = (1 << wbits) - 1
        self.error = error
        probs = array("H", range(PROBS))  # sized from the range's length: no temporary copy
        for i in range(PROBS):
            probs[i] = PROB_INIT
        self.probs = probs
        self.buf = bytearray(in_buf)
        self.start = 0
        self.end = 0
        self.work = bytearray(BUF)
        self.range = RANGE_INIT
        self.code = -1            # -1: the 5 opening bytes not read yet
        self.out = 0
        self.copy_left = 0
        self.diff_left = 0
        self.extra_left = 0
        self.seek = 0
        self.hist = 0             # last 4 diff flags (1: nonzero)
        self.last = bytearray(4)  # last nonzero diff per lane
        self.hits = bytearray(4)  # last 2 "same as last" outcomes per lane
        self.prev = 0             # last byte of the new image
        self.lastm = 0            # was the last extra item a match?
        self.disp = 0             # base position - new position of the last match
        self.match_src = 0        # base offset of a base match, or -distance of a window match
        self.match_left = 0

    # -- input

    def push(self, data):
        if self.start:
            n = self.end - self.start
            self.buf[:n] = memoryview(self.buf)[self.start:self.end]
            self.start, self.end = 0, n
        self.buf[self.end:self.end + len(data)] = data
        self.end += len(data)

    def available(self):
        return self.end - self.start

    def at_end(self):
        return self.code >= 0 and self.start == self.end

    def _byte(self):
        if self.start >= self.end:
            raise self.error("patch ends inside a symbol")
        b = self.buf[self.start]
        self.start += 1
        return b

    # -- output

    def _put(self, data, n):
        """n new-image bytes (n <= BUF <= window): into the window, then out."""
        at = self.out & self.wmask
        first = len(self.win) - at
        if first >= n:
            self.win[at:at + n] = memoryview(data)[:n]
        else:
            self.win[at:] = memoryview(data)[:first]
            self.win[:n - first] = memoryview(data)[first:n]
        self.prev = data[n - 1]
        self.p._emit(data, n)
        self.out += n

    # -- single bits (record fields)

    def _bit(self, i):
        probs = self.probs
        p = probs[i]
        bound = (self.range >> PROB_BITS) * p
        if self.code < bound:
            self.range = bound
            probs[i] = p + ((4096 - p) >> ADAPT_SHIFT)
            b = 0
        else:
            self.code -= bound
            self.range -= bound
            probs[i] = p - (p >> ADAPT_SHIFT)
            b = 1
        if self.range < RANGE_TOP:
            self.range <<= 8
            self.code = (self.code << 8) | self._byte()
        return b

    def _tree(self, base, nbits):
        m = 1
        for _ in range(nbits):
            m = (m << 1) | self._bit(base + m)
        return m - (1 << nbits)

    def _number(self, base):
        n = self._tree(base, LEN_TREE_BITS)
        if n <= 1:
            return n
        if n > MAX_NUMBER_BITS:
            raise self.error("record field of %d bits" % n)
        rest = n - 1
        hi = rest if rest < TOP_BITS else TOP_BITS
        v = (1 << hi) | self._tree(base + TOP_OFFSET + n * TOP_STRIDE, hi)
        for _ in range(rest - hi):
            self.range >>= 1
            if self.code >= self.range:
                self.code -= self.range
                v = (v << 1) | 1
            else:
                v <<= 1
            if self.range < RANGE_TOP:
                self.range <<= 8
                self.code = (self.code << 8) | self._byte()
        return v

    # -- work

    def step(self, final):
        """One unit of work; False when more input is needed first."""
        p = self.p
        avail = self.end - self.start
        if self.code < 0:
            if avail < 5 and not final:
                return False
            if self._byte():
                raise self.error("range coder: bad first byte")
            code = 0
            for _ in range(4):
                code = (code << 8) | self._byte()
            if code >= self.range:
                raise self.error("range coder: bad start")
            self.code = code
            return True
        if self.copy_left:
            n = self.copy_left if self.copy_left < BUF else BUF
            self._put(p._old(n), n)
            self.copy_left -= n
            return True
        if self.match_left:
            # Extra bytes found in the base image or the window: copied, nothing decoded.
            n = self.match_left if self.match_left < BUF else BUF
            src = self.match_src
            if src >= 0:
                data = p.read_old(src, n)
                if len(data) != n:
                    raise self.error("cannot read the base image at %d" % src)
                self.match_src += n
            else:  # -distance: never more than the bytes written since the match began
                data = self.work
                at = (self.out + src) & self.wmask
                first = len(self.win) - at
                if first >= n:
                    data[:n] = memoryview(self.win)[at:at + n]
                else:
                    data[:first] = memoryview(self.win)[at:]
                    data[first:n] = memoryview(self.win)[:n - first]
            self._put(data, n)
            self.match_left -= n
            return True
        if self.diff_left or self.extra_left:
            n = self.diff_left or self.extra_left
            if n > BUF:
                n = BUF
            if not final:
                fit = (avail - MATCH_IN) // BYTE_IN
                if fit < n:
                    if fit <= 0:
                        return False
                    n = fit
            if self.diff_left:
                self._diff(n)
                self.diff_left -= n
            else:
                n = self._extra(n)
                self.extra_left -= n + self.match_left
            if n:
                self._put(self.work, n)
            return True
        if not final and avail < LOW_WATER:
            return False
        return self._record()

    def _record(self):
        p = self.p
        p.old += self.seek
        self.seek = 0
        copy = self._number(FIELD_BASE)
        diff = self._number(FIELD_BASE + NUMBER_SIZE)
        extra = self._number(FIELD_BASE + 2 * NUMBER_SIZE)
        seek = self._number(FIELD_BASE + 3 * NUMBER_SIZE)
        seek = (seek >> 1) ^ -(seek & 1)
        if copy + diff + extra == 0 and seek == 0:
            raise self.error("empty record")
        if self.out + copy + diff + extra > p.size:
            raise self.error("record writes past the new image's %d bytes" % p.size)
        if p.old < 0 or p.old + copy + diff > p.base_size:
            raise self.error("record reads outside the base image")
        self.copy_left = copy
        self.diff_left = diff
        self.extra_left = extra
        self.seek = seek
        return True

    def _diff(self, n):
        old = self.p._old(n)
        probs = self.probs
        work = self.work
        last = self.last
        hits = self.hits
        buf = self.buf
        pos = self.start
        end = self.end
        rng = self.range
        code = self.code
        hist = self.hist
        out = self.out
        for i in range(n):
            o = old[i]
            ia = FLAG_A + ((out & 3) | ((hist & 15) << 2))
            ib = FLAG_B + (((hist & 3) << 8) | o)
            pa = probs[ia]
            pb = probs[ib]
            bound = (rng >> PROB_BITS) * ((pa + pb) >> 1)
            if code < bound:
                rng = bound
                probs[ia] = pa + ((4096 - pa) >> ADAPT_SHIFT)
                probs[ib] = pb + ((4096 - pb) >> ADAPT_SHIFT)
                nz = 0
            else:
                code -= bound
                rng -= bound
                probs[ia] = pa - (pa >> ADAPT_SHIFT)
                probs[ib] = pb - (pb >> ADAPT_SHIFT)
                nz = 1
            if rng < RANGE_TOP:
                if pos >= end:
                    raise self.error("patch ends inside a symbol")
                rng <<= 8
                code = (code << 8) | buf[pos]
                pos += 1
            d = 0
            if nz:
                lane = out & 3
                h = hits[lane]
                k = REP_BASE + (lane << 2) + h
                pr = probs[k]
                bound = (rng >> PROB_BITS) * pr
                if code < bound:
                    rng = bound
                    probs[k] = pr + ((4096 - pr) >> ADAPT_SHIFT)
                    hit = 0
                else:
                    code -= bound
                    rng -= bound
                    probs[k] = pr - (pr >> ADAPT_SHIFT)
                    hit = 1
                if rng < RANGE_TOP:
                    if pos >= end:
                        raise self.error("patch ends inside a symbol")
                    rng <<= 8
                    code = (code << 8) | buf[pos]
                    pos += 1
                if hit:
                    d = last[lane]
                else:
                    base = VALUE_BASE + (lane << 8)
                    m = 1
                    while m < 256:
                        pr = probs[base + m]
                        bound = (rng >> PROB_BITS) * pr
                        if code < bound:
                            rng = bound
                            probs[base + m] = pr + ((4096 - pr) >> ADAPT_SHIFT)
                            m <<= 1
                        else:
                            code -= bound
                            rng -= bound
                            probs[base + m] = pr - (pr >> ADAPT_SHIFT)
                            m = (m << 1) | 1
                        if rng < RANGE_TOP:
                            if pos >= end:
                                raise self.error("patch ends inside a symbol")
                            rng <<= 8
                            code = (code << 8) | buf[pos]
                            pos += 1
                    d = m & 0xFF
                    if not d:
                        raise self.error("diff value 0 coded as nonzero")
                hits[lane] = ((h << 1) | hit) & 3
                last[lane] = d
            hist = ((hist << 1) | nz) & 15
            out += 1
            work[i] = (o + d) & 0xFF
        self.start = pos
        self.range = rng
        self.code = code
        self.hist = hist

    def _extra(self, n):
        """Up to n extra bytes: literals into work; stops after a match is decoded (its source
        and length in match_src, match_left). The number of literals."""
        probs = self.probs
        work = self.work
        buf = self.buf
        pos = self.start
        end = self.end
        rng = self.range
        code = self.code
        prev = self.prev
        lastm = self.lastm
        i = 0
        while i < n:
            k = MATCH_FLAG + lastm
            pr = probs[k]
            bound = (rng >> PROB_BITS) * pr
            if code < bound:
                rng = bound
                probs[k] = pr + ((4096 - pr) >> ADAPT_SHIFT)
                lastm = 0
            else:
                code -= bound
                rng -= bound
                probs[k] = pr - (pr >> ADAPT_SHIFT)
                lastm = 1
            if rng < RANGE_TOP:
                if pos >= end:
                    raise self.error("patch ends inside a symbol")
                rng <<= 8
                code = (code << 8) | buf[pos]
                pos += 1
            if lastm:
                self.start = pos
                self.range = rng
                self.code = code
                self._match(self.out + i, self.extra_left - i)
                pos = self.start
                rng = self.range
                code = self.code
                break
            base = EXTRA_BASE + ((prev >> (8 - EXTRA_CONTEXT_BITS)) << 8)
            m = 1
            while m < 256:
                pr = probs[base + m]
                bound = (rng >> PROB_BITS) * pr
                if code < bound:
                    rng = bound
                    probs[base + m] = pr + ((4096 - pr) >> ADAPT_SHIFT)
                    m <<= 1
                else:
                    code -= bound
                    rng -= bound
                    probs[base + m] = pr - (pr >> ADAPT_SHIFT)
                    m = (m << 1) | 1
                if rng < RANGE_TOP:
                    if pos >= end:
                        raise self.error("patch ends inside a symbol")
                    rng <<= 8
                    code = (code << 8) | buf[pos]
                    pos += 1
            prev = m & 0xFF
            work[i] = prev
            i += 1
        self.lastm = lastm
        self.start = pos
        self.range = rng
        self.code = code
        return i

    def _match(self, at, room):
        """A match's fields, for the extra byte at new-image offset `at` with `room` extra bytes
        left: match_src its source (base offset, or -distance in the window), match_left its
        length."""
        rep = self._bit(REP_FLAG)
        win = 0 if rep else self._bit(WIN_FLAG)
        length = self._number(MATCH_LEN) + MIN_MATCH
        if length > room:
            raise self.error("match longer than the extra bytes")
        if win:
            dist = self._number(WIN_DIST) + 1
            if dist > at or dist > len(self.win) or length > dist:
                raise self.error("window match outside the window")
            self.match_src = -dist
        else:
            src = at + self.disp
            if not rep:
                d = self._number(MATCH_DIST)
                src += (d >> 1) ^ -(d & 1)
            if src < 0 or src + length > self.p.base_size:
                raise self.error("match outside the base image")
            self.disp = src - at
            self.match_src = src
        self.match_left = length
