"""`fota demo`: a broker, the control center and MicroPython devices; a signed update end to end.

Everything runs on this machine in a throw-away fota home: a managed Mosquitto with per-device
credentials and ACL, the control center, N unix-port MicroPython agents on the example app 1.0.0
under the supervisor. It signs 1.1.0, deploys it to all devices, shows live progress, and exits 0
once every device confirmed 1.1.0 after its reboot.
"""
from __future__ import annotations

import asyncio
import logging
import random
import shutil
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.live import Live

from fota.device import protocol as P
from fota.tools.defaults import DEFAULT_HEAP
from fota.tools.waiting import TimedOut, wait_until_async


class DemoError(RuntimeError):
    pass


def run_demo(devices: int = 3, timeout: float = 120.0, keep: bool = False, console: Console | None = None,
             heap: str = DEFAULT_HEAP, port: int = 8080) -> int:
    """keep: once the update passed, leave everything running with the web dashboard on
    127.0.0.1:port (another free port if taken) and a read-only sign-in, until Ctrl-C; the home
    directory is kept afterwards."""
    console = console or Console()
    return run_in_home("fota-demo-", lambda root: _demo(root, devices, timeout, console, heap,
                                                         port if keep else None),
                       f"{devices} device(s) confirmed 1.1.0 after reboot", keep, console)


def run_in_home(prefix: str, demo, passed: str, keep: bool, console: Console) -> int:
    """Run the coroutine demo(root) in a throw-away home directory; 0 if it passed, else 1."""
    logging.getLogger("gmqtt").setLevel(logging.ERROR)  # its reconnect chatter is not for the demo
    root = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        asyncio.run(demo(root))
        console.print(f"[green]demo passed:[/green] {passed}")
        return 0
    except DemoError as e:
        console.print(f"[red]demo failed:[/red] {e}")
        return 1
    finally:
        if keep:
            console.print(f"demo home kept at {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


async def watch(console: Console, store, deployment_id: int, timeout: float, noun: str) -> list:
    """Live progress of a deployment until every job finished; returns its rows."""
    from fota.deployment_view import local_deployment, refresh_live
    deadline = time.monotonic() + timeout
    with Live(console=console, refresh_per_second=4) as live:
        while True:
            rows, summary, done = refresh_live(live, lambda i: local_deployment(store, i), deployment_id)
            if done:
                break
            if time.monotonic() > deadline:
                raise DemoError(f"not every {noun} finished within {timeout:.0f}s: {summary}")
            await asyncio.sleep(0.25)
    console.print()
    return rows


async def wait(predicate, timeout: float, what: str) -> None:
    """wait_until_async, failing the demo with what it waited for."""
    try:
        await wait_until_async(predicate, timeout, interval=0.2, what=what)
    except TimedOut as e:
        raise DemoError(str(e)) from None


async def serve_dashboard(home, store, port: int, console: Console) -> None:
    """The API and dashboard on 127.0.0.1 (port, or a free one if taken), with a new read-only
    token printed for signing in; returns on Ctrl-C / SIGTERM."""
    import contextlib
    import signal
    import socket

    import uvicorn

    from fota.server.app import home_api_app
    from fota.server.auth import create_token
    from fota.server.broker import free_port

    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            port = free_port()
    app = home_api_app(home, store)
    _, secret = create_token(store, f"demo-viewer-{random.randrange(10**6):06d}", "read")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                          timeout_graceful_shutdown=1))
    server.install_signal_handlers = lambda: None  # ours below: Ctrl-C ends the demo, not only the server
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(server.serve())
    await wait(lambda: server.started or task.done(), 20, "the dashboard's HTTP server to start")
    if task.done():
        raise DemoError(f"the dashboard's HTTP server did not start on 127.0.0.1:{port}")
    console.print(f"[bold]dashboard:[/bold] http://127.0.0.1:{port}/ui/  (sign in with the read-only token below)")
    console.print(f"[bold]read-only token:[/bold] {secret}")
    console.print(f"the demo keeps running (home {home.path}; an admin token: "
                  f"fota token create NAME --role admin --home {home.path}); Ctrl-C stops it")
    try:
        await stop.wait()
    finally:
        server.should_exit = True
        await task


async def _demo(root: Path, n: int, timeout: float, console: Console, heap: str, keep_port: int | None = None) -> None:
    from fota.cli_common import make_unix_device
    from fota.examples import hello_files
    from fota.server.app import control_center
    from fota.server.deployments import create_deployment
    from fota.server.fleet import list_devices, provision_device
    from fota.server.home import Home
    from fota.server.releases import create_release
    from fota.tools.supervisor import DeviceProcess

    home = Home(root / "home")
    home.keyring.init()
    key = home.keyring.signer().key
    home.config()
    store = home.store()
    ids = [f"dev-{i:02d}" for i in range(1, n + 1)]
    for dev in ids:
        row, password = provision_device(store, dev, "unix", tags=("demo",), kek=home.kek())
        make_unix_device(home, dev, "unix", password, version="1.0.0", wrapped_key=row.enc_key)
    console.print(f"provisioned {n} devices on hello app 1.0.0 (home {home.path})")

    procs: list[DeviceProcess] = []
    async with control_center(home) as center:
        host, port = home.device_broker
        console.print(f"Mosquitto and control center up: devices {host}:{port}, "
                      f"center {home.broker_url.rsplit('@', 1)[-1]}")
        try:
            procs = [DeviceProcess(home.devices_dir / dev, heap=heap).start() for dev in ids]

            def all_online_on_1_0_0():
                devs = {d.id: d for d in list_devices(store)}
                return all(devs[i].online and devs[i].version == "1.0.0" for i in ids)
            await wait(all_online_on_1_0_0, 30, "the devices to come online on 1.0.0")
            console.print(f"{n} MicroPython devices online on 1.0.0")

            app_dir = root / "hello-1.1.0"
            app_dir.mkdir()
            for name, data in hello_files("1.1.0").items():
                (app_dir / name).write_bytes(data)
            # Some weight, so that the transfer shows: a 128 KiB asset next to the code.
            (app_dir / "assets").mkdir()
            (app_dir / "assets" / "splash.bin").write_bytes(random.Random(11).randbytes(128 * 1024))
            rel = create_release(store, home.blobs, key, app_dir, "1.1.0", ["unix"])
            console.print(f"signed release 1.1.0 ({rel.size} bytes, key {rel.key_id})")
            dep = create_deployment(store, rel, device_ids=ids)
            console.print(f"deployment {dep.id} to {n} devices")

            rows = await watch(console, store, dep.id, timeout, "device")
            bad = [r for r in rows if r[1] != P.CONFIRMED]
            if bad:
                raise DemoError("; ".join(f"{d} ended {st} ({code}: {reason})" for d, st, _, code, reason in bad))

            def all_on_1_1_0():
                devs = {d.id: d for d in list_devices(store)}
                return all(devs[i].version == "1.1.0" and devs[i].online for i in ids)
            await wait(all_on_1_1_0, 20, "the devices to report 1.1.0 in their inventory")
            reboots = sum(p.reboots for p in procs)
            console.print(f"every device runs 1.1.0 ({reboots} reboots)")
            if keep_port is not None:
                await serve_dashboard(home, store, keep_port, console)
        finally:
            for p in procs:
                p.stop()
    store.dispose()
