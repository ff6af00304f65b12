"""Wiring of the control center: store + (managed) Mosquitto + ControlCenter service.

``fota serve`` runs one control center on SQLite; on PostgreSQL it runs ``--workers N``
worker processes (``fota worker``), each a ControlCenter in the shared subscription group
``SHARE_GROUP``, restarted (under a new worker id) when one exits.
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fota.server.broker import MANAGED_MAX_PACKET, Mosquitto
from fota.server.home import Home
from fota.tools.gctune import tune_for_throughput
from fota.tools.private import private_dir

log = logging.getLogger(__name__)

SHARE_GROUP = "fota"          # MQTT v5 shared subscriptions: $share/fota/fota/v1/+/status, ...
EXIT_FENCED = 3               # a worker declared dead by the others exits with this code
RESTART_DELAY = 1.0           # seconds before a worker that exited is started again


class ServeError(RuntimeError):
    pass


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


@contextlib.contextmanager
def sqlite_single_lock(home: Home):
    """One control center per SQLite database: an exclusive lock on <home>/serve.lock, held
    while it runs (released by the OS if the process dies)."""
    private_dir(home.path)
    with open(home.path / "serve.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ServeError(f"another control center runs on {home.path} (SQLite supports one worker): "
                             "use PostgreSQL for several workers") from None
        yield


async def supervise_broker(broker: Mosquitto, home: Home, store, interval: float = 1.0) -> None:
    """Restart the managed Mosquitto if it dies (its persistence keeps queued messages)."""
    while True:
        await asyncio.sleep(interval)
        if broker.proc is None or broker.proc.poll() is not None:
            code = broker.proc.returncode if broker.proc else None
            log.warning("managed Mosquitto exited (code %s): restarting it", code)
            try:
                await asyncio.to_thread(start_broker, broker, home, store)
            except Exception:  # keep trying: the control center is useless without it
                log.exception("restarting Mosquitto failed")


def start_broker(broker: Mosquitto, home: Home, store) -> Mosquitto:
    """Start the managed Mosquitto and sync its passwords once more: a device provisioned while
    it started (after it read the file, before its pid file said where to send the reload
    signal) is in the file only now."""
    broker.start()
    home.sync_broker_passwords(store)
    return broker


def managed_broker(home: Home, store) -> Mosquitto:
    """Start the home's own Mosquitto (device listener on broker_listen and service listener,
    fota.server.broker; persistence on, saved every broker_autosave seconds, TLS if the home has
    broker_tls or listens beyond loopback)."""
    home.sync_broker_passwords(store)
    cfg = home.config()
    host, port = home.broker_listen
    return start_broker(Mosquitto(home.broker_dir, port=port, service_port=cfg["broker_service_port"],
                                  auth=True, persistence=True, tls=home.tls_files(), host=host,
                                  max_packet_size=MANAGED_MAX_PACKET, acl_extra=home.broker_acl_extra(),
                                  autosave_interval=home.broker_autosave),
                        home, store)


def home_api_app(home: Home, store):
    """The HTTP API and dashboard (fota.server.api.create_app) of a home, with everything the
    home holds: its signing key and trust document, its key-encryption key (encrypted releases,
    the URL key of transport http), its object storage, and the rewrite of its broker's accounts
    after a rekey or revoke. `fota api` and `fota demo` serve this one."""
    from fota.server.accounts import broker_sync
    from fota.server.api import create_app
    return create_app(store, home.blobs, lambda: home.keyring.signer().key,
                      trust_loader=home.keyring.trust, kek_loader=home.kek,
                      url_key=lambda: home.kek().url_key, objects=home.object_store(),
                      broker_sync=lambda s: broker_sync(home, s))


def sync_nats_users(home: Home, store) -> None:
    """A NATS cluster's users file rewritten from the registry and the nodes on this machine
    reloaded, as `fota serve` starts (the managed Mosquitto's password file is, by managed_broker):
    an account changed while no control center ran (through an API on another machine, a restored
    database) takes effect now. ServeError when the file cannot be written: a stale one may still
    let a revoked device in."""
    from fota.server.accounts import SYNC_ERRORS, broker_report, missing_words, nats_words
    try:
        done = home.sync_nats_users(store)
    except SYNC_ERRORS as e:
        raise ServeError(f"cannot rewrite the NATS users file from the registry: {e}") from None
    report = broker_report(home, done)
    if done is None:
        log.warning("%s", report["note"])
        return
    rewritten, left = nats_words(report)
    log.info("%s", rewritten)
    for warning in (left, report["note"], report["missing"] and missing_words(report["missing"])):
        if warning:
            log.warning("%s", warning)


@contextlib.asynccontextmanager
async def control_center(home: Home, manage_broker: bool = True, **settings):
    """Start everything a home needs; yields the running ControlCenter. manage_broker: `fota
    serve` (the managed Mosquitto, or a NATS cluster's users file); False: a worker of several."""
    from fota.server.center import ControlCenter
    store = home.store()
    try:
        if manage_broker and home.nats_broker:
            sync_nats_users(home, store)
    except BaseException:
        store.dispose()
        raise
    broker = managed_broker(home, store) if home.managed_broker and manage_broker else None
    ring = home.keyring
    signer, keys_update = ring.current()
    settings.setdefault("signer", signer)
    settings.setdefault("keys_update", keys_update)
    settings.setdefault("keyring", ring)  # watched: a rotation takes effect without a restart
    settings.setdefault("kek", home.kek())
    if home.config().get("command_ttl") is not None:  # seconds a signed command stays valid
        settings.setdefault("command_ttl", home.config()["command_ttl"])
    if "command_resend" in home.config():  # seconds before an unanswered command is sent again; null: never
        settings.setdefault("unanswered_after", home.config()["command_resend"])
    if home.broker_tls:
        settings.setdefault("ssl_context", home.broker_ssl_context())
    settings.setdefault("homeassistant", home.homeassistant_settings())  # None: not enabled
    settings.setdefault("http", home.http_payloads())  # None: transport http not configured
    objects = settings["http"] if hasattr(settings["http"], "get_blob") else home.object_store()
    settings.setdefault("objects", objects)  # None: no object storage; blobs/ only
    center = ControlCenter(store, home.broker_url, home.blobs, **settings)
    watchdog = asyncio.create_task(supervise_broker(broker, home, store)) if broker else None
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


async def run_control_center(home: Home, **settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with control_center(home, **settings):
        tune_for_throughput()  # started: what exists now lives as long as the process
        await stop.wait()


async def run_worker(home: Home, lease: float = 10.0, **settings) -> int:
    """One worker of several (PostgreSQL): until SIGTERM (0) or declared dead by the others
    (EXIT_FENCED: its supervisor starts a fresh one)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with control_center(home, manage_broker=False, share_group=SHARE_GROUP, lease=lease,
                              **settings) as center:
        log.info("worker %s running", center.client_id)
        tune_for_throughput()
        lost = asyncio.create_task(center.lost.wait())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait([lost, stopped], return_when=asyncio.FIRST_COMPLETED)
        lost.cancel()
        stopped.cancel()
        return EXIT_FENCED if center.lost.is_set() else 0


def worker_command(home: Home, extra: list[str] = ()) -> list[str]:
    return [sys.executable, "-m", "fota.cli", "worker", "--home", str(home.path), *extra]


def supervise_workers(home: Home, n: int, stop_after: float | None = None, worker_args: list[str] = ()) -> None:
    """`fota serve --workers n` on PostgreSQL: the managed broker (if any) and n worker
    processes, each restarted when it exits, until SIGINT/SIGTERM."""
    if is_sqlite(home.database_url) and n > 1:
        raise ServeError("SQLite supports one control-center worker: use PostgreSQL "
                         "(database_url postgresql://...) for --workers > 1")
    from fota.server.store import Store
    store = home.store()  # migrates (and wraps plain keys) once, before the workers start
    try:
        if home.nats_broker:
            sync_nats_users(home, store)
        broker = managed_broker(home, store) if home.managed_broker else None
    finally:
        store.dispose()
    stopping = []
    previous = {sig: signal.signal(sig, lambda *_: stopping.append(1)) for sig in (signal.SIGINT, signal.SIGTERM)}
    procs: list[subprocess.Popen | None] = [None] * n
    restart_at = [0.0] * n
    deadline = time.monotonic() + stop_after if stop_after else None
    try:
        while not stopping and (deadline is None or time.monotonic() < deadline):
            for i, proc in enumerate(procs):
                if proc is not None and proc.poll() is not None:
                    log.warning("worker %d exited with %s: starting a new one", i + 1, proc.returncode)
                    procs[i], restart_at[i] = None, time.monotonic() + RESTART_DELAY
                if procs[i] is None and time.monotonic() >= restart_at[i]:
                    procs[i] = subprocess.Popen(worker_command(home, list(worker_args)), env=_worker_env())
            if broker is not None and (broker.proc is None or broker.proc.poll() is not None):
                log.warning("managed Mosquitto exited: restarting it")
                with contextlib.suppress(Exception):
                    store = Store(home.database_url)
                    try:
                        start_broker(broker, home, store)
                    finally:
                        store.dispose()
            time.sleep(0.2)
    finally:
        for proc in procs:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for proc in procs:
            if proc is not None:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if broker:
            broker.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])  # this fota, even when not installed
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return env
