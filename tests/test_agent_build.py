"""fota agent build: the agent as .mpy for a board, its package.json (mip) and manifest.py (freezing).

The .mpy header (MicroPython docs/reference/mpyfiles.rst): b"M", the version, a flags byte
(arch << 2 | sub-version; both 0 in a file without native code) and the small-int bits.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import micropython_binary
from fota.tools.mpy import BOARDS, MPY_VERSION, SRC, UNIX_ONLY, board_sources

FOTA = [sys.executable, "-m", "fota.cli"]


def agent_build(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run(FOTA + ["agent", "build", *args], capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[str, Path]:
    """One build per board of the table, through the command."""
    root = tmp_path_factory.mktemp("agents")
    out = {}
    for board in BOARDS:
        r = agent_build("--board", board, "--out", str(root / board))
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"agent for {board}" in r.stdout and "mpremote mip install" in r.stdout
        out[board] = root / board
    return out


def mpy_files(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in (out / "fota").rglob("*.mpy"))


def test_every_board_gets_every_module_it_needs_as_mpy(builds):
    for board, out in builds.items():
        expected = sorted(p.relative_to(SRC).with_suffix(".mpy").as_posix() for p in board_sources(board))
        assert mpy_files(out) == expected, board
        assert "fota/device/runner.mpy" in expected and "fota/device/slots/files.mpy" in expected
    # the unix port's emulations (the simulated flash) stay off the boards' small flash
    for rel in UNIX_ONLY:
        mpy = Path(rel).with_suffix(".mpy").as_posix()
        assert mpy in mpy_files(builds["unix"])
        assert all(mpy not in mpy_files(out) for board, out in builds.items() if board != "unix")


def test_the_headers_name_mpy_version_6_and_bytecode_only(builds):
    # The agent has no native code: arch and sub-version are 0, so the files load on every
    # MicroPython of .mpy version 6 (the loader ignores the sub-version of bytecode), whatever -march.
    for board, out in builds.items():
        for rel in mpy_files(out):
            head = (out / rel).read_bytes()[:4]
            assert head[:1] == b"M" and head[1] == 6, (board, rel, head)
            assert head[2] == 0, (board, rel, head)  # arch none, sub-version 0
            assert head[3] <= 31, (board, rel, head)  # small ints fit the 32-bit ports


def test_march_of_the_table_reaches_the_compiler(tmp_path):
    # Native code (not in the agent today) would be compiled for the board's CPU: the header of a
    # native module compiled the way the build compiles names the board's arch and sub-version 3.
    from fota.tools import mpy
    source = tmp_path / "probe.py"
    source.write_text("@micropython.native\ndef f(x):\n    return x + 1\n")
    for board, arch in (("esp32", 10), ("esp32s3", 10), ("rp2", 4), ("esp8266", 9)):
        target = tmp_path / f"{board}.mpy"
        mpy.compile_module(source, target, BOARDS[board][0], name="probe.py")
        assert mpy.mpy_header(target) == (6, 3, arch)
        assert mpy.MPY_ARCH[BOARDS[board][0]] == arch  # the table the build checks headers with


def test_package_json_is_mip_format_and_lists_every_file(builds):
    from fota import __version__
    for board, out in builds.items():
        doc = json.loads((out / "package.json").read_text())
        assert set(doc) == {"urls", "version"} and doc["version"] == __version__
        assert all(isinstance(u, list) and len(u) == 2 for u in doc["urls"])
        # dest (under the install target, /lib) and src (relative to package.json) are the same path
        assert sorted(dest for dest, _ in doc["urls"]) == mpy_files(out)
        assert all(dest == src and (out / src).is_file() for dest, src in doc["urls"])


def test_manifest_py_freezes_the_same_modules_from_sources(builds):
    # Executed as MicroPython's tools/manifestfile.py does: in the manifest's directory, with
    # package() and module() as globals.
    for board, out in builds.items():
        calls = []
        code = (out / "manifest.py").read_text()
        exec(compile(code, str(out / "manifest.py"), "exec"),
             {"package": lambda *a, **kw: calls.append(("package", a, kw)),
              "module": lambda *a, **kw: calls.append(("module", a, kw))})
        assert len(calls) == 1 and calls[0][:2] == ("package", ("fota",)), calls
        kw = calls[0][2]
        base = out / kw["base_path"]
        frozen = sorted(f"fota/{name}" for name in kw["files"])
        assert all((base / name).is_file() for name in frozen)
        assert [Path(n).with_suffix(".mpy").as_posix() for n in frozen] == mpy_files(out)
        assert (base / "fota/device/runner.py").read_bytes() == (SRC / "fota/device/runner.py").read_bytes()


@pytest.mark.parametrize("board", ["unix", "esp32"])
def test_the_built_agent_runs_under_the_real_micropython(builds, board):
    # The import path holds the build only (no sources): the runner, the files backend and the
    # boot selector load from .mpy and work. The esp32 build loads too: it is bytecode only.
    script = ("import fota.device.runner as r, fota.device.slots.files, fota.device.boot as b\n"
              "print(r.__file__)\n"
              "rec = b.new_record('1.0.0')\n"
              "print(b.select(rec, 3))\n")
    env = dict(os.environ, MICROPYPATH=str(builds[board]))
    p = subprocess.run([micropython_binary(), "-c", script], capture_output=True, text=True, timeout=60,
                       env=env, cwd=str(builds[board].parent))
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.split()
    assert lines[0].endswith("fota/device/runner.mpy"), p.stdout
    assert "('a', False)" in p.stdout


def test_an_older_micropython_gets_the_same_bytecode(tmp_path):
    r = agent_build("--board", "rp2", "--micropython-version", "1.22", "--out", str(tmp_path / "rp2"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "MicroPython 1.22, .mpy v6.2" in r.stdout
    assert (tmp_path / "rp2/fota/device/runner.mpy").read_bytes()[:3] == b"M\x06\x00"


def test_a_rebuild_leaves_no_module_of_another_board(tmp_path):
    out = str(tmp_path / "agent")
    assert agent_build("--board", "unix", "--out", out).returncode == 0
    assert (tmp_path / "agent/fota/device/slots/sim.mpy").exists()
    assert agent_build("--board", "esp32", "--out", out).returncode == 0
    assert not (tmp_path / "agent/fota/device/slots/sim.mpy").exists()


def test_unknown_board_or_release_is_one_clear_error(tmp_path):
    r = agent_build("--board", "stm32", "--out", str(tmp_path / "x"))
    assert r.returncode == 1 and "unknown board 'stm32'" in r.stderr and "esp32, esp32s3, rp2" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "x").exists()
    r = agent_build("--board", "esp32", "--micropython-version", "1.18", "--out", str(tmp_path / "y"))
    assert r.returncode == 1 and "MicroPython 1.18 is not supported" in r.stderr
    assert min(MPY_VERSION) in r.stderr


def test_a_directory_that_is_no_build_is_left_alone(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "mine.py").write_text("x = 1\n")
    r = agent_build("--board", "rp2", "--out", str(tmp_path))
    assert r.returncode == 1 and "no agent build" in r.stderr
    assert (tmp_path / "src" / "mine.py").read_text() == "x = 1\n"
