"""How long the agent keeps the app waiting: the longest step of the board runner, per kind.

    ./run bench agent_blocking [--image-kib 128] [--chunk 2048] [--window 8] [--idle-s 2] [--tls]
                               [--app-sleep-ms 2] [--target-ms 100] [--heap 224K] [--timeout 90]
                               [--out bench/results/agent_blocking.json]

One device runs the board runner (fota.device.board) on the MicroPython unix port, with the board
modules emulated (machine.reset, machine.WDT), against a real Mosquitto and control center. Its
app is a probe that owns its loop (the `main(agent)` style of docs/boards.md): every turn it calls
`agent.poll(0)` and times it, so each measured time is how long one step of the agent kept the
app from running. Inside the agent the probe also times each kind of work a step can contain:

    connect      one connection attempt: TCP connect, (TLS handshake), CONNECT/CONNACK, subscribes
    command      an update command: its checks and the manifest's ECDSA P-256 signature verify
    chunk        one chunk in the core: SHA-256 update (the last one: the digest check)
    write        one chunk written to the slot file
    journal      the download checkpoint: flush, then the journal's atomic replace
    install step one step of the install: unpacking up to 16 KiB of the bundle (bounded steps)
    boot         the boot selection and start (before the app's loop; not a step)

First the app runs --idle-s seconds next to an idle agent (the same run's baseline); then one
update of --image-kib KiB (a bundle: the app plus a random blob) is deployed and confirmed,
through the reboot (machine.reset) and the trial boot. Reported: per kind, count, mean and max ms;
the longest step while idle and during the update, and their ratio; the verdict against
--target-ms (a target, not a failure). The run fails (exit 1) when the update is not confirmed
or the probe recorded nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

from bench._report import print_table, write_and_judge
from fota.server.deployments import create_deployment
from fota.server.broker import SERVER_USER, Mosquitto
from fota.testkit.broker import BrokerAccounts
from fota.testkit.fleet import Fleet, bundle_of_size
from fota.tools.supervisor import DeviceProcess
from fota.tools.waiting import TimedOut, wait_until

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "agent_blocking.json"
KINDS = ("connect", "command", "chunk", "write", "journal", "begin", "install step", "agent state", "set trial",
         "confirm", "boot record", "boot")


def emulations() -> Path:
    """Where the emulated board modules (machine, network) are."""
    try:
        import fota.testkit.boards as boards  # where a later layout keeps them
        return Path(boards.__file__).resolve().parent
    except ImportError:
        return ROOT / "tests" / "boards"


# The board's main.py: the board runner with the probe as its app (MicroPython).
PROBE = r"""
import time, json, os, machine
from fota.device import board, runner, core as C
from fota.device.executor import Reboot

STATS = STATS_PATH
SLEEP_MS = APP_SLEEP_MS
try:
    with open(STATS) as f:
        stats = json.load(f)        # what the boots before this one measured
except OSError:
    stats = {}
phase = ["idle"]

def rec(kind, us):
    k = stats.get(kind)
    if k is None:
        k = stats[kind] = [0, 0, 0]
    k[0] += 1
    k[1] += us
    if us > k[2]:
        k[2] = us

def save():
    with open(STATS + ".tmp", "w") as f:
        json.dump(stats, f)
    os.rename(STATS + ".tmp", STATS)

def timed(kind, fn):
    def w(*a):
        t = time.ticks_us()
        try:
            return fn(*a)
        finally:
            rec(kind, time.ticks_diff(time.ticks_us(), t))
    return w

NAMES = {C.A_WRITE: "write", C.A_JOURNAL: "journal", C.A_BEGIN: "begin", C.A_STATE: "agent state",
         C.A_SET_TRIAL: "set trial", C.A_CONFIRM: "confirm", C.A_CLEAR_REPORT: "boot record"}

class Probe:
    def main(self, agent):
        saved = time.ticks_ms()
        while True:
            t = time.ticks_us()
            agent.poll(0)
            took = time.ticks_diff(time.ticks_us(), t)
            if agent.core.state != "idle" or agent.installing is not None:
                phase[0] = "update"
            rec("step " + phase[0], took)
            if time.ticks_diff(time.ticks_ms(), saved) > 300:
                saved = time.ticks_ms()
                if os.getenv("FOTA_BENCH_PHASE") == "update" or stats.get("step update"):
                    phase[0] = "update"
                save()
            time.sleep_ms(SLEEP_MS)   # the app's own work

probe = Probe()
dev = board.BoardDevice(ROOT_DIR, app_loader=lambda d: probe)
dev._connect = timed("connect", dev._connect)
dev._install_step = timed("install step", dev._install_step)
run = dev.executor.run
def run_timed(action):
    t = time.ticks_us()
    try:
        return run(action)
    finally:
        rec(NAMES.get(action[0], str(action[0])), time.ticks_diff(time.ticks_us(), t))
dev.executor.run = run_timed
try:
    t = time.ticks_us()
    dev.boot()
    rec("boot", time.ticks_diff(time.ticks_us(), t))
    dev.core.command = timed("command", dev.core.command)
    dev.core.chunk = timed("chunk", dev.core.chunk)
    board.run_app(dev)
except Reboot:
    save()
    runner.shut_down(dev)
machine.reset()
"""


class ProbeBoard(DeviceProcess):
    def __init__(self, root: Path, stats: Path, app_sleep_ms: int, **kwargs):
        super().__init__(root, **kwargs)
        self.script = (PROBE.replace("STATS_PATH", repr(str(stats))).replace("APP_SLEEP_MS", str(app_sleep_ms))
                       .replace("ROOT_DIR", repr(str(root))))
        self.phase = "idle"

    def arguments(self) -> list[str]:
        return ["-c", self.script]

    def environment(self) -> dict[str, str]:
        env = super().environment()
        env["MICROPYPATH"] = f"{emulations()}:{self.code_path}:.frozen"
        env["FOTA_EMU_RESET_CAUSE"] = str(self.root / "reset_cause")
        env["FOTA_BENCH_PHASE"] = self.phase
        env.pop("FOTA_EMULATED_BOARD", None)
        env.pop("FOTA_EMU_WLAN", None)
        return env


def log(*args) -> None:
    print("[bench]", *args, file=sys.stderr, flush=True)


class _TlsBroker(BrokerAccounts):
    """A TLS-only Mosquitto of the bench's own (the device verifies it against the CA)."""

    def __init__(self, directory: Path):
        from fota.server.tls import ensure_tls
        self.files = ensure_tls(directory / "tls")
        super().__init__(Mosquitto(directory / "broker", auth=True, tls=self.files).start())
        self.add_users({SERVER_USER: secrets.token_urlsafe(12)})

    @property
    def server_url(self) -> str:
        return f"mqtts://{SERVER_USER}:{self.users[SERVER_USER]}@{self.host}:{self.service_port}"


def _fleet(args, tmp: Path):
    """(fleet, device settings, stop): plain MQTT, or with --tls a TLS-only broker."""
    if not args.tls:
        return Fleet.standalone(tmp / "fleet", chunk=args.chunk, window=args.window), {}, lambda: None
    broker = _TlsBroker(tmp / "mosquitto")
    fleet = Fleet(tmp / "fleet", broker, f"sqlite:///{tmp / 'fota.db'}", kek=False, spy=False, device_settings={},
                  chunk=args.chunk, window=args.window, ssl_context=broker.files.client_context())
    return fleet, {"cadata": broker.files.ca_der(), "server_hostname": "localhost"}, broker.mosquitto.stop


def measure(args, tmp: Path) -> dict:
    fleet, settings, stop_broker = _fleet(args, tmp)
    try:
        fleet.add_device("probe-1", start=False, trial_wdt_ms=args.wdt_ms, trial_settle_ms=200, **settings)
        root = fleet.root("probe-1")
        stats_path = tmp / "stats.json"
        proc = ProbeBoard(root, stats_path, args.app_sleep_ms, heap=args.heap)
        fleet.devices["probe-1"] = proc
        proc.start()
        fleet.wait_online("probe-1", timeout=30)
        time.sleep(args.idle_s)
        proc.phase = "update"  # the next boot (the trial) counts as the update's
        image = bundle_of_size("1.1.0", args.image_kib * 1024)
        rel = fleet.release(image, "1.1.0")
        t0 = time.monotonic()
        dep = create_deployment(fleet.store, rel, device_ids=["probe-1"])
        job = fleet.wait_job(dep.jobs[0].id, timeout=args.timeout)
        wall = time.monotonic() - t0
        if job.state == "confirmed":
            fleet.wait_online("probe-1", version="1.1.0", timeout=30)
        time.sleep(1.0)  # the probe saves every 0.3 s
        stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
        return {"state": job.state, "code": job.code, "reason": job.reason, "wall_s": round(wall, 3),
                "image_bytes": len(image), "exits": list(proc.exits), "stats": stats,
                "log_tail": proc.log_text()[-2000:]}
    finally:
        fleet.close()
        stop_broker()


def summarize(raw: dict, target_ms: float) -> dict:
    stats = raw["stats"]
    rows = {}
    for kind, (count, total_us, max_us) in stats.items():
        rows[kind] = {"count": count, "mean_ms": round(total_us / count / 1000, 3), "max_ms": round(max_us / 1000, 3)}
    idle = rows.get("step idle", {}).get("max_ms")
    update = rows.get("step update", {}).get("max_ms")
    return {"kinds": rows, "idle_max_ms": idle, "update_max_ms": update,
            "ratio_update_to_idle": round(update / idle, 2) if idle and update else None,
            "target_ms": target_ms, "verdict": ("met" if update is not None and update <= target_ms else "MISSED")}


def failures(result: dict) -> list[str]:
    out = []
    if result["run"]["state"] != "confirmed":
        r = result["run"]
        out.append(f"update not confirmed: {r['state']} {r['code']} {r['reason']}")
    if not result["summary"]["kinds"].get("step update"):
        out.append("the probe recorded no step during the update")
    return out


def render(result: dict) -> None:
    s = result["summary"]
    cfg = result["config"]
    order = ["step idle", "step update"] + [k for k in KINDS if k in s["kinds"]]
    order += [k for k in sorted(s["kinds"]) if k not in order]
    rows = [[k, v["count"], v["mean_ms"], v["max_ms"]] for k in order if (v := s["kinds"].get(k))]
    print_table(f"agent steps seen by the app: {cfg['image_kib']} KiB bundle, chunk {cfg['chunk']}, "
                f"window {cfg['window']}, {'TLS' if cfg['tls'] else 'plain MQTT'}, MicroPython unix port",
                ["module", "count", "mean ms", "max ms"], rows,
                notes=[f"longest step: idle {s['idle_max_ms']} ms, during the update {s['update_max_ms']} ms "
                       f"(x{s['ratio_update_to_idle']} the idle baseline); target {s['target_ms']} ms: {s['verdict']}",
                       f"update wall time {result['run']['wall_s']} s, exits {result['run']['exits']}"])


def parse(argv):
    p = argparse.ArgumentParser(prog="./run bench agent_blocking", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--image-kib", type=int, default=128, help="release (bundle) size in KiB")
    p.add_argument("--chunk", type=int, default=2048, help="chunk size in bytes")
    p.add_argument("--window", type=int, default=8, help="chunks in flight")
    p.add_argument("--idle-s", type=float, default=2.0, help="seconds of the idle baseline")
    p.add_argument("--app-sleep-ms", type=int, default=2, help="the probe app's own work per turn (a sleep)")
    p.add_argument("--target-ms", type=float, default=100.0, help="the longest step allowed (a verdict)")
    p.add_argument("--wdt-ms", type=int, default=8000, help="the trial watchdog's timeout")
    p.add_argument("--tls", action="store_true", help="a TLS-only broker: the connect includes the handshake")
    p.add_argument("--heap", default="224K", help="device heap (the board runner with emulated modules)")
    p.add_argument("--timeout", type=float, default=90, help="seconds allowed for the update")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    with tempfile.TemporaryDirectory(prefix="fota-agent-blocking-") as d:
        try:
            raw = measure(args, Path(d))
        except TimedOut as e:
            raw = {"state": "timed out", "code": None, "reason": str(e), "wall_s": None, "image_bytes": None,
                   "exits": [], "stats": {}, "log_tail": ""}
    result = {"config": {"image_kib": args.image_kib, "chunk": args.chunk, "window": args.window, "tls": args.tls,
                         "idle_s": args.idle_s, "app_sleep_ms": args.app_sleep_ms, "heap": args.heap},
              "run": raw, "summary": summarize(raw, args.target_ms)}
    return write_and_judge(result, args.out, render, failures)


if __name__ == "__main__":
    sys.exit(main())
