"""Wire bytes of a device's MQTT connections, by packet kind and direction (bench/e2e --breakdown).

A FaultProxy between the devices and the broker calls `WireTally.tap` with every piece it
forwards; each connection's two byte streams are cut into MQTT packets and each packet's bytes
are added to a kind: a PUBLISH by its topic's last level (`cmd`, `data`, `req`, `status`, ...),
anything else by its packet type (`CONNECT`, `PUBACK`, `PINGREQ`, ...). For `data` the MQTT
framing (fixed header, topic, packet id) and the protocol's 8-byte chunk header are counted apart
from the chunk bytes, so the kind `data` holds only the image.
"""
from __future__ import annotations

import threading

from fota.device import protocol as P

NAMES = {1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 8: "SUBSCRIBE", 9: "SUBACK",
         12: "PINGREQ", 13: "PINGRESP", 14: "DISCONNECT"}


class _Stream:
    """One direction of one connection: unparsed bytes and per-kind [packets, bytes]."""

    def __init__(self):
        self.buf = bytearray()
        self.kinds: dict[str, list[int]] = {}
        self.samples: dict[str, list[str]] = {}  # kind -> payloads seen (JSON only, for reading)
        self.total = 0

    def add(self, kind: str, n: int, packets: int = 1) -> None:
        k = self.kinds.setdefault(kind, [0, 0])
        k[0] += packets
        k[1] += n

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        self.buf += data
        while True:
            buf = self.buf
            n = shift = 0
            i = 1
            while True:
                if i >= len(buf):
                    return
                b = buf[i]
                n |= (b & 0x7F) << shift
                i += 1
                if not b & 0x80:
                    break
                shift += 7
            if len(buf) < i + n:
                return
            self._packet(buf[0], bytes(buf[i:i + n]), i + n)
            del self.buf[:i + n]

    def _packet(self, b0: int, body: bytes, size: int) -> None:
        t = b0 >> 4
        if t != 3:
            self.add(NAMES.get(t, f"type{t}"), size)
            return
        tlen = body[0] << 8 | body[1]
        topic = body[2:2 + tlen].decode(errors="replace")
        head = 2 + tlen + (2 if b0 >> 1 & 3 else 0)
        kind = topic.rsplit("/", 1)[-1]
        if kind == P.DATA:
            payload = len(body) - head
            self.add("data framing (MQTT header + topic)", size - payload)
            self.add("data chunk header", min(P.CHUNK_HEADER_SIZE, payload), 0)
            self.add("data", max(0, payload - P.CHUNK_HEADER_SIZE), 0)
        else:
            self.add(kind, size)
            self.samples.setdefault(kind, []).append(body[head:head + 2000].decode(errors="replace"))


class WireTally:
    """Per proxied connection (its session number), the two directions' tallies."""

    def __init__(self):
        self.lock = threading.Lock()
        self.sessions: dict[int, dict[str, _Stream]] = {}

    def tap(self, session, direction: str, data: bytes) -> None:
        with self.lock:
            streams = self.sessions.setdefault(session.number, {"up": _Stream(), "down": _Stream()})
            streams[direction].feed(data)

    def find(self, tx: int, rx: int) -> dict | None:
        """The connection whose device->broker bytes are tx (the device's own count); its
        breakdown as {"tx": {kind: [packets, bytes]}, "rx": {...}}, rx as the device read it."""
        with self.lock:
            for number in sorted(self.sessions, reverse=True):
                s = self.sessions[number]
                if s["up"].total == tx:
                    return {"session": number, "tx": dict(s["up"].kinds), "rx": dict(s["down"].kinds),
                            "samples": {**s["up"].samples, **s["down"].samples},
                            "rx_forwarded": s["down"].total, "rx_read": rx}
        return None
