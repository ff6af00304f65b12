"""Secrets at rest (issue 11, item 3): what another local user, or a copy of the database, gets.

The home is made by the `fota` command as an operator does, in a directory every user may
enter (pytest's own tmp directories are 0700 and would hide the home's modes). The attacker is
a real unprivileged process (uid `nobody`) reading the files, and a copy of the database read
without the key-encryption key.
"""
from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fota.server.kek import Kek, is_wrapped
from fota.tools import bundle
from test_cli import _app_dir, assert_clean_error, fota, fota_in_process

NOBODY = 65534

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")


@pytest.fixture
def open_dir():
    """A directory every local user may enter and list (as /tmp or a shared /srv would be)."""
    path = Path(tempfile.mkdtemp(prefix="fota-secrets-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _as_nobody():
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def read_as_nobody(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["cat", str(path)], preexec_fn=_as_nobody, capture_output=True, timeout=10)


def _decrypt(blob: bytes, key: bytes) -> bytes | None:
    """IV || AES-256-CBC(PKCS#7(bundle)) -> the bundle, or None if `key` is not its key."""
    try:
        decryptor = Cipher(algorithms.AES(key), modes.CBC(blob[:16])).decryptor()
        padded = decryptor.update(blob[16:]) + decryptor.finalize()
        unpadder = padding.PKCS7(128).unpadder()
        plain = unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        return None
    return plain if plain.startswith(bundle.MAGIC) else None


def attack_with_database_copy(db_copy: Path, blob: bytes) -> bytes | None:
    """What a database dump alone yields: try every 32-byte hex value found in any text column
    of any row as the release key. The decrypted bundle, or None."""
    candidates = set()
    con = sqlite3.connect(db_copy)
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for row in con.execute(f'SELECT * FROM "{table}"'):
                for value in row:
                    if isinstance(value, str):
                        text = value.split(":")[-1]
                        for start in range(0, max(0, len(text) - 63), 2):
                            try:
                                candidates.add(bytes.fromhex(text[start:start + 64]))
                            except ValueError:
                                pass
    finally:
        con.close()
    for key in candidates:
        if len(key) == 32 and (plain := _decrypt(blob, key)) is not None:
            return plain
    return None


def _make_home(open_dir: Path) -> tuple[Path, str]:
    home = open_dir / "home"
    # setup, in the test's process (inproc.run_fota: fota.cli.main, as a process runs it)
    assert fota_in_process(home, "keys", "init").returncode == 0
    r = fota_in_process(home, "device", "add", "sec-1", "--hardware", "unix", "--unix-dir")
    assert r.returncode == 0, r.stderr
    app = _app_dir(open_dir, "7.0.0")
    (app / "secret.txt").write_text("the launch code is 0000\n")
    r = fota_in_process(home, "release", "create", str(app), "--version", "7.0.0", "--hardware", "unix", "--encrypt")
    assert r.returncode == 0, r.stdout + r.stderr
    return home, "7.0.0"


def _release_row(db: Path, version: str) -> tuple[str, str]:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT enc_key, blob_path FROM releases WHERE version = ?", (version,)).fetchone()
    finally:
        con.close()


@needs_root
def test_another_local_user_reads_no_secret_of_the_home(open_dir):
    home, _ = _make_home(open_dir)
    secrets = {"database": home / "fota.db", "device config": home / "devices" / "sec-1" / "config.json",
               "key-encryption key": home / "keys" / "kek", "signing key": home / "keys" / "signing.pem",
               "home config": home / "config.json"}
    # The attacker process works: it reads what is meant to be readable next to the home.
    control = open_dir / "public.txt"
    control.write_text("readable")
    control.chmod(0o644)
    assert read_as_nobody(control).stdout == b"readable"
    for what, path in secrets.items():
        assert path.is_file(), what
        result = read_as_nobody(path)
        assert result.returncode != 0 and b"Permission denied" in result.stderr, f"nobody read the {what}"
    # Not only the home's own mode protects them: every directory is 0700, every file 0600.
    for path in [home, *home.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), f"{path} has mode {mode:o}"
    assert stat.S_IMODE((home / "devices" / "sec-1").stat().st_mode) == 0o700


def test_a_copy_of_the_database_without_the_kek_decrypts_no_release(open_dir):
    home, version = _make_home(open_dir)
    db_copy = open_dir / "dump.db"
    shutil.copy(home / "fota.db", db_copy)
    stored_key, blob_path = _release_row(db_copy, version)
    blob = Path(blob_path).read_bytes()
    assert is_wrapped(stored_key)
    assert attack_with_database_copy(db_copy, blob) is None
    con = sqlite3.connect(db_copy)
    assert all(is_wrapped(k) for (k,) in con.execute("SELECT enc_key FROM devices"))
    con.close()
    # With the KEK (kept out of the database) the same copy opens it: the key is really there.
    kek = Kek.load(home / "keys" / "kek", create=False)
    plain = _decrypt(blob, kek.unwrap(stored_key, f"release:{version}"))
    assert plain is not None and b"launch code" in plain
    # A key wrapped for one release does not open on another row (the version is bound in).
    with pytest.raises(ValueError, match="does not open"):
        kek.unwrap(stored_key, "release:7.0.1")


def test_plain_keys_of_an_older_database_are_wrapped_and_modes_tightened(open_dir):
    home, version = _make_home(open_dir)
    kek = Kek.load(home / "keys" / "kek", create=False)
    stored_key, blob_path = _release_row(home / "fota.db", version)
    plain_key = kek.unwrap(stored_key, f"release:{version}")
    # What an older fota left: the key in clear, world-readable files.
    con = sqlite3.connect(home / "fota.db")
    con.execute("UPDATE releases SET enc_key = ? WHERE version = ?", (plain_key.hex(), version))
    con.commit()
    con.close()
    for path in (home, home / "fota.db", home / "devices" / "sec-1" / "config.json"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    assert fota(home, "releases").returncode == 0  # any command that opens the home
    stored_key, _ = _release_row(home / "fota.db", version)
    assert is_wrapped(stored_key) and kek.unwrap(stored_key, f"release:{version}") == plain_key
    for path in (home, home / "fota.db", home / "devices" / "sec-1" / "config.json"):
        assert stat.S_IMODE(path.stat().st_mode) == (0o700 if path.is_dir() else 0o600), path
    # Without the KEK the home refuses to go on (a new KEK would not open the stored keys)...
    kek_hex = (home / "keys" / "kek").read_text().strip()
    (home / "keys" / "kek").unlink()
    assert_clean_error(fota(home, "device", "add", "sec-2", "--hardware", "unix"), "kek is missing",
                       "restore it", "FOTA_KEK")
    assert not (home / "keys" / "kek").exists()
    # ...and works with it given by the environment instead of a file in the home.
    r = fota(home, "device", "add", "sec-2", "--hardware", "unix", "--unix-dir", env={"FOTA_KEK": kek_hex})
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (home / "keys" / "kek").exists()
