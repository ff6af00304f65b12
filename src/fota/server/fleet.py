"""The fleet: provisioning devices (broker accounts) and applying what they report.

A device's broker password is shown once, at provisioning; the store keeps only its hashes
(fota.server.credentials): Mosquitto's, from which the managed broker's password file is built,
and bcrypt's, from which a NATS cluster's users file is (fota.server.natsconfig).
"""
from __future__ import annotations

import os

import logging
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fota.device import protocol
from fota.server import credentials, names
from fota.server.broker import RESERVED_DEVICE_IDS, SERVER_USER
from fota.server.kek import Kek
from fota.server.store import Device, Store, utcnow

__all__ = ["FleetError", "apply_inventory", "apply_online", "broker_password_hashes", "get_device",
           "inventory_values", "list_devices", "nats_password_hashes", "online_values", "password_columns",
           "provision_device", "rekey_device", "revoke_device"]

log = logging.getLogger(__name__)


class FleetError(ValueError):
    """A device cannot be provisioned or found."""


def provision_device(store: Store, device_id: str, hardware: str,
                     tags: Iterable[str] = (), kek: Kek | None = None) -> tuple[Device, str]:
    """Create a device with a fresh broker password; returns (device, plain password).

    kek: the key-encryption key (fota.server.kek) the device's payload key is stored wrapped
    with (``kek.device_key(device.id, device.enc_key)`` gives it back for the device's config);
    None: no payload key (the device cannot receive encrypted releases)."""
    if not protocol.valid_device_id(device_id):
        raise FleetError(f"invalid device id {device_id!r}: 1-64 characters of [A-Za-z0-9_-]")
    if device_id in RESERVED_DEVICE_IDS:  # the control center's broker account and old client id
        raise FleetError(f"device id {device_id!r} is reserved")
    names.check(hardware, names.NAME, "hardware type", FleetError)
    tags = list(dict.fromkeys(tags))
    for tag in tags:
        names.check(tag, names.NAME, "tag", FleetError)
    password = credentials.new_password()
    # enc_key: the device's key for unwrapping release keys (optional payload encryption);
    # it goes into the device's config at provisioning, like the broker password.
    device = Device(id=device_id, hardware=hardware, tags=tags, **password_columns(password), inventory={},
                    enc_key=kek.wrap_device_key(device_id, os.urandom(32)) if kek else None)
    try:
        with store.session() as s:
            if s.get(Device, device_id) is not None:
                raise FleetError(f"device {device_id} already exists")
            s.add(device)
    except IntegrityError:  # provisioned concurrently
        raise FleetError(f"device {device_id} already exists") from None
    return device, password


def rekey_device(store: Store, device_id: str) -> tuple[Device, str]:
    """A new broker password for a registered device (re-provisioning its board): returns
    (device, plain password); the old password stops working at the broker's next reload. The
    payload key, tags and history stay."""
    password = credentials.new_password()
    return _set_account(store, device_id, password_columns(password)), password


def revoke_device(store: Store, device_id: str) -> Device:
    """Remove a device's broker account: its password hashes are cleared, so the next password
    or users file written leaves it out (the broker refuses it once reloaded). Its registry entry,
    payload key and history stay; re-provisioning its board (rekey_device) gives it a new account."""
    return _set_account(store, device_id, {"password_hash": None, "password_bcrypt": None})


def _set_account(store: Store, device_id: str, columns: dict[str, str | None]) -> Device:
    """Set a registered device's password columns (rekey_device, revoke_device); FleetError if unknown."""
    with store.session() as s:
        device = s.get(Device, device_id) if protocol.valid_device_id(device_id) else None
        if device is None:
            raise FleetError(f"no device {device_id!r}")
        for column, value in columns.items():
            setattr(device, column, value)
    return device


def password_columns(password: str) -> dict[str, str | None]:
    """The device columns a broker password sets: its hash for each broker (credentials)."""
    return {"password_hash": credentials.mosquitto_hash(password),
            "password_bcrypt": credentials.bcrypt_hash(password)}


def broker_password_hashes(store: Store, server_user_hash: str) -> dict[str, str]:
    """username -> Mosquitto hash for every device, plus the server account (broker.write_passwords)."""
    with store.session() as s:
        rows = s.execute(select(Device.id, Device.password_hash).where(Device.password_hash.is_not(None)))
        hashes = {device_id: pw_hash for device_id, pw_hash in rows}
    hashes[SERVER_USER] = server_user_hash
    return hashes


def nats_password_hashes(store: Store) -> tuple[dict[str, str], list[str]]:
    """(device id -> bcrypt hash for every device that has one, the ids of devices with a broker
    account but no bcrypt hash: provisioned before migration 0018, or on an install without
    bcrypt; their credentials must be rotated to give them a NATS user)."""
    with store.session() as s:
        rows = s.execute(select(Device.id, Device.password_bcrypt)
                         .where(Device.password_hash.is_not(None)).order_by(Device.id))
        hashes, missing = {}, []
        for device_id, bcrypt_hash in rows:
            if bcrypt_hash:
                hashes[device_id] = bcrypt_hash
            else:
                missing.append(device_id)
    return hashes, missing


def inventory_values(device_id: str, provisioned_hardware: str | None, payload: dict[str, Any],
                     when: datetime) -> dict[str, Any]:
    """The device columns an inventory message (§3) sets (the rules; apply_inventory and the
    control center's batch writer both use them)."""
    values: dict[str, Any] = {"inventory": dict(payload)}
    version = payload.get("version")
    if isinstance(version, str):
        values["version"] = version[:64]
    hardware = payload.get("hardware")
    if isinstance(hardware, str) and hardware != provisioned_hardware:
        # The provisioned type decides which releases a device gets; a differing report is
        # worth a look but must not silently retarget it.
        log.warning("device %s reports hardware %r, provisioned as %r", device_id, hardware, provisioned_hardware)
    values["last_seen"] = when
    return values


def online_values(online: bool, when: datetime, stored_at: datetime | None) -> dict[str, Any] | None:
    """The device columns an online flag (`1` on connect, `0` from the will or before a clean
    DISCONNECT) received at `when` sets; None when the flag the row holds was received later
    (`stored_at`, its online_at).

    A device publishes `online 0` before a clean DISCONNECT and `online 1` a second later, once
    reconnected: with several workers the two may be ingested by two of them, and the `0` may
    commit last. Keeping the newer one by the time the center received it keeps the device online."""
    if stored_at is not None and when < stored_at:
        return None
    return {"online": bool(online), "online_at": when, "last_seen": when}


def apply_inventory(session: Session, device_id: str, payload: dict[str, Any],
                    when: datetime | None = None) -> Device | None:
    """Record an inventory message (§3); None (and a log line) for an unknown device."""
    device = session.get(Device, device_id)
    if device is None:
        log.warning("inventory from unprovisioned device %s ignored", device_id)
        return None
    for name, value in inventory_values(device_id, device.hardware, payload, when or utcnow()).items():
        setattr(device, name, value)
    return device


def apply_online(session: Session, device_id: str, online: bool,
                 when: datetime | None = None) -> Device | None:
    """Record an online flag (`1` on connect, `0` from the will) unless the device holds a newer
    one (online_values); None for an unknown device."""
    device = session.get(Device, device_id)
    if device is None:
        log.warning("online flag from unprovisioned device %s ignored", device_id)
        return None
    for name, value in (online_values(online, when or utcnow(), device.online_at) or {}).items():
        setattr(device, name, value)
    return device


def list_devices(store: Store, tag: str | None = None, hardware: str | None = None) -> list[Device]:
    """Devices ordered by id, optionally only those with a tag and/or hardware type."""
    with store.session() as s:
        query = select(Device).order_by(Device.id)
        if hardware is not None:
            query = query.where(Device.hardware == hardware)
        devices = list(s.scalars(query))
    if tag is not None:  # JSON list membership differs per backend; fleets are small enough
        devices = [d for d in devices if tag in (d.tags or [])]
    return devices


def get_device(store: Store, device_id: str) -> Device:
    """One device; FleetError if unknown."""
    with store.session() as s:
        device = s.get(Device, device_id) if protocol.valid_device_id(device_id) else None
        if device is None:
            raise FleetError(f"no device {device_id!r}")
        return device
