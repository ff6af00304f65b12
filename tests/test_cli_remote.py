"""The `fota` commands in remote mode (issue 15, "the CLI from anywhere"): the same operator cases
run locally on the home and remotely through a real `fota api` process on a real port (SQLite and
PostgreSQL), with the same output and exit codes; plus what can only go wrong remotely (no
server, a refused token, a read token, an untrusted certificate) and `fota login`."""
from __future__ import annotations

import os
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from fota.server.audit import cli_actor as audit_actor
from fota.tools.waiting import TimedOut, wait_until
from inproc import run_fota
from test_cli import FOTA, _app_dir, assert_clean_error, stop
from db_fixtures import on_one_database

SECRET_LINE = "its secret, shown only now:"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def run(args, env: dict, *, cwd: Path | None = None, stdin: str | None = None, timeout: float = 60):
    return subprocess.run(FOTA + list(args), capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd,
                          input=stdin)


def secret_of(result: subprocess.CompletedProcess) -> str:
    lines = result.stdout.splitlines()
    return lines[lines.index(next(line for line in lines if SECRET_LINE in line)) + 1].strip()


class Center:
    """A control center's home (its database: db_url) served by `fota api` on a real port, and
    `fota` run on it locally or remotely (from a "laptop" directory without any home): as a
    process, or with in_process inside the test's (inproc.run_fota; `fota api` stays a process)."""

    def __init__(self, tmp_path: Path, db_url: str, tls: bool = False, in_process: bool = False):
        self.run = (lambda args, env, timeout=None, **kw: run_fota(args, env, **kw)) if in_process else run
        self.tmp = tmp_path
        self.home = tmp_path / "home"
        self.laptop = tmp_path / "laptop"
        self.laptop.mkdir()
        base = {k: v for k, v in os.environ.items() if not k.startswith("FOTA_")}
        base.update(COLUMNS="250", XDG_CONFIG_HOME=str(tmp_path / "config"))
        self.base_env = base
        self.server_env = {**base, "FOTA_HOME": str(self.home), "FOTA_DATABASE_URL": db_url}
        # the home's keys and tokens: setup, made in the test's process whichever way `fota` runs
        assert run_fota(["keys", "init"], self.server_env).returncode == 0
        self.admin = secret_of(run_fota(["token", "create", "ops", "--role", "admin"], self.server_env))
        self.reader = secret_of(run_fota(["token", "create", "viewer", "--role", "read"], self.server_env))
        self.port = free_port()
        args = ["api", "--port", str(self.port)]
        scheme = "http"
        self.ca = None
        if tls:
            from fota.server.tls import ensure_tls
            files = ensure_tls(tmp_path / "tls")
            self.ca = str(files.cafile)
            args += ["--certfile", str(files.certfile), "--keyfile", str(files.keyfile)]
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.api = subprocess.Popen(FOTA + args, env=self.server_env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, start_new_session=True)

        verify = ssl.create_default_context(cafile=self.ca) if self.ca else True

        def answers():
            try:
                return httpx.get(f"{self.url}/api/v1/whoami", verify=verify, timeout=2,
                                 headers={"Authorization": f"Bearer {self.admin}"}).status_code == 200
            except httpx.HTTPError:
                return self.api.poll() is not None  # ended: reported below
        try:
            wait_until(answers, timeout=30, interval=0.2, what="fota api answering")
        except TimedOut:
            pytest.fail(f"fota api did not answer: {stop(self.api)}")
        if self.api.poll() is not None:
            pytest.fail(f"fota api ended: {stop(self.api)}")

    def local(self, *args: str, **kwargs):
        return self.run(args, self.server_env, **kwargs)

    def background(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(FOTA + list(args), env=self.server_env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def remote_env(self, token: str | None = None, **extra: str) -> dict:
        return {**self.base_env, "FOTA_URL": self.url, "FOTA_TOKEN": token or self.admin,
                **({"FOTA_CA": self.ca} if self.ca else {}), **extra}

    def remote(self, *args: str, token: str | None = None, **kwargs):
        return self.run(args, self.remote_env(token), cwd=self.laptop, **kwargs)

    def close(self) -> None:
        stop(self.api)


@pytest.fixture
def center(tmp_path, db_url):
    c = Center(tmp_path, db_url)
    yield c
    c.close()


@pytest.fixture
def center_in_process(tmp_path, db_url):
    c = Center(tmp_path, db_url, in_process=True)
    yield c
    c.close()


@pytest.fixture(params=["local", "remote"])
def mode(request):
    return request.param


@on_one_database("postgres")
def test_operator_commands_answer_alike_in_both_modes(center_in_process, mode, tmp_path):
    """The operator's cases through the one seam: releases, devices, deploy, status, history,
    deployment cancel, tokens and every campaign command; refusals are one line and exit 1.
    `fota` runs in the test's process (the cases are the point; the refusals below and
    test_cli.py run it as a process)."""
    center = center_in_process
    cli = center.local if mode == "local" else center.remote
    for dev in ("u-1", "u-2"):
        assert center.local("device", "add", dev, "--hardware", "unix", "--tag", "lab").returncode == 0
    assert center.local("device", "add", "esp-1", "--hardware", "esp32", "--tag", "lab").returncode == 0

    app = _app_dir(tmp_path, "1.1.0")
    r = cli("release", "create", str(app), "--version", "1.1.0", "--hardware", "unix", "--counter", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "release 1.1.0 (bundle," in r.stdout and "for unix signed by key" in r.stdout
    assert_clean_error(cli("release", "create", str(app), "--version", "1.1.0", "--hardware", "unix"),
                       "already exists")
    assert_clean_error(cli("release", "create", str(tmp_path / "nope"), "--version", "1.2", "--hardware", "x"),
                       "does not exist")
    # an image file as it is, an encrypted bundle (the server's key-encryption key wraps its key)
    (tmp_path / "fw.bin").write_bytes(bytes(range(256)) * 4)
    r = cli("release", "create", str(tmp_path / "fw.bin"), "--version", "2.0.0", "--hardware", "esp32")
    assert r.returncode == 0 and "release 2.0.0 (image, 1024 bytes" in r.stdout, r.stdout + r.stderr
    r = cli("release", "create", str(_app_dir(tmp_path, "1.1.1")), "--version", "1.1.1", "--hardware", "unix",
            "--encrypt", "--min-version", "1.0.0")
    assert r.returncode == 0 and "release 1.1.1 (bundle," in r.stdout, r.stdout + r.stderr
    assert_clean_error(cli("release", "create", str(tmp_path / "fw.bin"), "--version", "2.0.1", "--hardware",
                           "esp32", "--encrypt"), "only bundles can be encrypted")
    listing = cli("releases").stdout
    assert all(v in listing for v in ("1.1.0", "1.1.1", "2.0.0")) and "2.0.1" not in listing
    listing = cli("devices", "--tag", "lab").stdout
    assert all(d in listing for d in ("u-1", "u-2", "esp-1")) and "never" in listing

    assert_clean_error(cli("status"), "no deployments")
    assert_clean_error(cli("deploy", "9.9.9", "--device", "u-1"), "9.9.9")
    assert_clean_error(cli("deploy", "1.1.0", "--device", "ghost"), "ghost")
    assert_clean_error(cli("deploy", "1.1.0", "--device", "esp-1"), "esp32")
    assert_clean_error(cli("deploy", "1.1.0"), "--device")
    r = cli("deploy", "1.1.0", "--device", "u-1", "--device", "u-2", "--min-battery", "20")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "release 1.1.0 to 2 device(s), battery >= 20%" in r.stdout
    dep = r.stdout.split()[1].rstrip(":")
    status = cli("status")
    assert status.returncode == 0 and f"deployment {dep} (release 1.1.0): 2 in progress" in status.stdout
    assert "u-1" in status.stdout and "pending" in status.stdout
    assert_clean_error(cli("status", "--deployment", "999"), "no deployment 999")
    r = cli("deployment", "cancel", dep)
    assert r.returncode == 0 and "2 job(s) not sent" in r.stdout, r.stdout + r.stderr
    # every job ended, not confirmed: --watch returns at once, with exit code 1
    watch = cli("status", "--watch")
    assert watch.returncode == 1 and "2 cancelled" in watch.stdout, watch.stdout + watch.stderr
    assert "Traceback" not in watch.stderr
    assert cli("history", "u-1").returncode == 0
    assert_clean_error(cli("history", "ghost"), "ghost")

    r = cli("token", "create", "ci", "--role", "read", "--ttl", "3600")
    assert r.returncode == 0 and "token ci (read, expires 20" in r.stdout and secret_of(r).startswith("fota_")
    assert_clean_error(cli("token", "create", "ci", "--role", "read"), "already exists")
    tokens = cli("token", "list").stdout
    assert "ci" in tokens and "viewer" in tokens and "active" in tokens
    assert cli("token", "revoke", "ci").stdout.strip() == "token ci revoked"
    assert_clean_error(cli("token", "revoke", "ci"), "already revoked")
    assert_clean_error(cli("token", "revoke", "nobody"), "no token named 'nobody'")
    assert "revoked" in cli("token", "list").stdout

    create = ("campaign", "create", "spring", "--release", "1.1.0")
    assert_clean_error(cli(*create, "--tag", "nope"), "no device has tag 'nope'")
    r = cli(*create, "--tag", "lab", "--waves", "50,100", "--dry-run")
    out = " ".join(r.stdout.split())
    assert r.returncode == 0 and "nothing created" in out and "targets 2 device(s)" in out, out + r.stderr
    assert "hardware esp32 not in the release's unix" in out
    r = cli(*create, "--tag", "lab", "--waves", "50,100", "--failure", "10")
    out = " ".join(r.stdout.split())
    assert r.returncode == 0 and "2 wave(s), draft" in out, out + r.stderr
    assert "a wave goes on once 90% of its devices succeeded" in out and "waves: 1, 1" in out
    assert "if started now: targets 2" in " ".join(cli("campaign", "status", "spring").stdout.split())
    assert_clean_error(cli("campaign", "resume", "spring"), "cannot resume a campaign that is draft")
    assert_clean_error(cli("campaign", "start", "nope"), "no campaign 'nope'")
    assert_clean_error(cli("campaign", "status", "nope"), "no campaign 'nope'")
    for action, state in (("start", "running"), ("pause", "paused"), ("resume", "running"), ("abort", "abort")):
        r = cli("campaign", action, "spring")
        assert r.returncode == 0 and r.stdout.startswith(f"campaign spring: {state}"), r.stdout + r.stderr
    view = cli("campaign", "status", "--devices", "--state", "cancelled", "--state", "skipped")
    assert view.returncode == 0 and "esp-1" in view.stdout, view.stdout + view.stderr
    assert "spring" in cli("campaign", "list").stdout

    if mode == "remote":
        # the same facts, the same words: every read command prints what the local one prints
        for args in (("releases",), ("devices",), ("status",), ("history", "u-1", "--ignored"), ("campaign", "list"),
                     ("token", "list")):
            remote, local = center.remote(*args), center.local(*args)
            assert (remote.returncode, remote.stdout) == (local.returncode, local.stdout), args
        # it went through the API as the token: audited under its name, no home on the laptop
        audit = httpx.get(f"{center.url}/api/v1/audit", params={"actor": "ops"},
                          headers={"Authorization": f"Bearer {center.admin}"}).json()
        assert {"release.create", "deployment.create", "deployment.cancel", "token.create", "token.revoke",
                "campaign.create", "campaign.start", "campaign.abort"} <= {e["action"] for e in audit}
        assert not (center.laptop / ".fota").exists()


def test_release_delete_answers_alike_in_both_modes(center_in_process, mode, tmp_path):
    """`fota release delete`: refused while a deployment needs the release, then its image leaves
    the home's blobs; listed only with --deleted; a second delete and a deploy of it are refused.
    The same words and exit codes locally and through the API (SQLite and PostgreSQL)."""
    from fota.server.home import Home
    center = center_in_process
    cli = center.local if mode == "local" else center.remote
    assert center.local("device", "add", "u-1", "--hardware", "unix").returncode == 0
    for version in ("1.1.0", "1.2.0"):
        r = cli("release", "create", str(_app_dir(tmp_path, version)), "--version", version, "--hardware", "unix")
        assert r.returncode == 0, r.stdout + r.stderr
    blobs = Home(center.home).blobs
    stored = {p.name for p in blobs.iterdir()}
    r = cli("deploy", "1.1.0", "--device", "u-1")
    assert r.returncode == 0, r.stdout + r.stderr
    dep = r.stdout.split()[1].rstrip(":")

    in_use = cli("release", "delete", "1.1.0")
    assert_clean_error(in_use, f"release 1.1.0 is in use by deployment {dep} (active): it can be deleted once")
    assert {p.name for p in blobs.iterdir()} == stored
    assert cli("deployment", "cancel", dep).returncode == 0
    r = cli("release", "delete", "1.1.0")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "release 1.1.0 deleted: its image and 0 patch(es) removed from the blobs directory"
    assert len({p.name for p in blobs.iterdir()}) == len(stored) - 1
    listing = cli("releases").stdout
    assert "1.2.0" in listing and "1.1.0" not in listing and "deleted" not in listing
    listing = cli("releases", "--deleted").stdout
    assert "1.1.0" in listing and "deleted" in listing and " UTC" in listing
    again = cli("release", "delete", "1.1.0")
    assert_clean_error(again, "no release '1.1.0': it was deleted at 20")
    assert_clean_error(cli("release", "delete", "9.9.9"), "no release '9.9.9'")
    assert_clean_error(cli("deploy", "1.1.0", "--device", "u-1"), "no release '1.1.0': it was deleted at")

    if mode == "remote":
        # the same words and exit codes as the local command on the same home
        for args in (("release", "delete", "1.1.0"), ("release", "delete", "9.9.9"), ("releases", "--deleted")):
            remote, local = center.remote(*args), center.local(*args)
            assert (remote.returncode, remote.stdout, remote.stderr) == \
                (local.returncode, local.stdout, local.stderr), args
        assert_clean_error(center.remote("release", "delete", "1.2.0", token=center.reader),
                           "role 'read': this needs an admin token")
        audit = httpx.get(f"{center.url}/api/v1/audit", params={"action": "release.delete"},
                          headers={"Authorization": f"Bearer {center.admin}"}).json()
        assert [(e["actor"], e["target"]) for e in audit] == [("ops", "release:1.1.0")]


def test_release_prune_answers_alike_in_both_modes(center_in_process, mode, tmp_path, db_url):
    """`fota release prune`: per hardware type the --keep newest stay, so do a release a device runs
    and one a deployment uses (each said why); --dry-run changes nothing; the same words and exit
    codes locally and through the API (SQLite and PostgreSQL); a read token is refused."""
    from sqlalchemy import update

    from fota.server.home import Home
    from fota.server.store import Device, Store
    center = center_in_process
    cli = center.local if mode == "local" else center.remote
    for dev in ("u-1", "u-2"):
        assert center.local("device", "add", dev, "--hardware", "unix").returncode == 0
    for version in ("1.0.0", "1.1.0", "1.2.0", "1.3.0"):
        r = cli("release", "create", str(_app_dir(tmp_path, version)), "--version", version, "--hardware", "unix")
        assert r.returncode == 0, r.stdout + r.stderr
    store = Store(db_url)
    try:
        with store.session() as s:
            s.execute(update(Device).where(Device.id == "u-1").values(version="1.0.0"))
    finally:
        store.dispose()
    r = cli("deploy", "1.1.0", "--device", "u-2")
    assert r.returncode == 0, r.stdout + r.stderr
    dep = r.stdout.split()[1].rstrip(":")
    blobs = Home(center.home).blobs
    stored = {p.name for p in blobs.iterdir()}

    kept = ["kept 1.0.0 (bundle, unix): running on 1 device(s)",
            f"kept 1.1.0 (bundle, unix): in use by deployment {dep} (active)",
            "kept 1.3.0 (bundle, unix): the newest bundle for unix"]
    dry = cli("release", "prune", "--keep", "1", "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert dry.stdout.splitlines() == ["would delete 1.2.0 (bundle, unix)", *kept,
                                       "dry run: 1 release(s) would be deleted, 3 kept; nothing changed",
                                       "garbage collection: would remove 0 blob(s) (0 bytes) from the blobs "
                                       "directory; nothing changed"]
    assert {p.name for p in blobs.iterdir()} == stored and "1.2.0" in cli("releases").stdout
    zero = cli("release", "prune", "--keep", "0")
    assert_clean_error(zero, "Invalid value for '--keep'")
    assert zero.returncode == 2
    if mode == "remote":
        for args in (("release", "prune", "--keep", "1", "--dry-run"), ("release", "prune", "--keep", "0")):
            remote, local = center.remote(*args), center.local(*args)
            assert (remote.returncode, remote.stdout, remote.stderr) == \
                (local.returncode, local.stdout, local.stderr), args
        assert_clean_error(center.remote("release", "prune", "--keep", "1", token=center.reader),
                           "role 'read': this needs an admin token")
        assert {p.name for p in blobs.iterdir()} == stored

    r = cli("release", "prune", "--keep", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines() == ["deleted 1.2.0 (bundle, unix)", *kept,
                                     "1 release(s) deleted (1 blob(s), 0 patch(es) removed from the blobs directory), "
                                     "3 kept",
                                     "garbage collection: removed 0 blob(s) (0 bytes) from the blobs directory"]
    assert len({p.name for p in blobs.iterdir()}) == len(stored) - 1
    listing = cli("releases").stdout
    assert "1.2.0" not in listing and "1.3.0" in listing
    if mode == "remote":  # nothing left to delete: the same answer either way
        args = ("release", "prune", "--keep", "1")
        remote, local = center.remote(*args), center.local(*args)
        assert (remote.returncode, remote.stdout, remote.stderr) == (local.returncode, local.stdout, local.stderr)
        assert remote.stdout.splitlines()[-2] == "0 release(s) deleted (0 blob(s), 0 patch(es) removed from the " \
                                                 "blobs directory), 3 kept"
        audit = httpx.get(f"{center.url}/api/v1/audit", params={"actor": "ops"},
                          headers={"Authorization": f"Bearer {center.admin}"}).json()
        assert [(e["action"], e["target"]) for e in audit if e["action"].startswith("release.")][:3] == [
            ("release.prune", "releases"), ("release.prune", "releases"), ("release.delete", "release:1.2.0")]


@on_one_database("sqlite")
def test_release_gc_answers_alike_in_both_modes(center_in_process, mode, tmp_path):
    """`fota release gc`: a blob nothing names (left behind by a delete whose removal failed) goes
    once older than --grace, a younger one stays; --dry-run lists without removing; the same words
    locally and through the API (which sweeps the API's own blobs directory); audited as release.gc."""
    import hashlib

    from fota.server.home import Home
    center = center_in_process
    cli = center.local if mode == "local" else center.remote
    r = cli("release", "create", str(_app_dir(tmp_path, "1.0.0")), "--version", "1.0.0", "--hardware", "unix")
    assert r.returncode == 0, r.stdout + r.stderr
    blobs = Home(center.home).blobs
    old, young = b"left behind " * 100, b"being written " * 10
    for data in (old, young):
        (blobs / hashlib.sha256(data).hexdigest()).write_bytes(data)
    old_path = blobs / hashlib.sha256(old).hexdigest()
    os.utime(old_path, (time.time() - 7200, time.time() - 7200))
    stored = {p.name for p in blobs.iterdir()}

    stays = "; 1 named by nothing but younger than 3600 s stay"
    dry = cli("release", "gc", "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert dry.stdout.splitlines() == [f"would remove blob {old_path.name} (1200 bytes) from the blobs directory",
                                       "garbage collection: would remove 1 blob(s) (1200 bytes) from the blobs "
                                       f"directory{stays}; nothing changed"]
    assert {p.name for p in blobs.iterdir()} == stored
    assert_clean_error(cli("release", "gc", "--grace", "-1"), "Invalid value for '--grace'")
    if mode == "remote":
        args = ("release", "gc", "--dry-run")
        remote, local = center.remote(*args), center.local(*args)
        assert (remote.returncode, remote.stdout, remote.stderr) == (local.returncode, local.stdout, local.stderr)
        assert_clean_error(center.remote("release", "gc", token=center.reader),
                           "role 'read': this needs an admin token")

    r = cli("release", "gc")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines() == [
        f"garbage collection: removed 1 blob(s) (1200 bytes) from the blobs directory{stays}"]
    assert {p.name for p in blobs.iterdir()} == stored - {old_path.name}
    r = cli("release", "gc", "--grace", "0")
    assert r.stdout.splitlines() == ["garbage collection: removed 1 blob(s) (140 bytes) from the blobs directory"]
    assert len(list(blobs.iterdir())) == 1  # the release's image
    actor = "ops" if mode == "remote" else audit_actor()
    audit = httpx.get(f"{center.url}/api/v1/audit", params={"action": "release.gc"},
                      headers={"Authorization": f"Bearer {center.admin}"}).json()
    assert [(e["actor"], e["target"], e["detail"]["files"], e["detail"]["grace"]) for e in audit] == [
        (actor, "blobs", 1, 0), (actor, "blobs", 1, 3600)]


@on_one_database("sqlite")
def test_device_rekey_and_revoke_answer_alike_in_both_modes_and_reach_the_homes_broker(center_in_process):
    """`fota device rekey|revoke` on the home and from the laptop (through `fota api`, whose process
    rewrites the home's broker accounts): the same output and exit codes, audited under the token's
    name, and the real Mosquitto the home manages refuses the old credentials, then the device."""
    import re

    from fota.server.broker import Mosquitto
    from fota.server.home import Home
    from fota.testkit.broker import accepted as _accepted
    center = center_in_process
    home = Home(center.home)
    cfg = home.config()
    port = cfg["broker_port"]
    passwords = {}
    for dev in ("rk-1", "rk-2", "rk-3"):
        r = center.local("device", "add", dev, "--hardware", "unix")
        passwords[dev] = re.search(r"password (\S+)", r.stdout).group(1)

    def same(local, remote, local_id: str, remote_id: str) -> None:
        """The two runs print the same, but for the device and a new password."""
        def plain(text: str, dev: str) -> str:
            return re.sub(r"new password \S+", "new password P", text.replace(dev, "D"))
        assert local.returncode == remote.returncode, (local.stdout + local.stderr, remote.stdout + remote.stderr)
        assert plain(local.stdout, local_id) == plain(remote.stdout, remote_id)
        assert plain(local.stderr, local_id) == plain(remote.stderr, remote_id)

    def new_password(result) -> str:
        return re.search(r"new password (\S+)", result.stdout).group(1)

    broker = Mosquitto(home.broker_dir, port=port, service_port=cfg["broker_service_port"], auth=True).start()
    try:
        assert all(_accepted(port, dev, pw) for dev, pw in passwords.items())
        local, remote = center.local("device", "rekey", "rk-1"), center.remote("device", "rekey", "rk-2")
        assert remote.returncode == 0 and "device rk-2: broker user rk-2, new password" in remote.stdout, remote.stderr
        assert "managed Mosquitto reloaded" in remote.stdout
        same(local, remote, "rk-1", "rk-2")
        new2 = new_password(remote)
        wait_until(lambda: not _accepted(port, "rk-2", passwords["rk-2"]), timeout=5,
                   what="rk-2's old password refused")
        assert _accepted(port, "rk-2", new2) and _accepted(port, "rk-1", new_password(local))

        remote = center.remote("device", "revoke", "rk-2")
        assert remote.returncode == 0 and "device rk-2: broker account removed" in remote.stdout, remote.stderr
        wait_until(lambda: not _accepted(port, "rk-2", new2), timeout=5, what="rk-2 refused after the revoke")
        assert _accepted(port, "rk-3", passwords["rk-3"])
        same(center.local("device", "revoke", "rk-1"), remote, "rk-1", "rk-2")
        for run_it in (center.local, center.remote):
            assert_clean_error(run_it("device", "revoke", "ghost"), "no device 'ghost'")
        assert_clean_error(center.remote("device", "rekey", "rk-3", token=center.reader),
                           "role 'read': this needs an admin token")
    finally:
        broker.stop()

    # no broker runs from the home: changed all the same, and a note says when it takes effect
    local, remote = center.local("device", "rekey", "rk-3"), center.remote("device", "rekey", "rk-3")
    same(local, remote, "rk-3", "rk-3")
    assert remote.returncode == 0 and "no managed Mosquitto runs from the home" in remote.stderr, remote.stderr
    # the broker's files cannot be written: the new password is printed all the same, then the error, exit 1
    shutil.rmtree(home.broker_dir)
    home.broker_dir.write_text("")
    local, remote = center.local("device", "rekey", "rk-3"), center.remote("device", "rekey", "rk-3")
    same(local, remote, "rk-3", "rk-3")
    assert remote.returncode == 1 and "new password" in remote.stdout, remote.stdout + remote.stderr
    assert "the broker's accounts were not rewritten" in remote.stderr and "Traceback" not in remote.stderr

    # audited: under the token's name through the API, as cli:<user> on the home
    events = httpx.get(f"{center.url}/api/v1/audit", headers={"Authorization": f"Bearer {center.admin}"}).json()
    cli = audit_actor()
    accounts = [(e["actor"], e["action"], e["target"]) for e in reversed(events)
                if e["action"] in ("device.rekey", "device.revoke")]
    assert accounts == [
        (cli, "device.rekey", "device:rk-1"), ("ops", "device.rekey", "device:rk-2"),
        ("ops", "device.revoke", "device:rk-2"), (cli, "device.revoke", "device:rk-1"),
        (cli, "device.rekey", "device:rk-3"), ("ops", "device.rekey", "device:rk-3"),
        (cli, "device.rekey", "device:rk-3"), ("ops", "device.rekey", "device:rk-3")]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_remote_refusals_are_one_line_and_exit_1(center, tmp_path):
    app = _app_dir(tmp_path, "1.1.0")
    assert center.remote("release", "create", str(app), "--version", "1.1.0", "--hardware", "unix").returncode == 0

    # a read token reads, and is refused every change with the API's reason
    assert "1.1.0" in center.remote("releases", token=center.reader).stdout
    for args in (("deploy", "1.1.0", "--tag", "lab"), ("token", "list"), ("campaign", "abort", "x"),
                 ("release", "create", str(app), "--version", "1.2.0", "--hardware", "unix")):
        assert_clean_error(center.remote(*args, token=center.reader), "role 'read': this needs an admin token")
    assert "1.2.0" not in center.remote("releases").stdout

    # a token the server does not know, or none at all
    assert_clean_error(center.remote("releases", token="fota_" + "x" * 43), "refused the token", "FOTA_TOKEN")
    assert_clean_error(run(["devices"], {**center.base_env, "FOTA_URL": center.url}), "FOTA_TOKEN is not")
    # 404s: what the path names does not exist
    assert_clean_error(center.remote("deployment", "cancel", "77"), "no deployment 77")
    # a request the API refuses as malformed (422) says which field, why and what it got
    assert_clean_error(center.remote("deploy", "1.1.0", "--device", "bad id"), "devices.0", "'bad id'")

    # nobody listening, and a URL that is not a URL
    closed = free_port()
    for args in (("releases",), ("deploy", "1.1.0", "--device", "d")):
        r = run(args, {**center.remote_env(), "FOTA_URL": f"http://127.0.0.1:{closed}"})
        assert_clean_error(r, f"cannot reach the control center at http://127.0.0.1:{closed}")
    assert_clean_error(run(["releases"], {**center.remote_env(), "FOTA_URL": "fota.example.net"}), "https://")
    # a web server that is not fota's API
    other = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(closed)],
                             cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: listening(closed), timeout=10, what="http.server")
        for args in (("releases",), ("deploy", "1.1.0", "--device", "d")):
            r = run(args, {**center.remote_env(), "FOTA_URL": f"http://127.0.0.1:{closed}"})
            assert_clean_error(r, "not as fota's API does: is it the control center's URL?")
    finally:
        other.kill()
        other.wait()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_login_keeps_url_and_token_private_and_verifies_a_private_ca(tmp_path, db_url):
    center = Center(tmp_path, db_url, tls=True)
    try:
        env = {**center.base_env}  # no FOTA_URL: the login file decides
        # the server's certificate is from the home's own CA: refused until that CA is given
        assert_clean_error(run(["login", center.url, "--token", center.admin], env, cwd=center.laptop),
                           "certificate this machine does not trust", "--ca")
        assert_clean_error(run(["releases"], {**center.remote_env(), "FOTA_CA": ""}, cwd=center.laptop),
                           "does not trust")
        assert center.remote("releases").returncode == 0  # FOTA_CA: verified against the private CA
        # a wrong token saves nothing
        assert_clean_error(run(["login", center.url, "--ca", center.ca], env, cwd=center.laptop,
                               stdin="fota_wrong\n"), "refused the token")
        login_file = tmp_path / "config" / "fota" / "login.json"
        assert not login_file.exists()
        # the token read from stdin, as a script pipes it in
        r = run(["login", center.url + "/api/v1/", "--ca", center.ca], env, cwd=center.laptop,
                stdin=center.admin + "\n")
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"logged in to {center.url} as ops (role admin, expires never)" in r.stdout
        assert stat.S_IMODE(login_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(login_file.parent.stat().st_mode) == 0o700
        app = _app_dir(tmp_path, "3.0.0")
        r = run(["release", "create", str(app), "--version", "3.0.0", "--hardware", "unix"], env, cwd=center.laptop)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "3.0.0" in center.local("releases").stdout  # on the server, signed by its key
        assert not (center.laptop / ".fota").exists()
        # an explicit home beats the login: local mode on that home
        assert "3.0.0" in run(["releases"], {**env, "FOTA_HOME": str(center.home),
                                             "FOTA_DATABASE_URL": db_url}).stdout
        # the saved token revoked on the server: the next command says to log in again
        assert center.local("token", "revoke", "ops").returncode == 0
        assert_clean_error(run(["devices"], env, cwd=center.laptop), "refused the token (token revoked)",
                           f"fota login {center.url}")
        r = run(["logout"], env, cwd=center.laptop)
        assert r.returncode == 0 and "logged out" in r.stdout and not login_file.exists()
        # local again: the laptop's own (empty) home
        r = run(["releases"], env, cwd=center.laptop)
        assert r.returncode == 0 and "3.0.0" not in r.stdout
    finally:
        center.close()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_remote_deploy_and_watch_update_micropython_devices(center, tmp_path):
    """The whole loop from the laptop: upload, deploy, watch until MicroPython devices confirmed."""
    for dev in ("rm-1", "rm-2"):
        r = center.local("device", "add", dev, "--hardware", "unix", "--tag", "lab", "--unix-dir")
        assert r.returncode == 0, r.stderr
    serve = center.background("serve")
    devices = [center.background("device", "run", dev) for dev in ("rm-1", "rm-2")]

    def listing() -> str:  # polled: `fota devices` in the test's process, through the API all the same
        return run_fota(["devices"], center.remote_env(), cwd=center.laptop).stdout
    try:
        def online():
            seen = listing()
            return seen.count("1.0.0") == 2 and seen.count("yes") == 2
        try:
            wait_until(online, timeout=60, interval=0.5, what="devices online")
        except TimedOut:
            pytest.fail(f"devices did not come online: {listing()}\n{stop(serve)}")
        app = _app_dir(tmp_path, "1.4.0")
        r = center.remote("release", "create", str(app), "--version", "1.4.0", "--hardware", "unix")
        assert r.returncode == 0, r.stdout + r.stderr
        r = center.remote("deploy", "1.4.0", "--tag", "lab")
        assert r.returncode == 0 and "2 device(s)" in r.stdout, r.stdout + r.stderr
        watch = center.remote("status", "--watch", timeout=120)
        assert watch.returncode == 0 and "2 confirmed" in watch.stdout, watch.stdout + watch.stderr
        hist = center.remote("history", "rm-1").stdout
        for state in ("downloading", "verifying", "installing", "rebooting", "trial", "confirmed"):
            assert state in hist
        deadline = time.monotonic() + 10
        while listing().count("1.4.0") != 2 and time.monotonic() < deadline:
            time.sleep(0.3)
        assert center.remote("devices").stdout.count("1.4.0") == 2
    finally:
        for p in devices:
            stop(p)
        stop(serve)
