"""`fota` run inside the test's process: the real entry point (fota.cli.main: the Typer app, its
one-line errors and exit codes) with the given environment, directory, argv and stdin, its
stdout and stderr captured, returned as a subprocess.CompletedProcess.

A `python -m fota.cli` process costs about a second (Python, Typer, SQLAlchemy, FastAPI models
imported afresh); this costs what the command itself does (tens of milliseconds for most). Tests
where the operator's cases are the point, not the process, use it; the tests that are about the
process (test_cli.py, the refusals of test_cli_remote.py, `fota login`, serve/api/device run)
keep real subprocesses (docs/testing.md).

An exception that escapes main() is what a process would print as a traceback: it goes to
stderr with exit code 1, so `assert_clean_error` still catches it.
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import traceback
import weakref
from pathlib import Path

_lock = threading.Lock()  # os.environ, the directory and sys.std* are the process's own
_engines: "weakref.WeakSet" = weakref.WeakSet()  # every SQLAlchemy engine that connected in a call


def _connected(connection) -> None:
    _engines.add(connection.engine)


def _close_engines() -> None:
    """Close the pooled connections of the engines a command opened (its store), as a process's
    exit closes them: no PostgreSQL connection outlives the call."""
    while _engines:
        _engines.pop().dispose()


class _Stdin(io.StringIO):
    def isatty(self) -> bool:  # as a process whose stdin is a pipe
        return False


def run_fota(args, env: dict, *, cwd: Path | str | None = None,
             stdin: str | None = None) -> subprocess.CompletedProcess:
    from sqlalchemy import Engine, event

    from fota.cli import main

    args = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with _lock:
        saved_env, saved_cwd = dict(os.environ), os.getcwd()
        saved = sys.argv, sys.stdin, sys.stdout, sys.stderr, sys.excepthook
        umask = os.umask(0o022)
        os.environ.clear()
        os.environ.update({k: str(v) for k, v in env.items()})
        code = 0
        event.listen(Engine, "engine_connect", _connected)
        try:
            if cwd is not None:
                os.chdir(cwd)
            sys.argv = ["fota", *args]
            sys.stdin, sys.stdout, sys.stderr = _Stdin(stdin or ""), out, err
            try:
                main()
            except SystemExit as e:
                if e.code is None:
                    code = 0
                elif isinstance(e.code, int):
                    code = e.code
                else:
                    err.write(f"{e.code}\n")
                    code = 1
            except Exception:  # what the interpreter prints for an uncaught exception
                err.write(traceback.format_exc())
                code = 1
        finally:
            sys.argv, sys.stdin, sys.stdout, sys.stderr, sys.excepthook = saved
            os.chdir(saved_cwd)
            os.umask(umask)
            os.environ.clear()
            os.environ.update(saved_env)
            event.remove(Engine, "engine_connect", _connected)
            _close_engines()
    return subprocess.CompletedProcess(["fota", *args], code, out.getvalue(), err.getvalue())
