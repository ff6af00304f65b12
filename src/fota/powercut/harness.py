# Power-cut harness: one update of a device, with no network, and power cut at chosen persistent
# operations (fota.device.slots.sim.Power). MicroPython and CPython.
#
# The device is the real thing: fota.device.runner.Device (boot selection, the order of the
# actions), the executor it performs them with (fota.device.executor: journal resume, slots,
# boot record) and fota.device.core, driven through the runner's public methods only (boot,
# deliver, dispatch, execute). This module plays the rest of the world:
#   Link    the runner's MQTT client: a publish reaches the Center at once; a QoS 1 message to
#           the device stays queued (and is delivered again at the next power-on) until the
#           runner acknowledges it, as the broker's persistent session would do;
#   Center  the control center: the signed update command of one job, the chunks of its image
#           (answers every chunk request), the statuses it received;
#   Run     powers the device on again after every reboot and every cut, checks every boot
#           (_check_boot) and the end state (outcome());
#   worlds  what a slot backend's board adds (fota.powercut.worlds): `sim` a NOR flash;
#           `esp32` the board's `esp32` module (OTA partitions, OTA data, the bootloader's choice
#           and rollback at every reset); `files` nothing but the filesystem.
# The device's files go through a file model: `replace` (fota.device.fsutil's own counting of
# whole-file replacements and removals) or `littlefs` (fota.powercut.littlefs: every open,
# write, sync, close, rename, remove, mkdir, with LittleFS's guarantees at a cut).
# A scenario directory is prepared on CPython by fota.powercut.scenario.build.

import gc
import os
import json
import struct

from fota.device import protocol as P
from fota.device import fsutil
from fota.device import runner
from fota.device.runner import Device, Reboot
from fota.device.slots.sim import Power, PowerCut
from fota.powercut.worlds import WORLDS, Bricked


def copy_tree(src, dst):
    fsutil.makedirs(dst)
    for name in os.listdir(src):
        if fsutil.is_dir(src + "/" + name):
            copy_tree(src + "/" + name, dst + "/" + name)
        else:
            copy_file(src + "/" + name, dst + "/" + name)


def copy_file(src, dst):
    with open(src, "rb") as f, open(dst, "wb") as g:
        while True:
            block = f.read(1024)
            if not block:
                break
            g.write(block)


def _silent(*args):
    pass


def _size(path):
    with open(path, "rb") as f:
        f.seek(0, 2)
        return f.tell()


class Scenario:
    """A prepared scenario: template/ (the provisioned device), scenario.json, image.bin (what
    the center serves: the image, or the patch of a delta job)."""

    def __init__(self, path):
        self.path = path
        meta = fsutil.read_json(path + "/scenario.json")
        if not meta:
            raise OSError(2, "no scenario.json in " + path)
        self.name = meta["name"]
        self.device = meta["device"]
        self.job = meta["job"]
        self.command = meta["command"].encode()
        self.chunk = meta["chunk"]
        self.images = meta["images"]          # version -> [size, sha256 hex]
        self.unhealthy = meta["unhealthy"]    # versions whose health check fails
        self.expect = meta["expect"]          # {"version", "state", "counter"} after the job
        self.first = meta["first"]            # the version running before the job
        self.first_slot = meta["first_slot"]  # and its slot
        self.counter_before = meta["counter_before"]
        self.max_trial_boots = meta["max_trial_boots"]
        self.trial_timeout = meta["trial_timeout"]
        self.chunk_timeout = meta["chunk_timeout"]
        self.slot_size = meta["slot_size"]
        self.backend = meta.get("backend", "sim")
        self.fs = meta.get("fs", "replace")   # the file model: replace or littlefs
        self.board = meta.get("board")        # esp32: {"app_size", "chip_id"}
        self.files = meta.get("files")        # files: version -> {name: sha256} of its app
        self.delta = meta.get("delta", False)
        self.image = path + "/image.bin"      # served in chunks, never all in RAM
        self.size = _size(self.image)


class Center:
    def __init__(self, scenario):
        self.s = scenario
        self.acked = False   # the device acknowledged the update command
        self.queue = []      # chunks on their way to the device (QoS 0: lost with the power)
        self.statuses = []
        self.sent = 0        # image bytes sent in chunks

    def received(self, topic, payload):
        suffix = topic.rsplit("/", 1)[-1]
        if suffix == P.STATUS:
            self.statuses.append(json.loads(payload))
        elif suffix == P.REQ:
            if payload[:1] in (b"{", "{"):
                req = json.loads(payload)
            else:  # the text form of §5: job first count chunk
                req = dict(zip(("job", "first", "count", "chunk"), [int(x) for x in payload.split()]))
            s = self.s
            if req.get("job") != s.job or req.get("chunk") != s.chunk:
                return
            with open(s.image, "rb") as f:
                for i in range(req["first"], req["first"] + req["count"]):
                    f.seek(i * s.chunk)
                    data = f.read(s.chunk)
                    if data:
                        self.queue.append(struct.pack(P.CHUNK_HEADER, s.job, i) + data)
                        self.sent += len(data)

    def terminal(self):
        """The terminal states reported for the job, in order."""
        return [st["state"] for st in self.statuses
                if st.get("job") == self.s.job and st.get("state") in P.TERMINAL_STATES]


class Link:
    """Stands in for fota.device.mqtt.MQTTClient inside the runner."""

    CMD_PID = 1  # the packet id of the update command (QoS 1); chunks (QoS 0) have none

    def __init__(self, center, eager_ack=False):
        self.center = center
        # eager_ack: acknowledge a QoS 1 message as soon as it is handed to the runner (before
        # it is processed), instead of when the runner calls ack(pid).
        self.eager_ack = eager_ack
        self.delivered = False

    def publish(self, topic, msg, retain=False, qos=0):
        self.center.received(topic, msg)

    def ack(self, pid):
        if pid == self.CMD_PID and self.delivered:
            self.center.acked = True

    def close(self):
        pass


class Wedged(Exception):
    pass


class Run:
    """One update from the scenario's template, with power cut before (or, with mid, in the
    middle of) each persistent operation whose number is in `cuts`."""

    MAX_BOOTS = 40
    MAX_IDLE_TIMEOUTS = 3

    def __init__(self, scenario, workdir, cuts=(), mid=False, log=None, eager_ack=False):
        self.s = scenario
        self.root = workdir
        self.eager_ack = eager_ack
        self.power = Power(cuts, mid, log, self._label if log is not None else None)
        self.world = WORLDS[scenario.backend](self)
        self.fs = None
        if scenario.fs == "littlefs":
            from fota.powercut.littlefs import LittleFS
            self.fs = LittleFS(self.power)
        self.center = Center(scenario)
        self.dev = None
        self.boots = 0
        self.cuts = 0            # cuts that happened
        self.exhausted = False   # cuts used up the trial boots of a healthy image
        self.errors = []         # broken invariants (see _check_boot)
        self.bricked = None      # why the device did not boot a verified image, or None
        self.counter = 0
        self.booted = []         # (slot, version, on trial) of every completed boot
        self.now = 0

    # ---- the device's world ----------------------------------------------------------------
    def _reset(self):
        fsutil.rmtree(self.root)
        copy_tree(self.s.path + "/template", self.root)

    def _label(self):
        # The phase of the update an operation belongs to (for reports of the clean run).
        dev = self.dev
        core = getattr(dev, "core", None) if dev is not None else None
        if core is not None and core.state in (P.VERIFYING, P.INSTALLING, P.REBOOTING):
            return "install"
        record = fsutil.read_json(self.root + "/boot.json") or {}
        if record.get("trial") or record.get("report") or record.get("active") != self.s.first_slot:
            return "trial"
        return "download"

    def run(self):
        self._reset()
        if self.fs is not None:
            fsutil.fs = self.fs
        else:
            fsutil.power = self.power
        say = runner.log
        runner.log = _silent  # thousands of boots: the runner's messages would drown the report
        try:
            while True:
                try:
                    if self._power_on():
                        break
                except Reboot:
                    pass
                except PowerCut:
                    self.cuts += 1
                    self.center.queue = []
                    if self.fs is not None:
                        self.fs.crash()  # a cut of the flash: the files lose their unsynced writes too
                except Wedged as e:
                    self.errors.append("wedged: %s" % e)
                    break
                except Bricked as e:
                    self.bricked = "boot %d: %s" % (self.boots, e)
                    break
                except Exception as e:  # the device code crashed: it would crash again at every boot
                    self.errors.append("crash: %s: %s" % (type(e).__name__, e))
                    self.bricked = self.bricked or "agent crashed in boot %d: %s: %s" % (
                        self.boots, type(e).__name__, e)
                    break
                if self.bricked:
                    break
            # Power off at the end: what the device left must survive it.
            self.power.down = True
            if self.fs is not None:
                self.fs.crash()
        finally:
            fsutil.power = None
            fsutil.fs = None
            if self.s.backend == "esp32":
                self.world.esp32.power = None
            runner.log = say
        return self

    def _power_on(self):
        """One boot until the device is quiet (True) or reboots/loses power (raises)."""
        self.boots += 1
        self.power.down = False
        if hasattr(gc, "mem_free"):  # MicroPython: a reboot starts with an empty heap
            gc.collect()
        if self.boots > self.MAX_BOOTS:
            raise Wedged("still not done after %d boots" % self.MAX_BOOTS)
        self.dev = None
        self.world.power_on()  # esp32: the bootloader picks (and may roll back) the app
        trial = (fsutil.read_json(self.root + "/boot.json") or {}).get("trial")
        if trial and trial.get("version") not in self.s.unhealthy:
            if self.world.bootloader:
                # The bootloader abandons an image reset before it was marked valid: a cut during
                # its trial boot reverts even a healthy image, by design.
                if trial.get("slot") != self.world.running:
                    self.exhausted = True
            elif trial.get("tries", 0) >= self.s.max_trial_boots:
                # Cuts during trial boots count as failed trials, as a crash would (the attempt
                # is counted before the image runs): enough of them revert even a healthy image.
                # That is the designed outcome, not a failure.
                self.exhausted = True
        dev = Device(self.root, app_loader=self.world.app_loader())
        self.dev = dev
        self.world.attach(dev)
        try:
            dev.boot()
            on_trial = dev.core.state == P.TRIAL
            self._check_boot(dev, on_trial)
            if self.bricked:
                return True
            version = dev.executor.record["versions"].get(dev.executor.slot)
            if version in self.s.unhealthy:
                if not on_trial:
                    self.errors.append("boot %d runs the unhealthy %s outside a trial" % (self.boots, version))
                    return True
                # Its health check fails: the broker is never reached before the trial deadline.
                self.now += self.s.trial_timeout + 1
                dev.execute(dev.core.tick(self.now))
                raise Wedged("an unhealthy trial did not reboot")
            self._online(dev)
            return self._quiet(dev)
        finally:
            self.world.release(dev)
    def _online(self, dev):
        link = Link(self.center, self.eager_ack)
        dev.client = link
        dev.execute(dev.core.connected_())
        cmd_topic = P.topic(self.s.device, P.CMD)
        data_topic = P.topic(self.s.device, P.DATA)
        timeouts = 0
        while True:
            if not self.center.acked and not link.delivered:
                link.delivered = True
                dev.deliver(cmd_topic, self.s.command, Link.CMD_PID, link)
                if link.eager_ack:
                    self.center.acked = True
                dev.dispatch()
            elif self.center.queue:
                dev.deliver(data_topic, self.center.queue.pop(0), 0, link)
                dev.dispatch()
                timeouts = 0
            elif dev.core.state == P.DOWNLOADING and timeouts < self.MAX_IDLE_TIMEOUTS:
                # Nothing in flight: let the chunk timeout fire (re-requests the window).
                timeouts += 1
                self.now += self.s.chunk_timeout + 1
                dev.execute(dev.core.tick(self.now))
            else:
                return

    def _quiet(self, dev):
        if dev.pending:
            raise Wedged("actions left pending while connected")
        if dev.core.state != P.IDLE:
            raise Wedged("stuck in state %s" % dev.core.state)
        if not self.center.acked:
            raise Wedged("the update command was never acknowledged")
        if dev.executor.record.get("report"):
            raise Wedged("terminal report never cleared")
        if not self.center.terminal():
            raise Wedged("idle, but the job never ended (last job %s)" % dev.core.last_job)
        return True

    # ---- checks ------------------------------------------------------------------------------
    def _check_boot(self, dev, on_trial):
        record = dev.executor.record
        slot = dev.executor.slot
        version = record["versions"].get(slot)
        self.booted.append((slot, version, on_trial))
        if version is None or not self.world.holds(dev, slot, version):
            self.bricked = "boot %d: slot %s (record: %s) holds no verified image" % (self.boots, slot, version)
            return
        if self.world.bootloader and slot != self.world.running:
            self.errors.append("boot %d: the record runs slot %s, the bootloader started %s" % (
                self.boots, slot, self.world.running))
        for s in ("a", "b"):
            v = record["versions"].get(s)
            if v is not None and not self.world.holds(dev, s, v):
                self.errors.append("boot %d: record says slot %s holds %s, it does not" % (self.boots, s, v))
        trial = record.get("trial")
        if trial and not self.world.holds(dev, trial["slot"], trial.get("version")):
            self.errors.append("boot %d: trial points at unverified slot %s" % (self.boots, trial["slot"]))
        counter = record.get("counter", 0)
        if counter < self.counter:
            self.errors.append("boot %d: counter went down %d -> %d" % (self.boots, self.counter, counter))
        self.counter = counter

    def outcome(self):
        """The run's result: a dict (JSON-able)."""
        problems = list(self.errors)
        record = fsutil.read_json(self.root + "/boot.json") or {}
        final = (record.get("versions") or {}).get(record.get("active"))
        terminal = self.center.terminal()
        expect = self.s.expect
        want_state, want_version = expect["state"], expect["version"]
        if want_state == P.CONFIRMED and self.exhausted:
            want_state, want_version = P.REVERTED, self.s.first
        lost = 0 if terminal else 1
        if not self.bricked and not problems:
            if final != want_version:
                problems.append("runs %s, expected %s" % (final, want_version))
            if not terminal:
                problems.append("terminal status of job %d never reached the center" % self.s.job)
            elif terminal[-1] != want_state:
                problems.append("job ended %s, expected %s" % (terminal[-1], want_state))
            if record.get("counter", 0) != (expect["counter"] if want_state == P.CONFIRMED else self.s.counter_before):
                problems.append("counter %s after %s" % (record.get("counter"), want_state))
            if fsutil.exists(self.root + "/journal.json"):
                problems.append("journal left behind")
            if self.dev is not None:
                problems += self.world.check_end(self.dev, record)
        return {
            "ops": self.power.ops, "boots": self.boots, "cuts": self.cuts, "exhausted": self.exhausted,
            "bricked": self.bricked, "problems": problems, "final": final, "terminal": terminal,
            "lost": lost, "resent": max(0, self.center.sent - self.s.size),
            # (epoch, boot, seq) of every status the center received: bench/powercut.py counts the gaps
            "statuses": [[st.get("epoch") or 0, st.get("boot"), st.get("seq")] for st in self.center.statuses],
            "ok": not self.bricked and not problems,
        }


def clean_run(scenario, workdir):
    """The run without a cut; returns (outcome, [(kind, phase)] for operations 1..N)."""
    log = []
    out = Run(scenario, workdir, log=log).run().outcome()
    return out, log


def run_case(scenario, workdir, cuts, mid=False, eager_ack=False):
    """One run with power cut at the operations in `cuts` (torn: mid=True or those in mid)."""
    return Run(scenario, workdir, cuts, mid, eager_ack=eager_ack).run().outcome()


class Rng:
    """xorshift32: the same random cut points on MicroPython and CPython for a seed."""

    def __init__(self, seed):
        self.x = (seed * 2654435761 + 1) & 0xFFFFFFFF or 1

    def next(self):
        x = self.x
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
        self.x = x
        return x

    def below(self, n):
        return self.next() % n


def chained_cases(scenario, workdir, seed, count, depth=2, known=None, points=None):
    """`count` runs with `depth` cuts each: the first at a random operation of the clean run
    (from `points`, default all), each next one at a random operation of the recovery that
    follows (so it lands during the reboot, resume or re-download); each cut falls before its
    operation or tears it, at random. known: {(cuts, torn): total ops} of runs already made.

    Returns [(cuts, torn, outcome)]."""
    rng = Rng(seed)
    known = dict(known or {})
    if points is None:
        points = list(range(1, clean_run(scenario, workdir)[0]["ops"] + 1))
    cases = []
    for _ in range(count):
        cuts = [points[rng.below(len(points))]]
        torn = cuts[:] if rng.below(2) else []
        while len(cuts) < depth:
            key = (tuple(cuts), tuple(torn))
            if key not in known:
                known[key] = run_case(scenario, workdir, key[0], key[1] or False)["ops"]
            end = known[key]
            if end <= cuts[-1]:
                break
            cuts.append(cuts[-1] + 1 + rng.below(end - cuts[-1]))
            if rng.below(2):
                torn.append(cuts[-1])
        cases.append((tuple(cuts), tuple(torn), run_case(scenario, workdir, tuple(cuts), tuple(torn) or False)))
    return cases
