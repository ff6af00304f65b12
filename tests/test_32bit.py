"""The agent behaves the same on a 32-bit board as on CPython and the 64-bit unix port.

What differs on a 32-bit MicroPython (the 32-frozen interpreter, fota.testkit.interpreters): small
ints are 31-bit (above 2**30 - 1 an int is a heap-allocated bignum), and time.ticks_ms wraps at
2**30 ms (~12.4 days) with ticks_diff answering only within +-2**29 ms. Each check below is one
script run unchanged on CPython, on the 64-bit interpreter and on the 32-bit one with the agent
frozen in; the three must print the same, and what they print is checked against the values
computed here: job ids, counters, sizes and offsets above 2**30 through the core, the chunk header
and the delta decoder; the core's deadlines on a clock past 2**30 and 2**31 ms; the runner's
clock across the ticks wrap; the 64-bit arithmetic of the key unwrap.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.keywrap import aes_key_wrap

from conftest import micropython_on
from fota.device import protocol as P
from fota.server import delta as server_delta
from fota.tools import signing
from test_core import NOW, ROOT_KEY, SIGNING_KEY, TRUST, cmd, make_update

SRC = Path(__file__).resolve().parent.parent / "src"
RUNTIMES = ("cpython", "64", "32-frozen")


def run_everywhere(script: str, heap: str = "256K") -> dict[str, object]:
    """The script's last stdout line (JSON) on each runtime; a failing run fails the test."""
    out = {}
    for name in RUNTIMES:
        if name == "cpython":
            proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                                  env=dict(os.environ, PYTHONPATH=str(SRC)))
        else:
            mp = micropython_on(name)
            proc = subprocess.run(mp.argv(heap, "-c", script), capture_output=True, text=True, timeout=120,
                                  env=mp.env())
        assert proc.returncode == 0, f"{name}: {proc.stdout[-1500:]}{proc.stderr[-1500:]}"
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def same_everywhere(script: str, heap: str = "256K", apart: tuple[str, ...] = ()) -> dict:
    """The script's result, the same on every runtime but for the keys `apart` (returned as
    {runtime: value} under those keys)."""
    results = run_everywhere(script, heap)
    kept = {name: {k: v for k, v in r.items() if k not in apart} for name, r in results.items()}
    assert kept["64"] == kept["cpython"], "64-bit MicroPython differs from CPython"
    assert kept["32-frozen"] == kept["cpython"], "32-bit frozen MicroPython differs from CPython"
    return dict(kept["cpython"], **{k: {name: r[k] for name, r in results.items()} for k in apart})


# Every test takes the `interpreter` fixture as 32-frozen: it builds the 32-bit interpreter when
# missing, or fails the test saying why it cannot (never a skip).
pytestmark = pytest.mark.parametrize("interpreter", ["32-frozen"], indirect=True)


def test_the_32_bit_interpreter_has_31_bit_small_ints_ticks_wrapping_at_2_30_and_the_agent_frozen(interpreter):
    script = ("import sys, time\n"
              "import fota.device.core\n"   # MICROPYPATH is .frozen alone: found frozen, or not at all
              "print('[%d, %d, %d]' % (sys.maxsize, time.ticks_add(0, -1), time.ticks_diff(0, 1 << 29)))\n")
    mp = micropython_on("32-frozen")
    assert mp.path == ".frozen"
    proc = subprocess.run(mp.argv("64K", "-c", script), capture_output=True, text=True, env=mp.env(), timeout=30)
    assert proc.returncode == 0, proc.stderr
    # ticks_diff(0, 2**29) is -2**29: a difference of 2**29 ms or more cannot be told from a negative one
    assert json.loads(proc.stdout) == [2**31 - 1, 2**30 - 1, -2**29]


CLOCK = r"""
import json, time
from fota.device.runner import Clock
try:
    ticks_add, ticks_diff = time.ticks_add, time.ticks_diff
except AttributeError:  # CPython: the ticks arithmetic of MicroPython's ports (period 2**30)
    def ticks_add(t, d):
        return (t + d) % (1 << 30)
    def ticks_diff(a, b):
        return (a - b + (1 << 29)) % (1 << 30) - (1 << 29)
start = ticks_add(0, -1000)  # one second before the ticks wrap
t = [start]
clock = Clock(lambda: t[0], ticks_diff)
seen = []
for step in [600, 600] + [1 << 28] * 8 + [1]:
    t[0] = ticks_add(t[0], step)
    seen.append(clock.now())
print(json.dumps({"seen": seen, "naive": ticks_diff(t[0], start), "at": clock.at(ticks_add(t[0], -500))}))
"""


def test_the_runners_clock_runs_on_across_the_ticks_wrap_and_past_2_31_ms(interpreter):
    # The 64-bit port's ticks wrap at 2**62, not 2**30: there only the clock's values are compared.
    got = same_everywhere(CLOCK, apart=("naive",))
    steps = [600, 600] + [1 << 28] * 8 + [1]
    expect = [sum(steps[:i + 1]) for i in range(len(steps))]
    assert got["seen"] == expect and expect[-1] == 2**31 + 1201   # ~24.9 days, every step counted
    assert got["at"] == expect[-1] - 500
    # What the runner computed before, ticks_diff(now, start), lost 2**30 ms at every wrap of a
    # 32-bit port's ticks (and was negative for half of each period): 1201 ms after 24.9 days.
    assert got["naive"]["32-frozen"] == got["naive"]["cpython"] == 1201
    assert got["naive"]["64"] == expect[-1]


CORE = r"""
import json, struct, hashlib
from binascii import hexlify, unhexlify
from fota.device import core as C
IDENTITY = json.loads(IDENTITY_JSON)
IDENTITY["root"] = unhexlify(IDENTITY["root"])
out = {}

def harness(agent, capacity, settings):
    ident = dict(IDENTITY)
    ident["capacity"] = capacity
    core = C.UpdateCore(ident, agent, settings)
    h = {"core": core, "pub": [], "writes": [], "slot": bytearray(), "journal": []}
    return h

def run(h, actions):
    queue = list(actions)
    while queue:
        a = queue.pop(0)
        if a[0] == C.A_PUBLISH:
            h["pub"].append([a[1], json.loads(a[2])])
        elif a[0] == C.A_WRITE:
            h["writes"].append([a[1], len(a[2])])
            h["slot"].extend(a[2])
        elif a[0] == C.A_JOURNAL:
            h["journal"].append(a[1]["pos"] if a[1] else None)
        elif a[0] == C.A_INSTALL:
            queue[0:0] = h["core"].installed(None, None)

def reqs(h):
    return [m for t, m in h["pub"] if t == "req"]

def statuses(h):
    return [[m["state"], m["job"], m["seq"], m["boot"], m.get("bytes"), m.get("total"), m.get("code"), m["epoch"]]
            for t, m in h["pub"] if t == "status" and m["state"] != "health"]

# 1. A whole transfer of job MAX_ID (above 2**30), boot and status seq above 2**30, on a clock
#    past 2**31 ms; a chunk whose job id differs only in bit 30 is not taken for it.
T = (1 << 31) + 12345
h = harness({"last_job": JOB - 1, "boot": (1 << 30) + 5, "epoch": EPOCH}, 1 << 16,
            C.Settings(chunk_timeout=100, stall_timeout=1000, progress_interval=0))
core = h["core"]
run(h, core.booted({"trial": None}))
run(h, core.connected_(T))
run(h, core.tick(T))
run(h, core.command(FULL_CMD, NOW))
first = len(reqs(h))
run(h, core.tick(T + 150))              # nothing came: a probe after chunk_timeout
out["asked_again"] = reqs(h)[first:]
run(h, core.chunk(struct.pack(">II", JOB ^ (1 << 30), 0) + IMAGE[:256]))
out["writes_after_foreign_chunk"] = len(h["writes"])
served = 0
now = T + 150
while served < len(reqs(h)):
    r = reqs(h)[served]
    served += 1
    for i in range(r["first"], r["first"] + r["count"]):
        now += 10
        core.now = now
        run(h, core.chunk(struct.pack(">II", r["job"], i) + IMAGE[i * 256:(i + 1) * 256]))
out["full"] = {"statuses": statuses(h), "writes": h["writes"], "journal": h["journal"],
               "sha256": hexlify(hashlib.sha256(h["slot"]).digest()).decode(), "last_job": core.last_job}

# 2. The stall deadline on a clock past 2**30 ms: no chunk for stall_timeout fails the job.
h = harness({"last_job": 0, "boot": 1}, 1 << 16, C.Settings(chunk_timeout=100, stall_timeout=1000))
core = h["core"]
T = (1 << 30) + 7
run(h, core.booted({"trial": None}))
run(h, core.connected_(T))
run(h, core.tick(T))
run(h, core.command(STALL_CMD, NOW))
run(h, core.tick(T + 999))
before = statuses(h)
run(h, core.tick(T + 1200))
out["stall"] = {"before": before[-1], "after": statuses(h)[-1]}

# 3. Resume at an offset above 2**30 (a 1 GiB + 4 KiB image, journal at its last chunk).
h = harness({"last_job": 0, "boot": 1}, 1 << 31, C.Settings(max_chunk=8192, max_inflight=65536))
core = h["core"]
run(h, core.booted({"trial": None}, {"cmd": BIG_BODY, "pos": BIG_POS}, hashlib.sha256()))
run(h, core.connected_(0))
run(h, core.tick(0))
out["resume_requests"] = reqs(h)
r = reqs(h)[0]
run(h, core.chunk(struct.pack(">II", r["job"], r["first"]) + bytes(4096)))
out["resume"] = {"writes": h["writes"], "statuses": statuses(h)}
out["epochs"] = [C.new_epoch(seed) for seed in SEEDS]
print(json.dumps(out))
"""


def test_job_ids_counters_sizes_offsets_and_deadlines_above_2_30_behave_the_same(interpreter):
    job = P.MAX_ID                                   # 2**31 - 1: a bignum on a 32-bit port
    image = os.urandom(2048)
    full = cmd(make_update(SIGNING_KEY, image, job=job, chunk=256, window=4))
    stall = cmd(make_update(SIGNING_KEY, image, job=(1 << 30) + 1, chunk=256, window=4))
    seeds = [b"\xff" * 4, b"\x7f\xff\xff\xff", b"\x80\x00\x00\x00", b"\x40\x00\x00\x00", os.urandom(4)]
    big_size = (1 << 30) + 4096
    big_body = make_update(SIGNING_KEY, b"", job=(1 << 30) + 3, chunk=8192, window=4, size=big_size,
                           sha="ab" * 32)
    big_body.update(time=NOW, exp=NOW + 3600)
    identity = {"id": "d1", "hardware": "unix", "root": signing.public_key_bytes(ROOT_KEY).hex(), "trust": TRUST,
                "kinds": ["image"], "version": "1.0.0", "counter": 0, "time": NOW - 100}
    script = (f"import json\nIDENTITY_JSON = {json.dumps(identity)!r}\nJOB = {job}\nNOW = {NOW}\nIMAGE = {image!r}\n"
              f"FULL_CMD = {full!r}\nSTALL_CMD = {stall!r}\nBIG_BODY = {json.dumps(big_body)!r}\n"
              f"BIG_BODY = json.loads(BIG_BODY)\nBIG_POS = {big_size // 8192}\nEPOCH = {P.MAX_EPOCH}\n"
              f"SEEDS = {seeds!r}\n" + CORE)
    got = same_everywhere(script, heap="512K")

    # the timeout's probe: one chunk past the window (test_core: what follows)
    assert got["asked_again"] == [{"job": job, "first": 4, "count": 1, "chunk": 256}]
    assert got["writes_after_foreign_chunk"] == 0
    full_run = got["full"]
    assert full_run["sha256"] == hashlib.sha256(image).hexdigest() and full_run["last_job"] == job
    assert full_run["writes"] == [[i * 256, 256] for i in range(8)]
    assert full_run["journal"] == [0, 4, None]     # accepted, a checkpoint at chunk 4, done
    states = [s[0] for s in full_run["statuses"]]
    assert states[0] == "downloading" and states[-2:] == ["installing", "rebooting"] and "verifying" in states
    seqs = [s[2] for s in full_run["statuses"]]        # (seq 1: the health report after connecting)
    assert seqs == list(range(2, 2 + len(seqs)))
    assert all(s[1] == job and s[3] == (1 << 30) + 5 and s[7] == P.MAX_EPOCH for s in full_run["statuses"])
    assert got["epochs"] == [int.from_bytes(seed, "big") % P.MAX_EPOCH + 1 for seed in seeds]

    assert got["stall"]["before"][0] == "downloading"                     # 999 ms: not yet
    assert got["stall"]["after"][0] == "failed" and got["stall"]["after"][6] == P.E_TIMEOUT
    assert got["stall"]["after"][1] == (1 << 30) + 1

    last = big_size // 8192
    assert got["resume_requests"] == [{"job": (1 << 30) + 3, "first": last, "count": 1, "chunk": 8192}]
    assert got["resume"]["writes"] == [[last * 8192, 4096]] and last * 8192 == 1 << 30
    final = got["resume"]["statuses"][-1]
    assert final[0] == "failed" and final[6] == P.E_HASH_MISMATCH   # the sha256 of zeros is not "ab" * 32
    assert [s for s in got["resume"]["statuses"] if s[0] == "verifying"][0][4:6] == [big_size, big_size]


DELTA = r"""
import json, struct
from fota.device import delta as D
out = {"header": D.parse_header(HEADER)}
for name, patch in PATCHES:
    p = D.Patcher(lambda at, n: bytes(n), lambda data: None, len(patch), D.parse_header(patch), 15)
    try:
        p.feed(patch)
        p.finish()
        out[name] = "applied"
    except D.DeltaError as e:
        out[name] = str(e)
print(json.dumps(out))
"""


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append(n & 0x7F | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _records(*records: tuple[int, int, int, int]) -> bytes:
    """The compressed record stream: per record its four varints (copy, diff, extra, zigzag seek)
    then `diff` + `extra` bytes (zeros)."""
    raw = b"".join(b"".join(_varint(f) for f in r) + bytes(r[1] + r[2]) for r in records)
    z = zlib.compressobj(9, zlib.DEFLATED, -9)
    return z.compress(raw) + z.flush()


def _rc_fields(*fields: int) -> bytes:
    """A format-2 body: record fields (four per record) as its range coder codes them
    (fota.server.delta_rc); a lone 31 is a field announced as 31 bits long, which no encoder
    makes."""
    from fota.device import delta_rc as M
    from fota.server.delta_rc import RangeEncoder, _number, _table, _tree
    rc, nums = RangeEncoder(), [_table(M._NUMBER_SIZE) for _ in range(M._NUMBERS)]
    if fields == (31,):
        rc.bit(nums[0], 0, 0)  # the length tree's top bit (fota.server.delta_rc._number)
        _tree(rc, nums[0], 0, 31, M._LEN_TREE_BITS)
    for i, v in enumerate(fields if fields != (31,) else ()):
        _number(rc, nums[i % 4], v)
    return rc.finish()


def test_delta_header_and_record_fields_above_2_30_decode_the_same(interpreter):
    header = struct.pack(">4sBBI32sI32s", b"FOTD", 1, 12, 2**32 - 1, b"\x01" * 32, (1 << 31) + 5, b"\x02" * 32)
    old, new = bytes(1000), bytes(20_000)
    head = server_delta.header(old, new, 9)
    # A record's seek moves the old position before the next record reads from it.
    back, ahead = ((1 << 31) << 1) - 1, (1 << 31) << 1        # zigzag of -2**31 and of +2**31
    patches = [
        ("copy_past_the_end", head + _records(((1 << 31) + 7, 0, 0, 0))),   # a 5-byte varint: 2**31 + 7
        ("seek_far_back", head + _records((0, 1, 0, back), (1, 0, 0, 0))),
        ("seek_far_ahead", head + _records((0, 1, 0, ahead), (1, 0, 0, 0))),
    ]
    # Format 2: fields are at most 30 bits (values stay small ints); a longer one is refused.
    head2 = server_delta.header(old, new, 9, 2)
    patches += [
        ("f2_copy_past_the_end", head2 + _rc_fields((1 << 30) - 1, 0, 0, 0)),
        ("f2_seek_far_back", head2 + _rc_fields(1, 0, 0, (1 << 30) - 1, 1, 0, 0, 0)),  # seek -2**29
        ("f2_field_of_31_bits", head2 + _rc_fields(31)),
    ]
    script = f"HEADER = {header!r}\nPATCHES = {patches!r}\n" + DELTA
    got = same_everywhere(script)
    assert got["f2_copy_past_the_end"] == "record writes past the new image's 20000 bytes"
    assert got["f2_seek_far_back"] == "record reads outside the base image"
    assert got["f2_field_of_31_bits"] == "record field of 31 bits"
    assert got["header"] == {"format": 1, "wbits": 12, "base_size": 2**32 - 1, "base_sha256": "01" * 32,
                             "size": (1 << 31) + 5, "sha256": "02" * 32}
    assert got["copy_past_the_end"] == "record writes past the new image's 20000 bytes"
    assert got["seek_far_back"] == "record reads outside the base image"
    assert got["seek_far_ahead"] == "record reads outside the base image"


UNWRAP = r"""
import json
from binascii import hexlify
from fota.device import aes
out = {"key": hexlify(aes.unwrap(KEK, WRAPPED)).decode()}
try:
    aes.unwrap(KEK, WRAPPED[:-1] + bytes([WRAPPED[-1] ^ 1]))
    out["flipped"] = "accepted"
except aes.DecryptError as e:
    out["flipped"] = str(e)
print(json.dumps(out))
"""


def test_key_unwrap_64_bit_arithmetic_is_the_same(interpreter):
    kek, key = os.urandom(32), os.urandom(32)
    wrapped = aes_key_wrap(kek, key)          # RFC 3394: its counter xor is 64-bit arithmetic
    got = same_everywhere(f"KEK = {kek!r}\nWRAPPED = {wrapped!r}\n" + UNWRAP)
    assert got == {"key": key.hex(), "flipped": "key unwrap integrity check failed (wrong device key?)"}


def test_a_format_2_decoder_that_leaves_too_little_heap_fails_the_patch_not_the_agent(interpreter):
    """The agent's Patcher keeps delta.MIN_FREE bytes free beside format 2's decoder (MicroPython):
    with less, the patch fails (DeltaError: E_DELTA, the device keeps its firmware) instead of a
    later MemoryError elsewhere restarting the agent, which would resume the job at every boot.
    CPython has no heap limit to check."""
    old, new = os.urandom(1000), os.urandom(2000)
    patch = server_delta.encode(old, new, 9, fmt=2)
    script = f"PATCH = {patch!r}\nOLD = {old!r}\n" + r"""
import json
from fota.device import delta as D
p = D.Patcher(lambda at, n: OLD[at:at + n], lambda data: None, len(PATCH), D.parse_header(PATCH), 15, 1000000)
try:
    p.feed(PATCH)
    p.finish()
    r = "applied"
except D.DeltaError as e:
    r = str(e)
print(json.dumps({"result": r}))
"""
    got = run_everywhere(script)
    assert got["cpython"]["result"] == "applied"
    for name in ("64", "32-frozen"):
        assert got[name]["result"].startswith("MemoryError: ") and \
            got[name]["result"].endswith(" bytes of heap left beside the decoder, 1000000 needed"), got[name]
