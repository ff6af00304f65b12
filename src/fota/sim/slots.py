"""A light in-memory slot backend for large simulated fleets.

fota.device.slots.sim.SimBackend models NOR flash byte for byte (erase rules, alignment); with
10,000 devices x 2 slots x the image it would hold gigabytes and check every byte in Python.
HashSlots keeps per slot only what decides correctness: how many bytes were written (strictly
sequentially, within the capacity) and a running SHA-256 of them, plus a copy of that hash at
every flush, so that a download can resume from its last journal checkpoint after a reboot.
finalize() refuses an image whose length differs from the signed manifest, like a bootloader's
image check; the core has already verified signature and hash on the stream.
"""
from __future__ import annotations

import hashlib


class SlotError(OSError):
    pass


class HashSlots:
    KINDS = ("image",)

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._len = {"a": 0, "b": 0}
        self._hash = {"a": hashlib.sha256(), "b": hashlib.sha256()}
        self._saved = {"a": (0, hashlib.sha256()), "b": (0, hashlib.sha256())}
        self.digest = {"a": None, "b": None}   # hex SHA-256 of a finalized image

    def app_dir(self, slot):
        return None

    def begin(self, slot, size):
        if size > self.capacity:
            raise SlotError("image of %d bytes larger than the slot (%d)" % (size, self.capacity))
        self._len[slot] = 0
        self._hash[slot] = hashlib.sha256()
        self._saved[slot] = (0, hashlib.sha256())
        self.digest[slot] = None

    def write(self, slot, offset, data):
        if offset != self._len[slot]:
            raise SlotError("writes must be sequential (at %d, got %d)" % (self._len[slot], offset))
        if offset + len(data) > self.capacity:
            raise SlotError("write past the slot")
        self._hash[slot].update(data)
        self._len[slot] += len(data)

    def flush(self, slot):
        self._saved[slot] = (self._len[slot], self._hash[slot].copy())

    def _flushed(self, slot, offset):
        length, saved = self._saved[slot]
        if length != offset:
            raise SlotError("slot holds %d flushed bytes, the journal says %d" % (length, offset))
        return saved

    def resume(self, slot, offset):
        """After a reboot: continue at the last flushed position, which must be `offset`."""
        self._hash[slot] = self._flushed(slot, offset).copy()
        self._len[slot] = offset
        return offset

    def hasher_at(self, slot, offset):
        """The SHA-256 state of the slot's first `offset` bytes (flushed), in place of reading them
        back (the executor re-hashes the slot of a resumed download: fota.device.executor)."""
        return self._flushed(slot, offset).copy()

    def finalize(self, slot, size, files=None, key=None, plain_size=None, sha256=None):
        # What a bootloader's check would refuse: a length or an image hash that is not the
        # manifest's (the core checked the stream; this is the slot's own hash state).
        self.flush(slot)
        if self._len[slot] != size:
            raise SlotError("slot holds %d bytes, the manifest says %d" % (self._len[slot], size))
        digest = self._hash[slot].hexdigest()
        if sha256 is not None and digest != sha256.lower():
            raise SlotError("slot image does not match the manifest's sha256")
        self.digest[slot] = digest
