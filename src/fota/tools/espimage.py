"""ESP app images (ESP-IDF, App Image Format) built from segments, for the emulated ESP32s of the
tests, the benches, the power-cut sweep and the board demo: the one encoder they share.

Format: a 24-byte header (magic 0xE9, segment count, SPI mode and size/speed as esptool writes
them for an ESP32, entry point, WP pin, chip id at offset 12, hash_appended at 23), the segments
as (load address, length, data), a checksum byte (XOR of the segment data, seeded with 0xEF) that
ends a 16-byte block, then, when hash_appended, the SHA-256 of everything before it.
"""
from __future__ import annotations

import hashlib

MAGIC = 0xE9
DROM = 0x3F400020     # where an ESP32 maps the first data segment
IRAM = 0x40080000     # and the code (the entry point)


def app_image(segments: list[tuple[int, bytes]], chip_id: int = 0, hash_appended: bool = True) -> bytes:
    """The image of `segments` [(load address, data), ...] for the chip `chip_id`."""
    head = bytearray(24)
    head[0] = MAGIC
    head[1] = len(segments)
    head[2], head[3] = 2, 0x20          # SPI mode DIO, 4 MB / 40 MHz: what esptool writes for ESP32
    head[4:8] = IRAM.to_bytes(4, "little")
    head[8] = 0xEE                      # WP pin: not used
    head[12:14] = chip_id.to_bytes(2, "little")
    head[23] = 1 if hash_appended else 0
    out = bytearray(head)
    check = 0xEF
    for addr, seg in segments:
        out += addr.to_bytes(4, "little") + len(seg).to_bytes(4, "little") + seg
        for b in seg:
            check ^= b
    out += bytes(15 - len(out) % 16) + bytes([check])
    if hash_appended:
        out += hashlib.sha256(out).digest()
    return bytes(out)
