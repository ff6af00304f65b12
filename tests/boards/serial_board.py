"""An emulated board behind a serial port for the tests (CPython side): a pty whose slave end is
the "port" mpremote opens (/dev/pts/N), whose master end is the stdin/stdout of the real
`micropython` running tests/boards/rawrepl.py (the REPL's raw and raw-paste modes) on a
directory that is the board's filesystem."""
from __future__ import annotations

import os
import subprocess
import tty
from pathlib import Path

RAWREPL = Path(__file__).resolve().parent / "rawrepl.py"


class EmulatedBoard:
    def __init__(self, micropython: str, root: Path, platform: str = "rp2", raw_paste: bool = True,
                 free: int | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.platform = platform
        self.log = self.root.parent / f"{self.root.name}.events"
        self.log.write_text("")
        master, slave = os.openpty()
        tty.setraw(slave)  # no echo, no newline translation: a serial line, not a terminal
        self.port = os.ttyname(slave)
        # The test keeps the slave open: between two mpremote runs the master then sees no
        # hang-up, as a board's USB serial stays up between two connections.
        self._fds = (master, slave)
        self.stderr = self.root.parent / f"{self.root.name}.stderr"
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(
                [micropython, "-X", "heapsize=4M", str(RAWREPL), str(self.root), platform, str(self.log)]
                + ([] if raw_paste else ["--no-raw-paste"]) + ([] if free is None else ["--free", str(free)]),
                stdin=master, stdout=master, stderr=err, close_fds=True)

    def events(self) -> list[str]:
        return self.log.read_text().splitlines()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for fd in self._fds:
            os.close(fd)

    def __enter__(self) -> "EmulatedBoard":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
