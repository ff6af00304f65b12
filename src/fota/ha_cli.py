"""`fota ha …`: Home Assistant update entities (fota.server.homeassistant, docs/home-assistant.md).

Settings live in config.json's "homeassistant" block; the broker account's password is shown
once and kept only as its Mosquitto hash (and bcrypt hash, for a NATS cluster), like the devices'.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from fota.cli_common import HomeOpt, audit, console, fail, open_store
from fota.server.home import Home

ha_app = typer.Typer(no_args_is_help=True, help="Home Assistant: update entities over MQTT discovery.")


def _enabled(h: Home) -> dict:
    block = h.homeassistant()
    if not block.get("enabled"):
        fail("Home Assistant is not enabled: run 'fota ha enable' first")
    return block


def _new_account(h: Home, block: dict) -> str:
    from fota.server.credentials import bcrypt_hash, mosquitto_hash, new_password
    password = new_password()
    block["password_hash"] = mosquitto_hash(password)
    # a NATS cluster's users file takes bcrypt (Home.sync_nats_users); None without bcrypt
    block["password_bcrypt"] = bcrypt_hash(password)
    return password


def _apply(h: Home, block: dict) -> None:
    """Save the block and bring the managed broker's accounts and ACL in line with it."""
    h.save_homeassistant(block)
    store = open_store(h)
    try:
        h.sync_broker_passwords(store)
        h.sync_broker_acl()
    finally:
        store.dispose()


def _print_account(h: Home, password: str) -> None:
    from fota.server.broker import HOMEASSISTANT_USER
    host, port = h.device_broker
    console.print(f"Home Assistant's broker account (shown once): user {HOMEASSISTANT_USER}, password {password}")
    tls = f" (TLS: give Home Assistant the CA certificate {h.broker_cafile})" if h.broker_tls else ""
    console.print(f"broker: {host}:{port}{tls}", soft_wrap=True)
    if h.nats_broker:
        if h.nats_config() is None:
            console.print("NATS cluster: run 'fota broker nats-config' to write its user into the users file "
                          "(docs/home-assistant.md)", soft_wrap=True)
    elif not h.managed_broker:
        from fota.server.homeassistant import broker_acl
        device_acl, service_acl = broker_acl(HOMEASSISTANT_USER, h.homeassistant().get("discovery_prefix")
                                             or "homeassistant")
        console.print("your own broker: add this account with the password above and these ACL lines "
                      "(docs/home-assistant.md):", soft_wrap=True)
        console.print(device_acl + "# and for the control center's account:\n" + service_acl, markup=False)


@ha_app.command("enable")
def ha_enable(installs: bool = typer.Option(
                  False, "--installs/--no-installs", help="let Home Assistant start installs (default: off)"),
              tag: str = typer.Option("home-assistant", "--tag", help="the tag that opts a device in"),
              discovery_prefix: str = typer.Option("homeassistant", "--discovery-prefix",
                                                   help="Home Assistant's MQTT discovery prefix"),
              release_url: Optional[str] = typer.Option(
                  None, "--release-url", help="link shown with a release, {version} replaced (http or https)"),
              home: Optional[Path] = HomeOpt):
    """Turn on Home Assistant update entities and create its broker account.

    The password is printed once; the entities are published from the next 'fota serve'."""
    from fota.server import names
    from fota.server.broker import HOMEASSISTANT_USER
    h = Home.locate(home)
    if not names.matches(tag, names.NAME) or not names.matches(discovery_prefix, names.NAME):
        fail("--tag and --discovery-prefix: 1-64 characters of [A-Za-z0-9._-]")
    if h.nats_broker and "." in discovery_prefix:
        fail("--discovery-prefix: no '.' on a NATS cluster (a NATS subject's separator)")
    if release_url is not None and not release_url.startswith(("http://", "https://")):
        fail("--release-url must be an http:// or https:// URL (Home Assistant refuses others)")
    store = open_store(h)
    try:
        from fota.server.store import Device
        with store.session() as s:
            if s.get(Device, HOMEASSISTANT_USER) is not None:
                fail(f"a device is named {HOMEASSISTANT_USER!r}: that is Home Assistant's broker account")
    finally:
        store.dispose()
    block = h.homeassistant()
    password = None if block.get("password_hash") else _new_account(h, block)
    block.update(enabled=True, installs=installs, tag=tag, discovery_prefix=discovery_prefix,
                 release_url=release_url)
    _apply(h, block)
    store = open_store(h)
    audit(store, "ha.enable", "homeassistant", {"installs": installs, "tag": tag, "discovery_prefix": discovery_prefix})
    store.dispose()
    console.print(f"Home Assistant enabled: devices tagged {tag!r} get an update entity; installs from Home "
                  f"Assistant {'allowed' if installs else 'off'}. Restart 'fota serve' to start publishing.")
    if password:
        _print_account(h, password)
    else:
        console.print("its broker account is kept ('fota ha account' for a new password)")


@ha_app.command("account")
def ha_account(home: Optional[Path] = HomeOpt):
    """A new password for Home Assistant's broker account (the old one stops working)."""
    h = Home.locate(home)
    block = _enabled(h)
    password = _new_account(h, block)
    _apply(h, block)
    store = open_store(h)
    audit(store, "ha.account", "homeassistant", {})
    store.dispose()
    _print_account(h, password)


@ha_app.command("installs")
def ha_installs(allow: bool = typer.Option(..., "--allow/--deny", help="whether Home Assistant may start installs"),
                home: Optional[Path] = HomeOpt):
    """Allow or forbid installs from Home Assistant (the Install button).

    A running control center follows within seconds, without a restart."""
    h = Home.locate(home)
    block = _enabled(h)
    block["installs"] = allow
    h.save_homeassistant(block)
    store = open_store(h)
    audit(store, "ha.installs", "homeassistant", {"allowed": allow})
    store.dispose()
    console.print(f"installs from Home Assistant {'allowed' if allow else 'off'}")


def _opt(device: List[str], opted: bool, home: Optional[Path]) -> None:
    from fota.server.homeassistant import set_opt_in
    h = Home.locate(home)
    tag = _enabled(h).get("tag") or "home-assistant"
    store = open_store(h)
    try:
        changed = set_opt_in(store, list(device), tag, opted)
    except LookupError as e:
        fail(str(e))
    for device_id in changed:
        audit(store, "device.tag" if opted else "device.untag", f"device:{device_id}", {"tag": tag})
    store.dispose()
    console.print(f"{len(changed)} device(s) {'opted in' if opted else 'opted out'} (tag {tag!r})")


@ha_app.command("add")
def ha_add(device: List[str] = typer.Argument(..., help="device ids"), home: Optional[Path] = HomeOpt):
    """Give devices an update entity in Home Assistant (adds the opt-in tag)."""
    _opt(device, True, home)


@ha_app.command("remove")
def ha_remove(device: List[str] = typer.Argument(..., help="device ids"), home: Optional[Path] = HomeOpt):
    """Remove devices' update entities (removes the opt-in tag; the running center clears them)."""
    _opt(device, False, home)


@ha_app.command("status")
def ha_status(home: Optional[Path] = HomeOpt):
    """The Home Assistant settings and the devices that opted in."""
    from fota.server.fleet import list_devices
    h = Home.locate(home)
    block = h.homeassistant()
    if not block.get("enabled"):
        console.print("Home Assistant: not enabled ('fota ha enable')")
        return
    tag = block.get("tag") or "home-assistant"
    console.print(f"Home Assistant: enabled; installs {'allowed' if block.get('installs') else 'off'}; "
                  f"tag {tag!r}; discovery prefix {block.get('discovery_prefix') or 'homeassistant'}")
    store = open_store(h)
    devices = list_devices(store, tag=tag)
    store.dispose()
    console.print(f"{len(devices)} device(s) opted in: {', '.join(d.id for d in devices) or '-'}")


@ha_app.command("disable")
def ha_disable(home: Optional[Path] = HomeOpt):
    """Stop publishing entities and remove Home Assistant's broker account.

    Takes effect at the next 'fota serve'. Run 'fota ha remove' on the devices first, while the
    center runs, so that Home Assistant forgets their entities."""
    from fota.server.broker import HOMEASSISTANT_USER
    h = Home.locate(home)
    block = _enabled(h)
    block.update(enabled=False, password_hash=None, password_bcrypt=None)
    _apply(h, block)
    store = open_store(h)
    audit(store, "ha.disable", "homeassistant", {})
    store.dispose()
    console.print(f"Home Assistant disabled; broker account {HOMEASSISTANT_USER!r} removed")
