# The executor: performs the core's device-local actions (every action but a publish) against the
# slot backend and the device's stored state, and reads that state back at boot. One
# implementation for every runner: the unix-port and board runner (fota.device.runner), the fleet
# simulator (fota.sim.device) and, through the runner, the power-cut harness (fota.powercut).
# The runner owns the sockets, the clock, the app and the order of the actions; it never
# re-implements one.
#
# Stored state, JSON files under `prefix` (the runner: "<device directory>/"):
#   boot.json     the boot record (fota.device.boot)
#   agent.json    the agent state {"last_job", "boot", "time", "epoch"}
#   journal.json  an interrupted download, if any
#   keys.json     the trust store, once a key update replaced the provisioned one
# `files` reads and writes them: fota.device.fsutil on a device (atomic replacement), or any
# object with the same read_json(path), write_json(path, obj) and remove(path) (the simulator
# keeps them in memory). A module, not a wrapper class: on a board every class costs heap.
#
# MicroPython and CPython.
import json
import hashlib

from fota.device import protocol as P
from fota.device import boot as bootrec
from fota.device import core as C


class Reboot(Exception):
    """The device restarts: A_REBOOT, or a trial boot whose app did not come up."""


def install_error(e):
    """(status code, reason) of an exception raised by the install step. By class name: the
    classes live in modules (bundle, aes, delta) that only some devices import."""
    name = type(e).__name__
    code = {"BundleError": P.E_BAD_BUNDLE, "DecryptError": P.E_DECRYPT, "DeltaError": P.E_DELTA}.get(name, P.E_INSTALL)
    return code, "%s: %s" % (name, e)


class Executor:
    def __init__(self, backend, files, prefix, log):
        self.backend = backend
        self.files = files      # read_json, write_json, remove (see above)
        self.prefix = prefix    # of the state files' paths
        self.log = log          # log(*args): the runner's logger
        self.record = None      # the boot record, as last stored
        self.slot = None        # the running slot
        self.core = None        # this boot's core (start())
        self.patcher = None     # the delta decoder of the current job, if it is a delta job
        self.installed = None   # the core's answer to the last install (install_steps)
        self.crash = None       # the resumed journal's failure count (crashed()), until it moves on
        self.crash_job = None   # ... and its job

    # ---- boot --------------------------------------------------------------------------------
    def select(self, version, max_trial_boots):
        """Read the boot record (a device without one runs `version` in slot a), pick the slot to
        boot and store the record before anything runs (an attempt counts even if it crashes).
        Returns True if the slot boots on trial."""
        record = self._read("boot.json") or bootrec.new_record(version)
        # esp32: the bootloader picked the partition already (and may have rolled back): the
        # record follows it (boot.select).
        booted = getattr(self.backend, "booted_slot", None)
        slot, on_trial = bootrec.select(record, max_trial_boots, booted() if booted else None)
        if on_trial is None:
            self.log("running slot", slot, "that the boot record does not name: rebooting to the active one")
            raise Reboot()
        self._write("boot.json", record)
        self.record = record
        self.slot = slot
        return on_trial

    def trial_failed(self, reason):
        """The trial boot failed (its app, its health check): recorded for the revert report."""
        bootrec.trial_failed(self.record, reason)
        self._save_record()

    def agent_state(self, random4):
        """The stored agent state with this boot counted; random4() gives 4 random bytes for a new
        epoch (a fresh or erased device: its counters start over)."""
        agent = self._read("agent.json") or {}
        agent["boot"] = agent.get("boot", 0) + 1
        if not agent.get("epoch"):
            agent["epoch"] = C.new_epoch(random4())
        return agent

    def trust(self, provisioned):
        """The trust store the core starts with: keys.json once a key update replaced the
        provisioned one."""
        return self._read("keys.json") or provisioned

    def running_image(self):
        """The running slot's image as installed ({"sha256", "size"}), the base of a delta; None if
        unknown or no longer in the slot."""
        slot = self.slot
        return (self.record.get("images") or {}).get(slot) if self.backend.has_image(slot) else None

    def start(self, core, on_trial):
        """Hand over this boot's core (built from select(), agent_state() and trust()); returns
        its first actions: the trial or report of the boot record, the journal to resume."""
        self.core = core
        journal, hasher = self._load_journal()
        record = self.record
        return core.booted({"trial": record["trial"] if on_trial else None, "report": record.get("report")},
                           journal, hasher)

    def crashed(self, error):
        """The agent failed with an exception (runner.main, board.main): counted in the journal
        of the download in progress, if any, as [failures in a row, checkpoint, error]. A failure
        at a later checkpoint than the last one starts the count over; at P.MAX_CRASHES the core
        ends the job at the next boot (E_CRASH) instead of resuming it into the same failure.
        Best effort: the heap may be full (a MemoryError), and the reset matters more."""
        try:
            C.collect()
            journal = self._read("journal.json")
            if not journal or not isinstance(journal.get("pos"), int):
                return
            pos = journal["pos"]
            last = journal.get("crash")
            n = last[0] + 1 if isinstance(last, list) and len(last) == 3 and pos <= last[1] else 1
            journal["crash"] = [n, pos, ("%s: %s" % (type(error).__name__, error))[:120]]
            self._write("journal.json", journal)
            self.log("agent failure", n, "in a row at chunk", pos, "of job", journal["cmd"].get("job"))
        except Exception:
            pass

    def _load_journal(self):
        journal = self._read("journal.json")
        if not journal:
            return None, None
        self.crash = journal.get("crash")
        cmd = journal.get("cmd")
        self.crash_job = cmd.get("job") if isinstance(cmd, dict) else None
        try:
            cmd = journal["cmd"]
            # A cut between marking the trial and deleting the journal leaves the journal of a
            # download that is over. Resuming it would write into the other slot: the fallback
            # image while on trial.
            report = self.record.get("report") or {}
            if self.record.get("trial") or cmd.get("job") == report.get("job"):
                self.log("journal of a finished download dropped")
                self._remove("journal.json")
                return None, None
            if cmd.get("delta"):
                return journal, hashlib.sha256()  # the core restarts a patch from its start
            chunk = cmd["chunk"]
            inactive = bootrec.other(self.slot)
            if journal.get("postponed"):
                # A postponed job writes nothing until it goes on: nothing to resume. Re-hash what
                # it has: nothing, or the whole verified image (whose last chunk may be short).
                offset = min(journal["pos"] * chunk, json.loads(cmd["manifest"])["size"])
            else:
                start = self.backend.resume(inactive, journal["pos"] * chunk)
                if start is None:
                    start = journal["pos"] * chunk
                # The backend may continue below the journal's position: send again from the
                # chunk that holds its offset.
                journal = {"cmd": cmd, "pos": start // chunk}
                if self.crash:
                    journal["crash"] = self.crash
                offset = journal["pos"] * chunk
            hasher = self._hasher(inactive, offset)
            self.log("resuming job", cmd.get("job"), "at byte", offset)
            return journal, hasher
        except (OSError, KeyError, TypeError, ValueError) as e:
            # The core downloads the job again from the start (or drops a malformed journal).
            self.log("cannot resume from the slot, starting the download over:", e)
            return journal, None

    def _hasher(self, slot, offset):
        # The SHA-256 state of the slot's first `offset` bytes, read back (hashlib objects cannot
        # be stored). A backend that keeps no bytes (the simulator's HashSlots) keeps the state.
        hasher_at = getattr(self.backend, "hasher_at", None)
        if hasher_at is not None:
            return hasher_at(slot, offset)
        hasher = hashlib.sha256()
        done = 0
        while done < offset:
            piece = self.backend.read(slot, done, min(1024, offset - done))
            if not piece:
                raise OSError(5, "slot shorter than the journal says")
            hasher.update(piece)
            done += len(piece)
        return hasher

    # ---- actions -----------------------------------------------------------------------------
    def run(self, action):
        """Perform one local action. Returns the core's answer to A_INSTALL (actions to run next,
        before the rest), else None. A_REBOOT raises Reboot."""
        kind = action[0]
        inactive = bootrec.other(self.slot)
        if kind == C.A_WRITE:
            _, offset, data = action
            if self.patcher is None:
                self.backend.write(inactive, offset, data)
            else:
                try:
                    self.patcher.feed(data)
                except Exception:  # DeltaError, kept in the patcher: reported as E_DELTA at A_INSTALL
                    pass
        elif kind == C.A_BEGIN:
            _, size, delta = action
            # The slot is about to be written over: the boot record must stop naming the
            # version (and image) it held: nothing may boot it, report it, or patch from it.
            record = self.record
            images = record.get("images") or {}
            if record["versions"].get(inactive) is not None or images.get(inactive):
                record["versions"][inactive] = None
                images.pop(inactive, None)
                self._save_record()
            self.backend.begin(inactive, size)
            self.patcher = self._patcher(delta, inactive) if delta else None
        elif kind == C.A_JOURNAL:
            _, journal = action
            if journal is None:
                self.patcher = None
                self.crash = None
                self._remove("journal.json")
            else:
                self.backend.flush(inactive)  # data first, then the journal that points past it
                if self.crash:
                    # The failure count stays until the download gets past where it failed.
                    if journal["pos"] > self.crash[1] or journal["cmd"].get("job") != self.crash_job:
                        self.crash = None
                    else:
                        journal = dict(journal)
                        journal["crash"] = self.crash
                self._write("journal.json", journal)
        elif kind == C.A_STATE:
            _, agent = action
            self._write("agent.json", agent)
        elif kind == C.A_INSTALL:
            for _ in self.install_steps(action):
                pass
            return self.installed
        elif kind == C.A_SET_TRIAL:
            _, job, version, counter = action
            bootrec.set_trial(self.record, job, version, counter)
            self._save_record()
        elif kind == C.A_CONFIRM:
            _, report = action
            if hasattr(self.backend, "confirm"):
                self.backend.confirm()  # esp32: the bootloader's rollback is cancelled first
            bootrec.confirm(self.record, report)
            self.slot = self.record["active"]
            self.core.inventory_extra["active"] = self.slot
            self._save_record()
        elif kind == C.A_CLEAR_REPORT:
            self.record["report"] = None
            self._save_record()
        elif kind == C.A_TRUST:
            _, document = action
            self._write("keys.json", document)
        elif kind == C.A_TRIAL_FAILED:
            _, reason = action
            self.trial_failed(reason)
        elif kind == C.A_REBOOT:
            raise Reboot()
        else:
            raise ValueError("unknown action %r" % (kind,))
        return None

    def install_steps(self, action):
        """A_INSTALL in bounded steps (a generator): a runner that shares the board with an app
        advances it one step at a time (fota.device.runner, Device.stepped_install); run() runs
        it through. Afterwards `installed` holds the core's answer (actions to run next)."""
        _, manifest, key = action
        inactive = bootrec.other(self.slot)
        self.installed = None
        code = reason = None
        try:
            yield from self._install_steps(inactive, manifest, key)
        except Exception as e:
            code, reason = install_error(e)
        if code is None:
            # What the slot now holds: the base for the next delta once it runs.
            images = self.record.setdefault("images", {})
            images[inactive] = {"sha256": manifest["sha256"].lower(), "size": manifest["size"]}
        self.installed = self.core.installed(code, reason)

    def _save_record(self):
        self._write("boot.json", self.record)

    def _read(self, name):
        return self.files.read_json(self.prefix + name)

    def _write(self, name, obj):
        self.files.write_json(self.prefix + name, obj)

    def _remove(self, name):
        self.files.remove(self.prefix + name)

    def _install_steps(self, slot, manifest, key):
        if self.patcher is not None:
            self.patcher.finish()  # DeltaError unless it produced the manifest's image
            self.patcher = None
        elif manifest.get("_delta"):
            from fota.device.delta import DeltaError
            raise DeltaError("no decoder ran: the slot holds the patch, not the image")
        args = (slot, manifest["size"], manifest.get("files"), key,
                (manifest.get("enc") or {}).get("plain_size"), manifest["sha256"])
        steps = getattr(self.backend, "finalize_steps", None)
        if steps is None:
            self.backend.finalize(*args)  # a backend without steps: in one go
        else:
            yield from steps(*args)

    def _patcher(self, expect, inactive):
        # Imported only by a device that gets a delta; collected first, so that its bytecode
        # fills the heap's holes and leaves room in one piece for the inflate window.
        C.collect()
        from fota.device.delta import MIN_FREE, Patcher
        backend = self.backend
        active = self.slot
        state = [0]  # offset of the next new-image byte

        def write_new(data):
            backend.write(inactive, state[0], data)
            state[0] += len(data)

        def read_old(at, n):
            return backend.read(active, at, n)

        return Patcher(read_old, write_new, expect["patch_size"], expect, self.core.delta_wbits, MIN_FREE)
