"""`fota device run` ends its MicroPython agent however it is stopped: SIGTERM, SIGINT, SIGHUP,
SIGKILL (no handler sees it: the agent's parent-death signal ends it), an exception. Real
processes: the CLI, the supervisor and the `micropython` agent of a provisioned device directory."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fota.tools.supervisor import DeviceProcess, run_in_foreground
from fota.tools.waiting import wait_until

from test_cli import FOTA, background, fota, fota_in_process


def agent_pids(device_dir: Path) -> set[int]:
    """Live (not zombie) processes running the agent of device_dir."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"fota.device.main" in cmdline and str(device_dir).encode() in cmdline and state != "Z":
            pids.add(int(entry.name))
    return pids


def wait_for(predicate, timeout: float, what: str):
    return wait_until(predicate, timeout, interval=0.05, what=what)


def end_all(run: subprocess.Popen, device_dir: Path) -> None:
    """A test's cleanup: `fota device run`'s group and any agent of the device, killed."""
    if run.poll() is None:
        os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    for pid in agent_pids(device_dir):
        os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def device_home(tmp_path_factory):
    """A home with keys and one device directory (its broker is not running: the agent keeps
    trying to connect, which is all these tests need)."""
    home = tmp_path_factory.mktemp("home")
    assert fota_in_process(home, "keys", "init").returncode == 0  # setup: in the test's process
    r = fota_in_process(home, "device", "add", "stopper", "--hardware", "unix", "--unix-dir")
    assert r.returncode == 0, r.stdout + r.stderr
    return home, home / "devices" / "stopper"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGKILL],
                         ids=lambda s: signal.Signals(s).name)
def test_the_agent_ends_with_fota_device_run(device_home, sig):
    home, device_dir = device_home
    assert not agent_pids(device_dir)
    run = background(home, "device", "run", "stopper")
    try:
        agents = wait_for(lambda: agent_pids(device_dir), 30, "the agent to start")
        os.kill(run.pid, sig)  # the supervisor alone, as a service manager or `kill` sends it
        code = run.wait(15)
        wait_for(lambda: not agent_pids(device_dir), 5, f"agent {agents} to end after {sig.name}")
        if sig == signal.SIGKILL:
            assert code == -signal.SIGKILL
        else:
            assert code == 0, run.stdout.read()
    finally:
        end_all(run, device_dir)


def test_an_exception_in_the_supervisor_ends_the_agent(device_home):
    _, device_dir = device_home
    assert not agent_pids(device_dir)
    proc = DeviceProcess(device_dir)

    def fail_once_running(proc):
        wait_for(lambda: proc.pid, 30, "the agent to start")
        raise RuntimeError("the supervisor fails")
    try:
        with pytest.raises(RuntimeError):
            run_in_foreground(proc, on_start=fail_once_running)
        assert proc.pid is None and not agent_pids(device_dir)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handlers are put back
    finally:
        proc.stop()


def test_a_terminal_ctrl_c_reaches_only_the_supervisor(device_home):
    """The agent has a process group of its own: Ctrl-C (SIGINT to the terminal's foreground group)
    stops it through the supervisor, which does not restart it."""
    home, device_dir = device_home
    run = background(home, "device", "run", "stopper")  # a session and group of its own, like a terminal's
    try:
        agent, = wait_for(lambda: agent_pids(device_dir), 30, "the agent to start")
        assert os.getpgid(agent) == agent != os.getpgid(run.pid)
        os.killpg(run.pid, signal.SIGINT)
        assert run.wait(15) == 0
        assert not agent_pids(device_dir)
    finally:
        end_all(run, device_dir)


def test_nohup_keeps_a_hangup_ignored(device_home):
    """Started under nohup (SIGHUP ignored), `fota device run` survives a hangup as before."""
    home, device_dir = device_home
    env = dict(os.environ, FOTA_HOME=str(home))
    run = subprocess.Popen(["nohup", *FOTA, "device", "run", "stopper"], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True, cwd=home)
    try:
        agent, = wait_for(lambda: agent_pids(device_dir), 30, "the agent to start")
        os.kill(run.pid, signal.SIGHUP)
        time.sleep(1)
        assert run.poll() is None and agent_pids(device_dir) == {agent}
        os.kill(run.pid, signal.SIGTERM)
        assert run.wait(15) == 0
        assert not agent_pids(device_dir)
    finally:
        end_all(run, device_dir)
