"""The sans-IO update core on CPython: events in, actions out, no broker, no files."""
import ast
import hashlib
import json
import os
import re
import struct
import time
from pathlib import Path

import pytest

from fota.device import core as C
from fota.device import protocol as P
from fota.tools import signing
from fota.tools.keyring import envelope, make_cert

ROOT = Path(__file__).resolve().parent.parent
ROOT_KEY = signing.generate_private_key()
SIGNING_KEY = signing.generate_private_key()
NOW = int(time.time())
TTL = 3600  # the commands' exp: time + TTL


def trust_doc(*keys, version=1, revoked=(), **cert_args):
    return {"version": version, "certs": [make_cert(ROOT_KEY, k, **cert_args) for k in keys],
            "revoked": list(revoked)}


TRUST = trust_doc(SIGNING_KEY)


@pytest.fixture(scope="module")
def key():
    return SIGNING_KEY


def make_update(key, image, job=1, version="1.1.0", hw=("unix",), kind="image", chunk=256, window=4,
                sha=None, size=None, counter=0, device="d1"):
    """The body of an update command whose manifest `key` signed."""
    manifest = json.dumps({"v": 1, "version": version, "hw": list(hw), "kind": kind, "counter": counter,
                           "size": len(image) if size is None else size,
                           "sha256": sha or hashlib.sha256(image).hexdigest()}, sort_keys=True)
    sig = signing.sign(key, manifest.encode()).hex()
    pub = signing.public_key_bytes(key)
    return {"type": "update", "job": job, "device": device, "manifest": manifest, "manifest_sig": sig,
            "manifest_kid": signing.key_id(pub), "chunk": chunk, "window": window}


def cmd(body, key=SIGNING_KEY, now=NOW):
    """The signed envelope of a command body."""
    body = dict(body)
    body.setdefault("time", now)
    body.setdefault("exp", now + TTL)
    return envelope(key, body)


def new_core(capacity=1 << 16, agent=None, kinds=("image",), trust=TRUST, counter=0, version="1.0.0",
             settings=None):
    return C.UpdateCore({"id": "d1", "hardware": "unix", "root": signing.public_key_bytes(ROOT_KEY),
                         "trust": trust, "capacity": capacity, "kinds": kinds, "version": version,
                         "counter": counter, "time": NOW - 100},
                        agent or {"last_job": 0, "boot": 1}, settings)


class Harness:
    """Executes the core's actions in memory and records what it published."""

    def __init__(self, key, capacity=1 << 16, agent=None, kinds=("image",), trust=TRUST, counter=0):
        self.core = new_core(capacity=capacity, agent=agent, kinds=kinds, trust=trust, counter=counter)
        self.slot = bytearray()
        self.published = []
        self.journal = None
        self.state_saved = None
        self.began = 0
        self.trial = None
        self.rebooted = False
        self.install_result = (None, None)
        self.run(self.core.booted({"trial": None}))
        self.run(self.core.connected_())

    def run(self, actions):
        queue = list(actions)
        while queue:
            a = queue.pop(0)
            kind = a[0]
            if kind == C.A_PUBLISH:
                self.published.append((a[1], a[2]))
            elif kind == C.A_BEGIN:
                self.began += 1
                self.slot = bytearray()
            elif kind == C.A_WRITE:
                assert a[1] == len(self.slot), "writes are sequential"
                self.slot.extend(a[2])
            elif kind == C.A_JOURNAL:
                self.journal = a[1]
            elif kind == C.A_STATE:
                self.state_saved = a[1]
            elif kind == C.A_INSTALL:
                queue[0:0] = self.core.installed(*self.install_result)
            elif kind == C.A_SET_TRIAL:
                self.trial = {"job": a[1], "version": a[2]}
            elif kind == C.A_REBOOT:
                self.rebooted = True
        return self

    def statuses(self):
        """Update statuses (health reports apart: see healths())."""
        return [m for m in self.all_statuses() if m["state"] != P.HEALTH]

    def healths(self):
        return [m for m in self.all_statuses() if m["state"] == P.HEALTH]

    def all_statuses(self):
        return [json.loads(p) for t, p in self.published if t == P.STATUS]

    def requests(self):
        return [json.loads(p) for t, p in self.published if t == P.REQ]

    def serve(self, image, chunk, max_rounds=10000, corrupt=None, ms_per_chunk=0):
        """Answer every outstanding request like the control center would (the device's clock
        moving ms_per_chunk per chunk)."""
        served = 0
        for _ in range(max_rounds):
            reqs = self.requests()[served:]
            if not reqs:
                return
            served += len(reqs)
            for r in reqs:
                for i in range(r["first"], r["first"] + r["count"]):
                    self.core.now += ms_per_chunk
                    data = image[i * chunk:(i + 1) * chunk]
                    if corrupt is not None and i == corrupt:
                        data = bytes([data[0] ^ 1]) + data[1:]
                    self.run(self.core.chunk(struct.pack(">II", r["job"], i) + data))


# ---- the table is the whole truth: every state change of the core is one of its rows ----------

def record_transitions(monkeypatch):
    """From here on, every change of an UpdateCore's state as (from, event, to): event None when
    the state was set anywhere but in _go, from None for the constructor's start state."""
    steps = []
    event = [None]
    go = C.UpdateCore._go

    def recording_go(core, name):
        event[0] = name
        try:
            return go(core, name)
        finally:
            event[0] = None

    def set_state(core, to):
        steps.append((core.__dict__.get("state"), event[0], to))
        core.__dict__["state"] = to

    monkeypatch.setattr(C.UpdateCore, "_go", recording_go)
    # A data descriptor on the class sees every assignment, wherever it is made.
    monkeypatch.setattr(C.UpdateCore, "state", property(lambda core: core.__dict__["state"], set_state),
                        raising=False)
    return steps


@pytest.fixture(autouse=True)
def transitions(monkeypatch):
    """Every state change in a core test is a row of the table (tests that import this fixture too)."""
    steps = record_transitions(monkeypatch)
    yield steps
    allowed = set(C.TRANSITIONS) | {(None, None, P.IDLE)}  # the constructor's start state
    assert [s for s in steps if s not in allowed] == []


def _state_writes():
    """(file, function, value) of every assignment to an attribute named `state`, and of every
    other way of storing or deleting one, in the code that holds update cores: all of src/fota but
    the control center (whose jobs and campaigns have tables of their own), and bench/."""
    found = []

    class Writes(ast.NodeVisitor):
        def __init__(self, path):
            self.path, self.scope = path, []

        def scoped(self, node):
            self.scope.append(node.name)
            self.generic_visit(node)
            self.scope.pop()

        visit_ClassDef = visit_FunctionDef = visit_AsyncFunctionDef = scoped

        def note(self, value):
            found.append((self.path, ".".join(self.scope), value))

        def visit_Assign(self, node):
            for target in node.targets:
                for a in ast.walk(target):
                    if isinstance(a, ast.Attribute) and a.attr == "state" and isinstance(a.ctx, ast.Store):
                        self.note(ast.unparse(node.value))
            self.visit(node.value)

        def visit_Attribute(self, node):  # augmented, annotated, loop or with targets, del
            if node.attr == "state" and isinstance(node.ctx, (ast.Store, ast.Del)):
                self.note("?")
            self.generic_visit(node)

        def visit_Call(self, node):  # setattr(core, "state", ...)
            if any(isinstance(a, ast.Constant) and a.value == "state" for a in node.args[1:2]):
                self.note(ast.unparse(node))
            self.generic_visit(node)

    server = ROOT / "src/fota/server"
    for path in sorted((ROOT / "src/fota").rglob("*.py")) + sorted((ROOT / "bench").rglob("*.py")):
        if server not in path.parents:
            Writes(str(path.relative_to(ROOT))).visit(ast.parse(path.read_text()))
    return found


def test_transition_table_matches_protocol_doc_and_is_the_only_way_to_change_state():
    doc = (ROOT / "docs/protocol.md").read_text()
    block = doc.split("<!-- transitions:begin -->")[1].split("<!-- transitions:end -->")[0]
    rows = re.findall(r"\| `(\w+)` \| `(\w+)` \| `(\w+)` \|", block)
    assert rows == [tuple(t) for t in C.TRANSITIONS]
    assert len({(f, e) for f, e, _ in C.TRANSITIONS}) == len(C.TRANSITIONS)  # one row per (state, event)
    # The table spells the states out (a constant tuple): every one is a protocol state.
    assert {f for f, _, _ in C.TRANSITIONS} | {t for _, _, t in C.TRANSITIONS} <= set(P.STATES)
    codes = doc.split("<!-- codes:begin -->")[1].split("<!-- codes:end -->")[0]
    assert sorted(re.findall(r"\| `(E_\w+)` \|", codes)) == sorted(P.ERROR_CODES)
    for state in P.STATES:
        assert f"| `{state}` |" in doc
    # The table holds because nothing else sets the state: _go, and the constructor's start state.
    core = "src/fota/device/core.py"
    assert sorted(_state_writes()) == [(core, "UpdateCore.__init__", "P.IDLE"), (core, "UpdateCore._go", "to")]


def test_an_event_the_table_does_not_list_is_refused(key):
    core = new_core()
    core.booted({"trial": None})
    with pytest.raises(C.ProtocolError):
        core.installed()  # nothing is installing
    assert core.state == P.IDLE


def _row_takers():
    """Each row of the table, and a test that takes it."""
    import test_battery as B  # it imports this module: not at the top
    return {
        (P.IDLE, "accept", P.DOWNLOADING): test_happy_path_downloads_verifies_installs_and_reboots,
        (P.DOWNLOADING, "downloaded", P.VERIFYING): test_happy_path_downloads_verifies_installs_and_reboots,
        (P.DOWNLOADING, "cancel", P.CANCELLED): test_newer_job_supersedes_a_download,
        (P.DOWNLOADING, "error", P.FAILED): test_lost_chunks_are_requested_again_after_timeout_and_stall_fails,
        (P.VERIFYING, "verified", P.INSTALLING): test_happy_path_downloads_verifies_installs_and_reboots,
        (P.VERIFYING, "error", P.FAILED): test_flipped_bit_in_a_chunk_fails_the_hash,
        (P.INSTALLING, "installed", P.REBOOTING): test_happy_path_downloads_verifies_installs_and_reboots,
        (P.INSTALLING, "error", P.FAILED): test_install_failure_is_reported,
        (P.IDLE, "trial_boot", P.TRIAL): test_trial_boot_confirms_once_connected,
        (P.TRIAL, "healthy", P.CONFIRMED): test_trial_boot_confirms_once_connected,
        (P.TRIAL, "trial_timeout", P.REBOOTING): test_trial_without_broker_fails_after_deadline,
        (P.IDLE, "reverted_boot", P.REVERTED): test_reverted_boot_reports_reason,
        (P.CONFIRMED, "done", P.IDLE): test_trial_boot_confirms_once_connected,
        (P.FAILED, "done", P.IDLE): test_install_failure_is_reported,
        (P.REVERTED, "done", P.IDLE): test_reverted_boot_reports_reason,
        (P.CANCELLED, "done", P.IDLE): test_newer_job_supersedes_a_download,
        (P.IDLE, "low_power", P.POSTPONED): B.test_low_battery_postpones_before_anything_is_written_then_resumes,
        (P.VERIFYING, "low_power", P.POSTPONED): B.test_battery_dropping_during_the_download_holds_the_install,
        (P.POSTPONED, "power_ok", P.DOWNLOADING): B.test_low_battery_postpones_before_anything_is_written_then_resumes,
        (P.POSTPONED, "power_ok_verified", P.INSTALLING): B.test_battery_dropping_during_the_download_holds_the_install,
        (P.POSTPONED, "cancel", P.CANCELLED): B.test_cancel_or_a_newer_update_ends_a_postponed_job,
        (P.IDLE, "resume", P.DOWNLOADING): test_resume_from_journal_continues_at_checkpoint,
        (P.IDLE, "resume_postponed", P.POSTPONED): B.test_postponed_jobs_survive_a_restart,
        (P.IDLE, "resume_verified", P.VERIFYING): B.test_postponed_jobs_survive_a_restart,
        (P.VERIFYING, "rehashed", P.POSTPONED): B.test_postponed_jobs_survive_a_restart,
    }


def test_every_row_of_the_table_is_taken_by_a_test(transitions):
    takers = _row_takers()
    assert sorted(takers) == sorted(C.TRANSITIONS)
    for row, test in takers.items():
        del transitions[:]
        test(*[SIGNING_KEY][:test.__code__.co_argcount])
        assert row in transitions, (row, test.__name__)


def test_happy_path_downloads_verifies_installs_and_reboots(key):
    image = bytes(range(256)) * 9 + b"tail"
    h = Harness(key)
    h.run(h.core.command(cmd(make_update(key, image, job=5))))
    assert h.state_saved == {"last_job": 5, "boot": 1, "time": NOW, "epoch": 0}
    h.serve(image, 256)
    assert bytes(h.slot) == image
    states = [s["state"] for s in h.statuses()]
    assert states[0] == "downloading" and states[-3:] == ["verifying", "installing", "rebooting"]
    assert h.trial == {"job": 5, "version": "1.1.0"}
    assert h.rebooted and h.journal is None
    # Pipelined requests: never more than `window` chunks outstanding, none asked twice.
    asked = [i for r in h.requests() for i in range(r["first"], r["first"] + r["count"])]
    assert asked == list(range(len(asked))) and len(asked) == 10


@pytest.mark.parametrize("interval_ms, ms_per_chunk, reports", [
    (1000, 100, (3, 3)),   # 10 % steps would be every 4 chunks: the time limit (every 10) wins
    (1000, 400, (5, 9)),   # a slow link: every 10 %, at the next moment no chunk is in flight
    (1000, 0, (0, 0)),     # a download faster than the interval: start and end only
    (0, 0, (5, 9)),
])
def test_download_progress_is_reported_every_tenth_but_not_more_often_than_the_interval(
        key, interval_ms, ms_per_chunk, reports):
    chunks = 40
    image = os.urandom(chunks * 256)
    h = Harness(key)
    h.core.settings.progress_interval = interval_ms
    h.run(h.core.command(cmd(make_update(key, image, job=5))))
    h.serve(image, 256, ms_per_chunk=ms_per_chunk)
    downloading = [s["bytes"] // 256 for s in h.statuses() if s["state"] == "downloading"]
    assert downloading[0] == 0 and reports[0] <= len(downloading) - 1 <= reports[1], downloading
    for a, b in zip(downloading, downloading[1:]):
        assert (b - a) * 10 >= chunks and (b - a) * ms_per_chunk >= interval_ms, downloading
    # A report is published when no requested chunk is in flight (a runner waiting for its
    # PUBACK queues what arrives meanwhile in the heap), and the next request follows it.
    requested = 0
    for i, (topic, payload) in enumerate(h.published):
        msg = json.loads(payload) if topic in (P.REQ, P.STATUS) else {}
        if topic == P.REQ:
            requested = msg["first"] + msg["count"]
        elif msg.get("state") == "downloading" and msg["bytes"]:
            assert msg["bytes"] // 256 == requested, (msg["bytes"], requested)
            assert h.published[i + 1][0] == P.REQ
    assert [s["state"] for s in h.statuses()][-3:] == ["verifying", "installing", "rebooting"]


def test_in_flight_chunks_are_bounded_by_the_device_budget(key):
    # The command asks for 8 chunks of 4 KiB in flight; a device with a 10 KiB budget asks for
    # at most 2 at a time, and the download still completes.
    image = os.urandom(40_000)
    h = Harness(key)
    h.core = new_core(settings=C.Settings(max_inflight=10 * 1024))
    h.run(h.core.connected_())
    h.published.clear()
    h.run(h.core.command(cmd(make_update(key, image, job=5, chunk=4096, window=8))))
    assert h.statuses()[0]["state"] == "downloading", h.statuses()
    first = h.requests()[0]
    assert (first["first"], first["count"], first["chunk"]) == (0, 2, 4096)
    h.serve(image, 4096)
    assert bytes(h.slot) == image and h.rebooted
    asked = set()
    for r in h.requests():
        asked.update(range(r["first"], r["first"] + r["count"]))
        assert r["count"] <= 2
    assert asked == set(range(10))


def test_trial_boot_confirms_once_connected(key):
    h = Harness(key, agent={"last_job": 5, "boot": 2})
    h.core = new_core(agent={"last_job": 5, "boot": 2}, version="1.1.0")
    h.published.clear()
    confirmed = []
    h.run(h.core.booted({"trial": {"slot": "b", "job": 5, "version": "1.1.0", "tries": 1}}))
    assert h.core.state == P.TRIAL
    for a in h.core.connected_():
        if a[0] == C.A_CONFIRM:
            confirmed.append(a[1])
        h.run([a])
    assert confirmed == [{"job": 5, "state": "confirmed", "code": None, "reason": None}]
    st = h.statuses()[-1]
    assert (st["state"], st["job"], st["version"]) == ("confirmed", 5, "1.1.0")
    assert h.core.state == P.IDLE


def test_trial_without_broker_fails_after_deadline(key):
    core = new_core(agent={}, version="1.1.0", settings=C.Settings(trial_timeout=1000))
    core.booted({"trial": {"slot": "b", "job": 5, "version": "1.1.0", "tries": 1}})
    assert core.tick(500) == []
    actions = core.tick(1500)
    assert [a[0] for a in actions] == [C.A_TRIAL_FAILED, C.A_REBOOT]


def test_reverted_boot_reports_reason(key):
    h = Harness(key)
    h.core = new_core(agent={"last_job": 5, "boot": 4})
    report = {"job": 5, "state": "reverted", "code": P.E_HEALTH, "reason": "trial boot failed 3 times: boom"}
    h.run(h.core.booted({"trial": None, "report": report}))
    h.published.clear()
    h.run(h.core.connected_())
    st = h.statuses()[-1]
    assert (st["state"], st["code"], st["version"], st["job"]) == ("reverted", P.E_HEALTH, "1.0.0", 5)
    assert "boom" in st["reason"]


def _flip_last_hex(text):
    return text[:-2] + ("00" if text[-2:] != "00" else "01")


UNCERTIFIED = signing.generate_private_key()


@pytest.mark.parametrize("make, code", [
    # the command's signature is forged
    (lambda: json.dumps(dict(json.loads(cmd(make_update(SIGNING_KEY, b"x" * 1000, job=3))),
                             sig=_flip_last_hex(json.loads(cmd(make_update(SIGNING_KEY, b"x" * 1000, job=3)))["sig"]))),
     P.E_BAD_SIGNATURE),
    # a valid signature by a key the root never certified
    (lambda: cmd(make_update(UNCERTIFIED, b"x" * 1000, job=3), key=UNCERTIFIED), P.E_UNKNOWN_KEY),
    # the root key may sign key updates only
    (lambda: cmd(make_update(SIGNING_KEY, b"x" * 1000, job=3), key=ROOT_KEY), P.E_UNKNOWN_KEY),
    # a command captured for another device
    (lambda: cmd(make_update(SIGNING_KEY, b"x" * 1000, job=3, device="d2")), P.E_WRONG_DEVICE),
])
def test_unauthentic_commands_are_rejected_without_touching_the_slot(key, make, code):
    h = Harness(key)
    h.run(h.core.command(make()))
    st = h.statuses()[-1]
    assert (st["state"], st["code"]) == ("rejected", code)
    assert h.began == 0 and h.requests() == [] and h.core.state == P.IDLE and h.core.last_job == 0


@pytest.mark.parametrize("body, code", [
    # manifest edited after it was signed
    (lambda: dict(make_update(SIGNING_KEY, b"x" * 1000, job=3),
                  manifest=make_update(SIGNING_KEY, b"x" * 1000)["manifest"].replace("1.1.0", "9.9.9")),
     P.E_BAD_SIGNATURE),
    # manifest signed by an uncertified key (inside an authentic command)
    (lambda: make_update(UNCERTIFIED, b"x" * 1000, job=3), P.E_UNKNOWN_KEY),
])
def test_bad_manifest_signatures_fail_the_job(key, body, code):
    h = Harness(key)
    h.run(h.core.command(cmd(body())))
    st = h.statuses()[-1]
    assert (st["state"], st["code"], st["job"]) == ("failed", code, 3)
    assert h.began == 0 and h.requests() == [] and h.core.state == P.IDLE


def test_revoked_and_expired_keys_are_refused(key):
    revoked = Harness(key, trust=trust_doc(SIGNING_KEY, revoked=[signing.key_id(signing.public_key_bytes(SIGNING_KEY))]))
    revoked.run(revoked.core.command(cmd(make_update(key, b"x" * 10, job=3))))
    assert revoked.statuses()[-1]["code"] == P.E_KEY_REVOKED
    expired = Harness(key, trust=trust_doc(SIGNING_KEY, not_before=NOW - 1000, not_after=NOW - 10))
    expired.run(expired.core.command(cmd(make_update(key, b"x" * 10, job=3))))
    assert expired.statuses()[-1]["code"] == P.E_KEY_EXPIRED
    # An old time claimed by the signer does not bring an expired key back: the device keeps
    # the latest time it has seen.
    h = Harness(key, trust=trust_doc(SIGNING_KEY, not_before=NOW - 1000, not_after=NOW + 1000))
    h.run(h.core.command(cmd(make_update(key, b"x" * 10, job=3), now=NOW + 5000)))
    assert h.statuses()[-1]["code"] == P.E_KEY_EXPIRED
    h.core.time = NOW + 5000
    h.run(h.core.command(cmd(make_update(key, b"x" * 10, job=4), now=NOW)))
    assert h.statuses()[-1]["code"] == P.E_KEY_EXPIRED


def test_downgrade_below_installed_counter_is_refused(key):
    h = Harness(key, counter=5)
    h.run(h.core.command(cmd(make_update(key, b"x" * 10, job=3, counter=4))))
    st = h.statuses()[-1]
    assert (st["state"], st["code"]) == ("failed", P.E_DOWNGRADE) and h.began == 0
    h.run(h.core.command(cmd(make_update(key, b"x" * 10, job=4, counter=5))))
    assert h.began == 1  # the same counter is allowed (a deliberate re-release)
    assert h.trial is None


def test_root_signed_key_update_rotates_the_signing_key(key):
    new_key = signing.generate_private_key()
    old_kid = signing.key_id(signing.public_key_bytes(SIGNING_KEY))
    h = Harness(key)
    update = {"type": "keys", "version": 2, "certs": trust_doc(new_key)["certs"], "revoked": [old_kid]}
    # Only the root may sign it.
    h.run(h.core.command(cmd(update, key=SIGNING_KEY)))
    assert h.statuses()[-1]["code"] == P.E_UNKNOWN_KEY and h.core.trust.version == 1
    trusted = []
    for a in h.core.command(cmd(update, key=ROOT_KEY)):
        if a[0] == C.A_TRUST:
            trusted.append(a[1])
        h.run([a])
    assert trusted and trusted[0]["version"] == 2 and h.core.trust.version == 2
    assert h.statuses()[-1]["state"] == "keys"
    # The old key is now refused, the new one accepted.
    h.run(h.core.command(cmd(make_update(SIGNING_KEY, b"x" * 10, job=3))))
    assert h.statuses()[-1]["code"] == P.E_KEY_REVOKED
    h.run(h.core.command(cmd(make_update(new_key, b"x" * 10, job=4), key=new_key)))
    assert h.began == 1
    # Replaying the key update (or an older one) is refused.
    h.run(h.core.command(cmd(update, key=ROOT_KEY)))
    assert h.statuses()[-1]["code"] == P.E_STALE_KEYS
    forged_cert = dict(trust_doc(UNCERTIFIED)["certs"][0])
    forged_cert["sig"] = _flip_last_hex(forged_cert["sig"])
    h.run(h.core.command(cmd({"type": "keys", "version": 3, "certs": [forged_cert], "revoked": []}, key=ROOT_KEY)))
    assert h.statuses()[-1]["code"] == P.E_BAD_KEYS and h.core.trust.version == 2


def _cert_with_kid(key, kid):
    """A certificate the root really signed for `key`'s public key, but naming `kid`."""
    pub = signing.public_key_bytes(key)
    body = json.dumps({"kid": kid, "pub": pub.hex(), "usage": ["release", "command"],
                       "not_before": NOW - 100, "not_after": NOW + 10000}, sort_keys=True)
    return {"body": body, "sig": signing.sign(ROOT_KEY, body.encode()).hex()}


def test_key_update_needs_certificates_naming_their_own_key_and_revocations_by_exact_id(key):
    """A certificate's kid must be the key id of its pub (protocol §4.0): else a root that revokes a
    key by its id would leave it usable under the other name. Key ids in `revoked` are 16 lowercase
    hex, as the device compares them: an upper-case one would revoke nothing."""
    new_key = signing.generate_private_key()
    old_kid = signing.key_id(signing.public_key_bytes(SIGNING_KEY))
    new_kid = signing.key_id(signing.public_key_bytes(new_key))
    h = Harness(key)
    for version, certs, revoked in (
            (2, [_cert_with_kid(new_key, old_kid)], []),          # names another key's id
            (2, [_cert_with_kid(new_key, new_kid.upper())], []),  # its own id, in the wrong case
            (2, [_cert_with_kid(new_key, new_kid)], [old_kid.upper()]),
            (2, [_cert_with_kid(new_key, new_kid)], [12345])):
        h.run(h.core.command(cmd({"type": "keys", "version": version, "certs": certs, "revoked": revoked},
                                 key=ROOT_KEY)))
        assert h.statuses()[-1]["code"] == P.E_BAD_KEYS, (certs, revoked)
        assert h.core.trust.version == 1
    # The same update, well formed, is taken, and the revoked key is refused from then on.
    h.run(h.core.command(cmd({"type": "keys", "version": 2, "certs": [_cert_with_kid(new_key, new_kid)],
                              "revoked": [old_kid]}, key=ROOT_KEY)))
    assert h.core.trust.version == 2
    h.run(h.core.command(cmd(make_update(SIGNING_KEY, b"x" * 10, job=3))))
    assert h.statuses()[-1]["code"] == P.E_KEY_REVOKED


def test_wrong_hardware_type_is_refused_before_any_write(key):
    h = Harness(key)
    h.run(h.core.command(cmd(make_update(key, b"x" * 100, hw=("esp32",)))))
    st = h.statuses()[-1]
    assert (st["state"], st["code"]) == ("failed", P.E_HW_MISMATCH)
    assert h.began == 0


def test_image_larger_than_slot_is_refused(key):
    h = Harness(key, capacity=50)
    h.run(h.core.command(cmd(make_update(key, b"x" * 100))))
    assert h.statuses()[-1]["code"] == P.E_TOO_LARGE and h.began == 0


def test_flipped_bit_in_a_chunk_fails_the_hash(key):
    image = bytes(range(256)) * 4
    h = Harness(key)
    h.run(h.core.command(cmd(make_update(key, image))))
    h.serve(image, 256, corrupt=2)
    st = h.statuses()[-1]
    assert (st["state"], st["code"]) == ("failed", P.E_HASH_MISMATCH)
    assert h.trial is None and not h.rebooted and h.core.state == P.IDLE


@pytest.mark.parametrize("payload, code", [
    (b"not json", P.E_BAD_COMMAND),
    (b"[1, 2]", P.E_BAD_COMMAND),
    (b'{"body": 1, "kid": "00", "sig": "00"}', P.E_BAD_COMMAND),
    (b'{"body": "{}", "kid": "zz", "sig": "00"}', P.E_BAD_COMMAND),
    (b"\xff\xfe\x00", P.E_BAD_COMMAND),
    (b"{" + b" " * 9000 + b"}", P.E_OVERSIZE),
    # well signed, malformed bodies
    (cmd({"type": "update"}), P.E_BAD_COMMAND),
    (cmd({"type": "update", "job": "7", "device": "d1"}), P.E_BAD_COMMAND),
    (cmd({"type": "update", "job": True, "device": "d1"}), P.E_BAD_COMMAND),
    (cmd({"type": "update", "job": 7, "device": "d1", "manifest": 1}), P.E_BAD_COMMAND),
    (cmd({"type": "update", "job": 7, "device": "d1", "time": "now"}), P.E_BAD_COMMAND),
    (cmd({"type": "reformat", "job": 7, "device": "d1"}), P.E_UNKNOWN_COMMAND),
    (cmd({"type": "cancel", "job": 7, "device": "d1", "target": 99}), P.E_NOT_RUNNING),
])
def test_malformed_commands_are_rejected_without_state_change(key, payload, code):
    h = Harness(key)
    before = h.core.state, h.core.last_job
    h.run(h.core.command(payload))
    st = h.statuses()[-1]
    assert (st["state"], st["code"]) == ("rejected", code)
    assert st["reason"]
    assert (h.core.state, h.core.last_job) == before or code == P.E_NOT_RUNNING


def test_duplicate_and_stale_jobs_are_ignored(key):
    image = b"y" * 300
    h = Harness(key)
    first = cmd(make_update(key, image, job=9))
    h.run(h.core.command(first))
    began = h.began
    h.run(h.core.command(first))
    assert h.statuses()[-1]["code"] == P.E_DUPLICATE_JOB and h.began == began
    h.run(h.core.command(cmd(make_update(key, image, job=4))))
    assert h.statuses()[-1]["code"] == P.E_STALE_JOB and h.began == began
    assert h.core.job.id == 9


def test_command_expires_after_its_exp_and_a_fresh_copy_of_the_job_is_accepted(key):
    """Trusted time = the latest verified signed time: a command is taken up to its `exp`
    second inclusive and refused after it (E_EXPIRED) with nothing persisted, so the center's
    fresh copy of the same job is accepted."""
    image = b"e" * 300
    h = Harness(key)
    h.run(h.core.command(cmd({"type": "inventory", "job": 1, "device": "d1"}, now=NOW)))
    assert h.core.time == NOW and h.core.last_job == 1
    saved, published = h.state_saved, len(h.published)
    expired = cmd(dict(make_update(key, image, job=2), exp=NOW - 1), now=NOW - 1000)
    h.run(h.core.command(expired))
    st = h.statuses()[-1]
    assert (st["state"], st["code"], st["job"], st["current"]) == ("rejected", P.E_EXPIRED, 2, P.IDLE)
    assert h.state_saved == saved and h.began == 0 and h.core.last_job == 1 and h.journal is None
    assert [t for t, _ in h.published[published:]] == [P.STATUS]  # nothing but the refusal
    # the boundary: exp equal to the trusted time is still valid; the same job id, signed again
    h.run(h.core.command(cmd(dict(make_update(key, image, job=2), exp=NOW), now=NOW - 1000)))
    assert h.core.last_job == 2 and h.began == 1 and h.statuses()[-1]["state"] == P.DOWNLOADING
    h.serve(image, 256)
    assert bytes(h.slot) == image and h.rebooted


def test_a_command_signed_long_ago_is_refused_once_the_device_saw_a_later_time(key):
    """A captured command replayed 90 days later: valid signature, new job id, but expired."""
    h = Harness(key)
    h.run(h.core.command(cmd({"type": "inventory", "job": 1, "device": "d1"}, now=NOW)))
    old = NOW - 90 * 86400
    h.run(h.core.command(cmd(make_update(key, b"o" * 100, job=50), now=old)))
    assert h.statuses()[-1]["code"] == P.E_EXPIRED and h.began == 0 and h.core.last_job == 1


def test_real_time_clock_expires_commands_only_when_it_is_later_than_the_signed_time(key):
    h = Harness(key)  # signed time: the provisioning time, NOW - 100
    update = cmd(make_update(key, b"c" * 100, job=3), now=NOW - 100)  # exp NOW - 100 + TTL
    h.run(h.core.command(update, clock=NOW - 100 + TTL + 1))
    assert h.statuses()[-1]["code"] == P.E_EXPIRED and h.core.last_job == 0
    # A board without a set clock says 2000-01-01: below the signed time, it changes nothing.
    h.run(h.core.command(update, clock=946684800))
    assert h.core.last_job == 3 and h.began == 1


def test_exp_is_required_except_on_root_signed_key_updates(key):
    h = Harness(key)
    body = dict(make_update(key, b"x" * 10, job=3), time=NOW)
    h.run(h.core.command(envelope(key, body)))
    assert h.statuses()[-1]["code"] == P.E_BAD_COMMAND and "exp" in h.statuses()[-1]["reason"]
    keys = {"type": "keys", "time": NOW, "version": 2, "certs": TRUST["certs"], "revoked": []}
    h.run(h.core.command(envelope(ROOT_KEY, keys)))
    assert h.statuses()[-1]["state"] == "keys" and h.core.trust.version == 2


def test_statuses_and_agent_state_carry_the_boot_epoch(key):
    h = Harness(key, agent={"last_job": 0, "boot": 4, "epoch": 123456})
    h.run(h.core.command(cmd(make_update(key, b"p" * 10, job=2))))
    assert {(m["epoch"], m["boot"]) for m in h.all_statuses()} == {(123456, 4)}
    assert h.state_saved["epoch"] == 123456
    assert C.new_epoch(b"\x00\x00\x00\x00") == 1 and C.new_epoch(b"\xff\xff\xff\xff") == 2
    epochs = {C.new_epoch(os.urandom(4)) for _ in range(100)}
    assert len(epochs) > 90 and all(1 <= e <= P.MAX_EPOCH for e in epochs)


@pytest.mark.parametrize("payload", [b"", b"\x00\x00\x00\x01", struct.pack(">II", 1, 999) + b"x",
                                     struct.pack(">II", 1, 0) + b"short"])
def test_malformed_chunks_are_rejected_and_download_continues(key, payload):
    image = bytes(range(200)) * 3
    h = Harness(key)
    h.run(h.core.command(cmd(make_update(key, image, job=1, chunk=256))))
    h.run(h.core.chunk(payload))
    st = h.statuses()[-1]
    assert (st["state"], st["code"]) == ("rejected", P.E_BAD_CHUNK)
    assert h.core.state == P.DOWNLOADING and h.slot == bytearray()
    h.serve(image, 256)
    assert bytes(h.slot) == image and h.rebooted


def test_lost_chunks_are_requested_again_after_timeout_and_stall_fails(key):
    image = b"z" * 2048
    h = Harness(key)
    h.core.settings = C.Settings(chunk_timeout=100, stall_timeout=1000)
    h.run(h.core.tick(0))
    h.run(h.core.command(cmd(make_update(key, image))))
    n = len(h.requests())
    # The timeout asks for one chunk past the window (a probe); it arrives before the window's,
    # so those were lost: the window is asked for again from the next chunk.
    h.run(h.core.tick(150))
    probe = h.requests()[n:]
    assert [(r["first"], r["count"]) for r in probe] == [(4, 1)]
    h.run(h.core.chunk(struct.pack(">II", 1, 4) + image[4 * 256:5 * 256]))
    again = h.requests()[n + 1:]
    assert [(r["first"], r["count"]) for r in again] == [(0, 4)]
    h.run(h.core.tick(1200))
    st = h.statuses()[-1]
    assert (st["state"], st["code"]) == ("failed", P.E_TIMEOUT)


def test_late_window_after_a_chunk_timeout_is_not_asked_for_twice(key):
    # Under load a window can take longer than the chunk timeout: the timeout asks for one chunk
    # more, not the window again, and each timeout in a row without a chunk doubles the next.
    image = bytes(range(256)) * 8
    h = Harness(key)
    h.core.settings = C.Settings(chunk_timeout=100, stall_timeout=10000)
    h.run(h.core.tick(0))
    h.run(h.core.command(cmd(make_update(key, image, chunk=256, window=4))))
    n = len(h.requests())
    for now in (101, 150, 302, 500, 703):   # timeouts at 101, 302 (+200) and 703 (+400)
        h.run(h.core.tick(now))
    probes = h.requests()[n:]
    assert [(r["first"], r["count"]) for r in probes] == [(4, 1), (5, 1), (6, 1)]
    h.serve(image, 256)   # the late window, then the probes and whatever they lead to
    assert bytes(h.slot) == image and h.rebooted
    asked = [i for r in h.requests() for i in range(r["first"], r["first"] + r["count"])]
    assert sorted(asked) == list(range(8)), "no chunk asked for twice"


def test_resume_from_journal_continues_at_checkpoint(key):
    image = bytes(range(256)) * 16
    h = Harness(key)
    h.run(h.core.command(cmd(make_update(key, image, chunk=256, window=4))))
    # Deliver 6 chunks, then "lose power": the journal points at chunk 4.
    for i in range(6):
        h.run(h.core.chunk(struct.pack(">II", 1, i) + image[i * 256:(i + 1) * 256]))
    journal = h.journal
    assert journal["pos"] == 4
    hasher = hashlib.sha256(image[:4 * 256])
    h2 = Harness(key, agent={"last_job": 1, "boot": 2})
    h2.slot = bytearray(image[:4 * 256])
    h2.core = new_core(agent={"last_job": 1, "boot": 2})
    h2.published.clear()
    h2.run(h2.core.booted({"trial": None}, journal, hasher))
    h2.run(h2.core.connected_())
    assert h2.requests()[0]["first"] == 4
    h2.serve(image, 256)
    assert bytes(h2.slot) == image and h2.rebooted


def test_newer_job_supersedes_a_download(key):
    h = Harness(key)
    h.run(h.core.command(cmd(make_update(key, b"a" * 3000, job=1))))
    h.run(h.core.command(cmd(make_update(key, b"b" * 500, job=2))))
    states = [(s["job"], s["state"]) for s in h.statuses()]
    assert (1, "cancelled") in states and states[-1] == (2, "downloading")
    h.serve(b"b" * 500, 256)
    assert bytes(h.slot) == b"b" * 500 and h.trial["job"] == 2


def test_install_failure_is_reported(key):
    h = Harness(key)
    h.install_result = (P.E_BAD_BUNDLE, "BundleError: bad magic")
    image = b"q" * 10
    h.run(h.core.command(cmd(make_update(key, image))))
    h.serve(image, 256)
    st = h.statuses()[-1]
    assert (st["state"], st["code"]) == ("failed", P.E_BAD_BUNDLE) and not h.rebooted


def test_payloads_dropped_as_oversized_are_reported(key):
    h = Harness(key)
    h.run(h.core.command(70000))
    assert (h.statuses()[-1]["state"], h.statuses()[-1]["code"]) == ("rejected", P.E_OVERSIZE)
    h.run(h.core.chunk(70000))
    assert (h.statuses()[-1]["state"], h.statuses()[-1]["code"]) == ("rejected", P.E_BAD_CHUNK)
    assert h.core.state == P.IDLE


class _HeapFullAt:
    """json for the core whose loads() raises MemoryError at its n-th call (1: the envelope,
    2: the body), as MicroPython's does in a heap too small for the command."""

    def __init__(self, n):
        self.n, self.calls = n, 0

    def loads(self, text):
        self.calls += 1
        if self.calls == self.n:
            raise MemoryError("memory allocation failed")
        return json.loads(text)

    def __getattr__(self, name):
        return getattr(json, name)


@pytest.mark.parametrize("at", [1, 2], ids=["envelope", "body"])
def test_a_command_the_heap_cannot_parse_is_refused_naming_its_job_only_if_it_is_new(key, monkeypatch, at):
    """No heap to parse: E_BAD_COMMAND with the job id read from the text, so that the center ends
    that job at once (docs/protocol.md §9) rather than at its timeout; but never the job being run
    or an older one (a redelivery the heap could not parse must not end the download)."""
    image = os.urandom(2048)
    h = Harness(key)
    h.run(h.core.command(cmd(make_update(key, image, job=3))))
    assert h.core.state == P.DOWNLOADING and h.core.job.id == 3
    for job, named in ((7, 7), (3, None), (2, None)):
        monkeypatch.setattr(C, "json", _HeapFullAt(at))
        h.run(h.core.command(cmd(make_update(key, image, job=job))))
        monkeypatch.setattr(C, "json", json)
        st = h.statuses()[-1]
        assert (st["state"], st["code"], st.get("job")) == ("rejected", P.E_BAD_COMMAND, named), (st, h.core.last_job)
        assert "no heap to parse a command" in st["reason"]
        assert h.core.state == P.DOWNLOADING and h.core.job.id == 3  # the download goes on
    # Nor does a malformed command name the running job: the center would end it (§9)
    h.run(h.core.command(b"{not json"))
    st = h.statuses()[-1]
    assert (st["state"], st["code"], st.get("job"), st["current"]) == ("rejected", P.E_BAD_COMMAND, None, "downloading")


def test_confirmed_trial_raises_the_counter_for_the_running_agent(key):
    h = Harness(key)
    h.core = new_core(agent={"last_job": 5, "boot": 2}, version="3.0.0")
    h.run(h.core.booted({"trial": {"slot": "b", "job": 5, "version": "3.0.0", "tries": 1, "counter": 5}}))
    h.run(h.core.connected_())
    assert h.core.counter == 5
    h.run(h.core.command(cmd(make_update(key, b"x" * 10, job=6, counter=4))))
    assert h.statuses()[-1]["code"] == P.E_DOWNGRADE


def test_a_connection_that_breaks_before_a_whole_chunk_halves_the_chunk_down_to_2048(key):
    # §5: 8 KiB chunks, the link breaks before one arrives: the rest goes in 4 KiB, then 2 KiB
    # chunks, asked for from the same byte; a connection that brought a chunk changes nothing.
    image = os.urandom(40_000)
    h = Harness(key)
    h.run(h.core.command(cmd(make_update(key, image, chunk=8192, window=2) | {"req_format": 2})))

    def requests():
        return [tuple(map(int, body.split())) for topic, body in h.published if topic == P.REQ]

    def serve(first, count, chunk):
        for i in range(first, min(first + count, -(-len(image) // chunk))):
            h.run(h.core.chunk(struct.pack(">II", 1, i) + image[i * chunk:(i + 1) * chunk]))

    serve(*requests()[-1][1:])                         # 2 chunks of 8 KiB arrive
    h.run(h.core.disconnected()).run(h.core.connected_())
    assert requests()[-1] == (1, 2, 2, 8192)           # a connection with chunks: same size
    h.run(h.core.disconnected()).run(h.core.connected_())
    assert requests()[-1] == (1, 4, 2, 4096)           # nothing arrived: half, from byte 16384
    h.run(h.core.disconnected()).run(h.core.connected_())
    assert requests()[-1][1:] == (8, 2, 2048)          # and again, not below 2048
    h.run(h.core.disconnected()).run(h.core.connected_())
    assert requests()[-1][1:] == (8, 2, 2048)
    while h.core.state == P.DOWNLOADING:
        serve(*requests()[-1][1:])
    assert bytes(h.slot) == image and h.core.state != P.FAILED


def test_a_trial_boot_confirms_before_online_and_publishes_one_inventory(key):
    # §1.1: trial and confirmed before online, then one inventory naming the confirmed firmware,
    # so the center never builds a command from an inventory of before.
    h = Harness(key)
    h.core = new_core(agent={"last_job": 5, "boot": 2}, version="1.1.0")
    h.published.clear()
    h.run(h.core.booted({"trial": {"slot": "b", "job": 5, "version": "1.1.0", "tries": 1}}))
    h.run(h.core.connected_())
    kinds = [json.loads(body)["state"] if topic == P.STATUS else topic for topic, body in h.published
             if topic in (P.STATUS, P.ONLINE)]
    assert kinds[:3] == ["trial", "confirmed", P.ONLINE], kinds
    inventories = [json.loads(body) for topic, body in h.published if topic == P.INVENTORY]
    assert len(inventories) == 1 and (inventories[0]["version"], inventories[0]["state"]) == ("1.1.0", "idle")
    topics = [topic for topic, _ in h.published]
    assert topics.index(P.ONLINE) < topics.index(P.INVENTORY)


# ---- health reports (docs/protocol.md §6): what campaigns judge a probation by ----------------

def test_health_report_follows_the_confirmation_with_the_new_version(key):
    h = Harness(key)
    h.core = new_core(agent={"last_job": 5, "boot": 2}, version="1.1.0")
    h.published.clear()
    h.run(h.core.booted({"trial": {"slot": "b", "job": 5, "version": "1.1.0", "tries": 1}}))
    h.run(h.core.connected_())
    kinds = [m["state"] for m in h.all_statuses()]
    assert kinds.index("confirmed") < kinds.index("health")
    health = h.healths()[-1]
    assert (health["ok"], health.get("job"), health["version"], health.get("reason")) == (True, None, "1.1.0", None)
    # after the confirmation in the (boot, seq) order: the control center relies on it
    confirmed = [m for m in h.all_statuses() if m["state"] == "confirmed"][0]
    assert (health["boot"], health["seq"]) > (confirmed["boot"], confirmed["seq"])


def test_health_report_says_why_the_app_is_unhealthy(key):
    core = C.UpdateCore({"id": "d1", "hardware": "unix", "root": signing.public_key_bytes(ROOT_KEY),
                         "trust": TRUST, "capacity": 1 << 16, "kinds": ("image",), "version": "1.0.0",
                         "app_error": "app failed to start: ValueError: boom"}, {"last_job": 0, "boot": 3})
    core.booted({"trial": None})
    health = [json.loads(a[2]) for a in core.connected_() if a[0] == C.A_PUBLISH and a[1] == P.STATUS]
    assert [(m["state"], m["ok"], m["reason"]) for m in health] == \
        [("health", False, "app failed to start: ValueError: boom")]


def test_health_report_repeats_every_interval_while_connected(key):
    core = new_core(settings=C.Settings(health_interval=1000))
    core.booted({"trial": None})
    core.tick(100)
    core.connected_()

    def healths(actions):
        return [a for a in actions if a[0] == C.A_PUBLISH and json.loads(a[2]).get("state") == P.HEALTH]

    assert healths(core.tick(900)) == []
    assert len(healths(core.tick(1200))) == 1
    assert healths(core.tick(1500)) == []
    core.disconnected()
    assert healths(core.tick(5000)) == []  # nothing to publish on while offline
    # a health report changes no state and names no job
    assert core.state == P.IDLE


def test_health_status_kind_is_documented():
    spec = (ROOT / "docs" / "protocol.md").read_text()
    assert "`health`" in spec and "health_interval" in spec


def test_keyring_revokes_by_the_key_id_devices_compare(tmp_path):
    """`fota keys revoke` with an upper-case id writes the lower-case id devices match (§4.0), and
    refuses what is no key id, instead of a key update every device would refuse."""
    from fota.tools.keyring import Keyring
    from fota.tools.signing import SigningError
    ring = Keyring(tmp_path / "keys")
    ring.init()
    kid = "ABCDEF0123456789"
    assert ring.revoke(kid)["revoked"] == [kid.lower()]
    h = Harness(SIGNING_KEY)
    update = json.loads(json.loads(ring.keys_update())["body"])
    ring_root = ring.root()
    h.core.trust.root = signing.public_key_bytes(ring_root)  # this keyring's root, for this check
    h.core.trust.root_kid = signing.key_id(h.core.trust.root)
    h.run(h.core.command(cmd(update, key=ring_root)))
    assert h.statuses()[-1]["state"] == "keys" and h.core.trust.revoked == [kid.lower()]
    with pytest.raises(SigningError):
        ring.revoke("not-a-key-id")
