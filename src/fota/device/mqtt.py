# A minimal MQTT 3.1.1 client for MicroPython (unix port and boards) and CPython.
#
# In the spirit of micropython-lib's umqtt.simple, but with non-blocking buffered reads:
# the socket is non-blocking after connect, select.poll waits for data, and incoming
# bytes go into one small bytearray that is parsed in place. A PUBLISH too large for
# that buffer gets its own payload bytearray that the socket reads into directly, so
# every byte is copied at most twice and a payload is never concatenated piece by piece.
# With reuse_payload, that bytearray is kept for the next large PUBLISH and the callback
# gets a memoryview of it instead of a bytes copy: one chunk-sized buffer for the whole
# download, and no second copy of each chunk (docs/heap.md).
#
# Supported: CONNECT (will, user/password, keepalive, clean or persistent session),
# PUBLISH QoS 0/1 both ways, SUBSCRIBE (granted QoS up to 1), PINGREQ, DISCONNECT.
# Incoming QoS 2 is not supported (subscribe with QoS <= 1 and the broker never sends it).

import errno
import select
import socket
import struct
import time

# The device's clock, also for the runner and the http fetch (one copy of CPython's stand-ins).
try:
    from time import ticks_ms, ticks_diff, ticks_add, sleep_ms
except ImportError:  # CPython
    def ticks_ms():
        return int(time.monotonic() * 1000)

    def ticks_diff(a, b):
        return a - b

    def ticks_add(a, b):
        return a + b

    def sleep_ms(ms):
        time.sleep(ms / 1000)


def nonblocking_io(s):
    """(read into, write, poll) of a connected non-blocking socket, for this client and the http
    fetch: MicroPython's stream methods or CPython's socket ones, and a poll registered for input."""
    poll = select.poll()
    poll.register(s, select.POLLIN)
    return getattr(s, "readinto", None) or s.recv_into, getattr(s, "write", None) or s.send, poll


ETIMEDOUT = getattr(errno, "ETIMEDOUT", 110)
ECONNRESET = getattr(errno, "ECONNRESET", 104)
_AGAIN = (errno.EAGAIN, getattr(errno, "EWOULDBLOCK", errno.EAGAIN))

RBUF_SIZE = 512     # receive buffer; bigger packets are read straight into their payload
SMALL_MSG = 1024    # payloads up to this size are sent in the same write as their header

CONNACK = 0x20
PUBLISH = 0x30
PUBACK = 0x40
SUBACK = 0x90
PINGRESP = 0xD0

_REFUSED = ("", "bad protocol version", "client id rejected", "server unavailable",
            "bad user name or password", "not authorized")


class MQTTError(Exception):
    # MQTTError(code, text) for broker refusals (code: CONNACK return code, or 0x80 for a
    # refused subscription); MQTTError(text) for protocol errors (code is None).
    def __init__(self, *args):
        super().__init__(*args)
        self.code = args[0] if args and isinstance(args[0], int) else None


def _b(s):
    return s.encode() if isinstance(s, str) else s


def _again(e):
    # "no data / no room now" on a non-blocking socket (CPython ssl raises SSLWant*Error)
    return (e.args and e.args[0] in _AGAIN) or type(e).__name__.startswith("SSLWant")


def _header(b0, n):
    # fixed header: type/flags byte + remaining length (1..4 bytes, 7 bits each)
    if n > 268435455:
        raise ValueError("packet too large")
    pkt = bytearray((b0,))
    while True:
        b = n & 0x7F
        n >>= 7
        pkt.append(b | 0x80 if n else b)
        if not n:
            return pkt


def _topic(mv):
    # a received topic name; the broker sends UTF-8, anything else is a protocol error
    try:
        return bytes(mv).decode()
    except UnicodeError:
        raise MQTTError("topic is not UTF-8")


def _str(pkt, s):
    # append an MQTT string/binary field: 2-byte big-endian length + data
    pkt.append(len(s) >> 8)
    pkt.append(len(s) & 0xFF)
    pkt += s


class MQTTClient:
    def __init__(self, client_id, host, port=1883, user=None, password=None, keepalive=30,
                 clean_session=False, ssl_context=None, timeout=10, max_payload=0, manual_ack=False,
                 reuse_payload=False, payload_buffer=None):
        # manual_ack: the callback gets (topic, msg, pid) and a QoS 1 message is acknowledged
        # only when the application calls ack(pid), i.e. once it has really handled it. A device
        # that reboots with the message still queued gets it again (persistent session).
        # max_payload > 0: a larger incoming payload is read and dropped without being stored,
        # and the callback gets its length (an int) instead of the bytes, so one oversized
        # message cannot exhaust a small heap (and, redelivered, crash-loop the device).
        # reuse_payload: a payload larger than the receive buffer reaches the callback as a
        # memoryview of a buffer the client reuses for the next large PUBLISH. It is valid until
        # the client reads again (check_msg, or a publish/subscribe waiting for its
        # acknowledgement); a callback that keeps the message longer copies it (bytes(msg)).
        # payload_buffer: the buffer to start with (a bytearray taken early, before the heap is
        # fragmented; it is replaced by a larger one when a larger payload comes).
        self.max_payload = max_payload
        self.manual_ack = manual_ack
        self.reuse_payload = reuse_payload
        self.payload_buffer = payload_buffer  # the reused payload buffer (reuse_payload)
        self.client_id = _b(client_id)
        self.host = host
        self.port = port
        self.user = user
        self.password = password
        self.keepalive = keepalive
        self.clean_session = clean_session
        self.ssl_context = ssl_context
        self.timeout = timeout
        self.cb = None
        self.will = None
        self.sock = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self._pid = 0
        self._rb = bytearray(RBUF_SIZE)
        self._reset()

    def _reset(self):
        self._rs = self._re = 0    # unparsed bytes are _rb[_rs:_re]
        self._body = None          # payload bytearray of a large PUBLISH being received
        self._got = 0              # bytes of _body received so far
        self._pub = None           # (topic, qos, pid) of that PUBLISH
        self._skip = -1            # >= 0: bytes of an oversized payload still to drop
        self._skip_len = 0         # the oversized payload's length
        self._last_tx = ticks_ms()
        self._ping_at = None       # ticks of an unanswered PINGREQ

    def set_callback(self, f):
        self.cb = f

    def set_will(self, topic, msg, retain=False, qos=0):
        self.will = (_b(topic), _b(msg), retain, qos)

    # ---- connection ----

    def connect(self):
        self.close()
        self.connect_started = ticks_ms()  # the start of this attempt (the handshake counts)
        ai = socket.getaddrinfo(self.host, self.port, 0, socket.SOCK_STREAM)[0]
        s = socket.socket(ai[0], socket.SOCK_STREAM, ai[2])
        try:
            s.settimeout(self.timeout)  # bounded blocking connect and TLS handshake
            s.connect(ai[-1])
            # No Nagle delay on small writes (chunk requests, PUBACKs). The unix port lacks the
            # names; 6 and 1 are IPPROTO_TCP and TCP_NODELAY on Linux and lwIP alike.
            try:
                s.setsockopt(getattr(socket, "IPPROTO_TCP", 6), getattr(socket, "TCP_NODELAY", 1), 1)
            except (OSError, TypeError):
                pass
            if self.ssl_context:
                s = self.ssl_context.wrap_socket(s, server_hostname=self.host)
            s.setblocking(False)
        except BaseException:
            s.close()
            raise
        self.sock = s
        self._rd, self._wr, self._poll = nonblocking_io(s)
        self._reset()

        fields = [self.client_id]
        flags = 0x02 if self.clean_session else 0
        if self.will:
            t, m, retain, qos = self.will
            fields += (t, m)
            flags |= 0x04 | qos << 3 | (0x20 if retain else 0)
        if self.user is not None:
            fields.append(_b(self.user))
            flags |= 0x80
            if self.password is not None:
                fields.append(_b(self.password))
                flags |= 0x40
        n = 10
        for f in fields:
            n += 2 + len(f)
        pkt = _header(0x10, n)
        pkt += b"\x00\x04MQTT\x04"
        pkt.append(flags)
        pkt.append(self.keepalive >> 8)
        pkt.append(self.keepalive & 0xFF)
        for f in fields:
            _str(pkt, f)
        try:
            self._write(pkt)
            r = self._wait(CONNACK, None)
        except BaseException:
            self.close()
            raise
        if r[2]:
            self.close()
            rc = r[2]
            raise MQTTError(rc, "connection refused: " + (_REFUSED[rc] if rc < 6 else "?"))
        return bool(r[1] & 1)

    def disconnect(self):
        try:
            if self.sock:
                self._write(b"\xe0\x00")
        finally:
            self.close()

    def close(self):
        if self.sock:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None

    # ---- outgoing ----

    def _write(self, buf):
        if not self.sock:
            raise OSError(ECONNRESET)
        mv = memoryview(buf)
        i = 0
        t0 = ticks_ms()
        while i < len(buf):
            try:
                w = self._wr(mv[i:])
            except OSError as e:
                if not _again(e):
                    raise
                w = None
            if not w:  # socket buffer full: wait until writable
                left = self.timeout * 1000 - ticks_diff(ticks_ms(), t0)
                if left <= 0:
                    raise OSError(ETIMEDOUT)
                self._poll.modify(self.sock, select.POLLOUT)
                self._poll.poll(int(left))
                self._poll.modify(self.sock, select.POLLIN)
                continue
            i += w
        self.bytes_sent += i
        self._last_tx = ticks_ms()

    def _next_pid(self):
        self._pid = self._pid % 65535 + 1
        return self._pid

    def publish(self, topic, msg, retain=False, qos=0):
        if qos not in (0, 1):
            raise ValueError("qos must be 0 or 1")
        topic = _b(topic)
        msg = _b(msg)
        n = 2 + len(topic) + len(msg) + (2 if qos else 0)
        small = len(msg) <= SMALL_MSG
        pkt = _header(0x30 | qos << 1 | (1 if retain else 0), n)
        _str(pkt, topic)
        if qos:
            pid = self._next_pid()
            pkt.append(pid >> 8)
            pkt.append(pid & 0xFF)
        if small:
            pkt += msg
            self._write(pkt)
        else:
            self._write(pkt)
            self._write(msg)
        if qos:
            self._wait(PUBACK, pid)

    def subscribe(self, topic, qos=1):
        topic = _b(topic)
        pid = self._next_pid()
        n = 5 + len(topic)
        pkt = _header(0x82, n)
        pkt.append(pid >> 8)
        pkt.append(pid & 0xFF)
        _str(pkt, topic)
        pkt.append(qos)
        self._write(pkt)
        r = self._wait(SUBACK, pid)
        if r[2] == 0x80:
            raise MQTTError(0x80, "subscription refused: " + topic.decode())
        return r[2]

    def ping(self):
        self._write(b"\xc0\x00")
        if self._ping_at is None:
            self._ping_at = ticks_ms()

    # ---- incoming ----

    def _recv(self, mv):
        # one non-blocking read into mv; returns the byte count, 0 if nothing is available
        if not self.sock:
            raise OSError(ECONNRESET)
        try:
            n = self._rd(mv)
        except OSError as e:
            if _again(e):
                return 0
            raise
        if n is None:  # MicroPython: would block
            return 0
        if n == 0:
            raise OSError(ECONNRESET)  # closed by the peer
        self.bytes_received += n
        self._ping_at = None  # the broker is alive
        return n

    def _read(self, wait_ms):
        # read what is available (waiting up to wait_ms for it); returns the byte count
        n = self._read_once()
        if not n and wait_ms > 0:
            if self._poll.poll(int(wait_ms)):
                n = self._read_once()
        return n

    def _read_once(self):
        body = self._body
        rb = self._rb
        if self._skip > 0:  # dropping an oversized payload: read into rb and forget it
            n = self._recv(memoryview(rb)[:min(len(rb), self._skip)])
            self._skip -= n
            return n
        if body is not None and len(body) - self._got >= len(rb):
            n = self._recv(memoryview(body)[self._got:])
            self._got += n
            return n
        if self._rs:  # move the unparsed tail (at most one partial packet) to the front
            k = self._re - self._rs
            rb[:k] = memoryview(rb)[self._rs:self._re]
            self._rs, self._re = 0, k
        if self._re == len(rb):
            raise MQTTError("receive buffer overflow")
        start = self._re
        n = self._recv(memoryview(rb)[start:])
        self._re += n
        if body is not None and n:  # the payload's tail, maybe followed by more packets
            k = min(n, len(body) - self._got)
            memoryview(body)[self._got:self._got + k] = memoryview(rb)[start:start + k]
            self._got += k
            self._rs = start + k
        return n

    def _grow(self, need):
        if need > len(self._rb):
            rb = bytearray(need)
            k = self._re - self._rs
            rb[:k] = memoryview(self._rb)[self._rs:self._re]
            self._rb, self._rs, self._re = rb, 0, k

    def _next(self):
        # Handle one complete packet if buffered; returns (type, a, b) or None.
        # CONNACK: (type, flags, return code); PUBACK: (type, pid, 0);
        # SUBACK: (type, pid, granted qos); PUBLISH: (type, 0, 0); others: (type, 0, 0)
        if self._skip == 0:
            t, q, pid = self._pub
            self._skip, self._pub = -1, None
            return self._deliver(t, self._skip_len, q, pid)
        if self._skip > 0:
            return None
        if self._body is not None:
            if self._got < len(self._body):
                return None
            t, q, pid = self._pub
            msg = self._body if self.reuse_payload else bytes(self._body)
            self._body = self._pub = None
            return self._deliver(t, msg, q, pid)
        rb = self._rb
        s = self._rs
        avail = self._re - s
        n = sh = 0
        i = 1
        while True:  # remaining length, up to 4 bytes
            if i >= avail:
                return None
            b = rb[s + i]
            n |= (b & 0x7F) << sh
            i += 1
            if not b & 0x80:
                break
            sh += 7
            if i > 4:
                raise MQTTError("bad remaining length")
        t = rb[s] & 0xF0
        if i + n <= avail:  # whole packet buffered
            self._rs = s + i + n
            return self._handle(rb[s], s + i, n)
        if t != PUBLISH or i + n <= len(rb):
            if n > 4096 and t != PUBLISH:
                raise MQTTError("packet too large")
            self._grow(i + n)
            return None
        # a PUBLISH larger than the buffer: once its variable header is in, give the
        # payload its own bytearray and read into it
        q = rb[s] >> 1 & 3
        if avail < i + 2:
            return None
        vh = i + 2 + (rb[s + i] << 8 | rb[s + i + 1])
        if q:
            vh += 2
        if avail < vh:
            self._grow(vh)
            return None
        mv = memoryview(rb)
        topic = _topic(mv[s + i + 2:s + vh - (2 if q else 0)])
        pid = rb[s + vh - 2] << 8 | rb[s + vh - 1] if q else 0
        k = avail - vh
        if self.max_payload and i + n - vh > self.max_payload:
            self._skip_len = i + n - vh
            self._skip = self._skip_len - k
            self._rs = self._re = 0
            self._pub = (topic, q, pid)
            return None
        body = self._payload_buffer(i + n - vh)
        memoryview(body)[:k] = mv[s + vh:s + avail]
        self._rs = self._re = 0
        self._body, self._got, self._pub = body, k, (topic, q, pid)
        return None

    def _payload_buffer(self, n):
        # A bytearray for an n-byte payload; with reuse_payload a memoryview of the kept buffer,
        # which grows (the old one dropped first) when a larger payload comes.
        if not self.reuse_payload:
            return bytearray(n)
        if self.payload_buffer is None or len(self.payload_buffer) < n:
            self.payload_buffer = None
            self.payload_buffer = bytearray(n)
        return memoryview(self.payload_buffer)[:n]

    def _handle(self, b0, a, n):
        t = b0 & 0xF0
        rb = self._rb
        if n < (3 if t == SUBACK else 2) and t in (PUBLISH, CONNACK, PUBACK, SUBACK):
            raise MQTTError("packet too short")
        if t == PUBLISH:
            q = b0 >> 1 & 3
            e = a + 2 + (rb[a] << 8 | rb[a + 1])
            if e + (2 if q else 0) > a + n:
                raise MQTTError("topic beyond the packet")
            mv = memoryview(rb)
            topic = _topic(mv[a + 2:e])
            pid = 0
            if q:
                pid = rb[e] << 8 | rb[e + 1]
                e += 2
            return self._deliver(topic, bytes(mv[e:a + n]), q, pid)
        if t == CONNACK or t == PUBACK:
            return (t, rb[a] << 8 | rb[a + 1] if t == PUBACK else rb[a], rb[a + 1])
        if t == SUBACK:
            return (t, rb[a] << 8 | rb[a + 1], rb[a + 2])
        return (t, 0, 0)  # PINGRESP, UNSUBACK, ...: nothing to do

    def _deliver(self, topic, msg, q, pid):
        if q != 1:
            pid = 0
        if self.manual_ack:
            if self.cb:
                self.cb(topic, msg, pid)
        else:
            if self.cb:
                self.cb(topic, msg)
            self.ack(pid)  # acknowledge only once the application has the message
        return (PUBLISH, 0, 0)

    def ack(self, pid):
        """PUBACK a QoS 1 message (pid 0: a QoS 0 message, nothing to do)."""
        if pid:
            self._write(struct.pack("!BBH", PUBACK, 2, pid))

    def _wait(self, t, pid):
        # process incoming packets until a packet of type t (with packet id pid) arrives
        t0 = ticks_ms()
        while True:
            r = self._next()
            if r is None:
                left = self.timeout * 1000 - ticks_diff(ticks_ms(), t0)
                if left <= 0:
                    raise OSError(ETIMEDOUT)
                self._read(left)
            elif r[0] == t and (pid is None or r[1] == pid):
                return r

    def _keepalive(self):
        # send PINGREQ when due; returns ms until the next keepalive event
        if not self.keepalive:
            return 60000
        now = ticks_ms()
        if self._ping_at is not None:
            left = self.keepalive * 1500 - ticks_diff(now, self._ping_at)
            if left <= 0:
                raise OSError(ETIMEDOUT)
            return left
        left = self.keepalive * 500 - ticks_diff(now, self._last_tx)
        if left <= 0:
            self.ping()
            return self.keepalive * 500
        return left

    def check_msg(self, timeout_ms=0, limit=0):
        # Handle what has arrived (waiting up to timeout_ms for the first packet); returns the
        # number of PUBLISH delivered. limit > 0: stop once that many are delivered and leave the
        # rest in the socket (the broker's queue and the TCP window hold them, not the heap).
        t0 = ticks_ms()
        count = 0
        seen = False
        while True:
            r = self._next()
            if r is not None:
                seen = True
                if r[0] == PUBLISH:
                    count += 1
                    if limit and count >= limit:
                        break
                continue
            wait = 0 if seen else timeout_ms - ticks_diff(ticks_ms(), t0)
            ka = self._keepalive()
            if self._read(min(wait, ka)):
                continue
            if seen or wait <= 0:
                break
        self._keepalive()
        return count


def backoff_ms(n, base_ms=500, max_ms=30000):
    # The wait after the n-th failed attempt in a row (n >= 1): random in [d/2, d] with
    # d = min(max_ms, base_ms * 2**(n-1)): exponential back-off with jitter.
    import os
    d = min(max_ms, base_ms << min(n - 1, 20))
    r = struct.unpack("!H", os.urandom(2))[0]
    return d // 2 + d * r // 131072

