"""The seam between the `fota` commands and the control center they act on.

A command asks ``open_backend(home)`` for a backend and calls its methods; it never opens the
store or the API itself, so each command is written once:

- LocalBackend (fota.backend.local): the home's store, keys and blobs, as on the server;
- RemoteBackend (fota.backend.remote): the HTTP API with a token (`fota login URL`, or FOTA_URL
  and FOTA_TOKEN), from any machine.

Both take the same arguments and return the same plain data (dicts and lists, datetimes), and
both report a refusal as a CLIError with the service's own message. Which one a command gets:
fota.backend.login (FOTA_URL, then --home/FOTA_HOME, then the login file, then local).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional


def open_backend(home: Optional[Path]):
    """The backend for this invocation (home: the --home option, or FOTA_HOME)."""
    from fota.backend.login import remote_settings
    remote = remote_settings(home_given=home is not None)
    if remote is not None:
        from fota.backend.remote import RemoteBackend
        return RemoteBackend(remote)
    from fota.backend.local import LocalBackend
    return LocalBackend(home)
