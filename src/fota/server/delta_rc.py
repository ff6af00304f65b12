"""Delta patch format 2 (docs/delta.md §5): bsdiff records coded with an adaptive binary range
coder and context models, the encoder side of fota.device.delta_rc.

The records are format 1's (copy, diff, extra, seek; fota.server.delta.fota_records); what
changes is their coding. The model (which probability codes which bit, how it adapts) is
fota.device.delta_rc's, mirrored here bit for bit: the decoder's layout constants are imported,
and the tests decode every patch this module makes with the device code under MicroPython.
"""
from __future__ import annotations

from array import array

from fota.device import delta_rc as M

__all__ = ["RangeEncoder", "encode_records"]

_MASK32 = 0xFFFFFFFF


class RangeEncoder:
    """LZMA's carry-less range encoder with the range kept below 2**30 (M._RANGE_INIT): the
    decoder's range and code then stay 31-bit small ints on a 32-bit MicroPython."""

    def __init__(self):
        self.low = 0            # up to 33 bits: 32 + a carry
        self.range = M._RANGE_INIT
        self.cache = 0
        self.cache_size = 1
        self.out = bytearray()

    def _shift_low(self):
        if self.low < 0xFF000000 or self.low > _MASK32:
            carry = self.low >> 32
            temp = self.cache
            while True:
                self.out.append((temp + carry) & 0xFF)
                temp = 0xFF
                self.cache_size -= 1
                if not self.cache_size:
                    break
            self.cache = (self.low >> 24) & 0xFF
        self.cache_size += 1
        self.low = (self.low << 8) & _MASK32

    def _normalize(self):
        while self.range < M._RANGE_TOP:
            self.range <<= 8
            self._shift_low()

    def bit_p(self, p: int, b: int) -> None:
        """One bit with P(0) = p / 2**PROB_BITS (no adaptation)."""
        bound = (self.range >> M._PROB_BITS) * p
        if b:
            self.low += bound
            self.range -= bound
        else:
            self.range = bound
        self._normalize()

    def bit(self, probs, i: int, b: int, shift: int = M._ADAPT_SHIFT) -> None:
        p = probs[i]
        self.bit_p(p, b)
        probs[i] = M.adapt(p, b, shift)

    def direct(self, v: int, n: int) -> None:
        """The n low bits of v, most significant first, each with probability 1/2."""
        for k in range(n - 1, -1, -1):
            self.range >>= 1
            if (v >> k) & 1:
                self.low += self.range
            self._normalize()

    def finish(self) -> bytes:
        for _ in range(5):
            self._shift_low()
        return bytes(self.out)


def _tree(rc: RangeEncoder, probs, base: int, v: int, nbits: int, shift: int = M._ADAPT_SHIFT) -> None:
    m = 1
    for k in range(nbits - 1, -1, -1):
        b = (v >> k) & 1
        rc.bit(probs, base + m, b, shift)
        m = (m << 1) | b


def _number(rc: RangeEncoder, probs, v: int) -> None:
    """An unsigned integer < 2**30: its bit length in a bit tree, the next TOP_BITS bits below
    the leading one in a tree per length, the rest as direct bits."""
    n = v.bit_length()
    if n > M._MAX_NUMBER_BITS:
        raise ValueError(f"record field {v} too large for format 2")
    rc.bit(probs, 0, 0)  # the length tree's top bit: n < 32 (fota.device.delta_rc's layout)
    _tree(rc, probs, 0, n, M._LEN_TREE_BITS)
    if n > 1:
        rest = n - 1
        hi = min(rest, M._TOP_BITS)
        _tree(rc, probs, M._TOP_OFFSET + n * M._TOP_STRIDE, (v >> (rest - hi)) & ((1 << hi) - 1), hi)
        rc.direct(v, rest - hi)


def _table(n: int):
    return array("H", [M._PROB_INIT]) * n


class _Chains:
    """Where each KEY-byte string occurs in a buffer that grows at its end, newest first: the
    latest position per hash of the string, and from each position the previous one with the
    same hash (hash chains in two int arrays: 4 bytes per position, where a dict of lists took
    some 400 bytes per position of a firmware image)."""

    BITS = 18

    def __init__(self):
        self.head = array("i", [-1]) * (1 << self.BITS)
        self.prev = array("i")

    def _hash(self, key) -> int:
        return (int.from_bytes(key, "little") * 2654435761 >> 13) & ((1 << self.BITS) - 1)

    def index(self, buf, end: int) -> None:
        """Take in the positions of buf up to the last one with KEY bytes before `end`."""
        head, prev = self.head, self.prev
        for i in range(len(prev), end - KEY + 1):
            h = self._hash(buf[i:i + KEY])
            prev.append(head[h])
            head[h] = i

    def positions(self, buf, key, limit: int):
        """Up to `limit` positions where buf holds `key`, newest first."""
        src, found, steps = self.head[self._hash(key)], 0, 0
        while src >= 0 and found < limit and steps < 8 * limit:
            if buf[src:src + KEY] == key:
                yield src
                found += 1
            src = self.prev[src]
            steps += 1


class MatchFinder:
    """Longest matches of extra bytes in the base image."""

    def __init__(self, base: bytes, chain: int = 64):
        self.base = base
        self.chain = chain
        self.chains = _Chains()
        self.chains.index(base, len(base))

    def _extend(self, data, i, src):
        base, n, k = self.base, min(len(data) - i, len(self.base) - src), 0
        while k < n and data[i + k] == base[src + k]:
            k += 1
        return k

    def match(self, data, i, out, disp):
        """(base position, length, rep) of the longest match worth coding at data[i], or None;
        rep: at the last match's displacement (its source costs nothing)."""
        if len(data) - i < M._MIN_MATCH:
            return None
        best, best_len = None, 0
        rsrc = out + disp
        if 0 <= rsrc < len(self.base):
            k = self._extend(data, i, rsrc)
            if k >= REP_MIN:
                best, best_len = rsrc, k
        if len(data) - i >= KEY:
            for src in self.chains.positions(self.base, bytes(data[i:i + KEY]), self.chain):
                k = self._extend(data, i, src)
                if k > best_len + (2 if best == rsrc else 0):
                    best, best_len = src, k
        if best is None:
            return None
        rep = 1 if best == rsrc else 0
        if not rep and best_len < NEW_MIN:
            return None
        return best, best_len, rep


class WindowFinder:
    """Longest matches of extra bytes in the last `size` bytes of the new image."""

    def __init__(self, size: int, chain: int = 32):
        self.size = size
        self.chain = chain
        self.new = bytearray()
        self.chains = _Chains()

    def extend(self, data) -> None:
        self.new += data

    def match(self, data, i):
        """(distance, length) of the longest match at data[i] within the window, or None. A
        match ends before the current position (it never overlaps itself)."""
        new, out = self.new, len(self.new)
        if len(data) - i < KEY:
            return None
        self.chains.index(new, out)
        best, best_len = None, 0
        for src in self.chains.positions(new, bytes(data[i:i + KEY]), self.chain):
            if out - src > self.size:
                break
            n, k = min(len(data) - i, out - src), 0
            while k < n and data[i + k] == new[src + k]:
                k += 1
            if k > best_len:
                best, best_len = src, k
        return (out - best, best_len) if best_len >= NEW_MIN else None


KEY = 4       # bytes hashed to find match candidates
REP_MIN = 2   # shortest match at the last displacement worth coding (measured on the corpus)
NEW_MIN = 5   # ... at a new displacement, or in the window


def encode_records(base: bytes, records, wbits: int) -> bytes:
    """The range-coded body of a format-2 patch for `records` (copy, diff, extra, seek, diff
    bytes, extra bytes) with a window of 2**wbits new-image bytes, as
    fota.device.delta_rc.Decoder reads it."""
    rc = RangeEncoder()
    nums = [_table(M._NUMBER_SIZE) for _ in range(M._NUMBERS)]
    dprobs, vprobs, lprobs = _table(M._DIFF_SIZE), _table(M._VALUES_SIZE), _table(M._LITS_SIZE)
    prev = 0          # the last byte of the new image written (context of extra bytes)
    old = out = 0
    hist = 0          # the last 4 diff flags
    last = [0] * 4    # the last nonzero diff byte per lane (out & 3)
    hits = [0] * 4    # per lane: were the last 2 nonzero diffs equal to the one before?
    disp = 0          # base position - new position of the last base match
    lastm = 0         # was the last extra item a match?
    finder = MatchFinder(base)
    window = WindowFinder(1 << wbits)
    for copy, diff, extra, seek, dbytes, ebytes in records:
        for field, v in enumerate((copy, diff, extra, (seek << 1) ^ (seek >> 63))):
            _number(rc, nums[field], v)
        if copy:
            prev = base[old + copy - 1]
            window.extend(base[old:old + copy])
        old += copy
        out += copy
        for d in dbytes:
            o = base[old]
            ia = M._FLAG_A + ((out & 3) | ((hist & 15) << 2))
            ib = M._FLAG_B + (((hist & 1) << 7) | (o >> 1))
            nz = 1 if d else 0
            rc.bit_p((dprobs[ia] + dprobs[ib]) >> 1, nz)
            dprobs[ia] = M.adapt(dprobs[ia], nz, M._DIFF_SHIFT)
            dprobs[ib] = M.adapt(dprobs[ib], nz, M._DIFF_SHIFT)
            if nz:
                lane = out & 3
                hit = 1 if d == last[lane] else 0
                rc.bit(dprobs, M._REP_BASE + (lane << 2) + hits[lane], hit)
                if not hit:
                    _tree(rc, vprobs, lane << 8, d, 8, M._DIFF_SHIFT)
                hits[lane] = ((hits[lane] << 1) | hit) & 3
                last[lane] = d
            hist = ((hist << 1) | nz) & 15
            prev = (o + d) & 0xFF
            window.extend(bytes((prev,)))
            old += 1
            out += 1
        i = 0
        while i < len(ebytes):
            m = finder.match(ebytes, i, out, disp)
            w = window.match(ebytes, i)
            if w and (not m or w[1] > m[1] + 1):
                dist, length = w
                rc.bit(lprobs, M._LIT_MATCH + lastm, 1)
                rc.bit(lprobs, M._LIT_REP, 0)
                rc.bit(lprobs, M._LIT_WIN, 1)
                _number(rc, nums[M._MATCH_LEN], length - M._MIN_MATCH)
                _number(rc, nums[M._WIN_DIST], dist - 1)
                window.extend(ebytes[i:i + length])
            elif m:
                src, length, rep = m
                rc.bit(lprobs, M._LIT_MATCH + lastm, 1)
                rc.bit(lprobs, M._LIT_REP, rep)
                if not rep:
                    rc.bit(lprobs, M._LIT_WIN, 0)
                _number(rc, nums[M._MATCH_LEN], length - M._MIN_MATCH)
                if not rep:
                    delta = src - (out + disp)
                    _number(rc, nums[M._MATCH_DIST], (delta << 1) ^ (delta >> 63))
                disp = src - out
                window.extend(ebytes[i:i + length])
            else:
                rc.bit(lprobs, M._LIT_MATCH + lastm, 0)
                lastm = 0
                e = ebytes[i]
                _tree(rc, lprobs, (prev >> 7) << 8, e, 8)
                window.extend(ebytes[i:i + 1])
                prev = e
                out += 1
                i += 1
                continue
            lastm = 1
            prev = ebytes[i + length - 1]
            out += length
            i += length
        old += seek
    return rc.finish()
