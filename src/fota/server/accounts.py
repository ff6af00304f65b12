"""An operator changes a device's broker account: `fota device rekey|revoke` (on the home, or
through the API) and `POST /api/v1/devices/{id}/rekey|revoke`.

The registry change (fota.server.fleet) and its audit event are one transaction; then the broker's
accounts are rewritten from the registry as far as this process can (Home.sync_broker_passwords),
and what that did comes back as plain data, the API's ``broker`` object, from which the CLI prints
the same lines in local and remote mode:

    kind          mosquitto (the managed one), nats (a NATS cluster), external (a broker whose
                  accounts fota does not keep), none (the process knows no home)
    applied       every broker process was told here to reload: the change is in force
    file          the password or users file rewritten (a path on the machine that did it), or None
    reloaded      pid files of the broker processes told to reload (SIGHUP)
    not_reloaded  pid files of those not reached from here: not running, on another machine, or
                  refused
    refused       of those, the ones running here as another OS user, which this process may not
                  signal (EPERM): their user or root has to reload them
    missing       NATS: devices left out of the users file for want of a bcrypt hash
    note          what is left for the operator, in words; None: nothing
    error         why the rewrite failed; the registry change stands (the next rewrite applies it:
                  the same command again, any account change, or `fota serve` starting)
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from fota.server import audit
from fota.server.broker import BrokerError
from fota.server.fleet import rekey_device, revoke_device

__all__ = ["ACTIONS", "broker_report", "broker_sync", "change_account", "missing_words", "nats_words",
           "no_home_report"]

log = logging.getLogger(__name__)

ACTIONS = ("rekey", "revoke")

# What rewriting the files may raise: unwritable files, bcrypt not installed (ImportError), a
# broker_url or config.json the home refuses (BrokerError, HomeError: a RuntimeError, ValueError)
SYNC_ERRORS = (OSError, ImportError, BrokerError, RuntimeError, ValueError)


def change_account(store, device_id: str, action: str, actor: str,
                   sync: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    """Rekey or revoke a device's broker account, audited as device.<action> by ``actor``, then
    ``sync(store)`` (broker_sync, or no_home_report): {"device", "broker"} and, for a rekey, the
    new plain "password" (shown only in this answer). FleetError for an unknown device."""
    if action not in ACTIONS:
        raise ValueError(f"unknown account action {action!r}")
    with audit.transaction(store) as tx:
        if action == "rekey":
            _, password = rekey_device(tx, device_id)
        else:
            revoke_device(tx, device_id)
        tx.record(actor, f"device.{action}", f"device:{device_id}", {})
    result: dict[str, Any] = {"device": device_id, "broker": sync(store)}
    if action == "rekey":
        result["password"] = password
    return result


def broker_sync(home, store) -> dict[str, Any]:
    """Rewrite the home's broker accounts from the registry (Home.sync_broker_passwords) and say
    what that did (broker_report); a failure is reported in "error", never raised."""
    kind = "none"
    try:
        kind = _kind(home)
        done = home.sync_broker_passwords(store)
    except SYNC_ERRORS as e:
        log.error("rewriting the broker's accounts from the registry failed: %s", e)
        return _report(kind, error=str(e) or type(e).__name__)
    return broker_report(home, done)


def broker_report(home, done) -> dict[str, Any]:
    """The ``broker`` object for what Home.sync_broker_passwords (or sync_nats_users) returned."""
    from fota.server.broker import NOT_PERMITTED
    from fota.server.home import MosquittoPasswords, NatsUsers
    if isinstance(done, NatsUsers):
        from fota.server.natscluster import USERS_FILE
        reloaded = [str(p) for p in done.reloaded]
        others = [str(p) for p in done.pid_files if p not in done.reloaded]
        refused = [str(p) for p in done.refused]
        note = None
        if refused:
            note = ("nodes running here as another OS user, which this process may not signal, did not reload "
                    f"the users file: reload each as its user or root ({_reload_commands(refused)})")
        return _report("nats", applied=not others, file=str(done.directory / USERS_FILE), reloaded=reloaded,
                       not_reloaded=others, refused=refused, missing=list(done.missing), note=note)
    if isinstance(done, MosquittoPasswords):
        if done.reloaded:
            return _report("mosquitto", applied=True, file=str(done.file), reloaded=[str(done.pid_file)])
        if done.reload == NOT_PERMITTED:
            return _report("mosquitto", file=str(done.file), not_reloaded=[str(done.pid_file)],
                           refused=[str(done.pid_file)], note=(
                               f"the managed Mosquitto of the home {home.path} runs as another OS user, which this "
                               "process may not signal: it still has the old password file. Reload it as its user "
                               f"or root (kill -HUP $(cat {done.pid_file})), or restart 'fota serve'"))
        return _report("mosquitto", file=str(done.file), not_reloaded=[str(done.pid_file)], note=(
            f"no managed Mosquitto runs from the home {home.path}: it reads the rewritten password file when "
            "'fota serve' starts there (a 'fota serve' on another home or machine rewrites its own file when "
            "it starts: restart it)"))
    if home.nats_broker:
        return _report("nats", note="broker_url is a NATS cluster whose users file fota does not write yet: "
                                    "run 'fota broker nats-config' (docs/operations.md §4a)")
    return _report("external", note="broker_url names a broker whose accounts fota does not keep: change the "
                                    "device's account at that broker")


def nats_words(report: dict[str, Any]) -> tuple[str, str | None]:
    """A NATS users-file rewrite (a ``broker`` object of kind nats with a file) in words: what was
    done, and what is left for the nodes elsewhere (None: nothing). The CLI prints them, `fota
    serve` logs them; a refused node is the ``note``'s."""
    reloaded, others = report["reloaded"], report["not_reloaded"]
    done = (f"NATS users file {report['file']} rewritten from the registry; "
            f"nodes reloaded here: {len(reloaded)} of {len(reloaded) + len(others)}")
    elsewhere = [p for p in others if p not in report.get("refused", ())]
    left = f"copy it to the other nodes and reload each: {_reload_commands(elsewhere)}" if elsewhere else None
    return done, left


def _reload_commands(pid_files: list[str]) -> str:
    return "; ".join(f"nats-server --signal reload={p}" for p in pid_files)


def missing_words(missing: list[str]) -> str:
    """Devices a NATS users file leaves out, in words."""
    return (f"{len(missing)} device(s) have no NATS user (provisioned before bcrypt hashes were kept): "
            f"{', '.join(missing[:20])}{' …' if len(missing) > 20 else ''}; rotate their credentials "
            "('fota device rekey ID', or 'fota device provision --force' on the board) to give them one")


def no_home_report() -> dict[str, Any]:
    """The ``broker`` object of a process that knows no home (an API app made without broker_sync)."""
    return _report("none", note="this API process knows no home, so no broker account was rewritten: the "
                                "change takes effect when 'fota serve' starts (or any account change on the home)")


def _kind(home) -> str:
    return "nats" if home.nats_broker else "mosquitto" if home.managed_broker else "external"


def _report(kind: str, *, applied: bool = False, file: str | None = None, reloaded: Iterable[str] = (),
            not_reloaded: Iterable[str] = (), refused: Iterable[str] = (), missing: Iterable[str] = (),
            note: str | None = None, error: str | None = None) -> dict[str, Any]:
    return {"kind": kind, "applied": applied, "file": file, "reloaded": list(reloaded),
            "not_reloaded": list(not_reloaded), "refused": list(refused), "missing": list(missing), "note": note,
            "error": error}
