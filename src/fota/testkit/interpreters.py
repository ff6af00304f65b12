"""Which MicroPython runs the agent: the tests' and benches' choice of interpreter.

"64"         the PyPI `micropython` (64-bit unix port), the agent loaded as .mpy compiled by
             fota.tools.mpy.build_agent (into the heap, as `fota agent build` deploys it)
"32-frozen"  the unix port built 32-bit with the agent frozen in (fota.testkit.mp32): objects and
             small ints the size they have on an ESP32 or an RP2040, bytecode kept out of the heap
             as in a product's firmware. MICROPYPATH is only `.frozen`: nothing on disk shadows
             the frozen agent.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

INTERPRETERS = ("64", "32-frozen")
DEFAULT = "64"


@dataclass(frozen=True)
class Interpreter:
    name: str
    executable: str
    path: str      # MICROPYPATH

    def env(self, base: dict | None = None, extra_path: str | None = None) -> dict:
        """The environment a run needs (base: os.environ); extra_path goes after the agent's
        (a test's emulated board modules: never before, so they shadow nothing of the agent)."""
        env = dict(os.environ if base is None else base)
        env["MICROPYPATH"] = self.path + (":" + extra_path if extra_path else "")
        return env

    def argv(self, heap: str, *args: str) -> list[str]:
        return [self.executable, "-X", f"heapsize={heap}", *args]


def interpreter(name: str = DEFAULT, log=None) -> Interpreter:
    """The interpreter `name` (INTERPRETERS), built or compiled when missing; ValueError for an
    unknown name, fota.testkit.mp32.BuildError when the 32-bit one cannot be built here."""
    if name == "64":
        from fota.tools.mpy import build_agent
        from fota.tools.supervisor import find_micropython
        return Interpreter(name, find_micropython(), f"{build_agent()}:.frozen")
    if name == "32-frozen":
        from fota.testkit import mp32
        return Interpreter(name, str(mp32.interpreter(log=log)), ".frozen")
    raise ValueError(f"unknown interpreter {name!r}; known: {', '.join(INTERPRETERS)}")
