"""A small real fleet for benchmarks: Mosquitto + control center + MicroPython device processes.

Self-contained (it does not import tests/): an authenticated Mosquitto on a free loopback port in
its own directory, a Store on a SQLite file, a ControlCenter on its own event loop in a thread,
and unix-port devices under fota.tools.supervisor.DeviceProcess.
"""
from __future__ import annotations

import asyncio
import inspect
import json
import os
import secrets
import threading
import time
from pathlib import Path

from sqlalchemy import select

from fota.examples import hello_files
from fota.server.broker import SERVER_USER, Mosquitto
from fota.server.fleet import provision_device
from fota.server.releases import create_release
from fota.server.store import Device, Job, Store
from fota.tools.brokeraccounts import BrokerAccounts
from fota.tools.bundle import pack_files
from fota.tools.devicedir import create_device_dir
from fota.tools.supervisor import DEFAULT_HEAP, DeviceProcess
from fota.tools.waiting import TimedOut, wait_until  # noqa: F401 (re-exported to the benchmarks)

HOST = "127.0.0.1"


def bundle_of_size(version: str, size: int) -> bytes:
    """hello_files(version) plus a random assets/blob.bin, packed to exactly `size` bytes
    (or the smallest bundle possible if `size` is below it)."""
    files = dict(hello_files(version))
    files["assets/blob.bin"] = b""
    pad = max(0, size - len(pack_files(files)))
    files["assets/blob.bin"] = os.urandom(pad)
    return pack_files(files)


class Broker(BrokerAccounts):
    """An authenticated Mosquitto (password file + per-device ACL) in its own directory, with
    fota's generated config (which turns Nagle off: `set_tcp_nodelay true`)."""

    def __init__(self, directory: Path, *, persistence: bool = False, max_packet_size: int = 65536):
        super().__init__(Mosquitto(Path(directory), auth=True, persistence=persistence,
                                   max_packet_size=max_packet_size).start(), HOST)
        self.add_users({SERVER_USER: secrets.token_urlsafe(12)})

    def stop(self) -> None:
        self.mosquitto.stop()


class CenterThread:
    """A ControlCenter on its own asyncio loop in a background thread."""

    def __init__(self, store, broker_url, blobs, **settings):
        from fota.server.service import ControlCenter
        self.loop = asyncio.new_event_loop()
        settings.setdefault("client_id", f"bench-center-{os.getpid()}-{time.monotonic_ns()}")
        self.center = ControlCenter(store, broker_url, blobs, **settings)
        self.thread = threading.Thread(target=self.loop.run_forever, name="bench-center", daemon=True)

    def start(self) -> "CenterThread":
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.center.start(), self.loop).result(30)
        return self

    def stop(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.center.stop(), self.loop).result(30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


def _keys(directory: Path):
    """(release signing key, ControlCenter key settings, create_device_dir key settings).

    Two generations of fota's key handling: a pinned signing key (pubkey=...), or a root key
    certifying signing keys (fota.tools.keyring: root_key=/trust= on the device, a Signer and
    the key update on the control center)."""
    if "root_key" in inspect.signature(create_device_dir).parameters:
        from fota.tools.keyring import Keyring
        keyring = Keyring(directory)
        keyring.init()
        signer = keyring.signer()
        return (signer.key, {"signer": signer, "keys_update": keyring.keys_update()},
                {"root_key": keyring.root_public(), "trust": keyring.trust()})
    from fota.tools.signing import generate_private_key, public_key_bytes
    key = generate_private_key()
    return key, {}, {"pubkey": public_key_bytes(key)}


class Fleet:
    """Broker + store + control center + devices under one temporary directory."""

    def __init__(self, tmp: Path, *, chunk: int, window: int, heap: str = DEFAULT_HEAP, persistence: bool = False):
        self.tmp = Path(tmp)
        self.heap = heap
        self.broker = Broker(self.tmp / "mosquitto", persistence=persistence)
        self.store = Store(f"sqlite:///{self.tmp / 'fota.db'}")
        self.blobs = self.tmp / "blobs"
        self.devices: dict[str, DeviceProcess] = {}
        self.center = None
        try:
            self.key, center_keys, self.device_keys = _keys(self.tmp / "keys")
            self.center = CenterThread(self.store, self.broker.server_url, self.blobs,
                                       chunk=chunk, window=window, **center_keys).start()
        except BaseException:
            self.close()
            raise

    def add_devices(self, ids: list[str], *, heap: str | None = None, version: str = "1.0.0",
                    **config) -> list[DeviceProcess]:
        """Provision devices, add their accounts in one broker reload, start them; `config`: more
        keys for their config.json (e.g. wire_stats=True: wire_entries() then has their bytes)."""
        passwords = {}
        for device_id in ids:
            _, passwords[device_id] = provision_device(self.store, device_id, "unix")
        self.broker.add_users(passwords)
        procs = []
        for device_id in ids:
            root = create_device_dir(self.tmp / "devices" / device_id, device_id=device_id, hardware="unix",
                                     host=self.broker.host, port=self.broker.port, **self.device_keys,
                                     password=passwords[device_id], app_files=hello_files(version),
                                     version=version, **config)
            proc = DeviceProcess(root, heap=heap or self.heap)
            self.devices[device_id] = proc
            procs.append(proc)
        for proc in procs:
            proc.start()
        return procs

    def release(self, image: bytes, version: str):
        """A signed release of `image` for the unix hardware type."""
        return create_release(self.store, self.blobs, self.key, image, version, ["unix"])

    def online(self, ids: list[str], version: str = "1.0.0") -> bool:
        with self.store.session() as s:
            rows = s.execute(select(Device.id, Device.online, Device.version).where(Device.id.in_(ids))).all()
        return len(rows) == len(ids) and all(on and v == version for _, on, v in rows)

    def wait_online(self, ids: list[str], timeout: float = 60, version: str = "1.0.0") -> None:
        wait_until(lambda: self.online(ids, version), timeout=timeout, interval=0.1,
                   what=f"{len(ids)} device(s) online on {version}")

    def job_states(self, job_ids: list[int]) -> dict[int, tuple[str, str | None, str | None]]:
        with self.store.session() as s:
            rows = s.execute(select(Job.id, Job.state, Job.code, Job.reason).where(Job.id.in_(job_ids))).all()
        return {j: (state, code, reason) for j, state, code, reason in rows}

    def close(self) -> None:
        if self.center is not None:
            try:
                self.center.stop()
            except Exception:
                pass
        for proc in self.devices.values():
            try:
                proc.stop()
            except Exception:
                pass
        self.store.dispose()
        self.broker.stop()


def wire_entries(root: Path) -> list[dict]:
    """The {"tx", "rx"} entries a device appended to wire.json at each reboot (only a device whose
    config has "wire_stats": true writes them)."""
    path = Path(root) / "wire.json"
    if not path.exists():
        return []
    try:
        return json.loads(path.read_text())
    except ValueError:
        return []
