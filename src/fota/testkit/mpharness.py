"""fota.powercut.harness run in a MicroPython process: the power-cut bench's --interpreter.

MicroPythonHarness stands in for the harness module: its functions (clean_run, run_case,
chained_cases, ...) are called in one long-lived `micropython` process of the chosen interpreter
(fota.testkit.interpreters) and answer what the module's own functions answer on CPython; what is
not a function (Scenario, constants) is the CPython module's. A scenario is prepared on CPython
(fota.powercut.scenario) and passed by its directory.

Arguments and results cross as JSON lines with tuples, dicts with non-string keys and scenarios
tagged, so that the caller gets back exactly the types the module returns.
On "64" the harness is compiled from src/ (it is not part of the agent's .mpy build); on
"32-frozen" it is frozen with the agent (fota.testkit.mp32 freezes fota.powercut's MicroPython
modules too: a frozen package finds no submodule on disk).
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from fota.powercut import harness as _local
from fota.testkit.interpreters import Interpreter, interpreter as resolve

SRC = Path(__file__).resolve().parents[2]
MARK = "\x00fota-harness "

SERVER = r"""
import sys, json, gc
from fota.powercut import harness as H
scenarios = {}

def decode(v):
    if isinstance(v, list):
        return [decode(x) for x in v]
    if isinstance(v, dict):
        if "t" in v:
            return tuple(decode(x) for x in v["t"])
        if "s" in v:
            s = scenarios.get(v["s"])
            if s is None:
                s = scenarios[v["s"]] = H.Scenario(v["s"])
            return s
        if "d" in v:
            return dict((decode(k), decode(x)) for k, x in v["d"])
        return dict((k, decode(x)) for k, x in v["o"].items())
    return v

def encode(v):
    if isinstance(v, tuple):
        return {"t": [encode(x) for x in v]}
    if isinstance(v, list):
        return [encode(x) for x in v]
    if isinstance(v, dict):
        if all(isinstance(k, str) for k in v):
            return {"o": dict((k, encode(x)) for k, x in v.items())}
        return {"d": [[encode(k), encode(x)] for k, x in v.items()]}
    return v

while True:
    line = sys.stdin.readline()
    if not line:
        break
    req = json.loads(line)
    try:
        kwargs = decode(req["kwargs"])
        out = {"ok": encode(getattr(H, req["fn"])(*decode(req["args"]), **kwargs))}
    except Exception as e:
        out = {"error": "%s: %s" % (type(e).__name__, e)}
    gc.collect()
    sys.stdout.write(MARK + json.dumps(out) + "\n")
""".replace("MARK", repr(MARK))


def _encode(v):
    if isinstance(v, _local.Scenario):
        return {"s": v.path}
    if isinstance(v, tuple):
        return {"t": [_encode(x) for x in v]}
    if isinstance(v, list):
        return [_encode(x) for x in v]
    if isinstance(v, dict):
        if all(isinstance(k, str) for k in v):
            return {"o": {k: _encode(x) for k, x in v.items()}}
        return {"d": [[_encode(k), _encode(x)] for k, x in v.items()]}
    return v


def _decode(v):
    if isinstance(v, list):
        return [_decode(x) for x in v]
    if isinstance(v, dict):
        if "t" in v:
            return tuple(_decode(x) for x in v["t"])
        if "d" in v:
            return {_decode(k): _decode(x) for k, x in v["d"]}
        return {k: _decode(x) for k, x in v["o"].items()}
    return v


class HarnessError(RuntimeError):
    """The harness raised in MicroPython, or its process ended."""


class MicroPythonHarness:
    """The harness module's functions, run on `interpreter` ("64" or "32-frozen"). extra_path:
    more of MICROPYPATH (emulated board modules), after the agent's. close() ends the process."""

    def __init__(self, interpreter: str, heap: str = "512K", extra_path: str | None = None):
        mp = resolve(interpreter)
        if interpreter == "64":  # the harness is not in the agent's .mpy build: compiled from src/
            mp = Interpreter(mp.name, mp.executable, f"{SRC}:.frozen")
        self.interpreter = interpreter
        env = mp.env(extra_path=extra_path)
        self._proc = subprocess.Popen(mp.argv(heap, "-c", SERVER), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      text=True, env=env)

    def __getattr__(self, name):
        value = getattr(_local, name)
        if not callable(value) or isinstance(value, type):
            return value   # Scenario (built here, passed by path), constants
        return lambda *args, **kwargs: self._call(name, args, kwargs)

    def _call(self, fn: str, args: tuple, kwargs: dict):
        proc = self._proc
        proc.stdin.write(json.dumps({"fn": fn, "args": _encode(list(args)), "kwargs": _encode(kwargs)}) + "\n")
        proc.stdin.flush()
        seen = []
        for line in proc.stdout:
            if line.startswith(MARK):
                out = json.loads(line[len(MARK):])
                if "error" in out:
                    raise HarnessError(f"{fn} on the {self.interpreter} MicroPython: {out['error']}")
                return _decode(out["ok"])
            seen.append(line)
        raise HarnessError(f"the {self.interpreter} MicroPython harness ended (exit {proc.wait()}): "
                           + "".join(seen[-20:]))

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
