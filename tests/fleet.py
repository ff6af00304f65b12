"""A small real fleet for integration tests: control center + MicroPython device processes.

The control center runs in a background thread with its own asyncio loop; devices are real
`micropython` processes under the supervisor; the broker is the session's real Mosquitto.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from pathlib import Path

from fota.device import protocol as P
from fota.examples import hello_files
from fota.server.fleet import provision_device
from fota.server.kek import Kek
from fota.server.store import Device, Job, Store
from fota.tools.brokerspy import BrokerSpy
from fota.tools.devicedir import create_device_dir, read_boot_record
from fota.tools.keyring import Keyring
from fota.tools.supervisor import DEFAULT_HEAP, DeviceProcess
from fota.tools.waiting import wait_until  # noqa: F401 (re-exported to the tests)
from checked_mqtt import acknowledged


class CenterThread:
    """Runs a ControlCenter on its own event loop in a thread."""

    def __init__(self, store, broker_url, blobs, **settings):
        from fota.server.service import ControlCenter
        self.loop = asyncio.new_event_loop()
        # A client id of its own: a shared persistent session would hand one test's queued
        # statuses to the next test's center.
        settings.setdefault("client_id", f"center-{time.monotonic_ns()}")
        self.center = ControlCenter(store, broker_url, blobs, **settings)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self):
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.center.start(), self.loop).result(30)
        return self

    def stop(self):
        asyncio.run_coroutine_threadsafe(self.center.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class Spy(BrokerSpy):
    """A paho client on the server account that records every status and chunk request."""

    def __init__(self, broker):
        self.statuses: list[tuple[float, str, dict]] = []
        self.requests: list[tuple[float, str, dict]] = []
        super().__init__(broker, topics=[("fota/v1/+/status", 1), ("fota/v1/+/req", 0)])

    def _on_message(self, client, userdata, msg):
        device = msg.topic.split("/")[2]
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        target = self.statuses if msg.topic.endswith("/status") else self.requests
        target.append((time.monotonic(), device, body))

    def of(self, device, job=None, health=False):
        """Statuses of a device (of one job); health reports (protocol §6) only with health=True."""
        return [s for _, d, s in self.statuses if d == device and (job is None or s.get("job") == job)
                and (health or s.get("state") != P.HEALTH)]

    def publish(self, device, suffix, payload, qos=1):
        acknowledged(self.client.publish(P.topic(device, suffix), payload, qos=qos))


class Fleet:
    def __init__(self, tmp: Path, broker, db_url: str, heap=DEFAULT_HEAP, **center_settings):
        self.tmp = tmp
        self.broker = broker
        self.store = Store(db_url)
        self.keyring = Keyring(tmp / "keys")
        self.keyring.init()
        self.signer = self.keyring.signer()
        self.key = self.signer.key
        self.kek = Kek.load(tmp / "keys" / "kek")  # opens the stored release and device keys
        self.blobs = tmp / "blobs"
        self.heap = heap
        self.devices: dict[str, DeviceProcess] = {}
        self.passwords: dict[str, str] = {}
        center_settings.setdefault("signer", self.signer)
        center_settings.setdefault("keys_update", self.keyring.keys_update())
        center_settings.setdefault("kek", self.kek)
        self.center = CenterThread(self.store, broker.server_url, self.blobs, **center_settings).start()
        self.spy = Spy(broker)

    def add_device(self, device_id, hardware="unix", version="1.0.0", start=True, port=None, **settings):
        """port: where the device connects instead of the broker (a fault proxy in front of it)."""
        row, password = provision_device(self.store, device_id, hardware, kek=self.kek)
        settings.setdefault("enc_key", self.kek.device_key(device_id, row.enc_key).hex())
        # Tests time their faults (kills, restarts, cuts) by the progress statuses: every 10 %,
        # not at most once a second as the device's default would on the loopback.
        settings.setdefault("progress_interval_ms", 0)
        self.broker.add_user(device_id, password)
        self.passwords[device_id] = password
        return self._create(device_id, hardware, version, start, port, settings)

    def _create(self, device_id, hardware, version, start, port, settings):
        root = create_device_dir(self.tmp / "devices" / device_id, device_id=device_id, hardware=hardware,
                                 root_key=self.keyring.root_public(), trust=self.keyring.trust(),
                                 host=self.broker.host, port=port or self.broker.port,
                                 password=self.passwords[device_id], app_files=hello_files(version),
                                 version=version, **settings)
        proc = DeviceProcess(root, heap=self.heap)
        self.devices[device_id] = proc
        if start:
            proc.start()
        return proc

    def reprovision(self, device_id, hardware="unix", version="1.0.0", **settings):
        """Stop a device, erase its directory and provision it again with the same id and
        password: its boot counter and status numbers start over (a flash erase)."""
        self.devices[device_id].stop()
        shutil.rmtree(self.root(device_id))
        settings.setdefault("enc_key", self.kek.device_key(device_id, self.device_row(device_id).enc_key).hex())
        settings.setdefault("progress_interval_ms", 0)
        return self._create(device_id, hardware, version, True, None, settings)

    def root(self, device_id) -> Path:
        return self.devices[device_id].root

    def boot_record(self, device_id) -> dict:
        return read_boot_record(self.root(device_id))

    def running_version(self, device_id) -> str:
        rec = self.boot_record(device_id)
        return rec["versions"][rec["active"]]

    def device_row(self, device_id) -> Device:
        with self.store.session() as s:
            return s.get(Device, device_id)

    def job(self, job_id) -> Job:
        with self.store.session() as s:
            return s.get(Job, job_id)

    def wait_online(self, *ids, version="1.0.0", timeout=30):
        for dev in ids:
            wait_until(lambda: (r := self.device_row(dev)) and r.online and r.version == version,
                       timeout=timeout, what=f"{dev} online on {version}")

    def wait_job(self, job_id, states=P.TERMINAL_STATES, timeout=60):
        return wait_until(lambda: (j := self.job(job_id)).state in states and j, timeout=timeout,
                          what=f"job {job_id} to reach {states}")

    def run(self, coro, timeout=30):
        """Run a coroutine on the control center's loop (e.g. center.set_keys)."""
        return asyncio.run_coroutine_threadsafe(coro, self.center.loop).result(timeout)

    def close(self):
        for p in self.devices.values():
            p.stop()
        self.spy.close()
        self.center.stop()
        self.store.dispose()
