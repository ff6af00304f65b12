"""Wiring of the control center: store + (managed) Mosquitto + ControlCenter service."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from fota.server.broker import Mosquitto
from fota.server.home import Home

log = logging.getLogger(__name__)


async def supervise_broker(broker: Mosquitto, interval: float = 1.0) -> None:
    """Restart the managed Mosquitto if it dies (its persistence keeps queued messages)."""
    while True:
        await asyncio.sleep(interval)
        if broker.proc is None or broker.proc.poll() is not None:
            code = broker.proc.returncode if broker.proc else None
            log.warning("managed Mosquitto exited (code %s): restarting it", code)
            try:
                await asyncio.to_thread(broker.start)
            except Exception:  # keep trying: the control center is useless without it
                log.exception("restarting Mosquitto failed")


def managed_broker(home: Home, device_hashes: dict[str, str]) -> Mosquitto:
    """Start the home's own Mosquitto (password file + per-device ACL, persistence on, TLS if
    the home has broker_tls)."""
    home.write_broker_passwords(device_hashes)
    return Mosquitto(home.broker_dir, port=home.config()["broker_port"], auth=True, persistence=True,
                     tls=home.tls_files()).start()


def device_hashes(store) -> dict[str, str]:
    from fota.server.store import Device
    with store.session() as s:
        return {d.id: d.password_hash for d in s.query(Device).all() if d.password_hash}


@contextlib.asynccontextmanager
async def control_center(home: Home, **settings):
    """Start everything a home needs; yields the running ControlCenter."""
    from fota.server.service import ControlCenter
    from fota.server.store import Store
    store = Store(home.database_url)
    broker = managed_broker(home, device_hashes(store)) if home.managed_broker else None
    ring = home.keyring
    settings.setdefault("signer", ring.signer())
    settings.setdefault("keys_update", ring.keys_update())
    if home.broker_tls:
        settings.setdefault("ssl_context", home.broker_ssl_context())
    center = ControlCenter(store, home.broker_url, home.blobs, **settings)
    watchdog = asyncio.create_task(supervise_broker(broker)) if broker else None
    try:
        await center.start()
        if broker:
            broker.save()  # the center's session on disk now, not at the next autosave
        yield center
    finally:
        if watchdog:
            watchdog.cancel()
        await center.stop()
        if broker:
            broker.stop()
        store.dispose()


async def run_control_center(home: Home) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with control_center(home):
        await stop.wait()
