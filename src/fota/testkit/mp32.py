"""The 32-bit MicroPython with the agent frozen in: built from shared/micropython, cached outside git.

Boards are 32-bit and a product freezes the agent into its firmware, where the bytecode stays in
flash; the PyPI `micropython` the other runs use is 64-bit and loads the agent's .mpy into the
heap. This module builds the unix port of the MicroPython source kept beside the checkout
(shared/micropython: its build.sh and source archive) as a 32-bit interpreter with the agent
frozen in, the way a board is built.

Where the source is: `$FOTA_MICROPYTHON_SRC`, else `shared/micropython` beside the checkout or
beside a folder above it (as fota.testkit.corpus finds the corpus).

The cache: `$FOTA_CACHE` or `$XDG_CACHE_HOME/fota` or `~/.cache/fota`. The build tree
(mp32-build/: the unpacked source and the object files) is shared, so that a change of the agent
recompiles only the frozen modules (all of them, afresh for every build: see interpreter()); every interpreter built is kept as mp32-<key>/micropython,
key = a hash of the agent's sources, the manifest, build.sh and the build's variables. A change
of any of them builds a new one; the newest KEEP are kept. A lock file serialises builds (tests,
benches and ./run may ask at the same time).

    python -m fota.testkit.mp32        prints the interpreter's path, building it when missing
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from fota.tools.mpy import SRC, board_sources, freeze_manifest

ENV_SOURCE = "FOTA_MICROPYTHON_SRC"
ENV_CACHE = "FOTA_CACHE"
CHECKOUT = Path(__file__).resolve().parents[3]   # src/fota/testkit/mp32.py -> the checkout
MAKE_VARS = ("MICROPY_FORCE_32BIT=1",)
REQUIRES = ("ssl",)   # the unix port freezes ssl (micropython-lib) itself; a FROZEN_MANIFEST replaces it
KEEP = 6              # interpreters kept in the cache (several worktrees may share it)


class BuildError(RuntimeError):
    """The 32-bit interpreter cannot be built here; the message says why and what to install."""


def source_dir(start: Path = CHECKOUT) -> Path | None:
    """The directory holding build.sh and the source archive, or None when there is none."""
    if os.environ.get(ENV_SOURCE):
        return Path(os.environ[ENV_SOURCE])
    return next((d / "shared" / "micropython" for d in Path(start).resolve().parents
                 if (d / "shared" / "micropython" / "build.sh").is_file()), None)


def cache_dir() -> Path:
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fota"


def harness_sources() -> list[Path]:
    """The power-cut harness's modules (fota.powercut.harness and the fota.powercut modules it
    imports): frozen too, for `bench powercut --interpreter 32-frozen` (fota.testkit.mpharness),
    since a frozen package finds no submodule on disk. The agent never imports them: they cost
    the interpreter's "flash", not its heap."""
    pkg = SRC / "fota" / "powercut"
    found, todo = {"__init__", "harness"}, ["harness"]
    while todo:
        text = (pkg / f"{todo.pop()}.py").read_text()
        names = set(re.findall(r"^\s*(?:from|import) fota\.powercut\.(\w+)", text, re.M))
        for listed in re.findall(r"^\s*from fota\.powercut import ([\w, ]+)", text, re.M):
            names.update(n.split(" as ")[0].strip() for n in listed.split(","))
        for name in sorted(names - found):
            if (pkg / f"{name}.py").is_file():
                found.add(name)
                todo.append(name)
    return [pkg / f"{name}.py" for name in sorted(found)]


def manifest(base_path: str | None = None) -> str:
    """The frozen manifest: the agent as for the unix board (fota.tools.mpy.freeze_manifest, as
    `fota agent build` writes it) and the power-cut harness, their files taken from base_path
    (default: this checkout's src/)."""
    base = str(SRC) if base_path is None else base_path
    harness = [p.relative_to(SRC / "fota").as_posix() for p in harness_sources()]
    return (freeze_manifest("unix", base_path=base, requires=REQUIRES)
            + "# The power-cut harness (fota.testkit.mpharness), never imported by the agent:\n"
            + f"package(\"fota\", base_path={base!r}, files={harness!r})\n")


def build_key(source: Path) -> str:
    """What the interpreter is built from: the agent's and the harness's sources, the manifest (its
    base path left out: two checkouts of the same sources share one interpreter), build.sh, the archive's name and
    size, the make variables."""
    h = hashlib.sha256()
    for path in board_sources("unix") + harness_sources():
        h.update(str(path.relative_to(SRC)).encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(manifest(base_path="SRC").encode())
    h.update((source / "build.sh").read_bytes())
    for archive in sorted(source.glob("*.tar.*")):
        h.update(f"{archive.name} {archive.stat().st_size}".encode())
    h.update(" ".join(MAKE_VARS).encode())
    return h.hexdigest()[:16]


def _missing_source_message() -> str:
    where = (f"{ENV_SOURCE}={os.environ[ENV_SOURCE]}" if os.environ.get(ENV_SOURCE)
             else f"${ENV_SOURCE} unset, no shared/micropython/build.sh beside {CHECKOUT} or a folder above it")
    return f"the MicroPython source for the 32-bit interpreter is missing ({where})"


def check_toolchain() -> None:
    """A 32-bit C program compiles and links (gcc -m32: the Debian package gcc-multilib)."""
    if not shutil.which("make") or not shutil.which("gcc"):
        raise BuildError("building the 32-bit MicroPython needs make and gcc (apt-get install build-essential gcc-multilib)")
    probe = subprocess.run(["gcc", "-m32", "-x", "c", "-", "-o", os.devnull], input="int main(void){return 0;}\n",
                           capture_output=True, text=True)
    if probe.returncode != 0:
        raise BuildError("gcc cannot build 32-bit programs: install the Debian package gcc-multilib "
                         "(apt-get install gcc-multilib; ./run does it when run as root)\n" + probe.stderr[-400:])


def _prune(cache: Path, keep: int = KEEP) -> None:
    built = sorted(cache.glob("mp32-*/micropython"), key=lambda p: p.stat().st_mtime, reverse=True)
    for exe in built[keep:]:
        shutil.rmtree(exe.parent, ignore_errors=True)


def interpreter(log=None) -> Path:
    """The 32-bit interpreter with this checkout's agent frozen in, built when missing (about a
    minute the first time, seconds after a change of the agent). Raises BuildError saying why it
    cannot be built."""
    source = source_dir()
    if source is None or not (source / "build.sh").is_file():
        raise BuildError(_missing_source_message())
    cache = cache_dir()
    target = cache / f"mp32-{build_key(source)}" / "micropython"
    if target.exists():
        os.utime(target)   # in use: the newest for _prune
        return target
    try:
        cache.mkdir(parents=True, exist_ok=True)
        lock = open(cache / "mp32.lock", "w")
    except OSError as exc:
        raise BuildError(f"cannot write the build cache {cache} ({exc}): set {ENV_CACHE} to a writable directory")
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # another process may be building the same one
        if target.exists():
            return target
        check_toolchain()
        build = cache / "mp32-build"
        build.mkdir(exist_ok=True)
        # The build tree is shared by every checkout (worktrees) and MicroPython's manifest tool
        # recompiles a frozen module only when its .py is newer than the .mpy it made before:
        # another checkout's later build of an older copy would be kept. Frozen modules are
        # therefore compiled afresh for every interpreter (seconds).
        shutil.rmtree(build / "build" / "frozen_mpy", ignore_errors=True)
        (build / "manifest.py").write_text(manifest())
        if log:
            log(f"building the 32-bit MicroPython with the agent frozen in ({build}) ...")
        t0 = time.monotonic()
        proc = subprocess.run(["bash", str(source / "build.sh"), str(build), *MAKE_VARS,
                               f"FROZEN_MANIFEST={build / 'manifest.py'}"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError(f"{source / 'build.sh'} failed (log: {build / 'build.log'}):\n{proc.stderr[-2000:]}")
        tmp = target.parent.with_name(target.parent.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        shutil.copy2(build / "micropython", tmp / "micropython")
        (tmp / "manifest.py").write_text(manifest())
        (tmp / "build-seconds").write_text(f"{time.monotonic() - t0:.1f}\n")
        tmp.rename(target.parent)
        if log:
            log(f"built {target} in {time.monotonic() - t0:.0f} s")
        _prune(cache)
    return target


def main() -> int:
    try:
        print(interpreter(log=lambda msg: print(msg, file=sys.stderr, flush=True)))
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
