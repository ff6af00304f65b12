"""The `fota` command (Typer + Rich). Every command works on a fota home (--home or $FOTA_HOME)."""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from fota.campaign_cli import campaign_app
from fota.ha_cli import ha_app
from fota.cli_common import CLIError, HomeOpt, audit, console, err, fail, make_unix_device, open_store, \
    signing_key
from fota.backend import open_backend
from fota.deployment_view import progress_view, refresh_live, summarize
from fota.extras import missing_module_message
from fota.device import protocol as P
from fota.server.home import Home, HomeError
from fota.tools.defaults import DEFAULT_BLOB_GRACE, DEFAULT_HEAP, DEFAULT_RELEASE_KEEP

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Signed firmware updates over MQTT for fleets of MicroPython devices.")
keys_app = typer.Typer(no_args_is_help=True, help="The operator's signing key.")
release_app = typer.Typer(no_args_is_help=True, help="Releases: signed images and app bundles.")
device_app = typer.Typer(no_args_is_help=True, help="Provision and run devices.")
token_app = typer.Typer(no_args_is_help=True, help="API tokens of the operators (fota api).")
agent_app = typer.Typer(no_args_is_help=True, help="The device agent, packaged for a board.")
app.add_typer(keys_app, name="keys")
app.add_typer(release_app, name="release")
app.add_typer(device_app, name="device")
app.add_typer(token_app, name="token")
app.add_typer(agent_app, name="agent")
broker_app = typer.Typer(no_args_is_help=True, help="The managed Mosquitto, or a NATS cluster's configs.")
app.add_typer(broker_app, name="broker")
deployment_app = typer.Typer(no_args_is_help=True, help="Deployments (fota deploy creates them).")
app.add_typer(deployment_app, name="deployment")
app.add_typer(campaign_app, name="campaign")
app.add_typer(ha_app, name="ha")


# ---- keys ----------------------------------------------------------------------------------------
@keys_app.command("init")
def keys_init(home: Optional[Path] = HomeOpt, force: bool = typer.Option(False, help="replace existing keys")):
    """Create the root key (pinned on devices) and a root-certified signing key."""
    h = Home.locate(home)
    ring = h.keyring
    if ring.exists() and not force:
        fail(f"keys already exist in {h.keys} (use --force to replace them: devices pinned to the old "
              "root key would refuse everything)")
    ring.init()
    h.config()
    signer = ring.signer()
    console.print(f"root key {ring.root_path} (pin on devices; keep it offline in production)")
    console.print(f"signing key {signer.kid} certified by the root; trust version {ring.trust()['version']}")


@keys_app.command("rotate")
def keys_rotate(home: Optional[Path] = HomeOpt,
                keep_old: bool = typer.Option(False, "--keep-old", help="do not revoke the current key")):
    """Replace the signing key: the root certifies a new one and revokes the old one.

    Devices get the root-signed key update from the running control center when they next
    report an older trust version; no reflash is needed.
    """
    from fota.tools.signing import SigningError
    h = Home.locate(home)
    try:
        old = h.keyring.signer().kid
        new = h.keyring.rotate(revoke_old=not keep_old)
    except SigningError as e:
        fail(str(e))
    console.print(f"signing key {new.kid} replaces {old}{'' if keep_old else ' (revoked)'}; "
                  f"trust version {h.keyring.trust()['version']}")


@keys_app.command("revoke")
def keys_revoke(kid: str, home: Optional[Path] = HomeOpt):
    """Revoke a signing key by its key id (devices refuse it after the next key update)."""
    from fota.tools.signing import SigningError
    h = Home.locate(home)
    kid = kid.strip().lower()  # as the keyring stores it (an upper-case current key must not slip through)
    try:
        if kid == h.keyring.signer().kid:
            fail("that is the current signing key: run 'fota keys rotate' instead")
        doc = h.keyring.revoke(kid)
    except SigningError as e:
        fail(str(e))
    console.print(f"key {kid} revoked; trust version {doc['version']}")


# ---- releases ------------------------------------------------------------------------------------
@release_app.command("create")
def release_create(path: Path = typer.Argument(..., help="app directory (bundle), or an image: .bin, .img; for an "
                                                   "ESP32 the .app-bin of an OTA build (ESP32_GENERIC-OTA), "
                                                   "not the combined .bin"),
                   version: str = typer.Option(..., "--version", help="release version, e.g. 1.1.0"),
                   hardware: List[str] = typer.Option(..., "--hardware", help="hardware type (repeatable)"),
                   counter: int = typer.Option(0, "--counter", min=0,
                                               help="security counter: devices refuse releases below the "
                                                    "highest counter they installed"),
                   encrypt: bool = typer.Option(False, "--encrypt",
                                                help="encrypt the bundle (AES-256-CBC, key wrapped per device)"),
                   min_version: Optional[str] = typer.Option(None, "--min-version",
                                                             help="campaigns send it only to devices running "
                                                                  "at least this version"),
                   home: Optional[Path] = HomeOpt):
    """Sign and store a release (remote mode: uploads it; the control center signs it)."""
    if not path.exists():
        fail(f"{path} does not exist")
    rel = open_backend(home).create_release(path, version, list(hardware), counter=counter, encrypt=encrypt,
                                            min_version=min_version)
    console.print(f"release {rel['version']} ({rel['kind']}, {rel['size']} bytes, sha256 {rel['sha256'][:16]}…) "
                  f"for {', '.join(rel['hardware'])} signed by key {rel['key_id']}")


@release_app.command("resign")
def release_resign(release: str = typer.Argument(..., help="release version or id"),
                   home: Optional[Path] = HomeOpt):
    """Sign a release's unchanged manifest with the current signing key (after 'fota keys rotate':
    devices refuse a release signed by a revoked key)."""
    from fota.server.releases import ReleaseError, resign_release
    h = Home.locate(home)
    signing_key(h)
    store = open_store(h)
    try:
        rel, old_kid = resign_release(store, release, h.keyring.signer())
    except ReleaseError as e:
        fail(str(e))
    audit(store, "release.resign", f"release:{rel.version}", {"id": rel.id, "old_key_id": old_kid,
                                                                "key_id": rel.key_id})
    console.print(f"release {rel.version} re-signed by key {rel.key_id} (was {old_kid}); image unchanged")


def _blob_places(out: dict) -> str:
    """Where a release deletion removed blobs from (its answer's object_storage)."""
    return "the blobs directory" + (" and object storage" if out["object_storage"] else "")


def _warn_left_behind(out: dict) -> None:
    """A deletion's files or objects that could not be removed (its answer's failures)."""
    for failure in out["failures"]:
        err.print(f"warning: not removed (left behind): {failure}")


@release_app.command("delete")
def release_delete(release: str = typer.Argument(..., help="release version or id"),
                   home: Optional[Path] = HomeOpt):
    """Delete a release: its image and the cached patches from or to it leave the blobs directory
    and object storage (refused while a deployment or campaign that has not finished uses it).
    Devices running it get full images from then on."""
    out = open_backend(home).delete_release(release)
    where = _blob_places(out)
    if out["image_kept_for"]:
        console.print(f"release {out['version']} deleted; its image stays: release(s) "
                      f"{', '.join(out['image_kept_for'])} have the same image")
    else:
        console.print(f"release {out['version']} deleted: its image and {out['patches_removed']} patch(es) "
                      f"removed from {where}")
    _warn_left_behind(out)


def _print_gc(gc: dict) -> None:
    """A garbage collection's answer (fota release gc; fota release prune's "gc"): a dry run lists
    each blob, a real run the totals; what could not be removed as warnings."""
    places = [("the blobs directory", gc["files"])]
    if gc["object_storage"]:
        places.append(("object storage", gc["objects"]))
    if gc["dry_run"]:
        for where, blobs in places:
            for blob in blobs:
                console.print(f"would remove blob {blob['sha256']} ({blob['size']} bytes) from {where}")
    line = ("garbage collection: " + ("would remove " if gc["dry_run"] else "removed ")
            + ", ".join(f"{len(blobs)} blob(s) ({sum(b['size'] for b in blobs)} bytes) from {where}"
                        for where, blobs in places))
    if gc["young"]:
        line += f"; {gc['young']} named by nothing but younger than {gc['grace']} s stay"
    console.print(line + ("; nothing changed" if gc["dry_run"] else ""))
    for failure in gc["failures"]:
        err.print(f"warning: not removed: {failure}")


GraceOpt = typer.Option(DEFAULT_BLOB_GRACE, "--grace", min=0,
                        help="seconds: a blob no live release or patch names is removed once it is this old (a "
                             "release or patch being made writes its blob before its row)")


@release_app.command("prune")
def release_prune(keep: int = typer.Option(DEFAULT_RELEASE_KEEP, "--keep", min=1,
                                           help="newest releases kept per hardware type and kind"),
                  dry_run: bool = typer.Option(False, "--dry-run", help="only list what would be deleted"),
                  grace: int = GraceOpt,
                  home: Optional[Path] = HomeOpt):
    """Delete old releases (release retention): per hardware type and kind the --keep newest by
    version order stay, so do the releases a registered device runs and those a deployment or
    campaign that has not finished uses; the others are deleted as 'fota release delete' does.
    Then the blobs nothing names any more are removed, as 'fota release gc' does."""
    out = open_backend(home).prune_releases(keep, dry_run, grace)
    verb = "would delete" if dry_run else "deleted"
    for rel in out["deleted"]:
        console.print(f"{verb} {rel['version']} ({rel['kind']}, {', '.join(rel['hardware'])})")
    for rel in out["kept"]:
        console.print(f"kept {rel['version']} ({rel['kind']}, {', '.join(rel['hardware'])}): {'; '.join(rel['why'])}")
    where = _blob_places(out)
    if dry_run:
        console.print(f"dry run: {len(out['deleted'])} release(s) would be deleted, {len(out['kept'])} kept; "
                      "nothing changed")
    else:
        console.print(f"{len(out['deleted'])} release(s) deleted ({len(out['blobs_removed'])} blob(s), "
                      f"{out['patches_removed']} patch(es) removed from {where}), {len(out['kept'])} kept")
    _warn_left_behind(out)
    _print_gc(out["gc"])


@release_app.command("gc")
def release_gc(grace: int = GraceOpt,
               dry_run: bool = typer.Option(False, "--dry-run", help="only list what would be removed"),
               home: Optional[Path] = HomeOpt):
    """Garbage collection of blobs: remove from the home's blobs directory (and object storage)
    the images and patches no live release and no patch names any more, older than --grace: what a
    delete whose removal failed left behind. Run it on every host with its own blobs directory
    (--home there): remote mode sweeps the API's host and the bucket only."""
    _print_gc(open_backend(home).collect_garbage(grace, dry_run))


@app.command("releases")
def releases(home: Optional[Path] = HomeOpt,
             deleted: bool = typer.Option(False, "--deleted", help="also deleted releases (column 'deleted')")):
    """List releases."""
    columns = ("id", "version", "kind", "size", "hardware", "sha256") + (("deleted",) if deleted else ())
    t = Table(*columns)
    for r in open_backend(home).releases(deleted=deleted):
        row = [str(r["id"]), r["version"], r["kind"], str(r["size"]), ",".join(r["hardware"]), r["sha256"][:16]]
        if deleted:
            row.append(f"{r['deleted_at']:%Y-%m-%d %H:%M} UTC" if r.get("deleted_at") else "")
        t.add_row(*row)
    console.print(t)


# ---- devices ---------------------------------------------------------------------------------------
@device_app.command("add")
def device_add(device_id: str, hardware: str = typer.Option(..., "--hardware"),
               tag: List[str] = typer.Option([], "--tag"),
               unix_dir: bool = typer.Option(False, "--unix-dir", help="also create a unix-port device directory "
                                                                      "running the example app 1.0.0"),
               home: Optional[Path] = HomeOpt):
    """Provision a device: broker credentials (printed once) and registry entry."""
    from fota.server.fleet import FleetError, provision_device
    h = Home.locate(home)
    store = open_store(h)
    try:
        row, password = provision_device(store, device_id, hardware, tags=tuple(tag), kek=h.kek())
    except FleetError as e:
        fail(str(e))
    audit(store, "device.add", f"device:{device_id}", {"hardware": hardware, "tags": list(tag)})
    _refresh_broker_passwords(h, store)
    console.print(f"device {device_id} provisioned; broker user {device_id}, password {password}")
    if unix_dir:
        make_unix_device(h, device_id, hardware, password, wrapped_key=row.enc_key)
        console.print(f"unix-port device directory: {h.devices_dir / device_id}")


@device_app.command("provision")
def device_provision(device_id: str, hardware: str = typer.Option(..., "--hardware"),
                     board: str = typer.Option(..., "--board", help="esp32, esp32s3, rp2 (or esp8266 with --port)"),
                     port: Optional[str] = typer.Option(None, "--port", help="write onto the board on this serial "
                                                        "port with mpremote (e.g. /dev/ttyUSB0)"),
                     image: Optional[Path] = typer.Option(None, "--image", help="write a LittleFS image of the "
                                                          "board's filesystem to this file instead"),
                     backend: Optional[str] = typer.Option(None, "--backend", help="slot backend: files (app "
                                                           "bundles; default) or esp32 (whole firmware images in "
                                                           "the OTA partitions; esp32 and esp32s3 only)"),
                     wifi: Optional[str] = typer.Option(None, "--wifi", metavar="SSID",
                                                        help="the Wi-Fi network the board joins"),
                     wifi_password: Optional[str] = typer.Option(
                         None, "--wifi-password", envvar="FOTA_WIFI_PASSWORD", show_envvar=True,
                         help="its password (else asked for; '' for an open network)"),
                     force: bool = typer.Option(False, "--force", help="--port: overwrite a board that holds "
                                                "another device, or re-key a registered device its board lost"),
                     micropython_version: Optional[str] = typer.Option(
                         None, "--micropython-version", help="the board's MicroPython release (default: 1.28)"),
                     fs_size: Optional[int] = typer.Option(None, "--fs-size", help="--image: filesystem size in "
                                                           "bytes (default: the board's stock MicroPython layout)"),
                     block_size: int = typer.Option(4096, "--block-size", help="--image: LittleFS block size: "
                                                    "the board's flash erase block (4096 on esp32 and rp2)"),
                     tag: List[str] = typer.Option([], "--tag"),
                     home: Optional[Path] = HomeOpt):
    """Provision a device for a board: registers it (fresh broker credentials) and writes its
    config, trust store, broker CA, the agent as .mpy, main.py and boot.py onto the board through
    --port (mpremote), or into a LittleFS --image for factory programming at the filesystem's
    offset (the command is printed). Nothing is registered unless the board side checks pass."""
    import tempfile
    from fota.tools.mpy import BoardError, build_board_agent
    if (port is None) == (image is None):
        fail("give --port PORT (a board on a serial port) or --image FILE (a filesystem image), one of them")
    if image is not None and force:
        fail("--force goes with --port: an image is written onto a fresh or wiped board, with no identity to check")
    if port is not None and (fs_size is not None or block_size != 4096):
        fail("--fs-size and --block-size go with --image: with --port the board's filesystem is already there")
    settings = _board_settings(board, backend, wifi, wifi_password)
    h = Home.locate(home)
    _warn_unreachable_broker(h)
    with tempfile.TemporaryDirectory(prefix="fota-provision-") as tmp:
        tmp = Path(tmp)
        try:
            built = build_board_agent(board, tmp / "agent", micropython_version)
        except BoardError as e:
            fail(str(e))
        provision = _provision_port if port is not None else _provision_image
        provision(h, tmp, device_id, hardware, board, settings, list(tag), port=port, image=image, force=force,
                  mpy_major=int(built["mpy"].split(".")[0]), fs_size=fs_size, block_size=block_size)
    if wifi is not None:
        console.print(f"Wi-Fi: the board joins {wifi!r} (its password is in the board's config.json only)")


# The boards a device is provisioned for: their slot backends (the first is the default).
BOARD_BACKENDS = {"esp32": ("files", "esp32"), "esp32s3": ("files", "esp32"), "rp2": ("files",),
                  "esp8266": ("files",)}


def _board_settings(board: str, backend: Optional[str], wifi: Optional[str], wifi_password: Optional[str]) -> dict:
    """The board's part of the device config: slot backend (and chip), Wi-Fi credentials."""
    if board not in BOARD_BACKENDS:
        fail(f"unknown board {board!r}; boards: {', '.join(BOARD_BACKENDS)}")
    backend = backend or BOARD_BACKENDS[board][0]
    if backend not in BOARD_BACKENDS[board]:
        fail(f"--backend {backend}: board {board} supports {' or '.join(BOARD_BACKENDS[board])}"
             + (" (only ESP32 firmware has OTA partitions)" if backend == "esp32" else ""))
    settings: dict = {"backend": backend}
    if backend == "esp32":
        settings["chip"] = board  # the chip id the esp32 backend checks images against
    if wifi is not None:
        if not 1 <= len(wifi.encode()) <= 32:
            fail(f"--wifi {wifi!r}: an SSID is 1 to 32 bytes")
        if wifi_password is None:
            if not sys.stdin.isatty():
                fail("--wifi needs the network's password: --wifi-password, $FOTA_WIFI_PASSWORD, or a terminal "
                     "to type it in")
            wifi_password = typer.prompt(f"Wi-Fi password for {wifi} (empty: an open network)", default="",
                                         show_default=False, hide_input=True)
        if wifi_password and not 8 <= len(wifi_password) <= 63:
            fail("the Wi-Fi password has the wrong length: WPA2 takes 8 to 63 characters (empty: an open network)")
        settings["wifi"] = {"ssid": wifi, "password": wifi_password}
    return settings


def _warn_unreachable_broker(h: Home) -> None:
    from fota.server.broker import is_loopback
    host, port = h.device_broker
    if is_loopback(host):
        err.print(f"[yellow]warning:[/yellow] the board is told to connect to {host}:{port}, which only this "
                  "machine reaches: run 'fota serve --listen 0.0.0.0 --hostname NAME' first (docs/boards.md)")


def _provision_image(h: Home, tmp: Path, device_id: str, hardware: str, board: str, settings: dict,
                     tags: list, *, image: Path, fs_size, block_size: int, **_) -> None:
    from fota.server.credentials import new_password
    from fota.server.fleet import FleetError, provision_device
    from fota.tools.lfsimage import ImageError, build_image, image_tree, layout, write_command
    try:
        where = layout(board, fs_size)
    except ImageError as e:
        fail(str(e))

    def board_image(name: str, password: str, **device) -> bytes:
        _board_device_dir(h, tmp / name, device_id, hardware, password, settings, **device)
        return build_image(image_tree(board, tmp / name, tmp / "agent"), where["size"], block_size)
    try:  # a trial image with placeholder secrets of the real sizes: a filesystem size that
        # cannot serve registers no device
        board_image("trial", "x" * len(new_password()), enc_key="00" * 32)
    except ImageError as e:
        fail(str(e))
    store = open_store(h)
    try:
        row, password = provision_device(store, device_id, hardware, tags=tuple(tags), kek=h.kek())
    except FleetError as e:
        fail(str(e))
    audit(store, "device.add", f"device:{device_id}", {"hardware": hardware, "tags": tags, "board": board,
                                                       "backend": settings["backend"]})
    _refresh_broker_passwords(h, store)
    data = board_image("device", password, wrapped_key=row.enc_key)
    from fota.tools.private import write_private
    write_private(image, data)  # the image holds the broker password and the payload key
    console.print(f"device {device_id} provisioned for {board} ({settings['backend']} backend): {image} "
                  f"({len(data)} bytes, LittleFS, {block_size}-byte blocks)")
    console.print(f"write it at the filesystem's offset {hex(where['offset'])}:  "
                  f"{write_command(board, image, fs_size)}")


def _provision_port(h: Home, tmp: Path, device_id: str, hardware: str, board: str, settings: dict,
                    tags: list, *, port: str, force: bool, mpy_major: int, **_) -> None:
    from fota.server.credentials import new_password
    from fota.server.fleet import FleetError, get_device, provision_device, rekey_device
    from fota.tools import boardport
    from fota.tools.boardfs import board_tree, tree_bytes, write_tree
    # The board side first: a board that cannot be reached, runs another port or MicroPython,
    # has no room or holds another device registers nothing.
    _board_device_dir(h, tmp / "trial", device_id, hardware, "x" * len(new_password()), settings, enc_key="00" * 32)
    need = tree_bytes(board_tree(tmp / "trial", tmp / "agent"))
    try:
        found = boardport.probe(port)
        notes = boardport.check_board(found, board, mpy_major, need, device_id, force)
    except boardport.BoardPortError as e:
        fail(str(e))
    store = open_store(h)
    try:
        registered = get_device(store, device_id)
    except FleetError:
        registered = None
    if registered is not None:
        if registered.hardware != hardware:
            fail(f"device {device_id} is registered as hardware {registered.hardware!r}, not {hardware!r}")
        if found["id"] != device_id and not force:
            fail(f"device {device_id} is already registered and this board does not hold it: --force re-keys "
                 "it for this board (the board that holds it now loses its broker access)")
        row, password = rekey_device(store, device_id)
        audit(store, "device.rekey", f"device:{device_id}", {"board": board, "port": port})
        notes.append(f"device {device_id} was registered: re-provisioned with a new broker password "
                     "(the old one stops working)")
    else:
        try:
            row, password = provision_device(store, device_id, hardware, tags=tuple(tags), kek=h.kek())
        except FleetError as e:
            fail(str(e))
        audit(store, "device.add", f"device:{device_id}", {"hardware": hardware, "tags": tags, "board": board,
                                                           "backend": settings["backend"], "port": port})
    _refresh_broker_passwords(h, store)
    _board_device_dir(h, tmp / "device", device_id, hardware, password, settings, wrapped_key=row.enc_key)
    tree = board_tree(tmp / "device", tmp / "agent")
    stage = write_tree(tree, tmp / "stage")
    try:
        boardport.write(port, stage, tree, found)
        boardport.reset(port)
    except boardport.BoardPortError as e:
        fail(f"{e}. Device {device_id} is registered with a broker password the board may not hold: run the "
             "same command again with --force")
    for note in notes:
        console.print(note)
    console.print(f"device {device_id} provisioned on {port} ({board}, {settings['backend']} backend): "
                  f"{len(tree)} files, {sum(map(len, tree.values()))} bytes; the board restarts into the agent")


def _board_device_dir(h: Home, root: Path, device_id: str, hardware: str, password: str, settings: dict,
                      **device) -> Path:
    """The board's device directory (the same for --port and --image)."""
    return make_unix_device(h, device_id, hardware, password, root=root, **settings, **device)


def _refresh_broker_passwords(h: Home, store) -> None:
    """The broker's accounts from the registry: the managed Mosquitto's password file, or a NATS
    cluster's users file (fota broker nats-config), the nodes told to reload."""
    from fota.server.accounts import broker_report
    _print_broker(broker_report(h, h.sync_broker_passwords(store)))


def _print_broker(report: dict, account_change: bool = False) -> None:
    """What the operator must know after the broker's accounts were rewritten (the ``broker``
    object of fota.server.accounts, local or from the API). A new device needs no word on a
    Mosquitto that is not running yet or a broker fota does not manage; a rekey or revoke does."""
    from rich.markup import escape

    from fota.server.accounts import missing_words, nats_words
    if report["kind"] == "nats" and report["file"]:
        for line in nats_words(report):
            if line:
                console.print(line, markup=False)
    elif report["kind"] == "mosquitto" and report["applied"] and account_change:
        console.print(f"managed Mosquitto reloaded its password file {report['file']}", markup=False)
    if report["missing"]:
        err.print(f"[yellow]warning:[/yellow] {escape(missing_words(report['missing']))}", soft_wrap=True)
    if report["note"] and (account_change or report["kind"] == "nats"):
        err.print(f"[yellow]note:[/yellow] {escape(report['note'])}", soft_wrap=True)


def _account_changed(report: dict) -> None:
    """The broker's part of a rekey or revoke (done through the backend, locally or by the API's
    process: fota.server.accounts); exit code 1 when its accounts could not be rewritten."""
    _print_broker(report, account_change=True)
    if report["error"]:
        fail(f"the broker's accounts were not rewritten: {report['error']} (the registry holds the change: "
             "the same command again, or 'fota serve' starting, applies it)")


@device_app.command("rekey")
def device_rekey(device_id: str, home: Optional[Path] = HomeOpt):
    """A new broker password for a registered device (printed once): the old one stops working at
    the broker's next reload (done here; in remote mode by the API's process, on its home). Put
    it in the board's config.json (broker.password)."""
    result = open_backend(home).change_account("rekey", device_id)
    console.print(f"device {device_id}: broker user {device_id}, new password {result['password']}", markup=False)
    _account_changed(result["broker"])


@device_app.command("revoke")
def device_revoke(device_id: str, home: Optional[Path] = HomeOpt):
    """Remove a device's broker account: the broker refuses it from its next reload (done here; in
    remote mode by the API's process, on its home). Its registry entry and history stay; 'fota
    device rekey' or 'fota device provision --force' gives it a new account."""
    result = open_backend(home).change_account("revoke", device_id)
    console.print(f"device {device_id}: broker account removed", markup=False)
    _account_changed(result["broker"])


@device_app.command("run")
def device_run(device_id: str, heap: str = typer.Option(DEFAULT_HEAP, help="MicroPython heap size"),
               home: Optional[Path] = HomeOpt):
    """Run a unix-port device under the supervisor (restarts it on reboot) until Ctrl-C (or
    SIGTERM, SIGHUP); its MicroPython process ends with it."""
    from fota.tools.supervisor import DeviceProcess, SupervisorError, find_micropython, run_in_foreground
    h = Home.locate(home)
    root = h.devices_dir / device_id
    if not (root / "config.json").exists():
        fail(f"no device directory {root}: create it with 'fota device add {device_id} --unix-dir ...'")
    try:
        find_micropython()
    except SupervisorError as e:
        fail(str(e))
    proc = DeviceProcess(root, heap=heap, die_with_parent=True)
    stopped_by = run_in_foreground(proc, on_start=lambda proc: console.print(
        f"device {device_id} running (log: {proc.log_path}); Ctrl-C to stop"))
    if stopped_by is None and proc.exits[-1:] != [0]:
        fail(f"device {device_id}: its agent ended {len(proc.exits)} time(s), last with exit code "
             f"{proc.exits[-1] if proc.exits else None}; the supervisor gave up (log: {proc.log_path})")


@agent_app.command("build")
def agent_build(board: str = typer.Option(..., "--board", help="esp32, esp32s3, rp2, esp8266 or unix"),
                out: Optional[Path] = typer.Option(None, "--out", help="output directory (default: agent-BOARD)"),
                micropython_version: Optional[str] = typer.Option(
                    None, "--micropython-version", help="the board's MicroPython release (default: 1.28)")):
    """Build the agent as .mpy for a board, with a package.json for `mpremote mip install` and a
    manifest.py that freezes it into a custom firmware."""
    from fota.tools.mpy import BoardError, build_board_agent
    out = out or Path(f"agent-{board}")
    try:
        built = build_board_agent(board, out, micropython_version)
    except BoardError as e:
        fail(str(e))
    march = built["march"] or "none (bytecode for the host)"
    console.print(f"agent for {board} (MicroPython {built['micropython']}, .mpy v{built['mpy']}, "
                  f"-march {march}): {len(built['files'])} modules in {out}")
    console.print(f"install on a board:  mpremote mip install {out / 'package.json'}")
    console.print(f"freeze into firmware: include(\"{(out / 'manifest.py').resolve()}\") in the board's manifest")


@app.command("devices")
def devices(home: Optional[Path] = HomeOpt, tag: Optional[str] = typer.Option(None)):
    """List the fleet."""
    t = Table("device", "hardware", "version", "online", "tags", "last seen")
    for d in open_backend(home).devices(tag):
        t.add_row(d["id"], d["hardware"] or "", d["version"] or "?", "yes" if d["online"] else "no",
                  ",".join(d["tags"] or []),
                  d["last_seen"].strftime("%Y-%m-%d %H:%M:%S") if d["last_seen"] else "never")
    console.print(t)


# ---- deployments ---------------------------------------------------------------------------------
@app.command("deploy")
def deploy(release: str = typer.Argument(..., help="release version or id"),
           device: List[str] = typer.Option([], "--device", help="device id (repeatable)"),
           tag: Optional[str] = typer.Option(None, "--tag", help="every device with this tag"),
           min_battery: Optional[int] = typer.Option(
               None, "--min-battery", min=0, max=100,
               help="battery %% a device needs to download and to install (it postpones the update until then)"),
           timeout: Optional[int] = typer.Option(
               None, "--timeout", min=1, help="seconds until unfinished jobs end 'timed_out' (default: wait for ever)"),
           transport: str = typer.Option(
               "mqtt", "--transport",
               help="payload transport: mqtt (chunks through the broker) or http (a signed URL to the center's "
                    "HTTP server, to devices that declare http; docs/http-transport.md)"),
           home: Optional[Path] = HomeOpt):
    """Deploy a release to devices (all at once); the running control center sends the commands."""
    if not device and not tag:
        fail("name the targets: --device ID (repeatable) or --tag TAG")
    if device and tag:
        fail("use either --device or --tag, not both")
    if transport not in ("mqtt", "http"):
        fail("--transport must be mqtt or http")
    dep = open_backend(home).deploy(release, list(device) or None, tag, min_battery=min_battery, timeout=timeout,
                                    transport=transport)
    limits = "".join([f", battery >= {min_battery}%" if min_battery else "",
                      f", timeout {timeout} s" if timeout else "", ", over http" if transport == "http" else ""])
    console.print(f"deployment {dep['id']}: release {dep['release']} to {len(dep['jobs'])} device(s){limits}")


@deployment_app.command("cancel")
def deployment_cancel(deployment_id: int = typer.Argument(..., help="deployment id"),
                      home: Optional[Path] = HomeOpt):
    """Stop a deployment: pending jobs are not sent, downloads get a cancel command, devices past
    their download finish (a campaign's deployment: use 'fota campaign abort')."""
    outcome = open_backend(home).cancel_deployment(deployment_id)
    console.print(f"deployment {deployment_id} cancelled: {len(outcome['withdrawn'])} job(s) not sent, "
                  f"{len(outcome['cancelling'])} cancel command(s) queued, "
                  f"{len(outcome['finishing'])} past their download finish")


@app.command("status")
def status(deployment: Optional[int] = typer.Option(None, "--deployment", help="deployment id (default: latest)"),
           watch: bool = typer.Option(False, "--watch", help="follow live until every device is done"),
           home: Optional[Path] = HomeOpt):
    """Per-device progress of a deployment and a summary line."""
    from rich.live import Live
    backend = open_backend(home)
    dep = backend.deployment(deployment)
    if not watch:
        rows, summary = summarize(dep)
        console.print(progress_view(rows))
        console.print(summary)
        return
    with Live(console=console, refresh_per_second=4) as live:
        while True:
            rows, summary, done = refresh_live(live, backend.deployment, dep["id"])
            if done:
                break
            time.sleep(0.5)
    if any(r[1] != P.CONFIRMED for r in rows):
        raise typer.Exit(1)


@app.command("history")
def history(device_id: str,
            limit: int = typer.Option(50, "--limit", min=1, max=1000, help="statuses per page"),
            cursor: Optional[int] = typer.Option(None, "--cursor", min=0,
                                                 help="continue after a page (the cursor it printed)"),
            newest: bool = typer.Option(False, "--newest", help="newest first"),
            all_pages: bool = typer.Option(False, "--all", help="every page, one after the other"),
            ignored: bool = typer.Option(False, "--ignored",
                                         help="also the statuses that did not take effect (column 'ignored' says why)"),
            home: Optional[Path] = HomeOpt):
    """A device's statuses that took effect, in the order stored, a page at a time (those the
    retention keeps)."""
    backend = open_backend(home)
    t = Table("received", "job", "state", "code", "reason", "version", *(["ignored"] if ignored else []))
    while True:
        rows, cursor = backend.history(device_id, limit, cursor, newest, ignored)
        for e in rows:
            t.add_row(e["received_at"].strftime("%H:%M:%S.%f")[:-3], str(e["job_id"] or ""), e["state"],
                      e["code"] or "", (e["reason"] or "")[:60], e["version"] or "",
                      *([e["ignored"] or ""] if ignored else []))
        if cursor is None or not all_pages:
            break
    console.print(t)
    if cursor is not None:
        console.print(f"more: fota history {device_id} --cursor {cursor}" + (" --newest" if newest else "")
                      + (f" --limit {limit}" if limit != 50 else ""))


# ---- API tokens ------------------------------------------------------------------------------------
@token_app.command("create")
def token_create(name: str = typer.Argument(..., help="token name (the actor in the audit log)"),
                 role: str = typer.Option(..., "--role", help="read | admin"),
                 ttl: Optional[int] = typer.Option(None, "--ttl", min=1, help="expires after SECONDS "
                                                                              "(default: never)"),
                 home: Optional[Path] = HomeOpt):
    """Create an API token; its secret is printed once and stored nowhere (only its SHA-256)."""
    token, secret = open_backend(home).create_token(name, role, ttl)
    expires = token["expires_at"].strftime("%Y-%m-%d %H:%M:%S UTC") if token["expires_at"] else "never"
    console.print(f"token {token['name']} ({token['role']}, expires {expires}); its secret, shown only now:")
    console.print(secret, highlight=False, soft_wrap=True)


@token_app.command("list")
def token_list(home: Optional[Path] = HomeOpt):
    """List API tokens (never their secrets)."""
    fmt = "%Y-%m-%d %H:%M:%S"
    t = Table("name", "role", "state", "created", "expires", "last used")
    for tok in open_backend(home).tokens():
        t.add_row(tok["name"], tok["role"], tok["state"], tok["created_at"].strftime(fmt),
                  tok["expires_at"].strftime(fmt) if tok["expires_at"] else "never",
                  tok["last_used_at"].strftime(fmt) if tok["last_used_at"] else "never")
    console.print(t)


@token_app.command("revoke")
def token_revoke(name: str, home: Optional[Path] = HomeOpt):
    """Revoke an API token for good."""
    open_backend(home).revoke_token(name)
    console.print(f"token {name} revoked")


# ---- remote mode -----------------------------------------------------------------------------------
@app.command("login")
def login(url: str = typer.Argument(..., help="the control center's API, e.g. https://fota.example.net"),
          token: Optional[str] = typer.Option(None, "--token", help="an API token (default: read from stdin, "
                                              "or asked for on a terminal; 'fota token create' makes one)"),
          ca: Optional[Path] = typer.Option(None, "--ca", help="PEM certificate of the private CA the "
                                            "server's certificate chains to (default: the system's CAs)")):
    """Work on a remote control center: check the token against its API and keep URL and token
    in a login file private to you (0600); releases, devices, deploy, status, history, campaign
    and token commands then go through the API with that token's role ('fota logout' ends it)."""
    from fota.backend.login import Remote, login_file, normalize_url, save_login
    from fota.backend.remote import RemoteBackend
    from fota.server.broker import is_loopback
    url = normalize_url(url)
    if token is None:
        if sys.stdin.isatty():
            token = typer.prompt("API token", hide_input=True)
        else:
            token = sys.stdin.readline()
    token = token.strip()
    if not token:
        fail("no token given: --token, on stdin, or typed in")
    if ca is not None and not ca.is_file():
        fail(f"the CA file {ca} does not exist")
    remote = Remote(url, token, str(ca.resolve()) if ca else None, source=str(login_file()))
    who = RemoteBackend(remote).whoami()
    path = save_login(remote)
    host = url.split("://", 1)[1].split("/")[0].rsplit(":", 1)[0].strip("[]")
    if url.startswith("http://") and not is_loopback(host):
        err.print(f"[yellow]warning:[/yellow] plain HTTP to {host}: the token travels in clear text; "
                  "use https:// (a TLS proxy, or 'fota api --certfile')")
    expires = who["expires_at"].strftime("%Y-%m-%d %H:%M:%S UTC") if who["expires_at"] else "never"
    console.print(f"logged in to {url} as {who['name']} (role {who['role']}, expires {expires}); saved in {path}",
                  markup=False)


@app.command("logout")
def logout():
    """Forget the login ('fota login'): commands work on the local home again."""
    from fota.backend.login import URL_ENV, forget_login
    path = forget_login()
    console.print(f"logged out: {path} removed" if path else "not logged in", markup=False)
    if os.environ.get(URL_ENV):
        err.print(f"[yellow]warning:[/yellow] {URL_ENV} is still set in the environment: commands stay remote")


# ---- services --------------------------------------------------------------------------------------
@app.command("api")
def api(host: str = typer.Option("127.0.0.1", "--host", help="address to listen on"),
        port: int = typer.Option(8080, "--port"),
        certfile: Optional[Path] = typer.Option(None, "--certfile", help="serve HTTPS with this certificate "
                                                "(PEM, the chain after it)"),
        keyfile: Optional[Path] = typer.Option(None, "--keyfile", help="the certificate's private key (PEM)"),
        home: Optional[Path] = HomeOpt):
    """Serve the HTTP API (bearer tokens: 'fota token create'; OpenAPI UI at /docs) and the web
    dashboard (/ui/). Remote 'fota' commands use it ('fota login URL')."""
    import uvicorn

    from fota.server.app import home_api_app
    if (certfile is None) != (keyfile is None):
        fail("--certfile and --keyfile go together")
    for given in (certfile, keyfile):
        if given is not None and not given.is_file():
            fail(f"{given} does not exist")
    h = Home.locate(home)
    api_app = home_api_app(h, open_store(h))
    scheme = "https" if certfile else "http"
    if host not in ("127.0.0.1", "localhost", "::1") and not certfile:
        err.print(f"[yellow]warning:[/yellow] plain HTTP on {host}: bearer tokens travel in clear text; "
                  "give --certfile/--keyfile or put a TLS-terminating proxy in front")
    console.print(f"API on {scheme}://{host}:{port} (dashboard: /ui/; OpenAPI UI: /docs; home {h.path})")
    uvicorn.run(api_app, host=host, port=port, log_level="info",
                ssl_certfile=str(certfile) if certfile else None, ssl_keyfile=str(keyfile) if keyfile else None)


@broker_app.command("tls-init")
def broker_tls_init(home: Optional[Path] = HomeOpt,
                    cafile: Optional[Path] = typer.Option(None, help="your own CA certificate (PEM)"),
                    certfile: Optional[Path] = typer.Option(None, help="your own broker certificate (PEM)"),
                    keyfile: Optional[Path] = typer.Option(None, help="the broker certificate's key (PEM)")):
    """Make the managed Mosquitto TLS-only: a CA of the home's own, or your certificates."""
    from fota.server.tls import TlsError, TlsFiles, ensure_tls
    h = Home.locate(home)
    cfg = h.config()
    if not h.managed_broker:
        fail("a broker URL is configured: give it as mqtts://... and set broker_cafile in config.json")
    own = (cafile, certfile, keyfile)
    if any(own) and not all(own):
        fail("--cafile, --certfile and --keyfile go together")
    try:
        files = TlsFiles(*(p.resolve() for p in own)) if all(own) else ensure_tls(h.tls_dir, *h.tls_names())
    except TlsError as e:
        fail(str(e))
    if all(own):
        cfg.update(broker_cafile=str(files.cafile), broker_certfile=str(files.certfile),
                   broker_keyfile=str(files.keyfile))
    cfg["broker_tls"] = True
    h.save_config(cfg)
    console.print(f"managed broker: TLS only on 127.0.0.1:{cfg['broker_port']} (devices) and "
                  f"127.0.0.1:{cfg['broker_service_port']} (control center) from its next start; "
                  f"devices pin the CA {files.cafile}")
    console.print("device directories made from now on get it; existing devices need broker.tls and "
                  "broker.cadata in their config.json (docs/architecture.md, TLS)")


@broker_app.command("nats-tls-init")
def broker_nats_tls_init(home: Optional[Path] = HomeOpt,
                         hostname: List[str] = typer.Option([], "--hostname",
                                                            help="a node's DNS name (repeat for each name "
                                                                 "devices or the center use)"),
                         ip: List[str] = typer.Option([], "--ip", help="a node's IP address (repeat)")):
    """TLS for a NATS cluster (broker_url nats://…): the nodes' certificate from the home's CA."""
    import ipaddress
    import json

    from fota.server.natscluster import tls_blocks
    from fota.server.tls import TlsError
    h = Home.locate(home)
    if not h.nats_broker:
        fail("broker_url is not a NATS cluster (nats://…,nats://…): see docs/operations.md §4a")
    if h.config().get("broker_cafile"):
        fail("broker_cafile is set (a CA of your own): issue the nodes' certificates with it")
    try:
        for address in ip:
            ipaddress.ip_address(address)
        files = h.nats_tls_files(hostname, ip)
    except (TlsError, ValueError) as e:
        fail(str(e))
    cfg = h.config()
    if os.environ.get("FOTA_BROKER_URL"):
        console.print("FOTA_BROKER_URL is set: list the nodes there as tls://… (config.json is left alone)")
    else:
        servers = [u.strip() for u in cfg["broker_url"].split(",") if u.strip()]
        cfg["broker_url"] = ",".join("tls://" + u.split("://", 1)[1] for u in servers)
        h.save_config(cfg)
    blocks = tls_blocks(files)
    # plain echo: the lines are to be copied into the node configs, not wrapped at the terminal's width
    typer.echo(f"the nodes' certificate {files.certfile} (key {files.keyfile}), issued by {files.cafile}; "
               "copy them and ca.pem to every node (adjust the paths below to where they are there) and "
               "add to each node's config (fota.server.natscluster.node_config writes the same):")
    typer.echo(f"at the top level:    tls: {json.dumps(blocks['client'])}\n"
               f"in the mqtt block:    tls: {json.dumps(blocks['mqtt'])}\n"
               f"in the cluster block: tls: {json.dumps(blocks['cluster'])}")
    console.print("the control center reaches the nodes as tls://… (handshake first) and verifies them against "
                  "the CA; devices made from now on pin it (docs/operations.md §4a)")


@broker_app.command("nats-config")
def broker_nats_config(out: Path = typer.Option(..., "--out", help="directory for the node configs and the users "
                                                "file (copy it to every node)"),
                       state_dir: Optional[Path] = typer.Option(None, "--state-dir", help="where each node keeps "
                                                                "its JetStream store and pid file (default: --out)"),
                       listen: Optional[str] = typer.Option(None, "--listen", help="the address every node listens "
                                                            "on (default: its host in broker_url)"),
                       cluster_port: List[int] = typer.Option([], "--cluster-port", help="the routes' port: one for "
                                                              "every node, or one per node in broker_url's order "
                                                              "(nodes sharing a machine); default 6222"),
                       mqtt_port: List[int] = typer.Option([], "--mqtt-port", help="the devices' MQTT port, the same "
                                                           "way (default: broker_mqtt_port, else 1883)"),
                       monitor_port: List[int] = typer.Option([], "--monitor-port", help="the monitoring port on "
                                                              "127.0.0.1, the same way (default 8222)"),
                       home: Optional[Path] = HomeOpt):
    """A NATS cluster's configs (broker_url nats://… or tls://…): one per node and the users file
    they include, its devices from the registry (bcrypt hashes). Every command that adds, re-keys
    or revokes devices rewrites the users file and reloads the nodes that run on this machine."""
    from fota.server.broker import BrokerError
    from fota.server.natsconfig import (CLUSTER_PORT, MONITOR_PORT, cluster_nodes, per_node, pid_file,
                                        write_node_configs)
    from fota.server.tls import TlsFiles
    h = Home.locate(home)
    if not h.nats_broker:
        fail("broker_url is not a NATS cluster (nats://…,nats://…): see docs/operations.md §4a")
    cfg = h.config()
    out = out.resolve()
    state = (state_dir or out).resolve()
    tls = None
    if h.broker_tls:
        if cfg.get("broker_cafile"):
            fail("broker_cafile is set (a CA of your own): add your certificates' tls blocks to the configs by hand")
        tls = TlsFiles(h.tls_dir / "ca.pem", h.tls_dir / "nats.pem", h.tls_dir / "nats.key")
        if not all(p.is_file() for p in (tls.cafile, tls.certfile, tls.keyfile)):
            fail("broker_url lists tls:// nodes but the nodes' certificate is missing: run 'fota broker nats-tls-init'")
    try:
        nodes, _ = cluster_nodes(h.broker_url)
        mqtt = per_node(mqtt_port, cfg.get("broker_mqtt_port", 1883), len(nodes), "--mqtt-port")
        paths = write_node_configs(out, nodes, mqtt_ports=mqtt, state_dir=state, listen=listen, tls=tls,
                                   cluster_ports=per_node(cluster_port, CLUSTER_PORT, len(nodes), "--cluster-port"),
                                   monitor_ports=per_node(monitor_port, MONITOR_PORT, len(nodes), "--monitor-port"))
    except BrokerError as e:
        fail(str(e))
    cfg["nats_config"] = {"dir": str(out), "pid_files": [str(pid_file(state, node.name)) for node in nodes],
                          "mqtt_ports": mqtt}  # where the Home Assistant bridge publishes (Home.nats_mqtt_url)
    if "broker_mqtt_port" not in cfg:
        cfg["broker_mqtt_port"] = mqtt[0]  # what devices made from now on connect to
    h.save_config(cfg)
    for node, path in zip(nodes, paths):
        console.print(f"{node.name} ({node.host}:{node.client_port}): {path}", markup=False)
    from fota.server.accounts import broker_report
    store = open_store(h)
    try:
        done = h.sync_nats_users(store)
    finally:
        store.dispose()
    console.print(f"start each node with: nats-server -c {out}/<node>.conf (on its machine: copy {out} there, "
                  f"and create {state})", markup=False)
    _print_broker(broker_report(h, done))


HistoryKeepOpt = typer.Option(None, "--history-keep", min=0,
                              help="statuses kept per device beyond those campaigns and operators need "
                                   "(0: no count limit; default: config.json history_keep, else 200)")
HistoryDaysOpt = typer.Option(None, "--history-days", min=0,
                              help="days such statuses are kept (0: no age limit; default: config.json "
                                   "history_days, else 90)")


def _retention_args(keep: Optional[int], days: Optional[float]) -> list[str]:
    return ([f"--history-keep={keep}"] if keep is not None else []) + \
        ([f"--history-days={days}"] if days is not None else [])


@app.command("serve")
def serve(home: Optional[Path] = HomeOpt,
          workers: int = typer.Option(1, "--workers", min=1,
                                      help="worker processes sharing the work (PostgreSQL only for more than 1)"),
          history_keep: Optional[int] = HistoryKeepOpt, history_days: Optional[float] = HistoryDaysOpt,
          listen: Optional[str] = typer.Option(
              None, "--listen", metavar="ADDR[:PORT]",
              help="the managed broker's device listener, kept in config.json broker_listen (e.g. 0.0.0.0 for "
                   "boards on the network: TLS is then turned on, port 8883 unless given)"),
          hostname: Optional[str] = typer.Option(
              None, "--hostname", help="the name or IP address boards connect to (put in the broker's certificate; "
                                       "kept in config.json broker_hostname)")):
    """Run the control center (and its own Mosquitto unless a broker URL is configured).

    On PostgreSQL it runs as --workers processes ('fota worker') sharing MQTT v5 shared
    subscriptions and the database; on SQLite as one process (docs/operations.md)."""
    import asyncio

    from fota.server.app import ServeError, is_sqlite, run_control_center, sqlite_single_lock, supervise_workers
    h = Home.locate(home)
    # --listen/--hostname are checked first and kept only once every check below passed: a
    # command that fails leaves config.json as it was.
    settings = _broker_listen_settings(h, listen, hostname) if listen is not None or hostname is not None else None
    if not h.keyring.exists():
        fail(f"no keys in {h.keys}: run 'fota keys init' first (commands to devices are signed)")
    try:
        retention = h.retention(history_keep, history_days)  # refuses a bad config.json before starting
        if is_sqlite(h.database_url) and workers > 1:
            fail("SQLite supports one control-center worker: set database_url to a PostgreSQL URL "
                 "for --workers > 1 (docs/operations.md)")
        broker = 'managed' if h.managed_broker else h.broker_url
        if is_sqlite(h.database_url):
            with sqlite_single_lock(h):  # another 'fota serve' on this home: refused before saving
                if settings is not None:
                    _save_broker_listen(h, settings)
                console.print(f"control center on {h.path}; broker {broker}")
                asyncio.run(run_control_center(h, retention=retention))
        else:
            if settings is not None:
                _save_broker_listen(h, settings)
            console.print(f"control center on {h.path}: {workers} worker(s), PostgreSQL; broker {broker}")
            supervise_workers(h, workers, worker_args=_retention_args(history_keep, history_days))
    except (ServeError, HomeError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        pass


def _broker_listen_settings(h: Home, listen: Optional[str], hostname: Optional[str]) -> dict:
    """config.json with --listen/--hostname applied (checked, not saved). A listener beyond
    loopback turns TLS on rather than refusing: boards send their passwords over it, and a home
    user asked for boards to reach the broker, not for another command to run."""
    from fota.server.broker import is_loopback, parse_listen
    if not h.managed_broker:
        fail("--listen and --hostname configure the managed broker; a broker URL is configured")
    cfg = h.config()
    if listen is not None:
        try:
            parse_listen(listen)
        except ValueError as e:
            fail(str(e))
        cfg["broker_listen"] = listen
    if hostname is not None:
        cfg["broker_hostname"] = hostname
    if cfg.get("broker_listen") and not is_loopback(parse_listen(cfg["broker_listen"])[0]):
        cfg["broker_tls"] = True
    return cfg


def _save_broker_listen(h: Home, cfg: dict) -> None:
    """Keep the listener settings (the next 'fota serve' listens the same way) and say what they mean."""
    from fota.server.broker import WILDCARDS, is_loopback
    tls_before = h.config().get("broker_tls")
    addr, port = h.broker_listen_in(cfg)
    # Said before saving: whoever sees the settings saved (a test, a script) has the words too.
    if not is_loopback(addr):
        if not tls_before:
            console.print(f"TLS turned on: the broker listens beyond loopback ({addr}); devices need the CA "
                          f"{h.tls_dir / 'ca.pem'} (docs/operations.md, boards on the network)")
        if addr in WILDCARDS and not cfg.get("broker_hostname"):
            err.print("[yellow]warning:[/yellow] listening on every address but no --hostname: the certificate "
                      "names only localhost and 127.0.0.1, so boards cannot verify it")
    console.print(f"device listener on {addr}:{port}")
    h.save_config(cfg)


@app.command("worker")
def worker(home: Optional[Path] = HomeOpt,
           lease: float = typer.Option(10.0, "--lease", min=1.0,
                                       help="seconds without a heartbeat after which a worker counts as dead"),
           history_keep: Optional[int] = HistoryKeepOpt, history_days: Optional[float] = HistoryDaysOpt):
    """Run one control-center worker (PostgreSQL; no managed broker): 'fota serve --workers N'
    starts these, or start them yourself on several hosts against one database and broker."""
    import asyncio

    from fota.server.app import EXIT_FENCED, is_sqlite, run_worker
    from fota.server.workers import SingleWorkerError
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    h = Home.locate(home)
    if not h.keyring.exists():
        fail(f"no keys in {h.keys}: run 'fota keys init' first (commands to devices are signed)")
    if is_sqlite(h.database_url):
        err.print("[yellow]warning:[/yellow] a worker on SQLite: only one may run (use PostgreSQL for several)")
    try:
        code = asyncio.run(run_worker(h, lease, retention=h.retention(history_keep, history_days)))
    except (SingleWorkerError, HomeError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        code = 0
    if code == EXIT_FENCED:
        raise SystemExit(EXIT_FENCED)


@app.command("simulate")
def simulate(devices: int = typer.Option(100, "--devices", min=1, help="number of simulated devices"),
             prefix: str = typer.Option("sim", help="device ids are PREFIX-00001, ..."),
             hardware: str = typer.Option("sim", help="hardware type (releases must name it)"),
             tag: List[str] = typer.Option(["sim"], "--tag", help="tags of newly provisioned devices"),
             unhealthy: float = typer.Option(0.0, help="fraction whose new image fails its health check (they revert)"),
             slow: float = typer.Option(0.0, help="fraction on a slow link (--chunk-delay per chunk)"),
             chunk_delay: float = typer.Option(0.05, help="seconds per chunk on a slow link"),
             sleepy: float = typer.Option(0.0, help="fraction that nap once (online 0, clean disconnect, session kept)"),
             sleep_at: float = typer.Option(30.0, help="a nap starts within this many seconds"),
             sleep_for: float = typer.Option(60.0, help="seconds a nap lasts"),
             backend: str = typer.Option("hash", help="slot backend: hash (light) or flash (NOR flash model)"),
             capacity_kib: int = typer.Option(1024, help="slot size in KiB"),
             verify: str = typer.Option("cryptography", help="signature check: cryptography or pure (the device's)"),
             seed: int = typer.Option(1, help="which devices get which failure"),
             http: bool = typer.Option(False, "--http", help="declare transport http in the inventory: jobs of "
                                       "'fota deploy --transport http' are fetched from the blob server (plain http)"),
             duration: Optional[float] = typer.Option(None, help="seconds to run (default: until Ctrl-C)"),
             home: Optional[Path] = HomeOpt):
    """Run simulated devices (the device's update core, one broker account each) against this home's broker.

    Devices are provisioned on first use; their broker passwords are kept in <home>/sim/<prefix>.json.
    Roll out with 'fota deploy RELEASE --tag sim' while 'fota serve' runs.
    """
    import asyncio
    import json

    from fota.server.fleet import FleetError
    from fota.sim.fleet import FailurePlan, SimFleet, device_ids, provision
    from fota.sim.run import raise_fd_limit
    from fota.sim.verify import VERIFIERS
    from fota.tools.private import write_private

    if backend not in ("hash", "flash"):
        fail("--backend must be hash or flash")
    if verify not in VERIFIERS:
        fail("--verify must be cryptography or pure")
    h = Home.locate(home)
    if not h.keyring.exists():
        fail(f"no keys in {h.keys}: run 'fota keys init' first")
    store = open_store(h)
    secrets_path = h.path / "sim" / f"{prefix}.json"
    known = json.loads(secrets_path.read_text()) if secrets_path.exists() else {}
    ids = device_ids(devices, prefix)
    new = [i for i in ids if i not in known]
    if new:
        try:
            known.update(provision(store, new, hardware, tags=tuple(tag)))
        except (FleetError, ValueError) as e:
            fail(f"{e} (simulated devices must be provisioned by 'fota simulate', which keeps their passwords)")
        write_private(secrets_path, json.dumps(known))
        _refresh_broker_passwords(h, store)
        console.print(f"provisioned {len(new)} simulated device(s), hardware {hardware}, tags {','.join(tag)}")
    host, port, tls = _simulator_broker(h)
    plan = FailurePlan(unhealthy=unhealthy, slow=slow, chunk_delay=chunk_delay, sleepy=sleepy,
                       sleep_at=sleep_at, sleep_for=sleep_for, seed=seed)
    raise_fd_limit()

    async def run():
        fleet = SimFleet.build({i: known[i] for i in ids}, host=host, port=port, ssl=tls,
                               root_key=h.keyring.root_public(), trust=h.keyring.trust(), plan=plan,
                               verify=verify, hardware=hardware, backend=backend, capacity=capacity_kib * 1024,
                               transports=("mqtt", "http") if http else ("mqtt",))
        await fleet.start()
        start = time.monotonic()

        def report():
            s = fleet.summary()
            console.print(f"{time.monotonic() - start:6.0f}s  connected {s['connected']}/{s['devices']}  "
                          f"versions {s['versions']}  states {s['states']}  confirmed {s['confirmed']}  "
                          f"reverted {s['reverted']}" + (f"  http chunks {s['http_chunks']}" if http else "")
                          + (f"  errors {s['errors']}" if s["errors"] else "")
                          + (f"  http errors {s['http_errors']}" if s["http_errors"] else ""))
        try:
            while duration is None or time.monotonic() - start < duration:
                await asyncio.sleep(min(5.0, max(0.0, duration - (time.monotonic() - start))) if duration else 5.0)
                report()
        finally:  # also on Ctrl-C: the final state
            report()
            await fleet.stop()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass


def _simulator_broker(h: Home):
    """(host, port, TLS context or None) the simulated devices connect to: the devices' listener,
    over TLS with the broker's CA when the home's broker is TLS-only (as boards connect). On this
    machine the managed broker is reached at its listen address (127.0.0.1 for a wildcard), which
    the home's own certificate names, rather than at --hostname, which may not resolve here."""
    from fota.server.broker import connect_host
    host, port = h.device_broker
    if not h.broker_tls:
        return host, port, None
    if h.managed_broker and not h.config().get("broker_certfile"):
        host = connect_host(h.broker_listen[0])
    import ssl
    return host, port, h.broker_ssl_context() or ssl.create_default_context()


@app.command("demo")
def demo(devices: int = typer.Option(3, "--devices", min=1, max=50),
         timeout: float = typer.Option(120.0, help="seconds to wait for every device to confirm"),
         keep: bool = typer.Option(False, help="once it passed (--board unix), keep the demo running with the web dashboard "
                                               "(its address and a read-only token are printed) until Ctrl-C, "
                                               "and keep its home directory"),
         board: str = typer.Option("unix", "--board",
                                   help="unix: app bundles on unix-port devices; esp32: firmware images on "
                                        "emulated ESP32 boards, with a rollback by the bootloader")):
    """Broker + control center + MicroPython devices: roll out a signed update end to end."""
    if board == "unix":
        from fota.demo import run_demo
        code = run_demo(devices=devices, timeout=timeout, keep=keep, console=console,
                        port=int(os.environ.get("FOTA_DEMO_PORT", "8080")))
    elif board == "esp32":
        from fota.demo_board import run_board_demo
        code = run_board_demo(board, devices=devices, timeout=timeout, keep=keep, console=console)
    else:
        raise CLIError(f"--board must be unix or esp32, not {board!r}")
    raise typer.Exit(code)


def main() -> None:
    # Whatever fota creates (home, database, keys, broker state, device directories) is private
    # to its owner; the code also sets the modes explicitly (fota.tools.private).
    os.umask(0o077)
    try:
        app(standalone_mode=True)
    except CLIError as e:
        _exit_with(str(e))
    except ModuleNotFoundError as e:  # a command of an extra that is not installed
        message = missing_module_message(e)
        if message is None:
            raise
        _exit_with(message)
    except Exception as e:
        # KekError: no key-encryption key, or not the one that wrapped the keys. Looked up only
        # once raised: importing fota.server.kek (SQLAlchemy) costs `fota --help` ~100 ms.
        kek = sys.modules.get("fota.server.kek")
        if kek is None or not isinstance(e, kek.KekError):
            raise
        _exit_with(str(e))


def _exit_with(message: str) -> None:
    from rich.markup import escape  # the message is text: "fota[server]" is no markup
    err.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    raise SystemExit(1)


if __name__ == "__main__":
    main()
