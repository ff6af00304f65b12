"""Real installs of fota with each set of extras (pyproject.toml): what each pulls and what its
commands do without the others.

Each install is a fresh virtual environment (`python -m venv`, `pip install <checkout>[extras]`, the
package index pip is configured with). Then, in each, with a throw-away home:
- every install: `fota keys init`, `fota device add --unix-dir` (the core's commands);
- `fota serve` runs (for 4 s) where the server extra is installed, else it fails naming fota[server];
- `fota device run` runs (for 4 s, then SIGTERM: exit 0 and no agent left) where the device extra is
  installed, else it fails naming fota[device];
- no install carries a module of an extra it did not ask for (fota.extras).
The run fails on any of these. Sizes are the venv's on disk minus an empty venv's.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._report import print_table
from fota.extras import EXTRA_OF_MODULE

ROOT = Path(__file__).resolve().parents[1]
INSTALLS = {"core": "", "server": "server", "server+postgres": "server,postgres", "device": "device",
            "test (./run)": "test"}
EXTRAS_OF_TEST = {"server", "postgres", "device", "test"}
# Modules of fota.extras not checked one by one: starlette comes with fastapi; python-multipart's
# module is multipart or python_multipart, depending on its version.
INDIRECT = {"starlette", "multipart", "python_multipart"}


def du(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def make_venv(where: Path, extras: str) -> float:
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True)
    spec = f"{ROOT}[{extras}]" if extras else str(ROOT)
    t = time.monotonic()
    r = subprocess.run([str(where / "bin" / "pip"), "install", "-q", spec], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"pip install {spec}: {r.stderr[-2000:]}")
    return time.monotonic() - t


def fota(venv: Path, home: Path, *args: str, run_for: float | None = None) -> tuple[int, str]:
    """(exit code, output); run_for: SIGTERM after that many seconds if still running (its
    output then starts with "(ran until SIGTERM)")."""
    env = dict(os.environ, FOTA_HOME=str(home), COLUMNS="200", PATH=f"{venv / 'bin'}:/usr/bin:/bin")
    p = subprocess.Popen([str(venv / "bin" / "fota"), *args], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=run_for or 120)
        return p.returncode, out
    except subprocess.TimeoutExpired:
        os.kill(p.pid, signal.SIGTERM)
        try:
            out, _ = p.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, _ = p.communicate()
        return p.returncode, "(ran until SIGTERM) " + out


def agents_of(home: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            cmd = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if b"fota.device.main" in cmd and str(home).encode() in cmd and state != "Z":
            pids.append(int(entry.name))
    return pids


def check(name: str, extras: str, venv: Path, home: Path) -> list[str]:
    failures = []
    wanted = set(extras.split(",")) - {""}
    if "test" in wanted:
        wanted |= EXTRAS_OF_TEST
    python = str(venv / "bin" / "python")
    for module, extra in EXTRA_OF_MODULE.items():
        found = subprocess.run([python, "-c", f"import importlib.util as u; print(u.find_spec({module!r}) is not None)"],
                               capture_output=True, text=True).stdout.strip() == "True"
        if module in INDIRECT:
            continue
        if found and extra not in wanted:
            failures.append(f"{name}: {module} installed without fota[{extra}]")
        if not found and extra in wanted:
            failures.append(f"{name}: {module} missing with fota[{extra}]")
    for args in (("keys", "init"), ("device", "add", "d-1", "--hardware", "unix", "--unix-dir")):
        code, out = fota(venv, home, *args)
        if code:
            failures.append(f"{name}: fota {' '.join(args)} exit {code}: {out[-300:]}")
    code, out = fota(venv, home, "serve", run_for=4)
    if "server" in wanted:
        if not out.startswith("(ran until SIGTERM)"):
            failures.append(f"{name}: fota serve ended early ({code}): {out[-300:]}")
    elif "pip install 'fota[server]'" not in out:
        failures.append(f"{name}: fota serve without fota[server] said: {out[-300:]}")
    code, out = fota(venv, home, "device", "run", "d-1", run_for=4)
    if "device" in wanted:
        if not out.startswith("(ran until SIGTERM)") or code != 0:
            failures.append(f"{name}: fota device run: exit {code}: {out[-300:]}")
        time.sleep(1)
        if agents_of(home):
            failures.append(f"{name}: agents left running after SIGTERM: {agents_of(home)}")
    elif "pip install 'fota[device]'" not in out:
        failures.append(f"{name}: fota device run without fota[device] said: {out[-300:]}")
    return failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default="bench/results/install.json")
    ap.add_argument("--keep", action="store_true", help="keep the virtual environments")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fota-install-"))
    rows, failures, results = [], [], {}
    try:
        subprocess.run([sys.executable, "-m", "venv", str(tmp / "empty")], check=True)
        empty = du(tmp / "empty")
        for name, extras in INSTALLS.items():
            venv = tmp / name.split()[0].replace("+", "-")
            seconds = make_venv(venv, extras)
            listed = subprocess.run([str(venv / "bin" / "pip"), "list", "--format=json"], capture_output=True,
                                    text=True, check=True).stdout
            packages = len(json.loads(listed))
            size = (du(venv) - empty) / 2**20
            found = check(name, extras, venv, tmp / f"home-{venv.name}")
            failures += found
            results[name] = {"extras": extras, "mib": round(size, 1), "packages": packages,
                             "install_s": round(seconds, 1), "failures": found}
            rows.append([name, f"{size:.0f}", packages, f"{seconds:.0f}", "ok" if not found else "FAILED"])
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print_table("fota installs by extras", ["install", "MiB", "packages", "install s", "result"], rows,
                left=("install", "result"))
    for f in failures:
        print(f"FAILED: {f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"installs": results, "failures": failures}, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
