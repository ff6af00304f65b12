"""Shared fixtures: a real Mosquitto per test session, the real MicroPython interpreter."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from fota.server.broker import SERVER_USER, Mosquitto
from fota.testkit.broker import BrokerAccounts
from fota.tools.supervisor import SupervisorError, find_micropython

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"


# The default run samples a few sweeps (docs/testing.md, "What the default run samples");
# FOTA_FULL=1 runs each in full.
FULL = os.environ.get("FOTA_FULL") == "1"


def sampled(cases: list, keep: int = 1) -> list:
    """`cases` under FOTA_FULL=1; otherwise the first `keep` of them (a fixed choice, never a
    random one, so that a failure comes back on the next run)."""
    return list(cases) if FULL else list(cases)[:keep]


def micropython_binary() -> str:
    try:
        return find_micropython()
    except SupervisorError as exc:
        pytest.fail(str(exc))


def missing_corpus(what: str) -> None:
    """A test that needs the firmware corpus (fota.testkit.corpus) and has none: skipped, but
    failed under CI=true, where a missing corpus means the proof did not run."""
    from fota.testkit.corpus import where
    message = f"firmware corpus missing ({what}; {where()})"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + ": required under CI=true", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def micropython() -> str:
    return micropython_binary()


def run_micropython(script: str, *, heap: str = "256K", timeout: float = 60, env: dict | None = None,
                    cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run a script under the real MicroPython with src/ on its import path."""
    e = dict(os.environ)
    e["MICROPYPATH"] = f"{SRC}:.frozen"
    e.update(env or {})
    return subprocess.run([micropython_binary(), "-X", f"heapsize={heap}", "-c", script],
                          capture_output=True, text=True, timeout=timeout, env=e, cwd=cwd)


class BrokerInfo(BrokerAccounts):
    """A running Mosquitto with auth: add users with add_user() or add_users(), which reload it."""

    @property
    def broker(self) -> Mosquitto:
        return self.mosquitto


@pytest.fixture(scope="session")
def broker(tmp_path_factory) -> BrokerInfo:
    """One authenticated Mosquitto (password file + per-device ACL) for the whole session."""
    directory = tmp_path_factory.mktemp("mosquitto")
    with Mosquitto(directory, auth=True) as m:
        info = BrokerInfo(m)
        info.add_user(SERVER_USER, "server-secret")
        yield info


# The interpreters a board-relevant test runs on (fota.testkit.interpreters): the 64-bit PyPI one
# with the agent as .mpy, and the 32-bit build with the agent frozen in, as on a board.
# @both_interpreters on a test that uses the `interpreter` fixture (or `fleet`) runs it on each.
INTERPRETERS = ("64", "32-frozen")
both_interpreters = pytest.mark.parametrize("interpreter", INTERPRETERS, indirect=True)


@pytest.fixture
def interpreter(request) -> str:
    """The interpreter's name: "64" unless the test is parametrized (both_interpreters). The
    32-bit one is built here when ./run has not built it; a machine that cannot build it fails
    the test with the reason, never skips it (./run test installs what it needs)."""
    name = getattr(request, "param", "64")
    if name != "64":
        from fota.testkit.interpreters import interpreter as resolve
        from fota.testkit.mp32 import BuildError
        try:
            resolve(name)
        except BuildError as exc:
            pytest.fail(f"the {name} interpreter cannot be built: {exc}", pytrace=False)
    return name


def micropython_on(name: str):
    """The fota.testkit.interpreters.Interpreter `name` (the `interpreter` fixture built it)."""
    from fota.testkit.interpreters import interpreter as resolve
    return resolve(name)


@pytest.fixture
def fleet(tmp_path, broker, sqlite_url, interpreter):
    """A fota.testkit Fleet (control center + MicroPython devices) on the session's broker and
    SQLite, its devices on the `interpreter` fixture's MicroPython."""
    from fota.testkit.fleet import Fleet
    f = Fleet(tmp_path, broker, sqlite_url, interpreter=interpreter)
    yield f
    f.close()


@pytest.fixture(scope="session")
def open_broker(tmp_path_factory):
    """An anonymous Mosquitto, for protocol-level tests of the MQTT client."""
    directory = tmp_path_factory.mktemp("mosquitto-open")
    with Mosquitto(directory, auth=False) as m:
        yield m


from db_fixtures import *  # noqa: E402,F401,F403  (db_url fixture: SQLite and PostgreSQL)
