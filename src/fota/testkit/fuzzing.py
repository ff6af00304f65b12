"""The device-side fuzz targets (hypothesis): for each parser a strategy of inputs and a check.

Inputs are random, structurally valid but wrong, validly signed with random field values, and
mutated valid ones. A check feeds one input and returns a label: the parse, or the clean error it
gave (a status `rejected`/`failed` with a code of protocol.ERROR_CODES, or a clean MQTTError /
BundleError / TrustError for the lower layers); anything else (an uncaught exception, a refused
input that changed state, last_job, time, trust document or slot) raises. PARSERS lists them.

bench/fuzz_device.py runs them long (10,000+ inputs each); tests/test_fuzz_device.py runs a few
hundred each in the test suite.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shutil
import struct
import tempfile

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.keywrap import aes_key_wrap
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from fota.device import bundle as B
from fota.device import core as C
from fota.device import ecdsa
from fota.device import mqtt as M
from fota.device import protocol as P
from fota.device import trust as T
from fota.tools import signing
from fota.tools.keyring import make_cert


class Violation(AssertionError):
    """A broken fuzzing invariant (counted as a crash, like an uncaught exception)."""


def require(cond, msg) -> None:
    if not cond:
        raise Violation(msg)


# ------------------------------------------------------------------------------- keys and device

def _key(n: int) -> ec.EllipticCurvePrivateKey:
    # Fixed keys, so that --seed reproduces the same inputs.
    return ec.derive_private_key(0x5EED_F022_0000 + n, ec.SECP256R1())


ROOT_KEY = _key(1)
SIGNING_KEY = _key(2)      # certified for release + command
OTHER_KEY = _key(3)        # never certified
REVOKED_KEY = _key(4)      # certified, then revoked
EXPIRED_KEY = _key(5)      # certified, validity over
CMD_ONLY_KEY = _key(6)     # certified for command only
REL_ONLY_KEY = _key(7)     # certified for release only
KEYS = (SIGNING_KEY, ROOT_KEY, OTHER_KEY, REVOKED_KEY, EXPIRED_KEY, CMD_ONLY_KEY, REL_ONLY_KEY)


def pub(key) -> bytes:
    return signing.public_key_bytes(key)


def kid(key) -> str:
    return signing.key_id(pub(key))


KIDS = [kid(k) for k in KEYS]
NOW = 1_800_000_000
EXP = NOW + 3600           # the commands' expiry (protocol.md §4): valid at the device's time
NOT_BEFORE, NOT_AFTER = NOW - 10**6, NOW + 10**8
TRUST_DOC = {
    "version": 1,
    "certs": [make_cert(ROOT_KEY, SIGNING_KEY, not_before=NOT_BEFORE, not_after=NOT_AFTER),
              make_cert(ROOT_KEY, REVOKED_KEY, not_before=NOT_BEFORE, not_after=NOT_AFTER),
              make_cert(ROOT_KEY, EXPIRED_KEY, not_before=NOT_BEFORE, not_after=NOW - 1000),
              make_cert(ROOT_KEY, CMD_ONLY_KEY, usage=["command"], not_before=NOT_BEFORE, not_after=NOT_AFTER),
              make_cert(ROOT_KEY, REL_ONLY_KEY, usage=["release"], not_before=NOT_BEFORE, not_after=NOT_AFTER)],
    "revoked": [kid(REVOKED_KEY)],
}
DEVICE_ENC_KEY = hashlib.sha256(b"fuzz device key").digest()
RELEASE_KEY = hashlib.sha256(b"fuzz release key").digest()
WRAPPED_KEY = aes_key_wrap(DEVICE_ENC_KEY, RELEASE_KEY).hex()
DEVICE = "d1"
LAST_JOB = 10              # the device has accepted jobs up to 10
COUNTER = 3                # and confirmed security counter 3
CAPACITY = 4096
SETTINGS = C.Settings(max_chunk=1024)
IMAGE = (bytes(range(256)) * 3)[:600]   # the download in progress: 10 chunks of 64 (the last 24)
IMAGE_SHA = hashlib.sha256(IMAGE).hexdigest()
CHUNK = 64
IDENTITY = {"id": DEVICE, "hardware": "unix", "root": pub(ROOT_KEY), "trust": {"version": 0},
            "capacity": CAPACITY, "kinds": ("image",), "version": "1.0.0", "counter": COUNTER,
            "time": NOW, "enc_key": DEVICE_ENC_KEY}

_TRUST = None
_BASES: dict = {}


def shared_trust() -> T.TrustStore:
    """The device's trust store, built once (building one verifies every certificate)."""
    global _TRUST
    if _TRUST is None:
        _TRUST = T.TrustStore(pub(ROOT_KEY), TRUST_DOC)
    return _TRUST


def compact(obj, ascii_only=True) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=ascii_only)


def utf8(text: str) -> bytes:
    # What a signer signs. Lone surrogates (which the fuzzer puts in strings on purpose) cannot be
    # UTF-8; "surrogatepass" still gives bytes to sign, so the device's own handling is what is tested.
    return text.encode("utf-8", "surrogatepass")


def envelope(key, body, ascii_only=True) -> bytes:
    """A validly signed command envelope around `body` (a dict, or any JSON value)."""
    text = compact(body, ascii_only)
    return json.dumps({"body": text, "kid": kid(key), "sig": signing.sign(key, utf8(text)).hex()}).encode()


def manifest_dict(**over) -> dict:
    m = {"v": 1, "version": "1.1.0", "hw": ["unix"], "kind": "image", "counter": COUNTER,
         "size": len(IMAGE), "sha256": IMAGE_SHA}
    m.update(over)
    return m


def update_body(job, manifest_text=None, mkey=SIGNING_KEY, chunk=CHUNK, window=4, **extra) -> dict:
    text = compact(manifest_dict()) if manifest_text is None else manifest_text
    body = {"type": "update", "job": job, "device": DEVICE, "time": NOW, "exp": EXP, "manifest": text,
            "manifest_kid": kid(mkey), "manifest_sig": signing.sign(mkey, utf8(text)).hex(),
            "chunk": chunk, "window": window}
    body.update(extra)
    return body


def chunk_payload(job_id: int, index: int, data: bytes) -> bytes:
    return struct.pack(">II", job_id & 0xFFFFFFFF, index & 0xFFFFFFFF) + data


def new_core() -> C.UpdateCore:
    core = C.UpdateCore(dict(IDENTITY), {"last_job": LAST_JOB, "boot": 1, "time": NOW}, SETTINGS)
    core.trust = shared_trust()   # identity carried an empty document: no certificate checks per core
    core.booted({"trial": None})
    core.tick(1000)
    core.connected_()
    return core


def clone(core: C.UpdateCore) -> C.UpdateCore:
    """A copy of a core that the original does not share mutable state with (hasher copied)."""
    c = object.__new__(C.UpdateCore)
    c.__dict__.update(core.__dict__)
    if core.hasher is not None:
        c.hasher = core.hasher.copy()
    return c


def _serve(core, upto):
    while core.state == P.DOWNLOADING and core.next < upto:
        i = core.next
        core.chunk(chunk_payload(core.job.id, i, IMAGE[i * CHUNK:(i + 1) * CHUNK]))


BASE_STATES = ("idle", "downloading", "last_chunk", "installing")


def base(name: str) -> C.UpdateCore:
    """A fresh copy of the device in one of BASE_STATES (each built once per process)."""
    if name not in _BASES:
        if name == "idle":
            core = new_core()
        else:
            core = clone(base("idle"))
            actions = core.command(envelope(SIGNING_KEY, update_body(LAST_JOB + 1)))
            require(core.state == P.DOWNLOADING, f"base update refused: {actions}")
            _serve(core, {"downloading": 3, "last_chunk": 9, "installing": 10}[name])
            require(core.state == (P.INSTALLING if name == "installing" else P.DOWNLOADING), core.state)
        _BASES[name] = core
    return clone(_BASES[name])


# ------------------------------------------------------------------------------------ invariants

KNOWN_ACTIONS = {C.A_PUBLISH, C.A_BEGIN, C.A_WRITE, C.A_JOURNAL, C.A_STATE, C.A_INSTALL, C.A_SET_TRIAL,
                 C.A_CONFIRM, C.A_CLEAR_REPORT, C.A_TRIAL_FAILED, C.A_REBOOT, C.A_TRUST}
STATUS_KINDS = set(P.STATES) | {P.REJECTED, P.KEYS_UPDATED, P.HEALTH}


def observe(core) -> dict:
    """Everything a refused input must leave alone (trust and job compared by identity)."""
    return {"state": core.state, "last_job": core.last_job, "time": core.time, "trust": core.trust,
            "keys": core.trust.version, "job": core.job, "next": core.next, "requested": core.requested,
            "counter": core.counter, "version": core.version}


def _diff(before, after) -> str:
    return ", ".join(f"{k}: {before[k]!r:.60} -> {after[k]!r:.60}" for k in before if before[k] != after[k])


def statuses_of(actions, core) -> list:
    """Check every action is well formed; returns the published statuses (parsed)."""
    require(isinstance(actions, list), f"actions are not a list: {actions!r:.100}")
    out = []
    for a in actions:
        require(isinstance(a, tuple) and a and a[0] in KNOWN_ACTIONS, f"unknown action {a!r:.100}")
        if a[0] == C.A_PUBLISH:
            require(isinstance(a[2], str) and a[3] in (0, 1), f"bad publish {a!r:.100}")
            if a[1] == P.STATUS:
                s = json.loads(a[2])
                require(s.get("state") in STATUS_KINDS, f"status of unknown state {s!r:.200}")
                code = s.get("code")
                require(code is None or code in P.ERROR_CODES, f"unknown error code {code!r}")
                if s["state"] in (P.REJECTED, P.FAILED):
                    require(code in P.ERROR_CODES, f"{s['state']} status without a code: {s!r:.200}")
                if s["state"] == P.REJECTED:
                    require(s.get("current") == core.state, f"rejected status names state {s.get('current')!r}")
                out.append(s)
    require(core.state in P.STATES, f"core in unknown state {core.state!r}")
    return out


def feed_command(core, payload) -> str:
    """core.command(payload) with its invariants; returns the outcome (an error code or 'accepted'/'keys')."""
    before = observe(core)
    actions = core.command(payload)
    sts = statuses_of(actions, core)
    after = observe(core)
    kinds = [a[0] for a in actions]
    if C.A_STATE not in kinds:
        # Refused by the checks of protocol.md section 4: one rejected status and nothing else.
        require(kinds == [C.A_PUBLISH] and len(sts) == 1 and sts[0]["state"] == P.REJECTED,
                f"refused command gave {actions!r:.300}")
        require(after == before, "refused command changed the device: " + _diff(before, after))
        return sts[0]["code"]
    # Accepted: the job id (or, for keys, the time) is persisted before anything is published
    # (an update persists its journal, the job itself, just before it).
    at = kinds.index(C.A_STATE)
    require(C.A_PUBLISH not in kinds[:at] and set(kinds[:at]) <= {C.A_BEGIN, C.A_JOURNAL},
            f"the job id is persisted after {kinds[:at]!r}")
    require(actions[at][1] == {"last_job": core.last_job, "boot": core.boot, "time": core.time, "epoch": core.epoch},
            f"persisted state {actions[at][1]!r} is not the core's")
    require(after["time"] >= before["time"], "trusted time went backwards")
    if any(s["state"] == P.KEYS_UPDATED for s in sts):
        require(after["keys"] > before["keys"] and C.A_TRUST in kinds and after["last_job"] == before["last_job"],
                "key update applied inconsistently: " + _diff(before, after))
        return "keys"
    require(after["last_job"] > before["last_job"], "accepted a job id that is not newer")
    errors = [s for s in sts if s["state"] in (P.REJECTED, P.FAILED)]
    if errors:
        # A refused update (manifest checks) or cancel: the download and the slot stay as they were.
        require(len(errors) == 1 and kinds[0] == C.A_STATE and all(k == C.A_PUBLISH for k in kinds[1:]),
                f"failed command also acted: {actions!r:.300}")
        for k in ("state", "job", "next", "requested", "trust", "counter", "version"):
            require(before[k] is after[k] or before[k] == after[k], "failed command changed " + _diff(before, after))
        return errors[0]["code"]
    if C.A_BEGIN in kinds:
        require(core.state == P.DOWNLOADING and core.job is not None and core.job.size <= CAPACITY
                and core.job.id == core.last_job, "accepted update left an inconsistent job")
    return "accepted"


def feed_chunk(core, payload) -> str:
    """core.chunk(payload) with its invariants; returns 'written', 'dropped', or a code."""
    before = observe(core)
    job = core.job
    actions = core.chunk(payload)
    sts = statuses_of(actions, core)
    after = observe(core)
    if not actions:
        require(after == before, "dropped chunk changed the device: " + _diff(before, after))
        return "dropped"
    writes = [a for a in actions if a[0] == C.A_WRITE]
    if not writes:
        require(len(actions) == 1 and len(sts) == 1 and sts[0]["state"] == P.REJECTED
                and sts[0]["code"] == P.E_BAD_CHUNK, f"refused chunk gave {actions!r:.300}")
        require(after == before, "refused chunk changed the device: " + _diff(before, after))
        return P.E_BAD_CHUNK
    require(len(writes) == 1 and before["state"] == P.DOWNLOADING, f"chunk wrote {len(writes)} times")
    i = before["next"]
    expected = job.chunk if i < job.chunks - 1 else job.size - i * job.chunk
    w = writes[0]
    require(struct.unpack_from(">II", payload) == (job.id, i), "wrote a chunk of another job or index")
    require(w[1] == i * job.chunk and len(w[2]) == expected and bytes(w[2]) == bytes(payload[8:]),
            "write at the wrong offset or of the wrong length")
    if core.state == P.DOWNLOADING:
        require(after["next"] == i + 1 and after["job"] is job, "chunk position did not advance by one")
        return "written"
    require(i == job.chunks - 1, "download ended before the last chunk")
    if core.state == P.IDLE:
        require(sts[-1]["state"] == P.FAILED and sts[-1]["code"] == P.E_HASH_MISMATCH, "ended without hash failure")
        return P.E_HASH_MISMATCH
    require(core.state == P.INSTALLING and any(a[0] == C.A_INSTALL for a in actions), "unexpected end state")
    return "installing"


# ------------------------------------------------------------------------------------ strategies

ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=16)   # lone surrogates included
SHORT_TEXT = st.one_of(st.text(max_size=10), ANY_TEXT)
INTS = st.one_of(st.integers(), st.sampled_from([0, -1, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63, -2**63,
                                                 10**30, 10**300]))
JSON_LEAF = st.one_of(st.none(), st.booleans(), INTS, st.floats(), SHORT_TEXT)
JSON_ANY = st.recursive(JSON_LEAF, lambda ch: st.one_of(st.lists(ch, max_size=4),
                                                        st.dictionaries(SHORT_TEXT, ch, max_size=4)),
                        max_leaves=10)
HEX = "0123456789abcdef"


def hexs(n):
    return st.text(HEX + "ABCDEF", min_size=n, max_size=n)


def near_hex(n):
    # wrong length, or one non-hex character
    return st.one_of(st.integers(0, 2 * n + 2).filter(lambda k: k != n).map(lambda k: "a" * k),
                     st.tuples(hexs(n), st.integers(0, n - 1), st.sampled_from("gG z\u00e9\ud800")).map(
                         lambda t: t[0][:t[1]] + t[2] + t[0][t[1] + 1:]))


def mostly(good, bad, weight=3):
    """`good` about weight/(weight+1) of the time, else `bad`."""
    return st.integers(0, weight).flatmap(lambda i: bad if i == 0 else good)


@st.composite
def mutated(draw, data):
    """A few byte-level mutations of `data` (flip, insert, delete, truncate, overwrite, duplicate)."""
    b = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 5))
        pos = draw(st.integers(0, len(b)))
        if op == 0 and b:
            b[min(pos, len(b) - 1)] ^= 1 << draw(st.integers(0, 7))
        elif op == 1:
            b[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == 2:
            del b[pos:pos + draw(st.integers(1, 16))]
        elif op == 3:
            del b[pos:]
        elif op == 4 and b:
            b[min(pos, len(b) - 1)] = draw(st.sampled_from(b'\x00\xff\x7f\x80"\\{}[],:0x\xc3\xed'))
        elif op == 5:
            n = draw(st.integers(1, 32))
            b[pos:pos] = b[pos:pos + n]
    return bytes(b)


NESTED = st.tuples(st.integers(1, 9000), st.sampled_from(["[", '{"a":', '{"body":', "[{}"])).map(
    lambda t: t[1] * t[0])                       # deep nesting within and beyond the size limit

# ---- command bodies


F_TYPE = mostly(st.sampled_from(["update", "cancel", "inventory", "keys"]),
                st.one_of(st.sampled_from(["UPDATE", "", "reboot", "update "]), JSON_ANY))
F_JOB = mostly(st.sampled_from([11, 12, 13, 11, 12, 10, 9, 1, 2**32, 2**63]),
               st.one_of(st.sampled_from([0, -1, True, False, "11", 11.0, None]), INTS, JSON_ANY))
F_DEVICE = mostly(st.just(DEVICE), st.one_of(st.sampled_from(["d2", "D1", "d1 ", "", "d1\x00"]), JSON_ANY))
F_TIME = mostly(st.sampled_from([NOW, NOW + 1, NOW + 60, NOW - 1, NOW - 5000]),
                st.one_of(st.sampled_from([0, -1, NOT_BEFORE - 1, NOT_AFTER + 1, 2**64, True, 1.5, "now"]),
                          INTS, JSON_ANY))
F_EXP = mostly(st.sampled_from([EXP, EXP, NOW, NOW + 1, NOW - 1, NOW + 10**6]),
               st.one_of(st.sampled_from([0, -1, 2**64, True, 1.5, "later"]), INTS, JSON_ANY))
F_CHUNK = mostly(st.sampled_from([64, 128, 1024, 100]),
                 st.one_of(st.sampled_from([63, 1025, 0, -64, 8192, True, 64.0, "64"]), INTS, JSON_ANY))
F_WINDOW = mostly(st.sampled_from([1, 4, 8, 32]),
                  st.one_of(st.sampled_from([0, 33, -1, True, 4.0, "4"]), INTS, JSON_ANY))
F_TARGET = mostly(st.sampled_from([11, 12, 10, 0]), st.one_of(st.sampled_from([True, "11", 11.0]), JSON_ANY))
F_KID = mostly(st.sampled_from(KIDS), st.one_of(hexs(16), near_hex(16), JSON_ANY))
F_WRAPPED = st.one_of(st.just(WRAPPED_KEY), hexs(80), near_hex(80), JSON_ANY)

# ---- manifests

MANIFEST_VALUES = {
    "v": st.sampled_from([2, 0, True, 1.0, "1", None, [1]]),
    "version": st.one_of(st.text(max_size=70), ANY_TEXT, st.sampled_from(["", "x" * 64, "x" * 65]), JSON_ANY),
    "hw": st.one_of(st.sampled_from([[], ["esp32"], ["unix", "esp32"], "unix", [1], ["unix", None], ["UNIX"]]),
                    st.lists(SHORT_TEXT, max_size=3), JSON_ANY),
    "kind": st.one_of(st.sampled_from(["bundle", "", "IMAGE", "image ", None]), SHORT_TEXT),
    "size": st.one_of(st.sampled_from([0, -1, 1, 599, 601, CAPACITY, CAPACITY + 1, True, 600.0, "600", 2**64]),
                      INTS, JSON_ANY),
    "sha256": st.one_of(hexs(64), near_hex(64), st.just(IMAGE_SHA.upper()), JSON_ANY),
    "counter": st.one_of(st.sampled_from([0, 2, 4, -1, True, 3.0, "3", None, 2**70]), INTS, JSON_ANY),
    "files": st.one_of(st.just([["app.py", 10, "0" * 64]]), st.sampled_from([[], "x", [1], [["app.py", "10", "0" * 64]],
                       [["app.py", 10, "0" * 63]], [["app.py", 10, "0" * 64, 1]], [[1, 10, "0" * 64]],
                       [["a", True, "0" * 64]]]), JSON_ANY),
    "enc": st.one_of(st.just({"alg": "aes-256-cbc", "plain_size": 500}),
                     st.sampled_from([{}, {"alg": "aes-256-cbc"}, {"alg": "x", "plain_size": 1}, 0, 1, [], "",
                                      {"alg": "aes-256-cbc", "plain_size": True},
                                      {"alg": "aes-256-cbc", "plain_size": "1"}]), JSON_ANY),
}
MANIFEST_FIELDS = sorted(MANIFEST_VALUES)


@st.composite
def manifest_dicts(draw):
    """(manifest dict, True if it is an unmodified valid one)."""
    m = manifest_dict()
    if draw(st.booleans()):
        m["files"] = [["app.py", 10, "ab" * 32], ["lib/x.py", 3, "CD" * 32]]
    n = draw(st.integers(0, 3))
    for _ in range(n):
        op = draw(st.integers(0, 5))
        field = draw(st.sampled_from(MANIFEST_FIELDS))
        if op == 0:
            m.pop(field, None)
        elif op == 1:
            m[draw(SHORT_TEXT)] = draw(JSON_ANY)          # extra field: ignored
        else:
            m[field] = draw(MANIFEST_VALUES[field])
    return m, n == 0


@st.composite
def manifest_texts(draw):
    """(manifest bytes, True if certainly a valid manifest for this device)."""
    how = draw(st.integers(0, 9))
    if how <= 5:
        m, valid = draw(manifest_dicts())
        return utf8(compact(m, draw(st.booleans()))), valid
    if how == 6:
        return utf8(compact(draw(JSON_ANY))), False
    if how == 7:
        return draw(st.one_of(st.binary(max_size=200), ANY_TEXT.map(utf8))), False
    if how == 8:
        return draw(mutated(compact(manifest_dict()).encode())), False
    return draw(NESTED).encode(), False


# ------------------------------------------------------------------------------------- targets
# Each target: a strategy of inputs and a check(input) -> outcome label that raises on a crash.

def check_manifest(x) -> str:
    text, kinds, valid = x
    try:
        m = C.parse_manifest(text, kinds)
    except C.Rejection as r:
        require(r.code == P.E_BAD_MANIFEST and r.terminal, f"manifest refused with {r.code}")
        require(not valid, f"valid manifest refused: {r.reason}")
        return r.code
    # Whatever parses has every field the core relies on, of the right type.
    require(isinstance(m, dict) and m["v"] == 1, "v")
    require(isinstance(m["version"], str) and 0 < len(m["version"]) <= 64, "version")
    require(isinstance(m["hw"], list) and m["hw"] and all(isinstance(h, str) for h in m["hw"]), "hw")
    for k, lo in (("size", 1), ("counter", 0)):
        require(type(m[k]) is int and m[k] >= lo, k)
    require(isinstance(m["sha256"], str) and re.fullmatch("[0-9a-fA-F]{64}", m["sha256"]), "sha256")
    require(m["kind"] in kinds, "kind")
    require(m.get("files") is None or C._valid_files(m["files"]), "files")
    return "ok"


MANIFEST_INPUT = st.tuples(manifest_texts(), st.sampled_from([("image",), ("bundle",), ("bundle", "image")])).map(
    lambda t: (t[0][0], t[1], t[0][1] and "image" in t[1]))

M_SIGNERS = mostly(st.just(SIGNING_KEY), st.sampled_from([REL_ONLY_KEY, CMD_ONLY_KEY, EXPIRED_KEY, REVOKED_KEY,
                                                          OTHER_KEY, ROOT_KEY]), 4)


@st.composite
def signed_manifest_commands(draw):
    """(base state, a validly signed update command carrying a fuzzed manifest, expected outcome)."""
    text, valid = draw(manifest_texts())
    mkey = draw(M_SIGNERS)
    state = draw(st.sampled_from(BASE_STATES))
    job = draw(st.sampled_from([LAST_JOB + 1, LAST_JOB + 2, LAST_JOB + 100]))
    body = update_body(job, text.decode("utf-8", "surrogateescape"), mkey,
                       chunk=draw(st.sampled_from([64, 100, 1024])), window=draw(st.sampled_from([1, 4, 32])))
    if not draw(st.booleans()):
        # signature over the exact bytes (also when they are not UTF-8: the device then refuses them)
        body["manifest_sig"] = signing.sign(mkey, text).hex()
    if draw(st.booleans()):
        body["key"] = draw(F_WRAPPED)
    ascii_only = draw(st.booleans())
    expect = None
    newer = job > (LAST_JOB if state == "idle" else LAST_JOB + 1)
    if valid and mkey is SIGNING_KEY and state != "installing" and newer:
        if utf8(body["manifest"]) == text and (ascii_only or _is_utf8(compact(body, False))):
            expect = "accepted"
    return state, envelope(SIGNING_KEY, body, ascii_only), expect


def _is_utf8(text: str) -> bool:
    try:
        text.encode()
        return True
    except UnicodeError:
        return False


def check_manifest_signed(x) -> str:
    state, payload, expect = x
    label = feed_command(base(state), payload)
    require(expect is None or label == expect, f"valid update gave {label}")
    return label


CMD_STATES = st.sampled_from(BASE_STATES)


def _envelope_base_payloads():
    return [envelope(SIGNING_KEY, update_body(LAST_JOB + 1)),
            envelope(SIGNING_KEY, {"type": "cancel", "job": LAST_JOB + 1, "device": DEVICE, "time": NOW, "exp": EXP,
                                   "target": 11}),
            envelope(SIGNING_KEY, {"type": "inventory", "job": LAST_JOB + 1, "device": DEVICE, "time": NOW,
                                   "exp": EXP}),
            envelope(ROOT_KEY, {"type": "keys", "time": NOW, "version": 2, "certs": TRUST_DOC["certs"], "revoked": []})]


BYTES_INPUT = st.one_of(
    st.binary(max_size=300),
    st.integers(P.MAX_COMMAND_BYTES - 2, P.MAX_COMMAND_BYTES + 2000).map(lambda n: b'{"body":"' + b"x" * n + b'"}'),
    st.integers(0, 10**7),                              # the length of a payload the MQTT client dropped
    NESTED.map(str.encode),
).map(lambda p: (p, False)) | st.sampled_from(_envelope_base_payloads()).flatmap(mutated).map(
    lambda p: (p, True))                                # may still be valid (e.g. whitespace added)


# the codes of the checks before and at the signature (protocol.md section 4, steps 1-3)
UNAUTHENTICATED = (P.E_OVERSIZE, P.E_BAD_COMMAND, P.E_UNKNOWN_KEY, P.E_KEY_REVOKED, P.E_KEY_EXPIRED,
                   P.E_BAD_SIGNATURE)


def check_envelope_bytes(x) -> str:
    state, (payload, maybe_valid) = x
    label = feed_command(base(state), payload)
    require(maybe_valid or label in UNAUTHENTICATED, f"random bytes passed the signature check ({label})")
    return label


@st.composite
def bodies(draw):
    """A command body: the fields of a random command type, each mostly plausible, sometimes absent."""
    kind = draw(F_TYPE)
    body = {"type": kind}
    fields = [("job", F_JOB), ("device", F_DEVICE), ("time", F_TIME), ("exp", F_EXP)]
    real = kind if isinstance(kind, str) else draw(st.sampled_from(["update", "cancel", "keys"]))
    if real == "update":
        fields += [("chunk", F_CHUNK), ("window", F_WINDOW), ("manifest_kid", F_KID),
                   ("manifest_sig", mostly(hexs(128), near_hex(128))), ("key", F_WRAPPED)]
    elif real == "cancel":
        fields.append(("target", F_TARGET))
    elif real == "keys":
        fields += [("version", mostly(st.integers(2, 4), JSON_ANY)), ("certs", st.lists(CERTS, max_size=2)),
                   ("revoked", mostly(st.lists(st.sampled_from(KIDS), max_size=2), JSON_ANY))]
    for name, strategy in fields:
        if draw(st.integers(0, 9)):
            body[name] = draw(strategy)
    if real == "update" and draw(st.integers(0, 9)):
        text, _ = draw(manifest_texts())
        body["manifest"] = text.decode("utf-8", "surrogateescape")
        if "manifest_sig" in body and draw(st.booleans()):
            mkey = draw(M_SIGNERS)
            body["manifest_kid"] = kid(mkey)
            body["manifest_sig"] = signing.sign(mkey, utf8(body["manifest"])).hex()
    if draw(st.integers(0, 5)) == 0:
        body[draw(SHORT_TEXT)] = draw(JSON_ANY)
    if draw(st.integers(0, 7)) == 0:
        body.pop(draw(st.sampled_from(sorted(body))))
    return body


@st.composite
def wrong_envelopes(draw):
    """Envelopes that look right (body/kid/sig of the right shape, mostly) but are not validly signed."""
    how = draw(st.integers(0, 3))
    if how == 0:
        text = compact(draw(JSON_ANY))
    elif how == 1:
        text = draw(st.one_of(ANY_TEXT, NESTED))
    else:
        text = compact(draw(bodies()), draw(st.booleans()))   # raw (not escaped) characters, maybe surrogates
    env = {"body": text, "kid": draw(F_KID), "sig": draw(mostly(hexs(128), near_hex(128)))}
    if draw(st.integers(0, 3)) == 0:
        # a real signature, over other bytes or by another key than kid names
        signer, over = draw(st.sampled_from(KEYS)), draw(st.sampled_from([text, text + " "]))
        if isinstance(env["kid"], str) and kid(signer) == env["kid"].lower():
            over = text + " "
        env["sig"] = signing.sign(signer, utf8(over)).hex()
    for _ in range(draw(st.integers(0, 2))):
        op = draw(st.integers(0, 2))
        field = draw(st.sampled_from(["body", "kid", "sig"]))
        if op == 0:
            env.pop(field, None)
        elif op == 1:
            env[field] = draw(JSON_ANY)
        else:
            env[draw(SHORT_TEXT)] = draw(JSON_ANY)
    return json.dumps(env).encode()


JSON_INPUT = st.tuples(CMD_STATES, st.one_of(JSON_ANY.map(lambda v: json.dumps(v).encode()), wrong_envelopes()))


def check_envelope_json(x) -> str:
    state, payload = x
    label = feed_command(base(state), payload)
    require(label in UNAUTHENTICATED, f"a wrongly signed envelope passed the signature check ({label})")
    return label


C_SIGNERS = mostly(st.just(SIGNING_KEY), st.sampled_from([ROOT_KEY, OTHER_KEY, REVOKED_KEY, EXPIRED_KEY,
                                                          CMD_ONLY_KEY, REL_ONLY_KEY]), 3)


# ---- certificates and key updates (trust)

T_VALUES = mostly(st.sampled_from([NOT_BEFORE, NOT_AFTER, NOW, NOW - 1000, NOW + 1000, 0]),
                  st.one_of(st.sampled_from([True, None, 1.5, "5", "x", 2**80, float("inf"), float("nan"),
                                             -10**30]), JSON_ANY))
USAGE = mostly(st.sampled_from([["release", "command"], ["command"], ["release"], []]),
               st.one_of(st.sampled_from(["release", "command", ["x"], [None], {}]), JSON_ANY))


@st.composite
def certs(draw):
    how = draw(st.integers(0, 7))
    if how == 6:
        return draw(st.sampled_from(TRUST_DOC["certs"]))
    if how == 7:
        return draw(JSON_ANY)
    key = draw(st.sampled_from(KEYS))
    body = {"kid": kid(key), "pub": pub(key).hex(), "usage": draw(USAGE),
            "not_before": draw(T_VALUES), "not_after": draw(T_VALUES)}
    for _ in range(draw(st.integers(0, 2))):
        op = draw(st.integers(0, 2))
        field = draw(st.sampled_from(sorted(body)))
        if op == 0:
            body.pop(field, None)
        elif op == 1:
            body[field] = draw(st.one_of(JSON_ANY, hexs(130), near_hex(130), hexs(16), st.just(pub(OTHER_KEY).hex())))
        else:
            body[draw(SHORT_TEXT)] = draw(JSON_ANY)
    text = compact(body, draw(st.booleans())) if how != 5 else draw(st.one_of(ANY_TEXT, NESTED))
    signer = ROOT_KEY if how != 4 else draw(st.sampled_from(KEYS[2:]))
    cert = {"body": text, "sig": signing.sign(signer, utf8(text)).hex()}
    if how == 3:
        cert["sig"] = draw(st.one_of(hexs(128), near_hex(128), JSON_ANY))
    return cert


CERTS = certs()


@st.composite
def key_updates(draw):
    body = {"type": "keys", "time": draw(F_TIME), "version": draw(mostly(st.integers(0, 4), JSON_ANY)),
            "certs": draw(mostly(st.lists(CERTS, max_size=3), JSON_ANY, 5)),
            "revoked": draw(mostly(st.lists(mostly(st.sampled_from(KIDS), JSON_ANY), max_size=2), JSON_ANY))}
    if draw(st.integers(0, 5)) == 0:
        body.pop(draw(st.sampled_from(["version", "certs", "revoked", "time"])))
    probes = draw(st.lists(st.tuples(mostly(st.sampled_from(KIDS), st.one_of(hexs(16), SHORT_TEXT)),
                                     st.sampled_from(["release", "command", "x"]), T_VALUES.filter(
                                         lambda v: isinstance(v, int) and not isinstance(v, bool))),
                           max_size=3))
    via_core = draw(st.booleans())
    follow = draw(st.sampled_from(KEYS))
    return body, probes, via_core, follow


def check_keys(x) -> str:
    body, probes, via_core, follow = x
    trust = shared_trust()
    try:
        new = trust.updated(body)
        label = "ok"
    except T.TrustError as e:
        require(e.code in (P.E_BAD_KEYS, P.E_STALE_KEYS), f"key update refused with {e.code}")
        new, label = None, e.code
    if new is not None:
        require(new.version > trust.version, "an older trust document replaced a newer one")
        for k, usage, now in [(k, u, NOW) for k in list(new.keys) + KIDS[:2] for u in ("release", "command")] + probes:
            try:
                key = new.key_for(k, usage, now)
            except T.TrustError as e:
                require(e.code in (P.E_UNKNOWN_KEY, P.E_KEY_REVOKED, P.E_KEY_EXPIRED), f"key_for gave {e.code}")
                continue
            require(isinstance(key, (bytes, bytearray)), f"key_for returned {key!r:.60}")
            ecdsa.verify(key, b"m", b"\x01" * 64)
    if via_core:
        core = base("idle")
        label = feed_command(core, envelope(ROOT_KEY, body))
        if label == "keys":
            # the new document is in use: a command by an arbitrary key goes through key_for
            feed_command(core, envelope(follow, {"type": "inventory", "job": LAST_JOB + 1, "device": DEVICE,
                                                 "time": NOW + 1, "exp": EXP}))
    return label


@st.composite
def signed_commands(draw):
    return draw(CMD_STATES), envelope(draw(C_SIGNERS), draw(bodies()), draw(st.booleans()))


def check_command_signed(x) -> str:
    state, payload = x
    return feed_command(base(state), payload)


# ---- chunks

@st.composite
def chunks(draw):
    state = draw(st.sampled_from(BASE_STATES))
    how = draw(st.integers(0, 5))
    if how == 0:
        return state, draw(st.binary(max_size=100))
    if how == 1:
        return state, draw(st.integers(0, 10**6))
    job = draw(st.sampled_from([LAST_JOB + 1, LAST_JOB + 1, LAST_JOB, LAST_JOB + 2, 0, 2**32 - 1]))
    nxt = {"idle": 0, "downloading": 3, "last_chunk": 9, "installing": 10}[state]
    index = draw(st.one_of(st.sampled_from([nxt, nxt, nxt - 1, nxt + 1, 9, 10, 11, 0, 2**31, 2**32 - 1]),
                           st.integers(0, 2**32 - 1)))
    expected = CHUNK if index < 9 else 24
    size = draw(st.one_of(st.sampled_from([expected, expected, expected - 1, expected + 1, 0, CHUNK, 24]),
                          st.integers(0, 1100)))
    if draw(st.booleans()) and 0 <= index < 10:
        data = (IMAGE[index * CHUNK:(index + 1) * CHUNK] + bytes(1100))[:size]
    else:
        data = draw(st.binary(min_size=size, max_size=size))
    payload = chunk_payload(job, index, data)
    if how == 5:
        payload = draw(mutated(payload))
    return state, payload


def check_chunk(x) -> str:
    state, payload = x
    return feed_chunk(base(state), payload)


# ---- bundles

SEGMENT = st.text(B.NAME_CHARS.replace("/", ""), min_size=1, max_size=8).filter(lambda x: x not in (".", ".."))
GOOD_NAMES = st.one_of(st.sampled_from(["app.py", "lib/a.py", "assets/blob.bin"]),
                       st.lists(SEGMENT, min_size=1, max_size=3).map("/".join))
NAMES = mostly(GOOD_NAMES, st.one_of(
    st.sampled_from(["app.py", "app.mpy", "lib/a.py", "lib/b/c.py", "a", "a/b", "../x", "a/../../x", "/abs", "a//b",
                     ".", "..", "a/./b", "x" * 255, "x" * 256, "\u00e9.py", "a b", "a\\b", "a\x00b", "lib/",
                     "assets/blob.bin", "App.py", "...", "-", "_"]),
    st.text(B.NAME_CHARS + "\x00\u00e9 \\", min_size=0, max_size=12)), 5)


def bundle_bytes(entries, magic=B.MAGIC, version=1, count=None, nlen=None, fsize=None, tail=b"") -> bytes:
    out = bytearray(magic) + struct.pack(">BH", version, (len(entries) if count is None else count) & 0xFFFF)
    for i, (name, data) in enumerate(entries):
        raw = name.encode("utf-8", "surrogatepass")
        out += struct.pack(">H", (len(raw) if nlen is None or nlen[0] != i else nlen[1]) & 0xFFFF) + raw
        out += struct.pack(">I", (len(data) if fsize is None or fsize[0] != i else fsize[1]) & 0xFFFFFFFF) + data
    return bytes(out + tail)


@st.composite
def bundles(draw):
    """(data, size passed to extract, files list or None, expected names or None)."""
    how = draw(st.integers(0, 5))
    if how == 0:
        data = draw(st.one_of(st.binary(max_size=200), st.binary(max_size=60).map(lambda b: B.MAGIC + b"\x01" + b)))
        return data, len(data), None, None
    unique = draw(st.integers(0, 3)) > 0     # mostly distinct names (a duplicate is an error)
    entries = draw(st.lists(st.tuples(NAMES, st.binary(max_size=100)), max_size=5,
                            unique_by=(lambda e: e[0]) if unique else None))
    if draw(st.integers(0, 3)) and not (unique and "app.py" in [n for n, _ in entries]):
        entries.insert(draw(st.integers(0, len(entries))), ("app.py", b"VERSION = '1'\ndef start(): pass\n"))
    kw = {}
    if how == 2:
        kw = draw(st.sampled_from(["magic", "version", "count", "nlen", "fsize", "tail"]).flatmap(lambda f: {
            "magic": st.binary(min_size=4, max_size=4).map(lambda v: {"magic": v}),
            "version": st.integers(0, 255).map(lambda v: {"version": v}),
            "count": st.integers(0, 0xFFFF).map(lambda v: {"count": v}),
            "nlen": st.tuples(st.integers(0, 5), st.integers(0, 0xFFFF)).map(lambda v: {"nlen": v}),
            "fsize": st.tuples(st.integers(0, 5), st.sampled_from([0, 1, 99, 2**31, 2**32 - 1])).map(
                lambda v: {"fsize": v}),
            "tail": st.binary(min_size=1, max_size=8).map(lambda v: {"tail": v})}[f]))
    data = bundle_bytes(entries, **kw)
    if how == 3:
        data = draw(mutated(data))
    files = None
    if draw(st.booleans()):
        files = [[n, len(d), hashlib.sha256(d).hexdigest()] for n, d in entries]
        if draw(st.booleans()) and files:
            i = draw(st.integers(0, len(files) - 1))
            op = draw(st.integers(0, 3))
            if op == 0:
                files[i][1] += draw(st.sampled_from([-1, 1]))
            elif op == 1:
                files[i][2] = "0" * 64
            elif op == 2:
                files.pop(i)
            else:
                files.append(["extra.py", 1, "ab" * 32])
            how = -1
        if not C._valid_files(files):   # the manifest parser lets only this shape through
            files = None
    size = len(data)
    if how == 4:
        size = draw(st.integers(0, len(data)))
    expect = [n for n, _ in entries] if how in (1, 5) else None
    return data, size, files, expect


_BUNDLE_DIR = None


def _norm(text: str) -> str:
    """An error message without its variable parts (names, numbers), to count distinct errors."""
    text = re.sub(r"'.*'|\"[^\"]*\"", "…", text)
    text = re.sub(r"^file \S+", "file …", text)
    text = re.sub(r"conflicts with \S+", "conflicts with …", text)
    return re.sub(r"(?<![\w-])\d+", "N", text)


def check_bundle(x) -> str:
    global _BUNDLE_DIR
    data, size, files, expect = x
    if _BUNDLE_DIR is None:
        _BUNDLE_DIR = tempfile.mkdtemp(prefix="fuzz-bundle-")
    box = os.path.join(_BUNDLE_DIR, "box")
    shutil.rmtree(box, ignore_errors=True)
    dest = os.path.join(box, "dest")
    os.makedirs(dest)
    try:
        names = B.extract(io.BytesIO(data), size, dest, files)
        label = "ok"
    except B.BundleError as e:
        names, label = None, "BundleError: " + _norm(str(e))
    finally:
        require(os.listdir(box) == ["dest"], f"extract wrote outside its directory: {os.listdir(box)}")
        for d, dirs, fs in os.walk(dest):
            for f in fs + dirs:
                p = os.path.realpath(os.path.join(d, f))
                require(p.startswith(os.path.realpath(dest) + os.sep), f"{p} escapes the destination")
    if names is not None:
        require(all(B.check_name(n) for n in names) and len(set(names)) == len(names), "bad names returned")
        require("app.py" in names or "app.mpy" in names, "bundle without an app accepted")
        if files is not None:
            require(sorted(names) == sorted(f[0] for f in files), "files differ from the manifest's list")
            for n, fsize, digest in files:
                with open(os.path.join(dest, n), "rb") as f:
                    require(hashlib.sha256(f.read()).hexdigest() == digest, f"{n} differs from the manifest")
    if expect is not None and all(B.check_name(n) for n in expect) and len(set(expect)) == len(expect) \
            and not any(a != b and b.startswith(a + "/") for a in expect for b in expect) \
            and ("app.py" in expect or "app.mpy" in expect):
        require(names == expect, f"a well-formed bundle was refused: {label}")
    return label


# ---- MQTT packet decoder

class FakeSocket:
    """recv_into hands out `stream` in pieces of the given sizes (cycled); then 'would block'."""

    def __init__(self, stream: bytes, splits):
        self.stream, self.splits, self.pos, self.turn = stream, splits, 0, 0
        self.sent = bytearray()

    def recv_into(self, mv):
        if self.pos >= len(self.stream):
            raise OSError(errno.EAGAIN, "would block")
        n = min(len(mv), self.splits[self.turn % len(self.splits)], len(self.stream) - self.pos)
        self.turn += 1
        mv[:n] = self.stream[self.pos:self.pos + n]
        self.pos += n
        return n

    def send(self, data):
        self.sent += bytes(data)
        return len(data)

    def close(self):
        pass


def publish_packet(topic: bytes, payload: bytes, qos=0, pid=0, dup=False) -> bytes:
    var = struct.pack("!H", len(topic)) + topic + (struct.pack("!H", pid) if qos else b"")
    return bytes(M._header(0x30 | (8 if dup else 0) | qos << 1, len(var) + len(payload))) + var + payload


TOPICS = st.one_of(st.sampled_from(["fota/v1/d1/cmd", "fota/v1/d1/data", "", "t" * 600]),
                   st.text(max_size=30)).map(str.encode)
BLOB = bytes(i * 7 & 255 for i in range(65536))
PAYLOADS = st.one_of(st.binary(max_size=700), st.integers(0, 20000).map(lambda n: BLOB[:n]))
PACKETS = st.one_of(
    st.tuples(st.just("pub"), TOPICS, PAYLOADS, st.integers(0, 1), st.integers(1, 65535), st.booleans()),
    st.sampled_from([b"\x20\x02\x00\x00", b"\x20\x02\x01\x05", b"\x40\x02\x00\x07", b"\x90\x03\x00\x02\x01",
                     b"\x90\x03\x00\x03\x80", b"\xd0\x00", b"\xb0\x02\x00\x09"]).map(lambda b: ("raw", b)))


@st.composite
def mqtt_streams(draw):
    """(stream, read sizes, max_payload, expected deliveries and PUBACKs or None)."""
    how = draw(st.integers(0, 3))
    splits = draw(st.lists(st.one_of(st.integers(1, 8), st.integers(1, 1600)), min_size=1, max_size=6))
    max_payload = draw(st.sampled_from([8200, 1000, 64]))
    if how == 0:
        stream = draw(st.one_of(st.binary(max_size=600),
                                st.binary(max_size=600).map(lambda b: b"\x30" + b),
                                st.binary(max_size=600).map(lambda b: b"\x32" + b)))
        return stream, splits, max_payload, None
    pkts = draw(st.lists(PACKETS, min_size=1, max_size=5))
    stream = b"".join(publish_packet(*p[1:]) if p[0] == "pub" else p[1] for p in pkts)
    if how == 1:
        if draw(st.booleans()):
            max_payload = 0   # no limit: bounded here, since these lengths are real
        expect = [(p[1], p[2]) for p in pkts if p[0] == "pub"]
        acks = b"".join(struct.pack("!BBH", M.PUBACK, 2, p[4]) for p in pkts if p[0] == "pub" and p[3])
        return stream, splits, max_payload, (expect, acks)
    return draw(mutated(stream)), splits, max_payload, None


def check_mqtt(x) -> str:
    stream, splits, max_payload, expect = x
    c = M.MQTTClient("fuzz", "127.0.0.1", keepalive=0, max_payload=max_payload)
    sock = FakeSocket(stream, splits)
    c.sock, c._rd, c._wr, c._poll = sock, sock.recv_into, sock.send, None
    got = []
    c.set_callback(lambda topic, msg: got.append((topic, msg)))
    label = "ok"
    try:
        for _ in range(2 * len(stream) + 10):     # every turn consumes bytes or hands out a packet
            if c._next() is not None:
                continue
            if not c._read_once():
                break
        else:
            raise Violation("the decoder makes no progress")
    except M.MQTTError as e:
        label = "MQTTError: " + _norm(str(e))
    for topic, msg in got:
        require(isinstance(topic, str) and isinstance(msg, (bytes, int)), f"delivered {type(topic)}/{type(msg)}")
        if isinstance(msg, int):
            require(max_payload and msg > max_payload, f"payload of {msg} bytes dropped, limit {max_payload}")
    if expect is not None:
        messages, acks = expect
        require(label == "ok", f"valid packets gave {label}")
        require(len(got) == len(messages), f"{len(got)} messages delivered, {len(messages)} sent")
        for (topic, msg), (t, payload) in zip(got, messages):
            require(topic == t.decode(), "topic differs")
            require(msg == payload or msg == len(payload), f"payload differs ({len(payload)} bytes)")
        require(bytes(sock.sent) == acks, "PUBACKs differ")
    return label


# ---- a whole session: a random sequence of messages to one device

@st.composite
def sessions(draw):
    events = []
    for _ in range(draw(st.integers(1, 10))):
        what = draw(st.integers(0, 9))
        if what == 0:
            events.append(("update", draw(st.integers(1, 3)), draw(st.sampled_from([64, 100, 1024])),
                           draw(st.sampled_from([1, 2, 4])), draw(st.booleans())))
        elif what == 1:
            events.append(("cmd", draw(signed_commands())[1]))
        elif what == 2:
            events.append(("cmd", draw(st.one_of(wrong_envelopes(), st.binary(max_size=50)))))
        elif what == 3:
            events.append(("cancel", draw(st.integers(-1, 1))))
        elif what in (4, 5):
            events.append(("serve", draw(st.integers(1, 12)), draw(st.integers(0, 3))))
        elif what == 6:
            events.append(("chunk", draw(chunks())[1]))
        elif what == 7:
            events.append(("tick", draw(st.sampled_from([10, 3001, 61000]))))
        elif what == 8:
            events.append(("link", draw(st.booleans())))
        else:
            events.append(("installed", draw(st.sampled_from([None, P.E_INSTALL, P.E_BAD_BUNDLE]))))
    return events


def check_session(events) -> str:
    core = base("idle")
    now = 1000
    labels = []
    for ev in events:
        kind = ev[0]
        last = core.last_job
        if kind == "update":
            _, ahead, chunk, window, good = ev
            text = compact(manifest_dict()) if good else compact(manifest_dict(sha256="0" * 64))
            labels.append(feed_command(core, envelope(SIGNING_KEY, update_body(core.last_job + ahead, text,
                                                                               chunk=chunk, window=window))))
        elif kind == "cancel":
            target = (core.job.id if core.job else core.last_job) + ev[1]
            labels.append(feed_command(core, envelope(SIGNING_KEY, {"type": "cancel", "job": core.last_job + 1,
                                                                    "device": DEVICE, "time": NOW, "exp": EXP,
                                                                    "target": target})))
        elif kind == "cmd":
            labels.append(feed_command(core, ev[1]))
        elif kind == "serve":
            for _ in range(ev[1]):
                if core.state != P.DOWNLOADING:
                    break
                job, i = core.job, core.next + ev[2] % 2     # sometimes one ahead: dropped
                data = IMAGE[i * job.chunk:(i + 1) * job.chunk] if i < job.chunks else b""
                labels.append(feed_chunk(core, chunk_payload(job.id, i, data)))
        elif kind == "chunk":
            labels.append(feed_chunk(core, ev[1]))
        elif kind == "tick":
            now += ev[1]
            statuses_of(core.tick(now), core)
        elif kind == "link":
            statuses_of(core.connected_() if ev[1] else core.disconnected(), core)
        elif kind == "installed" and core.state == P.INSTALLING:
            sts = statuses_of(core.installed(ev[1], "fuzz" if ev[1] else None), core)
            require(sts[-1]["state"] == (P.FAILED if ev[1] else P.REBOOTING), "install result not reported")
            if core.state == P.REBOOTING:
                break   # the device restarts here
        require(core.last_job >= last, "last_job went backwards")
    codes = sorted({x for x in labels if x in P.ERROR_CODES})
    return ",".join(codes) if codes else "ok"


# ---- events for the run under the real MicroPython (tests/test_fuzz_device.py)

MP_RANDOM = st.one_of(
    BYTES_INPUT.map(lambda t: ("n" if isinstance(t[0], int) else "c", t[0])),
    wrong_envelopes().map(lambda p: ("c", p)),
    signed_commands().map(lambda t: ("c", t[1])),
    signed_manifest_commands().map(lambda t: ("c", t[1])),
    key_updates().map(lambda t: ("c", envelope(ROOT_KEY, t[0]))),
    chunks().map(lambda t: ("m" if isinstance(t[1], int) else "d", t[1])),
    chunks().map(lambda t: ("m" if isinstance(t[1], int) else "d", t[1])),
)


def sample(strategy, n: int, seed: int | None = None) -> list:
    """n values drawn from a strategy (a hypothesis run that only collects)."""
    out: list = []

    @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(x):
        out.append(x)

    (hypothesis_seed(seed)(run) if seed is not None else run)()
    return out


def _cert_text(not_before_json: str) -> dict:
    """A root-signed certificate for OTHER_KEY whose not_before is the given JSON literal."""
    text = ('{"kid":"%s","not_after":%d,"not_before":%s,"pub":"%s","usage":["command"]}'
            % (kid(OTHER_KEY), NOT_AFTER, not_before_json, pub(OTHER_KEY).hex()))
    return {"body": text, "sig": signing.sign(ROOT_KEY, text.encode()).hex()}


def edge_events() -> list:
    """Inputs behind the bugs this fuzzer found (see bench/README.md), as (kind, payload)."""
    surrogate_body = '{"device":"d1","exp":%d,"job":11,"time":%d,"type":"inventory\ud800"}' % (EXP, NOW)
    out = [("c", b"[" * 8000),
           ("c", json.dumps({"body": "[" * 5000, "kid": kid(SIGNING_KEY), "sig": "0" * 128}).encode()),
           ("c", json.dumps({"body": surrogate_body, "kid": kid(SIGNING_KEY), "sig": "0" * 128}).encode()),
           ("c", envelope(SIGNING_KEY, update_body(LAST_JOB + 1, "[" * 3000))),
           ("c", envelope(SIGNING_KEY, update_body(LAST_JOB + 2, '{"v":1,"version":"\ud800"}')))]
    for literal in ('"5"', "1e999", "1.5", "true"):
        out.append(("c", envelope(ROOT_KEY, {"type": "keys", "time": NOW, "version": 2,
                                             "certs": [_cert_text(literal)], "revoked": []})))
        out.append(("c", envelope(OTHER_KEY, {"type": "inventory", "job": LAST_JOB + 3, "device": DEVICE,
                                              "time": NOW, "exp": EXP})))
    return out


def mp_events(n: int, seed: int | None = None, segment: int = 25) -> list:
    """About n generated commands and chunks in segments; each segment starts from a fresh device
    ("r"), which accepts a valid update and its first chunks, so that what follows also meets a
    download in progress. Kinds: c/n command bytes/dropped length, d/m chunk bytes/dropped length."""
    events = [("r", "")] + edge_events()
    for i, ev in enumerate(sample(MP_RANDOM, n, seed)):
        if i % segment == 0:
            events += [("r", ""), ("c", envelope(SIGNING_KEY, update_body(LAST_JOB + 1)))]
            events += [("d", chunk_payload(LAST_JOB + 1, k, IMAGE[k * CHUNK:(k + 1) * CHUNK])) for k in range(3)]
        events.append(ev)
    return events


def mp_identity() -> dict:
    """IDENTITY as JSON for the MicroPython run (bytes as hex), with the full trust document."""
    return dict(IDENTITY, root=pub(ROOT_KEY).hex(), enc_key=DEVICE_ENC_KEY.hex(), trust=TRUST_DOC,
                kinds=list(IDENTITY["kinds"]))


# ------------------------------------------------------------------------------------- registry

PARSERS = {
    "manifest": (MANIFEST_INPUT, check_manifest, "parse_manifest(text, kinds)"),
    "manifest_signed": (signed_manifest_commands(), check_manifest_signed,
                        "the manifest of a validly signed update command (core.command)"),
    "envelope_bytes": (st.tuples(CMD_STATES, BYTES_INPUT), check_envelope_bytes,
                       "core.command(arbitrary bytes / mutated valid envelopes / oversized / dropped)"),
    "envelope_json": (JSON_INPUT, check_envelope_json,
                      "core.command(arbitrary JSON / well-formed envelopes without a valid signature)"),
    "command_signed": (signed_commands(), check_command_signed,
                       "core.command(validly signed bodies with random field values and types)"),
    "keys": (key_updates(), check_keys, "TrustStore.updated + key_for, and root-signed keys commands"),
    "chunk": (chunks(), check_chunk, "core.chunk while idle, downloading, at the last chunk, installing"),
    "bundle": (bundles(), check_bundle, "bundle.extract(random / malformed / mutated bundles)"),
    "mqtt": (mqtt_streams(), check_mqtt, "MQTTClient packet decoder, random read splits"),
    "session": (sessions(), check_session, "random sequences of commands, chunks, ticks, reconnects"),
}
