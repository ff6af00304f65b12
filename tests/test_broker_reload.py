"""Telling a broker to re-read its accounts (SIGHUP by its pid file) says what came of it, and an
account change reports a broker that runs as another OS user precisely: the API or CLI process may
not signal it (EPERM), so the change is not in force until its user reloads it. The report used to
say that no broker ran at all."""
from __future__ import annotations

import os
import pwd
import signal
import subprocess
import tempfile
from pathlib import Path

from fota.server.accounts import broker_report
from fota.server.broker import NOT_PERMITTED, NOT_RUNNING, SIGNALLED, hup_pid_file
from fota.server.home import Home, MosquittoPasswords, NatsUsers


def _outcome_as_another_user(pid_file: Path) -> str:
    """hup_pid_file(pid_file) from a process that may not signal the one it names: a child that
    drops to the user nobody when this runs as root (else this user, which may not signal init)."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # only os calls here, then _exit: the parent's threads do not exist in the child
        try:
            os.close(read)
            if os.geteuid() == 0:
                nobody = pwd.getpwnam("nobody")
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
            os.write(write, hup_pid_file(pid_file).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        outcome = f.read()
    os.waitpid(child, 0)
    return outcome


def test_hup_says_signalled_not_running_or_not_permitted(tmp_path):
    # world-readable, so that only the signal is refused to another user
    place = Path(tempfile.mkdtemp(prefix="fota-hup-"))
    place.chmod(0o755)
    pid_file = place / "broker.pid"
    broker = subprocess.Popen(["sleep", "60"])
    try:
        if os.geteuid() == 0:
            pid_file.write_text(f"{broker.pid}\n")
        else:
            pid_file.write_text("1\n")  # init: never this user's
        pid_file.chmod(0o644)
        assert _outcome_as_another_user(pid_file) == NOT_PERMITTED
        assert broker.poll() is None  # untouched

        pid_file.write_text(f"{broker.pid}\n")
        assert hup_pid_file(pid_file) == SIGNALLED
        assert broker.wait(10) == -signal.SIGHUP  # sleep ends on SIGHUP: it was told
        assert hup_pid_file(pid_file) == NOT_RUNNING  # the pid names no process now
    finally:
        broker.kill()
        broker.wait()
        pid_file.unlink(missing_ok=True)
        place.rmdir()
    assert hup_pid_file(tmp_path / "absent.pid") == NOT_RUNNING
    (tmp_path / "garbage.pid").write_text("not a pid")
    assert hup_pid_file(tmp_path / "garbage.pid") == NOT_RUNNING


def test_an_account_change_names_a_broker_it_may_not_signal(tmp_path):
    home = Home(tmp_path / "home")
    pid_file = home.broker_dir / "mosquitto.pid"
    report = broker_report(home, MosquittoPasswords(home.broker_dir / "passwords", pid_file, NOT_PERMITTED))
    assert (report["kind"], report["applied"], report["not_reloaded"], report["refused"]) == \
        ("mosquitto", False, [str(pid_file)], [str(pid_file)])
    assert "runs as another OS user" in report["note"] and f"kill -HUP $(cat {pid_file})" in report["note"]
    assert "no managed Mosquitto runs" not in report["note"]

    report = broker_report(home, MosquittoPasswords(home.broker_dir / "passwords", pid_file, NOT_RUNNING))
    assert report["refused"] == [] and "no managed Mosquitto runs" in report["note"]


def test_a_nats_node_it_may_not_signal_is_named_apart_from_the_nodes_elsewhere(tmp_path):
    home = Home(tmp_path / "home")
    here, theirs, elsewhere = (tmp_path / f"n{i}.pid" for i in range(3))
    done = NatsUsers(tmp_path, [], {here: SIGNALLED, theirs: NOT_PERMITTED, elsewhere: NOT_RUNNING})
    report = broker_report(home, done)
    assert (report["applied"], report["reloaded"], report["not_reloaded"], report["refused"]) == \
        (False, [str(here)], [str(theirs), str(elsewhere)], [str(theirs)])
    assert f"nats-server --signal reload={theirs}" in report["note"]
    assert str(elsewhere) not in report["note"]

    from fota.server.accounts import nats_words
    rewritten, left = nats_words(report)
    assert "nodes reloaded here: 1 of 3" in rewritten
    assert left is not None and str(elsewhere) in left and str(theirs) not in left
