# Delta patch format 2 (docs/delta.md §5): the records of format 1 coded with an adaptive binary
# range coder (LZMA's scheme) and context models, decoded as the patch streams in.
#
# 32-bit MicroPython keeps ints below 2**30 unboxed: the range stays below 2**30 (_RANGE_INIT) and
# probabilities are 12-bit, so range, code and bound = (range >> 12) * p are all small ints.
# RAM: the probability tables (2,709 16-bit entries, 5.3 KiB, in 13 arrays of at most 1 KiB:
# a board's fragmented heap has room for those where one 5.3 KiB block may not), the window
# (2**wbits bytes of the new image), the compressed input not yet used (a 512-byte buffer) and a 256-byte
# work buffer.
# The encoder is fota.server.delta_rc; it imports the layout below (the names start with "_" so
# that MicroPython inlines them and keeps no module attribute for them: heap on a board).
from array import array

try:
    from micropython import const
except ImportError:  # CPython
    def const(x):
        return x

_PROB_BITS = const(12)
_PROB_INIT = const(2048)          # p = P(bit is 0) in 1/4096ths
_ADAPT_SHIFT = const(4)           # how fast a probability adapts: by 1/16 of the way
_DIFF_SHIFT = const(3)            # ... diff flags and values: by 1/8 (they change faster)
# Probabilities move towards _PROB_LO..PROB_HI and never leave it: with p >= 16 a bit leaves the
# range >= (2**22 >> 12) * 16 = 2**14, so one byte shifted in brings it back to >= 2**22.
_PROB_LO = const(16)
_PROB_HI = const(4096 - 16)
_RANGE_INIT = const(0x3FFFFFFF)
_RANGE_TOP = const(0x400000)      # below 2**22 a byte is shifted in: range stays < 2**30

# A number (record field, match length or distance): its bit length n (at most 30) in a 6-bit
# tree, the _TOP_BITS bits below the leading one in a tree per n, the rest as direct bits. Only
# the entries a valid number reaches are stored: the tree's top bit (n >= 32) at 0 (always 0),
# the 5-bit tree below it at 1..31, the tree of length n (1 entry for n = 2, 3 for n >= 3) at
# _TOP_OFFSET + n * _TOP_STRIDE + 1..3, n = 2..30 at 32..118.
_LEN_TREE_BITS = const(5)
_TOP_BITS = const(2)
_TOP_OFFSET = const(25)
_TOP_STRIDE = const(3)
_MAX_NUMBER_BITS = const(30)
_NUMBER_SIZE = const(119)
# Seven number models, each its own table: record fields copy, diff, extra, zigzag(seek); match
# length - _MIN_MATCH; base match zigzag(source - predicted source); window distance - 1.
_COPY = const(0)
_DIFF = const(1)
_EXTRA = const(2)
_SEEK = const(3)
_MATCH_LEN = const(4)
_MATCH_DIST = const(5)
_WIN_DIST = const(6)
_NUMBERS = const(7)
_MIN_MATCH = const(2)
# The diff table: is a diff byte nonzero? (mixed from two contexts), is a nonzero one the last
# of its lane? Then the values table: a bit tree per lane (out & 3).
_FLAG_A = const(0)                 # by (out & 3, last 4 flags)
_FLAG_B = const(64)                # by (last flag, old byte >> 1)
_REP_BASE = const(320)             # by (lane, its last 2 hits)
_DIFF_SIZE = const(336)
_VALUES_SIZE = const(4 * 256)
# The literals table: a bit tree per top bit of the last byte, then the match flags.
_LIT_MATCH = const(512)            # match or literal? by lastm (the last extra item was a match)
_LIT_REP = const(514)              # base match at the last base match's displacement?
_LIT_WIN = const(515)              # if not: a match in the window (1) or in the base (0)?
_LITS_SIZE = const(516)

_BUF = const(256)
# Compressed bytes that one unit of work may consume at most (one bit shifts in at most one byte):
# a record is 4 fields of at most 6 + 30 bits, a diff byte 10 bits, an extra byte 9, a match 2
# bits and 2 fields.
_RECORD_IN = const(4 * (1 + _LEN_TREE_BITS + _MAX_NUMBER_BITS))
_BYTE_IN = const(10)
_MATCH_IN = const(3 + 2 * (1 + _LEN_TREE_BITS + _MAX_NUMBER_BITS))
_LOW_WATER = const(_RECORD_IN)


def _table(n):
    """n probabilities at _PROB_INIT; sized from the range's length, so no temporary copy."""
    t = array("H", range(n))
    for i in range(n):
        t[i] = _PROB_INIT
    return t


def adapt(p, b, shift=_ADAPT_SHIFT):
    """The probability after coding bit b with it (shared with the encoder)."""
    if b:
        return p - ((p - _PROB_LO) >> shift)
    return p + ((_PROB_HI - p) >> shift)


class Decoder:
    """The format-2 body: push() compressed bytes, step() decodes one unit of work.

    patcher supplies read_old(offset, n), _emit(buf, n), size and base_size and gets DeltaError
    raised through it. One instance per patch."""

    def __init__(self, patcher, in_buf, wbits, error):
        self.p = patcher
        self.win = bytearray(1 << wbits)   # the last 2**wbits bytes of the new image
        self.wmask = (1 << wbits) - 1
        self.nums = [_table(_NUMBER_SIZE) for _ in range(_NUMBERS)]
        self.dprobs = _table(_DIFF_SIZE)
        self.vprobs = [_table(256) for _ in range(4)]  # one per lane: blocks of 512 bytes
        self.lprobs = _table(_LITS_SIZE)
        self.error = error
        self.buf = bytearray(in_buf)
        self.start = 0
        self.end = 0
        self.work = bytearray(_BUF)
        self.range = _RANGE_INIT
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
        """n new-image bytes (n <= _BUF <= window): into the window, then out."""
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

    def _bit(self, probs, i):
        p = probs[i]
        bound = (self.range >> _PROB_BITS) * p
        if self.code < bound:
            self.range = bound
            probs[i] = p + ((_PROB_HI - p) >> _ADAPT_SHIFT)
            b = 0
        else:
            self.code -= bound
            self.range -= bound
            probs[i] = p - ((p - _PROB_LO) >> _ADAPT_SHIFT)
            b = 1
        if self.range < _RANGE_TOP:
            self.range <<= 8
            self.code = (self.code << 8) | self._byte()
        return b

    def _tree(self, probs, base, nbits):
        m = 1
        for _ in range(nbits):
            m = (m << 1) | self._bit(probs, base + m)
        return m - (1 << nbits)

    def _number(self, k):
        probs = self.nums[k]
        if self._bit(probs, 0):
            raise self.error("record field of 32 bits or more")
        n = self._tree(probs, 0, _LEN_TREE_BITS)
        if n <= 1:
            return n
        if n > _MAX_NUMBER_BITS:
            raise self.error("record field of %d bits" % n)
        rest = n - 1
        hi = rest if rest < _TOP_BITS else _TOP_BITS
        v = (1 << hi) | self._tree(probs, _TOP_OFFSET + n * _TOP_STRIDE, hi)
        for _ in range(rest - hi):
            self.range >>= 1
            if self.code >= self.range:
                self.code -= self.range
                v = (v << 1) | 1
            else:
                v <<= 1
            if self.range < _RANGE_TOP:
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
            n = self.copy_left if self.copy_left < _BUF else _BUF
            self._put(p._old(n), n)
            self.copy_left -= n
            return True
        if self.match_left:
            # Extra bytes found in the base image or the window: copied, nothing decoded.
            n = self.match_left if self.match_left < _BUF else _BUF
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
            if n > _BUF:
                n = _BUF
            if not final:
                fit = (avail - _MATCH_IN) // _BYTE_IN
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
        if not final and avail < _LOW_WATER:
            return False
        return self._record()

    def _record(self):
        p = self.p
        p.old += self.seek
        self.seek = 0
        copy = self._number(_COPY)
        diff = self._number(_DIFF)
        extra = self._number(_EXTRA)
        seek = self._number(_SEEK)
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

    # _diff and _extra decode every diff and literal byte: they write _bit's arithmetic out in
    # their loops with the coder's state in locals, because on MicroPython a method call and the
    # attribute loads per bit cost more than the bit's arithmetic itself. _bit serves the rest.
    def _diff(self, n):
        old = self.p._old(n)
        probs = self.dprobs
        vprobs = self.vprobs
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
            ia = (out & 3) | ((hist & 15) << 2)
            ib = _FLAG_B + (((hist & 1) << 7) | (o >> 1))
            pa = probs[ia]
            pb = probs[ib]
            bound = (rng >> _PROB_BITS) * ((pa + pb) >> 1)
            if code < bound:
                rng = bound
                probs[ia] = pa + ((_PROB_HI - pa) >> _DIFF_SHIFT)
                probs[ib] = pb + ((_PROB_HI - pb) >> _DIFF_SHIFT)
                nz = 0
            else:
                code -= bound
                rng -= bound
                probs[ia] = pa - ((pa - _PROB_LO) >> _DIFF_SHIFT)
                probs[ib] = pb - ((pb - _PROB_LO) >> _DIFF_SHIFT)
                nz = 1
            if rng < _RANGE_TOP:
                if pos >= end:
                    raise self.error("patch ends inside a symbol")
                rng <<= 8
                code = (code << 8) | buf[pos]
                pos += 1
            d = 0
            if nz:
                lane = out & 3
                h = hits[lane]
                k = _REP_BASE + (lane << 2) + h
                pr = probs[k]
                bound = (rng >> _PROB_BITS) * pr
                if code < bound:
                    rng = bound
                    probs[k] = pr + ((_PROB_HI - pr) >> _ADAPT_SHIFT)
                    hit = 0
                else:
                    code -= bound
                    rng -= bound
                    probs[k] = pr - ((pr - _PROB_LO) >> _ADAPT_SHIFT)
                    hit = 1
                if rng < _RANGE_TOP:
                    if pos >= end:
                        raise self.error("patch ends inside a symbol")
                    rng <<= 8
                    code = (code << 8) | buf[pos]
                    pos += 1
                if hit:
                    d = last[lane]
                else:
                    vp = vprobs[lane]
                    m = 1
                    while m < 256:
                        pr = vp[m]
                        bound = (rng >> _PROB_BITS) * pr
                        if code < bound:
                            rng = bound
                            vp[m] = pr + ((_PROB_HI - pr) >> _DIFF_SHIFT)
                            m <<= 1
                        else:
                            code -= bound
                            rng -= bound
                            vp[m] = pr - ((pr - _PROB_LO) >> _DIFF_SHIFT)
                            m = (m << 1) | 1
                        if rng < _RANGE_TOP:
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
        probs = self.lprobs
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
            k = _LIT_MATCH + lastm
            pr = probs[k]
            bound = (rng >> _PROB_BITS) * pr
            if code < bound:
                rng = bound
                probs[k] = pr + ((_PROB_HI - pr) >> _ADAPT_SHIFT)
                lastm = 0
            else:
                code -= bound
                rng -= bound
                probs[k] = pr - ((pr - _PROB_LO) >> _ADAPT_SHIFT)
                lastm = 1
            if rng < _RANGE_TOP:
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
            base = (prev >> 7) << 8
            m = 1
            while m < 256:
                pr = probs[base + m]
                bound = (rng >> _PROB_BITS) * pr
                if code < bound:
                    rng = bound
                    probs[base + m] = pr + ((_PROB_HI - pr) >> _ADAPT_SHIFT)
                    m <<= 1
                else:
                    code -= bound
                    rng -= bound
                    probs[base + m] = pr - ((pr - _PROB_LO) >> _ADAPT_SHIFT)
                    m = (m << 1) | 1
                if rng < _RANGE_TOP:
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
        rep = self._bit(self.lprobs, _LIT_REP)
        win = 0 if rep else self._bit(self.lprobs, _LIT_WIN)
        length = self._number(_MATCH_LEN) + _MIN_MATCH
        if length > room:
            raise self.error("match longer than the extra bytes")
        if win:
            dist = self._number(_WIN_DIST) + 1
            if dist > at or dist > len(self.win) or length > dist:
                raise self.error("window match outside the window")
            self.match_src = -dist
        else:
            src = at + self.disp
            if not rep:
                d = self._number(_MATCH_DIST)
                src += (d >> 1) ^ -(d & 1)
            if src < 0 or src + length > self.p.base_size:
                raise self.error("match outside the base image")
            self.disp = src - at
            self.match_src = src
        self.match_left = length
