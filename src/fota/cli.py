"""The `fota` command (Typer + Rich). Every command works on a fota home (--home or $FOTA_HOME)."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from fota.device import protocol as P
from fota.server.home import Home

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Signed firmware updates over MQTT for fleets of MicroPython devices.")
keys_app = typer.Typer(no_args_is_help=True, help="The operator's signing key.")
release_app = typer.Typer(no_args_is_help=True, help="Releases: signed images and app bundles.")
device_app = typer.Typer(no_args_is_help=True, help="Provision and run devices.")
app.add_typer(keys_app, name="keys")
app.add_typer(release_app, name="release")
app.add_typer(device_app, name="device")

console = Console()
err = Console(stderr=True)

HomeOpt = typer.Option(None, "--home", envvar="FOTA_HOME", help="fota home directory (default ./.fota)")


class CLIError(Exception):
    """An error for the operator: printed in one line, exit code 1, no traceback."""


def _fail(message: str) -> None:
    raise CLIError(message)


def _store(home: Home):
    from fota.server.store import Store
    return Store(home.database_url)


def _signing_key(home: Home):
    from fota.tools.signing import SigningError, load_private_key
    if not home.private_key.exists():
        _fail(f"no signing key in {home.keys}: run 'fota keys init' first")
    try:
        return load_private_key(home.private_key)
    except SigningError as e:
        _fail(str(e))


# ---- keys ----------------------------------------------------------------------------------------
@keys_app.command("init")
def keys_init(home: Optional[Path] = HomeOpt, force: bool = typer.Option(False, help="replace an existing key")):
    """Create the operator's ECDSA P-256 signing key; prints the public key devices must pin."""
    from fota.tools.signing import generate_private_key, key_id, public_key_bytes, save_private_key
    h = Home.locate(home)
    if h.private_key.exists() and not force:
        _fail(f"a signing key already exists at {h.private_key} (use --force to replace it)")
    h.keys.mkdir(parents=True, exist_ok=True)
    key = generate_private_key()
    save_private_key(key, h.private_key)
    pub = public_key_bytes(key)
    (h.keys / "signing.pub").write_text(pub.hex() + "\n")
    h.config()
    console.print(f"signing key written to {h.private_key}")
    console.print(f"key id {key_id(pub)}; public key (pin on devices): {pub.hex()}")


# ---- releases ------------------------------------------------------------------------------------
@release_app.command("create")
def release_create(path: Path = typer.Argument(..., help="app directory (bundle) or .bin image"),
                   version: str = typer.Option(..., "--version", help="release version, e.g. 1.1.0"),
                   hardware: List[str] = typer.Option(..., "--hardware", help="hardware type (repeatable)"),
                   home: Optional[Path] = HomeOpt):
    """Sign and store a release."""
    from fota.server.releases import ReleaseError, create_release
    h = Home.locate(home)
    if not path.exists():
        _fail(f"{path} does not exist")
    key = _signing_key(h)
    try:
        rel = create_release(_store(h), h.blobs, key, path, version, list(hardware))
    except (ReleaseError, ValueError) as e:
        _fail(str(e))
    console.print(f"release {rel.version} ({rel.kind}, {rel.size} bytes, sha256 {rel.sha256[:16]}…) "
                  f"for {', '.join(rel.hardware)} signed by key {rel.key_id}")


@app.command("releases")
def releases(home: Optional[Path] = HomeOpt):
    """List releases."""
    from fota.server.releases import list_releases
    t = Table("id", "version", "kind", "size", "hardware", "sha256")
    for r in list_releases(_store(Home.locate(home))):
        t.add_row(str(r.id), r.version, r.kind, str(r.size), ",".join(r.hardware), r.sha256[:16])
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
    store = _store(h)
    try:
        _, password = provision_device(store, device_id, hardware, tags=tuple(tag))
    except FleetError as e:
        _fail(str(e))
    _refresh_broker_passwords(h, store)
    console.print(f"device {device_id} provisioned; broker user {device_id}, password {password}")
    if unix_dir:
        _make_unix_device(h, device_id, hardware, password)
        console.print(f"unix-port device directory: {h.devices_dir / device_id}")


def _refresh_broker_passwords(h: Home, store) -> None:
    from fota.server.store import Device
    with store.session() as s:
        hashes = {d.id: d.password_hash for d in s.query(Device).all() if d.password_hash}
    h.write_broker_passwords(hashes)


def _make_unix_device(h: Home, device_id: str, hardware: str, password: str, version: str = "1.0.0", **settings):
    from fota.examples import hello_files
    from fota.tools.devicedir import create_device_dir
    from fota.tools.signing import load_private_key, public_key_bytes
    from urllib.parse import urlparse
    url = urlparse(h.broker_url)
    pub = public_key_bytes(load_private_key(h.private_key))
    return create_device_dir(h.devices_dir / device_id, device_id=device_id, hardware=hardware, pubkey=pub,
                             host=url.hostname or "127.0.0.1", port=url.port or 1883, password=password,
                             app_files=hello_files(version), version=version, **settings)


@device_app.command("run")
def device_run(device_id: str, heap: str = typer.Option("128K", help="MicroPython heap size"),
               home: Optional[Path] = HomeOpt):
    """Run a unix-port device under the supervisor (restarts it on reboot) until Ctrl-C."""
    from fota.tools.supervisor import DeviceProcess
    h = Home.locate(home)
    root = h.devices_dir / device_id
    if not (root / "config.json").exists():
        _fail(f"no device directory {root}: create it with 'fota device add {device_id} --unix-dir ...'")
    proc = DeviceProcess(root, heap=heap).start()
    console.print(f"device {device_id} running (log: {proc.log_path}); Ctrl-C to stop")
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        proc.stop()


@app.command("devices")
def devices(home: Optional[Path] = HomeOpt, tag: Optional[str] = typer.Option(None)):
    """List the fleet."""
    from fota.server.fleet import list_devices
    t = Table("device", "hardware", "version", "online", "tags", "last seen")
    for d in list_devices(_store(Home.locate(home)), tag=tag):
        t.add_row(d.id, d.hardware or "", d.version or "?", "yes" if d.online else "no", ",".join(d.tags or []),
                  d.last_seen.strftime("%Y-%m-%d %H:%M:%S") if d.last_seen else "never")
    console.print(t)


# ---- deployments ---------------------------------------------------------------------------------
@app.command("deploy")
def deploy(release: str = typer.Argument(..., help="release version or id"),
           device: List[str] = typer.Option([], "--device", help="device id (repeatable)"),
           tag: Optional[str] = typer.Option(None, "--tag", help="every device with this tag"),
           home: Optional[Path] = HomeOpt):
    """Deploy a release to devices (all at once); the running control center sends the commands."""
    from fota.server.deployments import DeploymentError, create_deployment
    from fota.server.releases import ReleaseError, get_release
    if not device and not tag:
        _fail("name the targets: --device ID (repeatable) or --tag TAG")
    if device and tag:
        _fail("use either --device or --tag, not both")
    store = _store(Home.locate(home))
    try:
        rel = get_release(store, release)
        dep = create_deployment(store, rel, device_ids=list(device) or None, tag=tag)
    except (DeploymentError, ReleaseError, LookupError) as e:
        _fail(str(e))
    console.print(f"deployment {dep.id}: release {rel.version} to {len(dep.jobs)} device(s)")


def render_status(store, deployment_id: int | None = None):
    """A Rich table of the jobs of one deployment (the latest by default) and a summary line."""
    from fota.server.store import Deployment, Job
    with store.session() as s:
        q = s.query(Deployment)
        dep = q.get(deployment_id) if deployment_id else q.order_by(Deployment.id.desc()).first()
        if dep is None:
            return None, None, "no deployments"
        jobs = s.query(Job).filter(Job.deployment_id == dep.id).order_by(Job.device_id).all()
        version = dep.release.version
        rows = [(j.device_id, j.state, j.progress or 0.0, j.code, j.reason) for j in jobs]
    counts: dict[str, int] = {}
    for _, state, *_ in rows:
        counts[state] = counts.get(state, 0) + 1
    in_progress = sum(n for st, n in counts.items() if st not in P.TERMINAL_STATES)
    summary = (f"deployment {dep.id} (release {version}): " +
               ", ".join(f"{counts.get(st, 0)} {st}" for st in P.TERMINAL_STATES if counts.get(st)) +
               (", " if counts.keys() - set(P.TERMINAL_STATES) and any(counts.get(st) for st in P.TERMINAL_STATES) else "") +
               (f"{in_progress} in progress" if in_progress else ""))
    return dep, rows, summary


def progress_view(rows) -> Progress:
    prog = Progress(TextColumn("{task.fields[device]:<12}"), BarColumn(),
                    TextColumn("{task.percentage:>5.1f}%"), TextColumn("{task.fields[state]:<11}"),
                    TextColumn("{task.fields[detail]}"), console=console, auto_refresh=False)
    for dev, state, progress, code, reason in rows:
        pct = 100.0 if state == P.CONFIRMED else progress * 100
        detail = f"{code}: {reason}" if code else ""
        prog.add_task("", total=100, completed=pct, device=dev, state=state, detail=detail)
    return prog


@app.command("status")
def status(deployment: Optional[int] = typer.Option(None, "--deployment", help="deployment id (default: latest)"),
           watch: bool = typer.Option(False, "--watch", help="follow live until every device is done"),
           home: Optional[Path] = HomeOpt):
    """Per-device progress of a deployment and a summary line."""
    from rich.live import Live
    store = _store(Home.locate(home))
    dep, rows, summary = render_status(store, deployment)
    if dep is None:
        _fail(summary)
    if not watch:
        console.print(progress_view(rows))
        console.print(summary)
        return
    with Live(console=console, refresh_per_second=4) as live:
        while True:
            dep, rows, summary = render_status(store, dep.id)
            from rich.console import Group
            live.update(Group(progress_view(rows), summary))
            if all(r[1] in P.TERMINAL_STATES for r in rows):
                break
            time.sleep(0.5)
    if any(r[1] != P.CONFIRMED for r in rows):
        raise typer.Exit(1)


@app.command("history")
def history(device_id: str, home: Optional[Path] = HomeOpt):
    """Every status a device reported, in order."""
    from fota.server.deployments import device_history
    t = Table("received", "job", "state", "code", "reason", "version")
    for e in device_history(_store(Home.locate(home)), device_id):
        t.add_row(e.received_at.strftime("%H:%M:%S.%f")[:-3], str(e.job_id or ""), e.state, e.code or "",
                  (e.reason or "")[:60], e.version or "")
    console.print(t)


# ---- services --------------------------------------------------------------------------------------
@app.command("serve")
def serve(home: Optional[Path] = HomeOpt):
    """Run the control center (and its own Mosquitto unless a broker URL is configured)."""
    from fota.server.app import run_control_center
    h = Home.locate(home)
    console.print(f"control center on {h.path}; broker {'managed' if h.managed_broker else h.broker_url}")
    try:
        asyncio.run(run_control_center(h))
    except KeyboardInterrupt:
        pass


@app.command("demo")
def demo(devices: int = typer.Option(3, "--devices", min=1, max=50),
         timeout: float = typer.Option(120.0, help="seconds to wait for every device to confirm"),
         keep: bool = typer.Option(False, help="keep the demo's home directory")):
    """Broker + control center + MicroPython devices: roll out a signed update end to end."""
    from fota.demo import run_demo
    code = run_demo(devices=devices, timeout=timeout, keep=keep, console=console)
    raise typer.Exit(code)


def main() -> None:
    try:
        app(standalone_mode=True)
    except CLIError as e:
        err.print(f"[red]error:[/red] {e}")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
