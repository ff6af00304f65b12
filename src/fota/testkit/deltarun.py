"""Apply a delta patch with the device's decoder under the real `micropython` binary.

Used by the tests (round trips on real firmware) and by bench/delta (the smallest heap that
applies a patch). The script streams the patch from a file in chunks, as the runner feeds it from
the network, reads the old image by seek + read and writes the new one sequentially.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

from fota.testkit.interpreters import DEFAULT, interpreter as resolve

SCRIPT = """
import sys, gc
{path}
from fota.device import delta as D
old = open({old!r}, "rb")
out = open({out!r}, "wb")
pf = open({patch!r}, "rb")
def read_old(at, n):
    old.seek(at)
    return old.read(n)
expect = D.parse_header(pf.read(D.HEADER_SIZE))
pf.seek(0)
p = D.Patcher(read_old, out.write, {size}, expect, {max_wbits})
buf = bytearray({chunk})
gc.collect()
while True:
    n = pf.readinto(buf)
    if not n:
        break
    p.feed(memoryview(buf)[:n])
p.finish()
out.close()
print("OK")
"""


def path_line(root: Path | None) -> str:
    """SCRIPT's {path}: the agent's import root put first, or nothing (the interpreter's
    MICROPYPATH finds it: the .mpy build, or the frozen agent)."""
    return f"sys.path.insert(0, {str(root)!r})" if root else "pass"


def apply_with_micropython(old: Path, patch: Path, out: Path, *, heap: str = "256K", chunk: int = 2048,
                           max_wbits: int = 15, timeout: float = 120, root: Path | None = None,
                           interpreter: str = DEFAULT) -> subprocess.CompletedProcess:
    """Run the decoder on `interpreter` (fota.testkit.interpreters); returncode 0 and "OK" on
    stdout when the patch applied and verified. root: an agent build to import instead."""
    mp = resolve(interpreter)
    script = SCRIPT.format(path=path_line(root), old=str(old), out=str(out), patch=str(patch),
                           size=patch.stat().st_size, chunk=chunk, max_wbits=max_wbits)
    return subprocess.run(mp.argv(heap, "-c", script), capture_output=True, text=True, timeout=timeout,
                          env=mp.env())
