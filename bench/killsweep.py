"""Kill -9 sweep: SIGKILL real MicroPython device agents at random moments of an update.

    ./run bench killsweep [--devices 4] [--kills 200] [--seed 1] [--image-kib 64] [--chunk 2048]
                          [--window 8] [--heap 160K] [--timeout 120] [--out bench/results/killsweep.json]

A fresh Mosquitto, control center and N unix-port devices (fota.testkit.fleet). Round 0 updates
every device without faults and measures how long each phase takes. Then, round after round, a
new release goes to every device while one thread per device kills its agent (SIGKILL, as a
power cut) at random moments of the download, the install, the trial boot and the confirmation;
the supervisor restarts it like a watchdog. It goes on until --kills kills were made and every
phase had at least --min-per-phase of them. After each round every job must be `confirmed` at
the control center and every device must run the new version from a slot whose content is
exactly the release's. See bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

from bench._report import print_table
from fota.device import protocol as P
from fota.examples import hello_files
from fota.server.deployments import create_deployment
from fota.testkit.brokerspy import BrokerSpy
from fota.testkit.faults import device_outcome, files_manifest, status_gaps
from fota.testkit.fleet import Fleet, bundle_of_size
from fota.tools.waiting import TimedOut, wait_until
from fota.tools.supervisor import DEFAULT_HEAP

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "killsweep.json"

PHASES = ("command", "download", "install", "trial", "confirm")
OTHER = "idle"                # a kill that landed outside the job (already confirmed)
MAX_TRIAL_BOOTS = 3           # the agent's default max_trial_boots
BAD_CODES = (P.E_HASH_MISMATCH, P.E_INSTALL, P.E_BAD_BUNDLE)


def log(*args) -> None:
    print("[killsweep]", *args, file=sys.stderr, flush=True)


class Watcher(BrokerSpy):
    """A paho client on the server account recording statuses, online flags and chunk requests."""

    def __init__(self, broker):
        self.events: dict[str, list[tuple[float, str, object]]] = defaultdict(list)
        self.armed: dict[str, object] = {}
        super().__init__(broker, name="killsweep", settle=0,
                         topics=[(P.PREFIX + "+/" + P.STATUS, 1), (P.PREFIX + "+/" + P.ONLINE, 1),
                                 (P.PREFIX + "+/" + P.REQ, 0), (P.PREFIX + "+/" + P.CMD, 1)])

    def arm(self, device: str, fire, on: str = "online") -> None:
        """Call fire() from the network thread as soon as the device's next online "1" (or, with
        on="cmd", the next command to it) arrives: no polling delay before the kill."""
        self.armed[device] = (on, fire)

    def disarm(self, device: str) -> None:
        self.armed.pop(device, None)

    def _fire(self, device: str, on: str) -> None:
        armed = self.armed.get(device)
        if armed and armed[0] == on and self.armed.pop(device, None):
            armed[1]()

    def _on_message(self, client, userdata, msg):
        t = time.monotonic()
        _, _, device, suffix = msg.topic.split("/")
        if suffix == P.ONLINE:
            self.events[device].append((t, "online", msg.payload == b"1"))
            if msg.payload == b"1":
                self._fire(device, "online")
            return
        if suffix == P.CMD:  # the device receives the same message now
            try:
                body = json.loads(json.loads(msg.payload)["body"])
            except (ValueError, KeyError, TypeError):
                return
            self.events[device].append((t, "cmd", body))
            self._fire(device, "cmd")
            return
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        self.events[device].append((t, suffix, body))

    def since(self, device: str, t0: float, kind: str | None = None) -> list[tuple[float, str, object]]:
        return [e for e in list(self.events[device]) if e[0] >= t0 and (kind is None or e[1] == kind)]

    def states(self, device: str, job: int, t0: float = 0.0) -> list[tuple[float, str]]:
        return [(t, b["state"]) for t, k, b in self.since(device, t0, "status") if b.get("job") == job]

    def statuses(self, device: str) -> list[dict]:
        return [b for _, k, b in list(self.events[device]) if k == "status"]


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def classify(record: dict, journal: bool, states_this_boot: list[str], online_this_boot: bool,
             command_seen: bool = False) -> str:
    """The phase a killed agent was in, from the files it left and what this boot published."""
    trial = record.get("trial")
    if trial and trial.get("tries", 0) == 0:
        return "install"          # slot marked for trial, the reboot not started yet
    if trial:
        # Health check passed and connected: confirming. A device publishes its `trial` status
        # before `online` after a trial boot (protocol §1.1), so either one shows the connection.
        connected = online_this_boot or P.TRIAL in states_this_boot
        return "confirm" if connected else "trial"
    if record.get("report"):
        return "confirm"          # confirmed, the report not yet acknowledged by the broker
    if journal:
        return "install" if {P.VERIFYING, P.INSTALLING} & set(states_this_boot) else "download"
    if command_seen and not states_this_boot:
        return "command"          # the command arrived; the download had not started
    return OTHER


class Durations:
    """Phase lengths measured in the fault-free round (seconds), the scale of the random delays."""

    def __init__(self, command=0.02, download=0.5, install=0.05, trial=0.3, confirm=0.02):
        self.command, self.download, self.install, self.trial, self.confirm = command, download, install, trial, confirm

    def as_dict(self):
        return {k: round(v, 4) for k, v in vars(self).items()}


class Killer(threading.Thread):
    """Kills one device's agent at random moments of one job, following a plan of phases."""

    def __init__(self, sweep, device: str, job: int, chunks: int, plan: list[str], rng: random.Random):
        super().__init__(name=f"killer-{device}", daemon=True)
        self.sweep, self.device, self.job, self.chunks, self.plan, self.rng = sweep, device, job, chunks, plan, rng
        self.proc = sweep.fleet.devices[device]
        self.root = Path(self.proc.root)
        self.kills: list[dict] = []
        self.missed: list[dict] = []
        self.killed_start = -1     # proc.starts of the process last killed
        self.t_job = time.monotonic()

    def _done(self) -> bool:
        return self.sweep.stop.is_set() or any(
            s == P.CONFIRMED for _, s in self.sweep.watcher.states(self.device, self.job))

    def _record(self) -> dict:
        return _read_json(self.root / "boot.json") or {}

    def _trigger(self, target: str) -> float | None | str:
        """Delay (s) before the kill once the target phase is reached, None to keep waiting,
        'missed' when this process is past it."""
        w, d, rng = self.sweep.watcher, self.sweep.durations, self.rng
        started = self.proc.started_at
        states = [s for _, s in w.states(self.device, self.job, started)]
        if target == "command":
            if states or any(b.get("job") == self.job for _, _, b in w.since(self.device, 0, "cmd")):
                return "missed"
            # while the agent checks the command's signatures and sets up the download
            return ("cmd", rng.uniform(0, 0.6 * d.command))
        if target == "download":
            if P.VERIFYING in states or P.INSTALLING in states:
                return "missed"
            reqs = [b for _, _, b in w.since(self.device, started, "req") if b.get("job") == self.job]
            if not reqs:
                return None
            # a random moment of what is left of the download in this process
            left = 1 - min(self.chunks, reqs[0].get("first", 0)) / self.chunks
            return rng.uniform(0, left * d.download)
        rec = self._record()
        trial = rec.get("trial")
        if target == "install":
            if trial and trial.get("tries", 0) >= 1:
                return "missed"
            return rng.uniform(0, d.install) if {P.VERIFYING, P.INSTALLING} & set(states) else None
        if not trial or trial.get("job") != self.job:
            return "missed" if rec.get("versions", {}).get(rec.get("active")) == self.sweep.version else None
        if trial.get("tries", 0) < 1:
            return None  # the trial boot has not counted itself yet
        online = [t for t, _, on in w.since(self.device, started, "online") if on]
        if online and (self.device, self.proc.starts) not in self.sweep.trial_boots:
            self.sweep.trial_boots[(self.device, self.proc.starts)] = online[0] - started  # keep the scale current
        if target == "trial":
            # before the health check passes: the agent starts, loads its app, connects
            return max(0.0, started + rng.uniform(0, 0.7 * self.sweep.trial_length()) - time.monotonic())
        # confirm: from the moment the trial boot reached the broker (its online flag)
        if online:
            return rng.uniform(0, d.confirm)  # already there: now (probably late)
        return ("online", rng.uniform(0, 0.3 * d.confirm))  # the window is a few ms long

    def run(self):
        for target in self.plan:
            if self._done():
                self._miss(target, "job done")
                continue
            self._kill_in(target)

    def _shoot(self, target: str):
        """SIGKILL now; (started_at, start number, kill time) of the killed agent, False if none
        was running, "budget" if the kill would exceed the trial budget."""
        if target in ("trial", "confirm"):
            trial = self._record().get("trial")
            if trial and trial.get("tries", 0) >= MAX_TRIAL_BOOTS:
                # One more kill on trial would (rightly) revert: leave the budget alone.
                return "budget"
        started, start_no = self.proc.started_at, self.proc.starts
        t_kill = time.monotonic()
        if not self.proc.kill(wait=True):
            return False
        return started, start_no, t_kill

    def _armed(self, target: str, delay: float, on: str):
        """Kill from the watcher's thread when the online flag (or the command) arrives; None if
        the job ended first."""
        done = threading.Event()
        box = {}

        def fire():
            time.sleep(delay)
            box["shot"] = self._shoot(target)
            done.set()
        self.sweep.watcher.arm(self.device, fire, on)
        while not done.wait(0.01):
            if self._done() or self.proc.starts != self.killed_start and self.proc.pid is None:
                self.sweep.watcher.disarm(self.device)
                if not done.is_set():
                    return None
        return box["shot"]

    def _miss(self, target: str, why: str) -> None:
        self.missed.append({"device": self.device, "job": self.job, "target": target, "why": why,
                            "at": round(time.monotonic() - self.t_job, 4),
                            "uptime": round(time.monotonic() - self.proc.started_at, 4)})

    def _kill_in(self, target: str) -> None:
        deadline = time.monotonic() + self.sweep.args.timeout
        while not self._done():
            if time.monotonic() > deadline:
                self._miss(target, "timeout")
                return
            if self.proc.pid is None or self.proc.starts == self.killed_start:
                time.sleep(0.003)  # the killed agent is not restarted yet
                continue
            delay = self._trigger(target)
            if delay == "missed":
                self._miss(target, "passed")
                return
            if delay is None:
                time.sleep(0.003)
                continue
            if isinstance(delay, tuple):
                shot = self._armed(target, delay[1], delay[0])
                if shot is None:
                    continue
            else:
                time.sleep(delay)
                shot = self._shoot(target)
            if shot == "budget":
                self._miss(target, "trial budget")
                return
            if not shot:
                continue  # between two processes (a reboot): try again
            started, start_no, t_kill = shot
            self.killed_start = start_no
            time.sleep(0.05)  # what it published before dying reaches the watcher
            record = self._record()
            journal = (self.root / "journal.json").exists()
            w = self.sweep.watcher
            states = [s for t, s in w.states(self.device, self.job, started) if t <= t_kill + 0.05]
            online = any(on for t, _, on in w.since(self.device, started, "online") if t <= t_kill)
            command_seen = any(b.get("job") == self.job for t, _, b in w.since(self.device, 0, "cmd") if t <= t_kill)
            phase = classify(record, journal, states, online, command_seen)
            if isinstance(delay, tuple):
                delay = delay[1]
            self.kills.append({"device": self.device, "job": self.job, "target": target, "phase": phase,
                               "delay": round(delay, 4), "at": round(t_kill - self.t_job, 4),
                               "uptime": round(t_kill - started, 4)})
            return


class Sweep:
    def __init__(self, tmp: Path, args):
        self.args = args
        self.fleet = Fleet.standalone(tmp, chunk=args.chunk, window=args.window, heap=args.heap)
        if not args.delta:
            self.fleet.center.center.delta_wbits = None  # full images, as the sweep was built for
        self.ids = [f"kill-{i:02d}" for i in range(args.devices)]
        self.fleet.add_devices(self.ids)
        for d in self.ids:
            self.fleet.devices[d].max_restarts = 1_000_000  # a watchdog never gives up
        self.watcher = Watcher(self.fleet.broker)
        # Killer threads must act within milliseconds, not after the default 5 ms GIL slice.
        self._switch = sys.getswitchinterval()
        sys.setswitchinterval(0.0005)
        self.durations = Durations()
        self.trial_boots: dict[tuple[str, int], float] = {}
        self.manifests: dict[str, dict] = {"1.0.0": files_manifest(hello_files("1.0.0"))}
        self.gaps_seen: set = set()   # (epoch, boot, seq) gaps already counted in an earlier round
        self.stop = threading.Event()
        self.version = "1.0.0"
        self.rounds: list[dict] = []
        self.kills: list[dict] = []

    def trial_length(self) -> float:
        """Median time from a trial boot's start to its online flag, over the last 20 seen
        (the fault-free round's figure until then): it shrinks when fewer agents boot at once."""
        seen = list(self.trial_boots.values())[-20:]
        if len(seen) < 3:
            return self.durations.trial
        return sorted(seen)[len(seen) // 2]

    def close(self):
        self.stop.set()
        sys.setswitchinterval(self._switch)
        self.watcher.close()
        self.fleet.close()

    def _deploy(self, version: str):
        image = bundle_of_size(version, self.args.image_kib * 1024)
        rel = self.fleet.release(image, version)
        self.manifests[version] = json.loads(rel.manifest)
        dep = create_deployment(self.fleet.store, rel, device_ids=self.ids)
        return rel, {j.device_id: j.id for j in dep.jobs}

    def round(self, number: int, kills: bool) -> dict:
        self.version = f"1.{number + 1}.0"
        rng = random.Random(f"{self.args.seed}-{number}")
        rel, jobs = self._deploy(self.version)
        chunks = -(-rel.size // self.args.chunk)
        t0 = time.monotonic()
        killers = []
        if kills:
            for d in self.ids:
                # the short command window is aimed at in every plan until it had its kills
                lacking = Counter(k["phase"] for k in self.kills)["command"] < self.args.min_per_phase
                plan = (["command"] * (lacking or rng.random() < 0.5) + ["download"] * rng.randint(1, 3) + ["install"] * rng.randint(1, 2)
                        + ["trial", "confirm"])
                k = Killer(self, d, jobs[d], chunks, plan, random.Random(rng.random()))
                killers.append(k)
                k.start()
        try:
            wait_until(lambda: all(s in P.TERMINAL_STATES for s, _, _ in
                                   self.fleet.job_states(list(jobs.values())).values()),
                       timeout=self.args.timeout, interval=0.05, what=f"round {number}: every job terminal")
        except TimedOut as exc:
            log(exc)
        wall = time.monotonic() - t0
        for k in killers:
            k.join(self.args.timeout)
        result = self._check(number, rel, jobs, wall)
        result["kills"] = [x for k in killers for x in k.kills]
        result["missed"] = [m for k in killers for m in k.missed]
        self.kills += result["kills"]
        if not kills:
            self._measure(jobs, t0)
        return result

    def _check(self, number: int, rel, jobs: dict[str, int], wall: float) -> dict:
        states = self.fleet.job_states(list(jobs.values()))
        devices = {}
        for d, job in jobs.items():
            state, code, reason = states[job]
            devices[d] = {"job": job, "state": state, "code": code, "reason": reason,
                          **device_outcome(self.fleet, d, self.manifests)}
        completed = sum(1 for v in devices.values() if v["state"] == P.CONFIRMED)
        # Lost statuses: (epoch, boot, seq) gaps in what the center stored, new since the last round.
        gaps = {kind: [k for k in keys if k not in self.gaps_seen]
                for kind, keys in status_gaps(self.fleet, self.ids).items()}
        self.gaps_seen.update(gaps["lost"], gaps["superseded"])
        return {"round": number, "version": self.version, "wall_s": round(wall, 3), "jobs": len(jobs),
                "completed": completed, "lost_statuses": len(gaps["lost"]), "lost": [list(k) for k in gaps["lost"]],
                "superseded_health": len(gaps["superseded"]),
                "bricked": sum(1 for v in devices.values() if v["bricked"]),
                "verified": sum(1 for v in devices.values() if v["verified"] and v["running"] == self.version),
                "devices": devices}

    def _measure(self, jobs: dict[str, int], t0: float) -> None:
        """Phase lengths of the fault-free round: medians over the devices."""
        spans = defaultdict(list)
        for d, job in jobs.items():
            seen = {}
            for t, s in self.watcher.states(d, job, t0):
                seen.setdefault(s, t)
            online = [t for t, _, on in self.watcher.since(d, seen.get(P.REBOOTING, t0), "online") if on]
            if not {P.DOWNLOADING, P.VERIFYING, P.REBOOTING, P.CONFIRMED} <= set(seen) or not online:
                continue
            cmds = [t for t, _, b in self.watcher.since(d, t0, "cmd") if b.get("job") == job]
            if cmds:
                spans["command"].append(seen[P.DOWNLOADING] - cmds[0])
            spans["download"].append(seen[P.VERIFYING] - seen[P.DOWNLOADING])
            spans["install"].append(seen[P.REBOOTING] - seen[P.VERIFYING])
            # round 0 has no kills: the running agent is the one that booted on trial
            spans["trial"].append(online[0] - self.fleet.devices[d].started_at)
            spans["confirm"].append(seen[P.CONFIRMED] - online[0])
        for name, values in spans.items():
            values.sort()
            setattr(self.durations, name, max(0.002, values[len(values) // 2]))

    def enough(self) -> bool:
        per_phase = Counter(k["phase"] for k in self.kills)
        return (len(self.kills) >= self.args.kills
                and all(per_phase[p] >= self.args.min_per_phase for p in PHASES))

    def run(self) -> dict:
        self.fleet.wait_online(*self.ids, timeout=60)
        log(f"{len(self.ids)} devices online; round 0 without faults")
        self.rounds.append(self.round(0, kills=False))
        log("phase lengths (s):", self.durations.as_dict())
        number = 1
        max_rounds = self.args.max_rounds or max(10, 4 * self.args.kills // max(1, len(self.ids)))
        while not self.enough() and number <= max_rounds:
            r = self.round(number, kills=True)
            self.rounds.append(r)
            log(f"round {number}: {len(r['kills'])} kills, {r['completed']}/{r['jobs']} confirmed, "
                f"{r['bricked']} bricked, {r['lost_statuses']} lost, {r['wall_s']} s; total {len(self.kills)}")
            if r["completed"] != r["jobs"] or r["bricked"]:
                log("stopping: a round did not complete", json.dumps(r["devices"], indent=1))
                break
            number += 1
        return self.summary()

    def summary(self) -> dict:
        killed_rounds = self.rounds[1:]
        rows = []
        for phase in PHASES + (OTHER,):
            ks = [k for k in self.kills if k["phase"] == phase]
            jobs = {(k["device"], k["job"]) for k in ks}
            outcome = {}
            for r in killed_rounds:
                for d, v in r["devices"].items():
                    outcome[(d, v["job"])] = v
            rows.append({"phase": phase, "kills": len(ks), "devices": len({k["device"] for k in ks}),
                         "jobs": len(jobs),
                         "completed": sum(1 for j in jobs if outcome.get(j, {}).get("state") == P.CONFIRMED),
                         "bricked": sum(1 for j in jobs if outcome.get(j, {}).get("bricked", True)),
                         "verified": sum(1 for j in jobs if outcome.get(j, {}).get("verified"))})
        bad = [s for d in self.ids for s in self.watcher.statuses(d)
               if s.get("code") in BAD_CODES or s.get("state") in (P.FAILED, P.REVERTED)]
        jobs = sum(r["jobs"] for r in killed_rounds)
        return {
            "kills": len(self.kills), "rounds": len(killed_rounds), "devices": len(self.ids), "jobs": jobs,
            "completed": sum(r["completed"] for r in killed_rounds),
            "bricked": sum(r["bricked"] for r in self.rounds),
            "lost_statuses": sum(r["lost_statuses"] for r in self.rounds),
            "superseded_health": sum(r["superseded_health"] for r in self.rounds),
            "verified": sum(r["verified"] for r in killed_rounds),
            "bad_statuses": bad, "phases": rows,
            "restarts": {d: self.fleet.devices[d].starts - 1 for d in self.ids},
            "baseline_wall_s": self.rounds[0]["wall_s"],
            "median_round_wall_s": sorted(r["wall_s"] for r in killed_rounds)[len(killed_rounds) // 2]
            if killed_rounds else None,
            "durations": self.durations.as_dict(),
        }


def sweep(tmp: Path, **options) -> dict:
    """Run a sweep with parser defaults overridden by options (for tests); returns the summary
    plus the rounds and every kill."""
    args = build_parser().parse_args([])
    for k, v in options.items():
        setattr(args, k, v)
    s = Sweep(Path(tmp), args)
    try:
        summary = s.run()
    finally:
        s.close()
    summary["rounds_detail"] = s.rounds
    summary["kill_log"] = s.kills
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="./run bench killsweep", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--devices", type=int, default=4, help="devices updated (and killed) in parallel")
    p.add_argument("--kills", type=int, default=200, help="run rounds until at least this many kills")
    p.add_argument("--min-per-phase", type=int, default=1, help="... and this many in each phase")
    p.add_argument("--seed", type=int, default=1, help="seed of the kill plans and delays")
    p.add_argument("--image-kib", type=int, default=64, help="release size in KiB (a bundle)")
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--heap", default=DEFAULT_HEAP, help="device heap")
    p.add_argument("--timeout", type=float, default=120, help="seconds allowed per round")
    p.add_argument("--max-rounds", type=int, default=0, help="give up after this many rounds (0: automatic)")
    p.add_argument("--delta", action="store_true",
                   help="let the control center send deltas (from round 2 on every job is a patch)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--keep", type=Path, help="run in this directory and keep it (device logs)")
    return p


def _table(summary: dict, args) -> None:
    rows = [[r["phase"], r["kills"], r["devices"], r["jobs"], r["completed"], r["bricked"], r["verified"]]
            for r in summary["phases"]]
    rows.append(["all", summary["kills"], summary["devices"], summary["jobs"], summary["completed"],
                 summary["bricked"], summary["verified"]])
    print_table(f"kill -9 sweep: {summary['devices']} devices, {summary['rounds']} rounds, {summary['kills']} kills, "
                f"seed {args.seed}, {args.image_kib} KiB image",
                ("phase", "kills", "devices", "jobs", "completed", "bricked", "verified versions"), rows,
                notes=[f"lost statuses ((epoch, boot, seq) gaps): {summary['lost_statuses']} (health reports dropped unsent, "
                       f"superseded: {summary['superseded_health']}); failed/reverted/bad-hash statuses: "
                       f"{len(summary['bad_statuses'])}; round wall time: {summary['baseline_wall_s']} s without "
                       f"kills, median {summary['median_round_wall_s']} s with kills; phase lengths (s) "
                       f"{summary['durations']}"], left=("phase",))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="fota-killsweep-") as tmp:
        s = Sweep(args.keep or Path(tmp), args)
        try:
            summary = s.run()
        finally:
            s.close()
    results = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "environment": {"python": platform.python_version(), "cpus": os.cpu_count()},
               "summary": summary, "rounds": s.rounds, "kills": s.kills}
    _table(summary, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    ok = (summary["bricked"] == 0 and summary["lost_statuses"] == 0 and summary["completed"] == summary["jobs"]
          and not summary["bad_statuses"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
