"""What every `fota` command shares: the consoles, the --home option, one-line errors, the home's
store and audit log, and making a unix-port device directory (`fota device add --unix-dir`, the demo).

fota.cli, fota.campaign_cli and fota.demo import this module; it imports none of them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import typer
from rich.console import Console

if TYPE_CHECKING:
    from fota.server.home import Home

console = Console()
err = Console(stderr=True)

HomeOpt = typer.Option(None, "--home", envvar="FOTA_HOME", help="fota home directory (default ./.fota)")


class CLIError(Exception):
    """An error for the operator: printed in one line, exit code 1, no traceback (fota.cli.main)."""


def fail(message: str) -> None:
    raise CLIError(message)


def open_store(home: "Home"):
    """The home's database; the home made private and plain keys wrapped first (Home.store)."""
    return home.store()


def signing_key(home: "Home"):
    """The home's current signing key (private), or a one-line error."""
    from fota.tools.signing import SigningError
    if not home.keyring.exists():
        fail(f"no signing key in {home.keys}: run 'fota keys init' first")
    try:
        return home.keyring.signer().key
    except SigningError as e:
        fail(str(e))


def audit(store, action: str, target: str, detail: dict | None = None) -> None:
    """Record a CLI action in the audit log (actor "cli:<os user>")."""
    from fota.server import audit as audit_log
    audit_log.record(store, audit_log.cli_actor(), action, target, detail)


def make_unix_device(h: "Home", device_id: str, hardware: str, password: str, version: str = "1.0.0",
                     wrapped_key: str | None = None, root: "Path | None" = None, **settings):
    """A unix-port device directory running the example app `version`, for this home's broker.

    wrapped_key: the device's payload key as the store keeps it (Device.enc_key); root: where to
    write it (default: the home's devices/<id>; a board image is built from a temporary one)."""
    from fota.examples import hello_files
    from fota.tools.devicedir import create_device_dir
    host, port = h.device_broker
    ring = h.keyring
    if wrapped_key:
        settings["enc_key"] = h.kek().device_key(device_id, wrapped_key).hex()
    return create_device_dir(root or h.devices_dir / device_id, device_id=device_id, hardware=hardware,
                             root_key=ring.root_public(), trust=ring.trust(), cadata=h.broker_cadata(),
                             host=host, port=port, password=password,
                             # the esp32 backend's app is the firmware: no app bundle in the slots
                             app_files={} if settings.get("backend") == "esp32" else hello_files(version),
                             version=version, **settings)
