"""Provisioning a board over its USB serial port with mpremote (fota device provision --port).

Three mpremote runs, each one command line (`mpremote_argv`):
  probe   exec a short script that prints what the board holds: the device id in
          /device/config.json, its port (sys.platform), the .mpy version its MicroPython loads,
          free space, and which of the provisioned paths exist;
  write   fs rm -r the old /device and /lib/fota, fs mkdir every directory of the new tree
          (fota.tools.boardfs), fs cp every file of it;
  reset   a hard reset (machine.reset()): the board boots into the agent.
The probe runs before the device is registered: a board that cannot be reached, runs another
port or MicroPython, or is full, registers nothing. Secrets travel in the files copied from a
private staging directory, never on a command line.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fota.tools.boardfs import AGENT_DIR, DEVICE_DIR, tree_dirs

# sys.platform of each board's MicroPython port
PLATFORM = {"esp32": "esp32", "esp32s3": "esp32", "rp2": "rp2", "esp8266": "esp8266"}

PROBE_MARK = "fota-probe:"
# Runs on the board (MicroPython): one line, PROBE_MARK and a JSON object. An unreadable
# config.json reports id "?" (a board holding something we cannot read is not a fresh board).
PROBE_CODE = f"""import os, sys, json
def used(p):
    try:
        s = os.stat(p)
    except OSError:
        return -1
    if not s[0] & 0x4000:
        return s[6]
    n = 0
    for e in os.ilistdir(p):
        n += max(0, used(p + '/' + e[0]))
    return n
try:
    with open('/{DEVICE_DIR}/config.json') as f:
        i = json.load(f).get('id')
except OSError:
    i = None
except Exception:
    i = '?'
v = os.statvfs('/')
print('{PROBE_MARK}' + json.dumps({{'id': i, 'platform': sys.platform, 'mpy': sys.implementation._mpy & 0xff,
    'free': v[0] * v[3], 'block': v[0], 'device': used('/{DEVICE_DIR}'), 'agent': used('/{AGENT_DIR}'),
    'lib': used('/lib')}}))
"""


class BoardPortError(RuntimeError):
    """The board cannot be reached through the port, or mpremote failed on it."""


def mpremote_command() -> list[str]:
    """How to run mpremote: the one installed with fota (the `device` extra)."""
    import mpremote  # noqa: F401  (a missing extra: one line naming it, fota.cli.main)
    return [sys.executable, "-m", "mpremote"]


def mpremote_argv(port: str, *steps: list[str]) -> list[str]:
    """One mpremote command line: connect to the port, then the steps, joined by '+'."""
    argv = ["connect", port]
    for n, step in enumerate(steps):
        argv += (["+"] if n else []) + list(step)
    return argv


def probe_step() -> list[str]:
    return ["exec", PROBE_CODE]


def write_steps(stage: Path, tree: dict[str, bytes], probe: dict) -> list[list[str]]:
    """The fs commands that replace the provisioned paths with the staged tree: what exists is
    removed first, so no module of an older agent and no file of an older device stays behind;
    then every directory is made and every file copied by name (mpremote's `cp -r` into a
    directory that does not exist yet copies nothing when the source has no subdirectory)."""
    steps = []
    if probe["device"] >= 0:
        steps.append(["fs", "rm", "-r", f":/{DEVICE_DIR}"])
    if probe["agent"] >= 0:
        steps.append(["fs", "rm", "-r", f":/{AGENT_DIR}"])
    steps += [["fs", "mkdir", f":/{d}"] for d in tree_dirs(tree) if not (d == "lib" and probe["lib"] >= 0)]
    # -f: copy without first hashing the (removed) destination on the board
    steps += [["fs", "cp", "-f", str(stage / name), f":/{name}"] for name in sorted(tree) if not name.endswith("/")]
    return steps


def reset_step() -> list[str]:
    return ["reset"]


def run_mpremote(argv: list[str], what: str, timeout: float = 300) -> str:
    """Run one mpremote command line; its output, or BoardPortError with mpremote's words."""
    cmd = mpremote_command() + argv
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise BoardPortError(f"{what}: mpremote gave no answer in {timeout:.0f} s") from None
    if r.returncode != 0:
        said = (r.stderr.strip() or r.stdout.strip()).splitlines()
        raise BoardPortError(f"{what}: mpremote failed: {said[-1] if said else f'exit code {r.returncode}'}")
    return r.stdout


def parse_probe(output: str) -> dict:
    for line in output.splitlines():
        if line.startswith(PROBE_MARK):
            try:
                found = json.loads(line[len(PROBE_MARK):])
            except ValueError:
                break
            if isinstance(found, dict) and {"id", "platform", "mpy", "free"} <= set(found):
                return found
            break
    raise BoardPortError(f"the board's answer is not a fota probe: {output.strip()[-200:]!r}")


def probe(port: str) -> dict:
    """What the board on `port` holds (PROBE_CODE)."""
    return parse_probe(run_mpremote(mpremote_argv(port, probe_step()), f"reading the board on {port}"))


def check_board(found: dict, board: str, mpy_major: int, need: int, device_id: str, force: bool) -> list[str]:
    """Refuse a board that is not the one asked for, cannot load the agent, has no room, or holds
    another device (unless forced). Returns notes for the operator."""
    notes = []
    if found["platform"] != PLATFORM[board]:
        raise BoardPortError(f"the board on the port runs MicroPython's {found['platform']} port, not "
                             f"{PLATFORM[board]} (--board {board})")
    if found["mpy"] != mpy_major:
        raise BoardPortError(f"the board's MicroPython loads .mpy v{found['mpy']}, the agent built for it is "
                             f"v{mpy_major}: pass its release with --micropython-version")
    held = found["id"]
    if held not in (None, device_id):
        shown = "an unreadable /device/config.json" if held == "?" else f"device {held!r}"
        if not force:
            raise BoardPortError(f"the board holds {shown}, not {device_id!r}: refusing to overwrite another "
                                 "device's identity (--force replaces it; the other device stays registered)")
        notes.append(f"--force: {shown} on the board is replaced by {device_id!r}")
    # What the write removes comes back as free space.
    room = found["free"] + max(0, found.get("device", -1)) + max(0, found.get("agent", -1))
    if need > room:
        raise BoardPortError(f"the board has {room} bytes free for the device and the agent, they take up to "
                             f"{need}: free some room on it")
    return notes


def write(port: str, stage: Path, tree: dict[str, bytes], found: dict) -> None:
    run_mpremote(mpremote_argv(port, *write_steps(stage, tree, found)), f"writing to the board on {port}")


def reset(port: str) -> None:
    run_mpremote(mpremote_argv(port, reset_step()), f"resetting the board on {port}", timeout=60)
