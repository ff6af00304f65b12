# The device's update state machine, sans-IO (in the manner of h11): events in, actions out.
#
# Everything that decides a state transition lives in this file, and the transitions are a table
# (TRANSITIONS) that docs/protocol.md repeats; tests keep the two equal and check that nothing
# but the table (UpdateCore._go) changes the state. The core never touches
# a socket, a file or a clock: a runner feeds it events (command received, chunk received, tick,
# install result) and executes the actions it returns, in order:
#
#   (A_PUBLISH, suffix, payload, qos, retain)   publish on fota/v1/<id>/<suffix>
#   (A_BEGIN, size, delta)                      prepare the inactive slot for `size` bytes; delta:
#                                               None, or the patch to apply (see Job.delta_expect)
#   (A_WRITE, offset, data)                     write image bytes to the inactive slot (a delta
#                                               job: patch bytes, for the runner's decoder)
#   (A_JOURNAL, dict_or_None)                   flush the slot, then persist (or delete) the journal
#   (A_STATE, dict)                             persist the agent state (last accepted job)
#   (A_INSTALL, manifest, key)                  finalise the slot (key: release key of an encrypted
#                                               release, else None); the runner answers installed()
#   (A_SET_TRIAL, job, version, counter)        mark the inactive slot for a trial boot
#   (A_TRUST, document)                         persist a new trust store (root-signed key update)
#   (A_CONFIRM, report)                         make the running trial slot permanent
#   (A_CLEAR_REPORT,)                           the boot record's terminal report was acknowledged
#   (A_TRIAL_FAILED, reason)                    record a failed trial in the boot record
#   (A_REBOOT,)                                 restart the device
#   (A_FETCH, http, offset, size, chunk)        transport http (docs/protocol.md §5.2): (re)start
#                                               the ranged GETs of http["url"] from byte `offset`;
#                                               the runner hands each `chunk` bytes to fetched()
#                                               and a refusal to fetch_failed()
#
# Power: the runner reports the battery level (percent, or None if the port cannot measure it)
# and external power with power(); an update that needs more battery than there is waits in
# `postponed` (before its download, or after verifying and before its install).
#
# Runs on MicroPython and CPython alike: no typing, no dataclasses, no enum.

import gc
import json
import hashlib
import struct
from binascii import hexlify, unhexlify

from fota.device import protocol as P
from fota.device import ecdsa
from fota.device.trust import TrustError, TrustStore

# A collection before the command's parse and after each signature check (MicroPython only: on
# CPython it would only cost time). The check's bignum temporaries, and the parse's, are garbage
# spread over the heap; what the core allocates next (the body's and the manifest's objects, the
# job) would land between them, and once they are collected the free heap is left in holes too
# small for a delta decoder's tables (docs/heap.md, "Delta update"). Collected first, the job's
# objects fill the lowest holes.
collect = gc.collect if hasattr(gc, "mem_free") else (lambda: None)

A_PUBLISH = "publish"
A_BEGIN = "begin"
A_WRITE = "write"
A_JOURNAL = "journal"
A_STATE = "state"
A_INSTALL = "install"
A_SET_TRIAL = "set_trial"
A_CONFIRM = "confirm"
A_CLEAR_REPORT = "clear_report"
A_TRIAL_FAILED = "trial_failed"
A_REBOOT = "reboot"
A_TRUST = "trust"
A_FETCH = "fetch"

# (from state, event) -> to state: every state change of the core is one of these rows, made by
# _go(); an event the table does not allow raises ProtocolError. A core starts in idle at every
# boot (the constructor sets it; no transition): the state of the boot before is not kept, and
# booted() takes the core on from idle by what the boot record and the journal say.
# The states are written out (the values of protocol's names, which a test checks): a tuple of
# literals is a constant, in flash when frozen, where one built from P.IDLE ... took ~0.9 KiB of
# heap.
TRANSITIONS = (
    ("idle", "accept", "downloading"),
    ("downloading", "downloaded", "verifying"),
    ("downloading", "cancel", "cancelled"),
    ("downloading", "error", "failed"),
    ("verifying", "verified", "installing"),
    ("verifying", "error", "failed"),
    ("installing", "installed", "rebooting"),
    ("installing", "error", "failed"),
    ("idle", "trial_boot", "trial"),            # booted on trial (the boot record's trial)
    ("trial", "healthy", "confirmed"),
    ("trial", "trial_timeout", "rebooting"),    # broker not reached: the selector counts the attempt
    ("idle", "reverted_boot", "reverted"),      # the selector gave up the trial (the boot record's report)
    ("confirmed", "done", "idle"),
    ("failed", "done", "idle"),
    ("reverted", "done", "idle"),
    ("cancelled", "done", "idle"),
    ("idle", "low_power", "postponed"),
    ("verifying", "low_power", "postponed"),
    ("postponed", "power_ok", "downloading"),
    ("postponed", "power_ok_verified", "installing"),
    ("postponed", "cancel", "cancelled"),
    ("idle", "resume", "downloading"),          # booted with the journal of a download
    ("idle", "resume_postponed", "postponed"),  # ... of a job postponed before its download
    ("idle", "resume_verified", "verifying"),   # ... of a job postponed after it: re-check the slot
    ("verifying", "rehashed", "postponed"),     # the slot still holds the image; wait for power
)

REJECTED = P.REJECTED  # status kind for a refused message; not a state
PROGRESS_STEPS = 10     # report download progress at most every 1/10 of the image
POWER_STEP = 5          # re-publish the inventory when the battery moved this many points


def new_epoch(seed):
    """A boot epoch (1..MAX_EPOCH) from 4 random bytes: chosen once, when the agent state is
    first created, so that statuses of a device whose counters started over (re-provisioned,
    flash erased) are not taken for duplicates of its old ones (docs/protocol.md section 6)."""
    n = 0
    for b in bytes(seed)[:4]:
        n = n * 256 + b
    return n % P.MAX_EPOCH + 1


class ProtocolError(Exception):
    pass


class Rejection(Exception):
    def __init__(self, code, reason, job=None, terminal=False):
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.job = job
        self.terminal = terminal  # True: the job fails; False: the message is refused


class Settings:
    """Timing and trial settings; all times in milliseconds."""

    def __init__(self, chunk_timeout=3000, stall_timeout=60000, trial_timeout=60000,
                 max_chunk=P.MAX_CHUNK_SIZE, max_inflight=P.DEFAULT_MAX_INFLIGHT, health_interval=0,
                 progress_interval=1000, chunk=P.DEFAULT_CHUNK_SIZE):
        self.chunk_timeout = chunk_timeout
        self.stall_timeout = stall_timeout
        self.trial_timeout = trial_timeout
        self.max_chunk = max_chunk
        # The chunk size the device asks the center for in its inventory (`chunk`, §3): larger
        # chunks cost fewer headers and requests on the wire, and a chunk-sized buffer of heap.
        self.chunk = chunk
        # Bytes of requested chunks the device lets be in flight at once: the window it uses is
        # min(command window, max_inflight // chunk), so a large chunk size cannot make
        # queued chunks exhaust a small heap whatever the control center asks for.
        self.max_inflight = max_inflight
        # A health report after every connect, and every health_interval ms while connected (0: only
        # after connecting): campaigns judge a confirmed update by it during their probation time.
        self.health_interval = health_interval
        # Download progress is reported every 1/PROGRESS_STEPS of the image but not more often than
        # this (ms): a fast link would otherwise send ten statuses for a download of a second,
        # which at fleet scale is most of the control center's ingestion work.
        self.progress_interval = progress_interval


def _need(obj, key, kind):
    value = obj.get(key)
    # bool is an int subclass on CPython: a JSON true is not a job id or a size.
    if not isinstance(value, kind) or isinstance(value, bool):
        raise Rejection(P.E_BAD_COMMAND, "field '%s' missing or not %s" % (key, kind.__name__))
    return value


def _job_in(raw, key):
    """The job id in a command the heap could not parse, read from its text without parsing it
    (key: b'\\"job\\":' in an envelope's bytes, '"job":' in a body's str); None if not found.
    Not authenticated: it only lets the center end the device's own job at once (a refusal
    E_BAD_COMMAND naming it, docs/protocol.md §9) instead of waiting for its timeout."""
    try:
        at = raw.find(key)
        if at < 0:
            return None
        at += len(key)
        end = at
        digit = (lambda c: 48 <= c <= 57) if isinstance(raw, bytes) else (lambda c: "0" <= c <= "9")
        while end < len(raw) and end - at < 10 and digit(raw[end]):
            end += 1
        return int(raw[at:end]) if end > at else None
    except (MemoryError, ValueError, TypeError, AttributeError):
        return None


def _is_hex(text, length):
    if not isinstance(text, str) or len(text) != length:
        return False
    for ch in text:
        if ch not in "0123456789abcdefABCDEF":
            return False
    return True


def parse_manifest(text, kinds):
    """Parse a manifest whose signature already verified; raise Rejection(E_BAD_MANIFEST)."""
    try:
        m = json.loads(text)
    except (ValueError, TypeError, RuntimeError, MemoryError):  # nested too deep / too big for the heap
        raise Rejection(P.E_BAD_MANIFEST, "manifest is not JSON", terminal=True)
    if not isinstance(m, dict):
        raise Rejection(P.E_BAD_MANIFEST, "manifest is not a JSON object", terminal=True)
    problems = []
    if m.get("v") != 1:
        problems.append("v must be 1")
    version = m.get("version")
    if not isinstance(version, str) or not 0 < len(version) <= 64:
        problems.append("version must be a string of 1..64 chars")
    hw = m.get("hw")
    if not isinstance(hw, list) or not hw or [h for h in hw if not isinstance(h, str)]:
        problems.append("hw must be a non-empty list of strings")
    size = m.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        problems.append("size must be a positive integer")
    if not _is_hex(m.get("sha256"), 64):
        problems.append("sha256 must be 64 hex chars")
    counter = m.get("counter")
    if not isinstance(counter, int) or isinstance(counter, bool) or counter < 0:
        problems.append("counter must be an integer >= 0")
    files = m.get("files")
    if files is not None and not _valid_files(files):
        problems.append("files must be a list of [name, size, sha256]")
    enc = m.get("enc")
    if enc is not None and not (isinstance(enc, dict) and enc.get("alg") == "aes-256-cbc"
                                and isinstance(enc.get("plain_size"), int) and not isinstance(enc.get("plain_size"), bool)):
        problems.append("enc must be {alg: aes-256-cbc, plain_size: int}")
    if not _percent(m.get("min_battery", 0)):
        problems.append("min_battery must be an integer 0..100")
    if m.get("kind") not in kinds:
        problems.append("kind %r is not installable here (backend takes %s)" % (m.get("kind"), "/".join(kinds)))
    if problems:
        raise Rejection(P.E_BAD_MANIFEST, "; ".join(problems), terminal=True)
    return m


def _percent(value):
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 100


def _valid_files(files):
    if not isinstance(files, list):
        return False
    for f in files:
        if not (isinstance(f, list) and len(f) == 3 and isinstance(f[0], str) and isinstance(f[1], int)
                and not isinstance(f[1], bool) and _is_hex(f[2], 64)):
            return False
    return True


def _valid_delta(d):
    if not isinstance(d, dict) or not _is_hex(d.get("base_sha256"), 64) or not _is_hex(d.get("sha256"), 64):
        return False
    for key, low in (("base_size", 1), ("size", 1), ("wbits", 9)):
        v = d.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            return False
    fmt = d.get("format", 1)
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
        return False
    d["base_sha256"] = d["base_sha256"].lower()
    d["sha256"] = d["sha256"].lower()
    return d["wbits"] <= 15


def _valid_http(h):
    if not isinstance(h, dict):
        return False
    url = h.get("url")
    if not isinstance(url, str) or len(url) > P.MAX_URL or not (url.startswith("https://") or url.startswith("http://")):
        return False
    exp = h.get("exp")
    if not isinstance(exp, int) or isinstance(exp, bool):
        return False
    hosts = h.get("hosts", [])
    return isinstance(hosts, list) and not [x for x in hosts if not isinstance(x, str)]


class Job:
    """An accepted update job: the command fields plus the parsed manifest."""

    def __init__(self, cmd, manifest, max_inflight, transports=P.TRANSPORTS):
        self.id = cmd["job"]
        self.cmd = cmd
        self.manifest = manifest
        self.delta = cmd.get("delta")
        # Transport http: the signed URL the payload is fetched from (a device without http
        # ignores the field and pulls chunks over MQTT, which the center serves for any job).
        self.http = cmd.get("http") if "http" in transports else None
        # What travels: the image, or the patch that turns the running image into it.
        self.size = self.delta["size"] if self.delta else manifest["size"]
        self.chunk = cmd["chunk"]
        self.window = max(1, min(cmd["window"], max_inflight // self.chunk))
        self.chunks = (self.size + self.chunk - 1) // self.chunk
        # battery percent needed to download and to install: the stricter of the deployment's
        # (command) and the release's (manifest) minimum
        self.min_battery = max(cmd.get("min_battery", 0), manifest.get("min_battery", 0))

    def delta_expect(self):
        """For A_BEGIN: what the patch must agree with (docs/delta.md), or None."""
        d = self.delta
        if not d:
            return None
        m = self.manifest
        return {"base_sha256": d["base_sha256"], "base_size": d["base_size"], "patch_size": d["size"],
                "wbits": d["wbits"], "format": d.get("format", 1), "sha256": m["sha256"].lower(), "size": m["size"]}


class UpdateCore:
    """The update state machine of one device.

    identity: dict with id, hardware, root (65-byte root public key), trust (trust document, see
    fota.device.trust), capacity (bytes), kinds (tuple of manifest kinds the slot backend
    installs), version (running version), counter (highest installed security counter).
    agent_state: persisted dict {"last_job", "boot" (already incremented), "time", "epoch"}.
    verify: ECDSA P-256 verify(pub, message, sig) -> bool; default the pure-Python ecdsa.verify
    (the fleet simulator passes one backed by `cryptography`, same result, ~20x faster).
    """

    def __init__(self, identity, agent_state, settings=None, verify=None):
        self.verify = verify or ecdsa.verify
        self.id = identity["id"]
        self.hardware = identity["hardware"]
        self.trust = TrustStore(identity["root"], identity["trust"], self.verify)
        self.counter = identity.get("counter", 0)
        # Device key for unwrapping release keys (optional payload encryption), or None when
        # the device or its backend cannot decrypt.
        self.enc_key = identity.get("enc_key")
        self.capacity = identity["capacity"]
        # Bytes the backend can write for a new image now (its filesystem's free space plus what
        # the inactive slot holds), or None where that does not apply (flash partitions). The
        # runner refreshes it before each command.
        self.free = identity.get("free")
        self.kinds = identity["kinds"]
        self.version = identity["version"]
        # The running image ({"sha256", "size"}, or None if unknown): the base a delta must name.
        self.image = identity.get("image")
        self.delta_wbits = identity.get("delta_wbits", 0)  # 0: this device takes no deltas
        self.delta_formats = identity.get("delta_formats", P.DELTA_FORMATS)
        self.transports = identity.get("transports", ("mqtt",))  # payload transports the runner has
        self.settings = settings or Settings()
        self.last_job = agent_state.get("last_job", 0)
        self.boot = agent_state.get("boot", 0)
        self.time = agent_state.get("time", identity.get("time", 0))  # latest signed time seen
        self.epoch = agent_state.get("epoch", 0)  # boot epoch (new_epoch); 0: a device without one
        self.seq = 0
        self.state = P.IDLE  # the start state, not a transition: see TRANSITIONS
        self.job = None
        self.report = None        # terminal status kept in the boot record until acknowledged
        self.now = 0
        self.connected = False
        self.chunk_seen = False   # a whole chunk arrived on the current connection
        self.inventory_extra = {}  # runner-provided facts: active slot, slot versions, backend, port
        # Why the running app is unhealthy (it failed to start outside a trial), or None.
        self.app_error = identity.get("app_error")
        self.last_health = 0
        self.battery = identity.get("battery")      # percent, or None: not measured
        self.external = bool(identity.get("external"))  # on external power
        self.reported_power = (self.battery, self.external)
        self._reset_transfer()

    # ---- state table -------------------------------------------------------------------------
    def _go(self, event):
        # A scan, not a dict: a handful of calls per job, and a dict of the table would cost
        # about 1.3 KB of heap on MicroPython (and a key tuple per call).
        state = self.state
        for frm, name, to in TRANSITIONS:
            if frm == state and name == event:
                self.state = to
                return to
        raise ProtocolError("event %r not allowed in state %r" % (event, state))

    def _reset_transfer(self):
        self.hasher = None
        self.next = 0             # next expected chunk index
        self.requested = 0        # chunks requested so far (exclusive end)
        self.last_chunk_at = 0
        self.last_progress_at = 0
        self.backoff = 0          # chunk timeouts in a row without a chunk: each doubles the next (3 at most)
        self.probe = -1           # the chunk a timeout's probe asked for (-1: none)
        self.stalled = 0          # connected ms without a chunk, carried across reconnects
        self.reported_next = None  # self.next at the last progress report (None: report the next chunk)
        self.reported_at = 0       # self.now of the last progress report

    # ---- statuses ----------------------------------------------------------------------------
    def _status(self, state, job=None, code=None, reason=None):
        # Fields without a value (no job, no code, no transfer) are left out: absent means null
        # (§11), and every byte of a status is on the wire of an update (docs/heap.md).
        self.seq += 1
        msg = {"state": state, "version": self.version, "boot": self.boot, "seq": self.seq,
               "epoch": self.epoch}
        if job is None and self.job:
            job = self.job.id
        if job is not None:
            msg["job"] = job
        if code is not None:
            msg["code"] = code
        if reason is not None:
            msg["reason"] = reason
        if self.job:
            total = self.job.size
            written = min(self.next * self.job.chunk, total)
            msg["progress"] = written / total
            msg["bytes"] = written
            msg["total"] = total
        return msg

    def _publish_status(self, msg):
        reason = msg.get("reason")
        if reason is not None and len(reason) > P.MAX_REASON:
            # An app's exception text can be any length; the center refuses a longer reason.
            msg["reason"] = reason[:P.MAX_REASON]
        return (A_PUBLISH, P.STATUS, json.dumps(msg, separators=P.COMPACT), 1, False)

    def inventory(self, extra=None):
        inv = {"device": self.id, "proto": P.VERSION, "hardware": self.hardware,
               "version": self.version, "max_chunk": self.settings.max_chunk, "chunk": self.settings.chunk,
               "capacity": self.capacity, "state": self.state, "job": self.last_job,
               "keys": self.trust.version, "counter": self.counter,
               "image": self.image["sha256"] if self.image else None, "delta_wbits": self.delta_wbits,
               "delta_formats": list(self.delta_formats), "transports": list(self.transports),
               "battery": self.battery, "external": self.external}
        inv.update(self.inventory_extra)
        if extra:
            inv.update(extra)
        return (A_PUBLISH, P.INVENTORY, json.dumps(inv, separators=P.COMPACT), 1, True)

    # ---- boot ----------------------------------------------------------------------------------
    def booted(self, boot_record, journal=None, hasher=None):
        """Start-up. boot_record: {"trial": {...} or None, "report": {...} or None}.

        journal/hasher: an interrupted download (hasher already fed with the bytes in the slot).
        """
        actions = []
        trial = boot_record.get("trial")
        report = boot_record.get("report")
        if report:
            self.report = report
            if report.get("state") == P.REVERTED:
                self._go("reverted_boot")
                self._go("done")
        if trial:
            # We were started on trial; health is judged once the broker is reached.
            self._go("trial_boot")
            self.trial = trial
            self.trial_started = self.now
        elif journal:
            try:
                cmd = journal["cmd"]
                job = Job(cmd, self._verify(cmd), self.settings.max_inflight, self.transports)
                pos = journal["pos"]
                if not isinstance(pos, int) or not 0 <= pos <= job.chunks:
                    raise ValueError("bad journal position")
            except Rejection as r:
                # The job cannot go on (e.g. its key was revoked meanwhile): say so, or the
                # control center would wait for it forever.
                msg = self._status(P.FAILED, job=cmd.get("job"), code=r.code, reason=r.reason)
                return [self._agent_state(), (A_JOURNAL, None), self._publish_status(msg)]
            except (KeyError, TypeError, ValueError, AttributeError):
                return [self._agent_state(), (A_JOURNAL, None)]
            # The journal is also the record that the job was accepted: it is written before
            # last_job (see _update), and a cut between the two must not let the command run twice.
            if job.id > self.last_job:
                self.last_job = job.id
            crash = journal.get("crash")  # [failures in a row, at checkpoint, error] (executor.crashed)
            if isinstance(crash, list) and len(crash) == 3 and isinstance(crash[0], int) \
                    and crash[0] >= P.MAX_CRASHES:
                # The agent failed that often without the download getting past this checkpoint
                # (a MemoryError where the heap is too small for this job): resuming would fail
                # again at every boot. The job ends; the running firmware stays.
                msg = self._status(P.FAILED, job=job.id, code=P.E_CRASH,
                                   reason="the agent failed %d times in a row at chunk %s of this job: %s"
                                   % (crash[0], crash[1], crash[2]))
                return [self._agent_state(), (A_JOURNAL, None), self._publish_status(msg)]
            if isinstance(cmd.get("time"), int) and cmd["time"] > self.time:
                self.time = cmd["time"]
            if job.delta or hasher is None:
                # A patch starts over: the decoder's state is not checkpointed (it is small). So
                # does a download whose slot could not be re-read up to the checkpoint (e.g. a
                # power cut after the install unpacked and deleted the image, before the trial
                # was marked), instead of being dropped without a word.
                # A postponed one starts once power allows (power()).
                pos = 0
                hasher = hashlib.sha256()
                if not journal.get("postponed"):
                    actions += [(A_BEGIN, job.manifest["size"], job.delta_expect()), (A_JOURNAL, {"cmd": cmd, "pos": 0})]
            self.job = job
            self.hasher = hasher
            self.next = pos
            self.requested = pos
            self.last_progress_at = self.now
            if journal.get("postponed"):
                if pos == job.chunks:
                    # Downloaded and verified before the restart: the runner re-hashed the slot.
                    self._go("resume_verified")
                    failed = self._hash_failure()
                    if failed:
                        return [self._agent_state()] + actions + failed
                    self._go("rehashed")  # re-checked at the runner's first power reading
                else:
                    self._go("resume_postponed")  # likewise
            else:
                self._go("resume")
        return [self._agent_state()] + actions

    # ---- connection ------------------------------------------------------------------------
    def connected_(self, now=None):
        """The runner (re)connected and subscribed (now: its clock, ms, if it has one)."""
        if now is not None:
            self.now = now
        self.connected = True
        self.chunk_seen = False  # a whole chunk arrived on this connection
        # A trial boot reports `trial` and `confirmed` before `online`: the one inventory after
        # `online` then names the confirmed firmware, and the center, which builds a command only
        # once the device is online, never builds one from the inventory of before (§1.1).
        actions = self._healthy() if self.state == P.TRIAL else []
        actions += [(A_PUBLISH, P.ONLINE, "1", 1, True), self.inventory()]
        if self.report:
            actions.append(self._publish_status(self._report_status(self.report)))
            actions.append((A_CLEAR_REPORT,))
            self.report = None
        if self.state == P.DOWNLOADING:
            # Ask again from where we are: whatever was in flight is gone with the connection.
            self.requested = self.next
            self.last_chunk_at = self.now
            self.backoff = 0
            self.last_progress_at = self.now - self.stalled
            if self.stalled > self.settings.stall_timeout:
                # Connections that die before the next tick never reach tick()'s check.
                actions += self._end(P.FAILED, "error", P.E_TIMEOUT,
                                     "no chunk for %d ms of connected time (at chunk %d of %d)"
                                     % (self.settings.stall_timeout, self.next, self.job.chunks))
            else:
                actions += self._request_more(True)
        actions.append(self._health())
        return actions

    def _health(self):
        """A health report (status kind `health`): ok unless the running app failed to start."""
        self.last_health = self.now
        msg = self._status(P.HEALTH)
        msg.pop("job", None)  # about the device, not a job
        msg["ok"] = self.app_error is None
        if self.app_error is not None:
            msg["reason"] = self.app_error
        msg["uptime"] = self.now
        return self._publish_status(msg)

    def disconnected(self, now=None):
        """The connection was lost (now: its clock, ms; a connection can die between ticks)."""
        if now is not None:
            self.now = now
        self.connected = False
        if self.state == P.DOWNLOADING:
            # Keep the stall time so far: a link that breaks every connection before a chunk
            # gets through must still reach the deadline instead of retrying for ever.
            self.stalled = max(0, self.now - self.last_progress_at)
            if not self.chunk_seen and self.requested > self.next and self.job.chunk >= 2 * P.DEFAULT_CHUNK_SIZE:
                self._halve_chunk()
        return []

    def _halve_chunk(self):
        # A connection broke with chunks requested and none arrived whole: the link may not carry
        # one, so the rest of the job goes in half-size chunks (§5; not below the default 2048).
        # The center slices by the request's chunk size; the bytes written stay where they are.
        job = self.job
        job.chunk //= 2
        job.cmd["chunk"] = job.chunk  # the journal's next checkpoint stores the two together
        job.chunks = (job.size + job.chunk - 1) // job.chunk
        job.window = max(1, min(job.cmd["window"], self.settings.max_inflight // job.chunk))
        self.next *= 2
        self.requested = self.next
        if self.reported_next is not None:
            self.reported_next *= 2

    # ---- commands ----------------------------------------------------------------------------
    def _agent_state(self):
        return (A_STATE, {"last_job": self.last_job, "boot": self.boot, "time": self.time, "epoch": self.epoch})

    def command(self, payload, clock=None):
        """A message on the cmd topic (bytes): a signed envelope, see docs/protocol.md section 4.

        clock: Unix seconds of the port's real-time clock, or None (no clock); it only ever
        makes commands expire sooner (see _expiry)."""
        collect()
        try:
            body, kid, now = self._authenticate(payload)
            kind = body["type"]
            if kind == "keys":
                self._expiry(body, clock, None)
                return self._keys(body, kid, now)
            if kid == self.trust.root_kid:
                raise Rejection(P.E_UNKNOWN_KEY, "the root key signs only key updates", body.get("job"))
            job = body["job"]
            if body.get("device") != self.id:
                raise Rejection(P.E_WRONG_DEVICE, "command is for device %r, this is %r" % (body.get("device"), self.id), job)
            if kind not in ("update", "cancel", "inventory"):
                raise Rejection(P.E_UNKNOWN_COMMAND, "unknown command type %r" % kind, job)
            if kind == "update":
                self._check_update_fields(body)
            elif kind == "cancel":
                _need(body, "target", int)
            if job == self.last_job:
                raise Rejection(P.E_DUPLICATE_JOB, "job %d already accepted; ignored" % job, job)
            if job < self.last_job:
                raise Rejection(P.E_STALE_JOB, "job %d is older than job %d; ignored" % (job, self.last_job), job)
            self._expiry(body, clock, job)
        except Rejection as r:
            return [self._publish_status(self._rejected(r, r.job))]

        # Authentic and new: persist the job id before anything is published, so that a
        # redelivery runs nothing twice. An update persists its journal (the job itself) first.
        self.last_job = job
        self.time = now
        if kind == "inventory":
            return [self._agent_state(), self.inventory()]
        if kind == "cancel":
            return [self._agent_state()] + self._cancel(body)
        return self._update(body)

    def _authenticate(self, payload):
        """Envelope -> (body, signer kid, trusted time); raises Rejection.

        The signer's key must be the root key or certified for commands at the command's time
        (never earlier than the latest time already seen), and must have signed the body bytes.
        """
        # An int is the length of a payload the MQTT client dropped as too large.
        size = payload if isinstance(payload, int) else len(payload)
        if size > P.MAX_COMMAND_BYTES:
            raise Rejection(P.E_OVERSIZE, "command of %d bytes exceeds %d" % (size, P.MAX_COMMAND_BYTES))
        try:
            env = json.loads(payload)
        except MemoryError:
            # MicroPython needs tens of bytes per JSON value, so 8 KB of "[[[..." or "[{},{},..."
            # exhausts a small heap, and so does a valid command in a heap too small for it (said
            # apart: the operator reads the reason). A crash there would crash-loop the device, as
            # the broker redelivers the command.
            raise Rejection(P.E_BAD_COMMAND, "no heap to parse a command of %d bytes" % size,
                            self._new_job(_job_in(payload, b'\\"job\\":')))
        except (ValueError, TypeError, UnicodeError, RuntimeError):
            # RuntimeError (RecursionError): nested too deep.
            raise Rejection(P.E_BAD_COMMAND, "command is not JSON")
        if not isinstance(env, dict):
            raise Rejection(P.E_BAD_COMMAND, "command is not a JSON object")
        text = env.get("body")
        kid = env.get("kid")
        sig = env.get("sig")
        env = None  # free before allocating: the body's parse and the signature check come next
        if not isinstance(text, str):
            raise Rejection(P.E_BAD_COMMAND, "field 'body' missing or not str")
        if not _is_hex(kid, 16) or not _is_hex(sig, 128):
            raise Rejection(P.E_BAD_COMMAND, "kid must be 16 and sig 128 hex chars")
        try:
            body = json.loads(text)
        except MemoryError:
            raise Rejection(P.E_BAD_COMMAND, "no heap to parse a command body of %d bytes" % len(text),
                            self._new_job(_job_in(text, '"job":')))
        except (ValueError, TypeError, RuntimeError):
            raise Rejection(P.E_BAD_COMMAND, "command body is not JSON")
        try:
            data = text.encode()
        except UnicodeError:  # CPython: a lone surrogate (JSON "\ud800") has no UTF-8 form
            raise Rejection(P.E_BAD_COMMAND, "command body is not UTF-8")
        text = None
        if not isinstance(body, dict):
            raise Rejection(P.E_BAD_COMMAND, "command body is not a JSON object")
        if not isinstance(body.get("type"), str):
            raise Rejection(P.E_BAD_COMMAND, "field 'type' missing or not str")
        job = body.get("job")
        if body["type"] != "keys":
            job = _need(body, "job", int)
            if job < 1:
                raise Rejection(P.E_BAD_COMMAND, "job must be >= 1")
        claimed = _need(body, "time", int)
        if body["type"] != "keys" or "exp" in body:  # key updates are root-signed and versioned
            _need(body, "exp", int)
        now = claimed if claimed > self.time else self.time
        kid = kid.lower()
        if kid == self.trust.root_kid:
            pub = self.trust.root
        else:
            try:
                pub = self.trust.key_for(kid, "command", now)
            except TrustError as e:
                raise Rejection(e.code, e.reason, job)
        if not self.verify(pub, data, unhexlify(sig)):
            raise Rejection(P.E_BAD_SIGNATURE, "command signature does not verify", job)
        collect()
        return body, kid, now

    def _expiry(self, body, clock, job):
        """E_EXPIRED when the command's `exp` is before the trusted time: the latest signed time
        verified (self.time), or the real-time clock if it is later. A clock that is not set (a
        board without NTP says 2000-01-01) is below the signed time and changes nothing; nothing
        is persisted, so a fresh copy of the command (same job id) is still accepted."""
        exp = body.get("exp")
        if exp is None:
            return  # only `keys` may come without one (_authenticate)
        trusted = self.time
        if clock is not None and clock > trusted:
            trusted = clock
        if exp < trusted:
            raise Rejection(P.E_EXPIRED, "command expired at %d, trusted time is %d" % (exp, trusted), job)

    def _keys(self, body, kid, now):
        """A root-signed key update: replaces the trust store if its version is newer."""
        try:
            if kid != self.trust.root_kid:
                raise Rejection(P.E_UNKNOWN_KEY, "key updates must be signed by the root key")
            try:
                self.trust = self.trust.updated(body)
            except TrustError as e:
                raise Rejection(e.code, e.reason)
        except Rejection as r:
            return [self._publish_status(self._rejected(r, None))]
        self.time = now
        msg = self._status(P.KEYS_UPDATED, job=None)
        msg["keys"] = self.trust.version
        return [self._agent_state(), (A_TRUST, self.trust.doc), self._publish_status(msg), self.inventory()]

    def _new_job(self, job):
        """job if it is newer than every job accepted, else None: a refusal must never name the
        job being run or one already done (a redelivery the heap could not parse), or the center
        would end it."""
        return job if isinstance(job, int) and job > self.last_job else None

    def _rejected(self, r, job):
        msg = self._status(REJECTED, job=job, code=r.code, reason=r.reason)
        if job is None:
            # A refused message whose job could not be read (or that has none: a key update)
            # names no job (§6): not the one running, which the center would end on a code such
            # as E_BAD_COMMAND while the device goes on with it.
            msg.pop("job", None)
        msg["current"] = self.state
        return msg

    def _check_update_fields(self, cmd):
        for key in ("manifest", "manifest_kid", "manifest_sig"):
            _need(cmd, key, str)
        if not _is_hex(cmd["manifest_sig"], 128):
            raise Rejection(P.E_BAD_COMMAND, "manifest_sig must be 128 hex chars", cmd["job"])
        if not _is_hex(cmd["manifest_kid"], 16):
            raise Rejection(P.E_BAD_COMMAND, "manifest_kid must be 16 hex chars", cmd["job"])
        chunk = cmd.get("chunk", P.DEFAULT_CHUNK_SIZE)
        window = cmd.get("window", P.DEFAULT_WINDOW)
        if not isinstance(chunk, int) or isinstance(chunk, bool) or not P.MIN_CHUNK_SIZE <= chunk <= self.settings.max_chunk:
            raise Rejection(P.E_BAD_COMMAND, "chunk must be an int in %d..%d" % (P.MIN_CHUNK_SIZE, self.settings.max_chunk))
        if not isinstance(window, int) or isinstance(window, bool) or not 1 <= window <= P.MAX_WINDOW:
            raise Rejection(P.E_BAD_COMMAND, "window must be an int in 1..%d" % P.MAX_WINDOW)
        if not _percent(cmd.get("min_battery", 0)):
            raise Rejection(P.E_BAD_COMMAND, "min_battery must be an int in 0..100", cmd["job"])
        cmd["chunk"] = chunk
        cmd["window"] = window
        http = cmd.get("http")
        if http is not None and not _valid_http(http):
            raise Rejection(P.E_BAD_COMMAND, "http must be {url: http(s)://... (at most %d chars), exp: int[, hosts]}"
                            % P.MAX_URL, cmd["job"])
        delta = cmd.get("delta")
        if delta is not None and not _valid_delta(delta):
            raise Rejection(P.E_BAD_COMMAND, "delta must be {base_sha256, base_size, size, sha256, wbits[, format]}",
                            cmd["job"])

    def _verify(self, cmd):
        """Release key, signature, manifest, hardware, counter and size checks; returns the manifest."""
        try:
            pub = self.trust.key_for(cmd["manifest_kid"].lower(), "release", self.time)
        except TrustError as e:
            raise Rejection(e.code, e.reason, terminal=True)
        try:
            text = cmd["manifest"].encode()
        except UnicodeError:  # CPython: a lone surrogate has no UTF-8 form
            raise Rejection(P.E_BAD_MANIFEST, "manifest is not UTF-8", terminal=True)
        if not self.verify(pub, text, unhexlify(cmd["manifest_sig"])):
            raise Rejection(P.E_BAD_SIGNATURE, "manifest signature does not verify", terminal=True)
        collect()
        m = parse_manifest(text, self.kinds)
        if self.hardware not in m["hw"]:
            raise Rejection(P.E_HW_MISMATCH, "release is for %s, this device is %s" % (",".join(m["hw"]), self.hardware), terminal=True)
        if m["counter"] < self.counter:
            raise Rejection(P.E_DOWNGRADE, "security counter %d is below the installed %d" % (m["counter"], self.counter), terminal=True)
        if m["size"] > self.capacity:
            raise Rejection(P.E_TOO_LARGE, "image of %d bytes exceeds slot capacity %d" % (m["size"], self.capacity), terminal=True)
        if self.free is not None:
            # The image, the files it unpacks to, and a margin must fit before a byte is written.
            need = m["size"] + P.SPACE_MARGIN
            for f in m.get("files") or ():
                need += f[1]
            if need > self.free:
                raise Rejection(P.E_SPACE, "needs %d bytes of free space, the filesystem has %d" % (need, self.free),
                                terminal=True)
        delta = cmd.get("delta")
        if delta:
            # The patch must start from the image this device runs; checked before any write.
            image = self.image
            if not image or image["sha256"] != delta["base_sha256"] or image["size"] != delta["base_size"]:
                raise Rejection(P.E_BASE_MISMATCH, "patch is for base %s, this device runs %s" % (
                    delta["base_sha256"][:16], image["sha256"][:16] if image else "an unknown image"), terminal=True)
            if delta["wbits"] > self.delta_wbits:
                raise Rejection(P.E_DELTA, "patch window 2**%d exceeds this device's 2**%d" % (
                    delta["wbits"], self.delta_wbits), terminal=True)
            if delta.get("format", 1) not in self.delta_formats:
                raise Rejection(P.E_DELTA, "patch format %d not decoded by this device" % delta["format"],
                                terminal=True)
            if m.get("enc"):
                raise Rejection(P.E_DELTA, "encrypted releases are not sent as patches", terminal=True)
        m["_delta"] = bool(delta)  # the runner must have applied a patch, not stored one
        m["_key"] = None
        if m.get("enc"):
            if self.enc_key is None:
                raise Rejection(P.E_BAD_MANIFEST, "release is encrypted; this device cannot decrypt", terminal=True)
            wrapped = cmd.get("key")
            if not _is_hex(wrapped, 80):
                raise Rejection(P.E_DECRYPT, "encrypted release without a wrapped key", terminal=True)
            from fota.device import aes  # only encrypted releases pay for its ~4 KiB of heap
            try:
                m["_key"] = aes.unwrap(self.enc_key, unhexlify(wrapped))
            except aes.DecryptError as e:
                raise Rejection(P.E_DECRYPT, str(e), terminal=True)
        return m

    def _update(self, cmd):
        try:
            manifest = self._verify(cmd)
        except Rejection as r:
            msg = self._status(P.FAILED, job=cmd["job"], code=r.code, reason=r.reason)
            msg["bytes"] = msg["total"] = 0
            msg["progress"] = 0.0
            return [self._agent_state(), self._publish_status(msg)]
        statuses = []
        if self.state in (P.DOWNLOADING, P.POSTPONED):
            # The new journal replaces the old one: a cut before it leaves the old job to resume.
            statuses = [a for a in self._end(P.CANCELLED, "cancel", None, "superseded by job %d" % cmd["job"])
                        if a[0] == A_PUBLISH]
        elif self.state != P.IDLE:
            # Past the download (installing, rebooting, trial) a job cannot be replaced.
            r = Rejection(P.E_NOT_RUNNING, "busy in state %s; job %d refused" % (self.state, cmd["job"]))
            return [self._agent_state(), self._publish_status(self._rejected(r, cmd["job"]))]
        self.job = Job(cmd, manifest, self.settings.max_inflight, self.transports)
        self._reset_transfer()
        if not self._power_ok():
            self._go("low_power")
            return self._postpone(statuses)
        self._go("accept")
        return self._start_download(statuses)

    def _start_download(self, statuses=()):
        self._reset_transfer()
        self.hasher = hashlib.sha256()
        self.last_progress_at = self.now
        self.last_chunk_at = self.now
        # The journal before last_job: a cut between them resumes the job (booted() adopts its
        # id), where the other order would have the job's redelivery refused as a duplicate
        # with nothing left to run it.
        actions = [(A_BEGIN, self.job.manifest["size"], self.job.delta_expect()),
                   (A_JOURNAL, {"cmd": self.job.cmd, "pos": 0}), self._agent_state()]
        actions += statuses
        actions.append(self._publish_status(self._status(P.DOWNLOADING)))
        self.reported_next = 0
        self.reported_at = self.now
        if self.connected:
            actions += self._request_more(True)
        return actions

    def _cancel(self, cmd):
        target = cmd["target"]
        if self.state not in (P.DOWNLOADING, P.POSTPONED) or self.job is None or self.job.id != target:
            r = Rejection(P.E_NOT_RUNNING, "job %d is not downloading" % target)
            return [self._publish_status(self._rejected(r, target))]
        return self._end(P.CANCELLED, "cancel", None, "cancelled by job %d" % cmd["job"])

    def _end(self, state, event, code, reason):
        """Finish the current job in a terminal state and go back to idle."""
        self._go(event)
        msg = self._status(state, code=code, reason=reason)
        self._go("done")
        self.job = None
        self._reset_transfer()
        return [(A_JOURNAL, None), self._publish_status(msg)]

    # ---- chunk transfer ----------------------------------------------------------------------
    def _request_more(self, force=False):
        # Refill once at most a quarter of the window is outstanding, up to a whole window: a
        # window of 8 takes 6 chunks a request, of 4 three (§5); each request is ~40 bytes.
        job = self.job
        if job.http:
            # One fetch streams from the next chunk to the end: nothing to ask for per window.
            # Forced (start, reconnect, chunk timeout): the runner restarts it from here.
            if not force:
                return []
            self.requested = job.chunks
            return [(A_FETCH, job.http, self.next * job.chunk, job.size, job.chunk)]
        outstanding = self.requested - self.next
        if not force and (outstanding > job.window // 4 or self.requested >= job.chunks):
            return []
        if force:
            self.requested = self.next
            outstanding = 0
            self.probe = -1
        first = self.requested
        count = min(job.window - outstanding, job.chunks - first)
        if count <= 0:
            return []
        return self._ask(first, count)

    def _ask(self, first, count):
        self.requested = first + count
        job = self.job
        if job.cmd.get("req_format") == 2:  # the center takes the short text form (§5)
            req = "%d %d %d %d" % (job.id, first, count, job.chunk)
        else:
            req = json.dumps({"job": job.id, "first": first, "count": count, "chunk": job.chunk}, separators=P.COMPACT)
        return [(A_PUBLISH, P.REQ, req, 0, False)]

    def chunk(self, payload):
        """A message on the data topic (bytes, or the length of one dropped as too large)."""
        if isinstance(payload, int):
            r = Rejection(P.E_BAD_CHUNK, "chunk of %d bytes exceeds the largest chunk" % payload)
            return [self._publish_status(self._rejected(r, self.job.id if self.job else None))]
        if len(payload) < P.CHUNK_HEADER_SIZE:
            r = Rejection(P.E_BAD_CHUNK, "chunk of %d bytes is shorter than its header" % len(payload))
            return [self._publish_status(self._rejected(r, self.job.id if self.job else None))]
        job_id, index = struct.unpack_from(P.CHUNK_HEADER, payload, 0)
        job = self.job
        if self.state != P.DOWNLOADING or job is None or job_id != job.id:
            return []  # late delivery for a finished or replaced job
        if index >= job.chunks:
            r = Rejection(P.E_BAD_CHUNK, "chunk %d beyond the image's %d chunks" % (index, job.chunks))
            return [self._publish_status(self._rejected(r, job.id))]
        expected = job.chunk if index < job.chunks - 1 else job.size - index * job.chunk
        got = len(payload) - P.CHUNK_HEADER_SIZE
        if got != expected:
            r = Rejection(P.E_BAD_CHUNK, "chunk %d has %d bytes, expected %d" % (index, got, expected))
            return [self._publish_status(self._rejected(r, job.id))]
        if index != self.next:
            if index == self.probe and index > self.next:
                # A timeout's probe overtook the chunks asked for before it: those are lost
                # (chunks of one job arrive in the order requested), so ask again from here.
                self.probe = -1
                self.last_chunk_at = self.now
                return self._request_more(True)
            return []  # duplicate or out of order: re-requested on timeout
        return self._take(memoryview(payload)[P.CHUNK_HEADER_SIZE:])

    def fetched(self, data):
        """Transport http: the next chunk's bytes (the runner's fetch cuts the body into the
        job's chunks, so the length is the one the next index needs; anything else is dropped
        and fetched again)."""
        job = self.job
        if self.state != P.DOWNLOADING or job is None or not job.http or self.next >= job.chunks:
            return []
        expected = job.chunk if self.next < job.chunks - 1 else job.size - self.next * job.chunk
        if len(data) != expected:
            return []
        return self._take(data)

    def fetch_failed(self, code, reason):
        """Transport http: the server refused the fetch for good (an E_HTTP_* code)."""
        if self.state != P.DOWNLOADING or self.job is None or not self.job.http:
            return []
        return self._end(P.FAILED, "error", code, reason)

    def _take(self, data):
        # The next chunk, whichever transport brought it: hash, write, checkpoint, progress.
        job = self.job
        index = self.next
        self.hasher.update(data)
        actions = [(A_WRITE, index * job.chunk, data)]
        self.next += 1
        self.chunk_seen = True
        self.last_chunk_at = self.now
        self.last_progress_at = self.now
        self.backoff = 0
        if self.next == job.chunks:
            return actions + self._downloaded()
        if self.next % job.window == 0:
            actions.append((A_JOURNAL, {"cmd": job.cmd, "pos": self.next}))
        # integers: a float 10 % step misses by one chunk (0.3 - 0.2 < 0.1)
        if (self.reported_next is None or (self.next - self.reported_next) * PROGRESS_STEPS >= job.chunks) \
                and self.now - self.reported_at >= self.settings.progress_interval:
            if job.http:
                # Over http nothing waits in the heap behind the report's PUBACK: the response
                # stays in the socket.
                self.reported_next = self.next
                self.reported_at = self.now
                actions.append(self._publish_status(self._status(P.DOWNLOADING)))
                return actions
            if self.requested > self.next:
                # A progress report waits until the chunks in flight have arrived, and no more are
                # asked for meanwhile: a runner waiting for its PUBACK would have to queue every
                # chunk that came before it in the heap (docs/heap.md). Then a whole window.
                return actions
            self.reported_next = self.next
            self.reported_at = self.now
            actions.append(self._publish_status(self._status(P.DOWNLOADING)))
            return actions + self._request_more(True)
        return actions + self._request_more()

    def _downloaded(self):
        self._go("downloaded")
        actions = [self._publish_status(self._status(P.VERIFYING))]
        failed = self._hash_failure()
        if failed:
            return actions + failed
        if not self._power_ok():
            # The image stays in the slot; the install waits for power.
            self._go("low_power")
            return actions + self._postpone()
        self._go("verified")
        return actions + self._install()

    def _hash_failure(self):
        digest = hexlify(self.hasher.digest()).decode()
        if self.job.delta:
            # The patch is checked here against the signed command; the image it produced is
            # checked against the manifest by the runner's decoder before A_INSTALL finalises.
            if digest != self.job.delta["sha256"]:
                return self._end(P.FAILED, "error", P.E_DELTA,
                                 "patch sha256 %s does not match %s" % (digest, self.job.delta["sha256"]))
        elif digest != self.job.manifest["sha256"].lower():
            return self._end(P.FAILED, "error", P.E_HASH_MISMATCH,
                             "image sha256 %s does not match manifest %s" % (digest, self.job.manifest["sha256"]))
        return None

    def _install(self):
        return [self._publish_status(self._status(P.INSTALLING)),
                (A_INSTALL, self.job.manifest, self.job.manifest["_key"])]

    # ---- power -------------------------------------------------------------------------------
    def _power_ok(self):
        # A device that cannot measure its battery (None) is not held back.
        return self.external or self.battery is None or self.battery >= self.job.min_battery

    def _postpone(self, statuses=()):
        msg = self._status(P.POSTPONED, code=P.E_LOW_BATTERY,
                           reason="battery %d%% below the %d%% this update needs; waiting for power"
                           % (self.battery, self.job.min_battery))
        msg["battery"] = self.battery
        msg["min_battery"] = self.job.min_battery
        # The journal keeps the job (and, after the download, the image's place) over a restart;
        # written before last_job, as for a download.
        return ([(A_JOURNAL, {"cmd": self.job.cmd, "pos": self.next, "postponed": True}), self._agent_state()]
                + list(statuses) + [self._publish_status(msg)])

    def power(self, battery, external):
        """The runner's power reading: battery percent (None if not measured), external power.

        Called periodically; a postponed update goes on once there is enough power.
        """
        self.battery = battery
        self.external = bool(external)
        actions = []
        last_battery, last_external = self.reported_power
        if (self.external != last_external or (battery is None) != (last_battery is None)
                or (battery is not None and abs(battery - last_battery) >= POWER_STEP)):
            self.reported_power = (battery, self.external)
            actions.append(self.inventory())
        if self.state == P.POSTPONED and self._power_ok():
            if self.next == self.job.chunks:
                self._go("power_ok_verified")
                return actions + self._install()
            self._go("power_ok")
            return actions + self._start_download()
        return actions

    def installed(self, code=None, reason=None):
        """The runner's answer to A_INSTALL: code None on success, else E_INSTALL / E_BAD_BUNDLE."""
        if code:
            return self._end(P.FAILED, "error", code, reason)
        self._go("installed")
        return [
            (A_SET_TRIAL, self.job.id, self.job.manifest["version"], self.job.manifest["counter"]),
            (A_JOURNAL, None),
            self._publish_status(self._status(P.REBOOTING)),
            (A_REBOOT,),
        ]

    # ---- trial -----------------------------------------------------------------------------
    def _healthy(self):
        on_trial = self._status(P.TRIAL, job=self.trial.get("job"))
        self._go("healthy")
        report = {"job": self.trial.get("job"), "state": P.CONFIRMED, "code": None, "reason": None}
        # The anti-rollback floor rises with the confirmation (A_CONFIRM persists it).
        self.counter = max(self.counter, self.trial.get("counter", 0))
        self._go("done")
        self.trial = None
        # A_CONFIRM stores the report in the boot record first: a power cut before the broker
        # acknowledged it re-sends it at the next boot.
        return [self._publish_status(on_trial), (A_CONFIRM, report), self._publish_status(self._report_status(report)),
                (A_CLEAR_REPORT,)]

    def _report_status(self, report):
        msg = self._status(report["state"], job=report.get("job"), code=report.get("code"),
                           reason=report.get("reason"))
        msg["progress"] = 1.0 if report["state"] == P.CONFIRMED else 0.0
        return msg

    # ---- time --------------------------------------------------------------------------------
    def tick(self, now):
        """Called by the runner on every loop turn with a monotonic clock in milliseconds."""
        self.now = now
        if self.connected and self.settings.health_interval and now - self.last_health >= self.settings.health_interval:
            return [self._health()] + self.tick(now)
        if self.state == P.TRIAL and not self.connected:
            if now - self.trial_started > self.settings.trial_timeout:
                self._go("trial_timeout")  # the boot selector counts the failed attempt
                return [(A_TRIAL_FAILED, "broker not reached within %d ms" % self.settings.trial_timeout), (A_REBOOT,)]
            return []
        if self.state != P.DOWNLOADING or not self.connected:
            if self.state == P.DOWNLOADING:
                self.last_progress_at = now - self.stalled  # the deadline counts only while connected
            return []
        if now - self.last_progress_at > self.settings.stall_timeout:
            return self._end(P.FAILED, "error", P.E_TIMEOUT,
                             "no chunk for %d ms (at chunk %d of %d)" % (self.settings.stall_timeout, self.next, self.job.chunks))
        if now - self.last_chunk_at > self.settings.chunk_timeout << self.backoff:
            self.last_chunk_at = now
            if not self.job.http and self.requested <= self.next:
                return self._request_more(True)  # nothing asked for is outstanding: ask again
            # Chunks are outstanding (mqtt), or a fetch runs (http): the next timeout in a row is
            # twice as long (up to 8x). Under load they are late, not lost: over mqtt a probe
            # asks for one more chunk; over http the fetch starts again from the next chunk (a
            # loaded blob server answers in turn, and a restart drops the request it has queued:
            # bench/fleet, part 4).
            if self.backoff < 3:
                self.backoff += 1
            return self._request_more(True) if self.job.http else self._probe()
        return []

    def _probe(self):
        # The chunk timeout with chunks still asked for: under load they are usually late, not
        # lost, and asking for the window again would have them all sent twice. Ask for one chunk
        # more (the last one again when all were asked for): if the earlier ones are only late,
        # it arrives after them and costs nothing; if it arrives first, they were lost and
        # chunk() asks for the window again from the next chunk.
        first = min(self.requested, self.job.chunks - 1)
        self.probe = first
        return self._ask(first, 1)
