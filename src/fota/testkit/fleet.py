"""A small real fleet: control center + MicroPython device processes, for the tests and the benches.

The control center runs in a background thread with its own asyncio loop (center.CenterThread);
devices are real `micropython` processes under the supervisor (fota.tools.supervisor), each in a
directory of its own; the broker is a real Mosquitto: the tests' session broker, or one the fleet
starts for itself (Fleet.standalone, the benches').
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

from sqlalchemy import select

from fota.device import protocol as P
from fota.examples import hello_files
from fota.server.center.chunks import parse_request
from fota.server.fleet import provision_device
from fota.server.kek import Kek
from fota.server.releases import create_release
from fota.server.store import Device, Job, Store
from fota.testkit.broker import ManagedBroker
from fota.testkit.brokerspy import BrokerSpy
from fota.testkit.center import CenterThread
from fota.testkit.checked_mqtt import acknowledged
from fota.testkit.devices import read_boot_record
from fota.testkit.interpreters import DEFAULT as DEFAULT_INTERPRETER
from fota.testkit.interpreters import interpreter as resolve_interpreter
from fota.tools.waiting import wait_until
from fota.tools.bundle import pack_files
from fota.tools.devicedir import create_device_dir
from fota.tools.keyring import Keyring
from fota.tools.supervisor import DEFAULT_HEAP, DeviceProcess

# Tests time their faults (kills, restarts, cuts) by the progress statuses: every 10 %, not at
# most once a second as the device's default would on the loopback.
TEST_DEVICE_SETTINGS = {"progress_interval_ms": 0}

# wait_online and wait_job poll the database every 20 ms (one indexed query): a test waits for
# its devices and jobs several times, and a coarser poll adds half its interval to each wait.
WAIT_POLL = 0.02


def bundle_of_size(version: str, size: int) -> bytes:
    """hello_files(version) plus a random assets/blob.bin, packed to exactly `size` bytes
    (or the smallest bundle possible if `size` is below it)."""
    files = dict(hello_files(version))
    files["assets/blob.bin"] = b""
    pad = max(0, size - len(pack_files(files)))
    files["assets/blob.bin"] = os.urandom(pad)
    return pack_files(files)


class Spy(BrokerSpy):
    """A paho client on the server account that records every status and chunk request."""

    def __init__(self, broker):
        self.statuses: list[tuple[float, str, dict]] = []
        self.requests: list[tuple[float, str, dict]] = []
        super().__init__(broker, topics=[("fota/v1/+/status", 1), ("fota/v1/+/req", 0)])

    def _on_message(self, client, userdata, msg):
        # Recorded as the center reads them: a request in either form (§5) as a dict, a status
        # with an absent job, code or reason as null (§11).
        device = msg.topic.split("/")[2]
        try:
            if msg.topic.endswith("/req"):
                self.requests.append((time.monotonic(), device, dataclasses.asdict(parse_request(msg.payload))))
                return
            body = json.loads(msg.payload)
        except ValueError:
            return
        if isinstance(body, dict):
            for key in ("job", "code", "reason"):
                body.setdefault(key, None)
        self.statuses.append((time.monotonic(), device, body))

    def of(self, device, job=None, health=False):
        """Statuses of a device (of one job); health reports (protocol §6) only with health=True."""
        return [s for _, d, s in self.statuses if d == device and (job is None or s.get("job") == job)
                and (health or s.get("state") != P.HEALTH)]

    def publish(self, device, suffix, payload, qos=1):
        acknowledged(self.client.publish(P.topic(device, suffix), payload, qos=qos))


class Fleet:
    """A store at `db_url`, a keyring, a control center and device processes under `tmp`, on
    `broker` (a testkit.broker.BrokerAccounts).

    kek: devices get a payload key wrapped with the fleet's key-encryption key, as `fota device
    add` gives them (the benches' fleets have none). spy: a Spy on every status and chunk request
    (fleet.spy). device_settings: config.json settings every device gets unless told otherwise.
    center_settings go to the ControlCenter. interpreter: the MicroPython the devices run
    (fota.testkit.interpreters: "64" or "32-frozen")."""

    def __init__(self, tmp: Path, broker, db_url: str, *, heap: str = DEFAULT_HEAP, kek: bool = True,
                 spy: bool = True, device_settings: dict | None = None, interpreter: str = DEFAULT_INTERPRETER,
                 **center_settings):
        self.tmp = Path(tmp)
        self.broker = broker
        self.heap = heap
        self.interpreter = resolve_interpreter(interpreter)  # built before anything starts
        self.device_settings = dict(TEST_DEVICE_SETTINGS if device_settings is None else device_settings)
        self.blobs = self.tmp / "blobs"
        self.devices: dict[str, DeviceProcess] = {}
        self.passwords: dict[str, str] = {}
        self.center: CenterThread | None = None
        self.spy: Spy | None = None
        self._stop_broker = False
        self.store = Store(db_url)
        try:
            self.keyring = Keyring(self.tmp / "keys")
            self.keyring.init()
            self.signer = self.keyring.signer()
            self.key = self.signer.key
            # opens the stored release and device keys
            self.kek = Kek.load(self.tmp / "keys" / "kek") if kek else None
            center_settings.setdefault("signer", self.signer)
            center_settings.setdefault("keys_update", self.keyring.keys_update())
            if self.kek is not None:
                center_settings.setdefault("kek", self.kek)
            self.center = CenterThread(self.store, broker.server_url, self.blobs, **center_settings).start()
            if spy:
                self.spy = Spy(broker)
        except BaseException:
            with contextlib.suppress(Exception):
                self.close()
            raise

    @classmethod
    def standalone(cls, tmp: Path, *, persistence: bool = False, heap: str = DEFAULT_HEAP,
                   interpreter: str = DEFAULT_INTERPRETER, tls: bool = False, **center_settings) -> "Fleet":
        """A fleet on a Mosquitto (ManagedBroker) and a SQLite file of its own, as the benches run
        it: no payload keys, no spy, the devices' default settings; close() stops the broker too.
        tls: the broker speaks only TLS (a CA of the fleet's own, fota.server.tls); the control
        center and the devices verify it (the devices pin the CA and check the name localhost)."""
        tmp = Path(tmp)
        device_settings = {}
        if tls:
            from fota.server.tls import ensure_tls
            files = ensure_tls(tmp / "tls")
            center_settings.setdefault("ssl_context", files.client_context())
            device_settings = {"cadata": files.ca_der(), "server_hostname": "localhost"}
        broker = ManagedBroker(tmp / "mosquitto", persistence=persistence, tls=files if tls else None)
        try:
            fleet = cls(tmp, broker, f"sqlite:///{tmp / 'fota.db'}", heap=heap, kek=False, spy=False,
                        device_settings=device_settings, interpreter=interpreter, **center_settings)
        except BaseException:
            broker.stop()
            raise
        fleet._stop_broker = True
        return fleet

    # ------------------------------------------------------------------------------- devices

    def add_devices(self, ids: list[str], *, hardware: str = "unix", version: str = "1.0.0", start: bool = True,
                    port: int | None = None, backoff_ms: int | None = None, heap: str | None = None,
                    max_restarts: int | None = None, **settings) -> list[DeviceProcess]:
        """Provision devices, add their accounts in one broker reload, write their directories and
        (start) start them. port: where they connect instead of the broker (a fault proxy in front
        of it); backoff_ms: their reconnect back-off base; settings: config.json settings."""
        for device_id in ids:
            row, self.passwords[device_id] = provision_device(self.store, device_id, hardware, kek=self.kek)
        self.broker.add_users({d: self.passwords[d] for d in ids})
        procs = [self._create(device_id, hardware, version, port, backoff_ms, heap, max_restarts, settings)
                 for device_id in ids]
        if start:
            for proc in procs:
                proc.start()
        return procs

    def add_device(self, device_id: str, hardware: str = "unix", version: str = "1.0.0", start: bool = True,
                   port: int | None = None, **settings) -> DeviceProcess:
        """add_devices for one device."""
        return self.add_devices([device_id], hardware=hardware, version=version, start=start, port=port,
                                **settings)[0]

    def _create(self, device_id, hardware, version, port, backoff_ms, heap, max_restarts, settings) -> DeviceProcess:
        settings = {**self.device_settings, **settings}
        if self.kek is not None:
            settings.setdefault("enc_key", self.kek.device_key(device_id, self.device_row(device_id).enc_key).hex())
        root = create_device_dir(self.tmp / "devices" / device_id, device_id=device_id, hardware=hardware,
                                 root_key=self.keyring.root_public(), trust=self.keyring.trust(),
                                 host=self.broker.host, port=port or self.broker.port,
                                 password=self.passwords[device_id], app_files=hello_files(version),
                                 version=version, **settings)
        if backoff_ms is not None:
            config = json.loads((root / "config.json").read_text())
            config["broker"]["backoff_ms"] = backoff_ms
            (root / "config.json").write_text(json.dumps(config, indent=1))
        proc = self.process(root, heap=heap or self.heap)
        if max_restarts is not None:
            proc.max_restarts = max_restarts
        self.devices[device_id] = proc
        return proc

    def process(self, root: Path, **options) -> DeviceProcess:
        """A DeviceProcess (not started) for the device directory `root` on the fleet's interpreter;
        options go to DeviceProcess (heap: the fleet's unless given)."""
        options.setdefault("heap", self.heap)
        return DeviceProcess(root, executable=self.interpreter.executable, micropypath=self.interpreter.path,
                             **options)

    def reprovision(self, device_id, hardware="unix", version="1.0.0", **settings):
        """Stop a device, erase its directory and provision it again with the same id and
        password: its boot counter and status numbers start over (a flash erase)."""
        self.devices[device_id].stop()
        shutil.rmtree(self.root(device_id))
        return self._create(device_id, hardware, version, None, None, None, None, settings).start()

    # ----------------------------------------------------------------------------- what is seen

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

    def job_states(self, job_ids: list[int]) -> dict[int, tuple[str, str | None, str | None]]:
        """job -> (state, code, reason), in one query."""
        with self.store.session() as s:
            rows = s.execute(select(Job.id, Job.state, Job.code, Job.reason).where(Job.id.in_(job_ids))).all()
        return {j: (state, code, reason) for j, state, code, reason in rows}

    def online(self, ids, version: str = "1.0.0") -> bool:
        """Every device of `ids` online on `version`, in one query."""
        ids = list(ids)
        with self.store.session() as s:
            rows = s.execute(select(Device.id, Device.online, Device.version).where(Device.id.in_(ids))).all()
        return len(rows) == len(ids) and all(on and v == version for _, on, v in rows)

    def wait_online(self, *ids: str, version: str = "1.0.0", timeout: float = 30) -> None:
        wait_until(lambda: self.online(ids, version), timeout=timeout, interval=WAIT_POLL,
                   what=f"{', '.join(ids) if len(ids) <= 3 else f'{len(ids)} devices'} online on {version}")

    def wait_job(self, job_id, states=P.TERMINAL_STATES, timeout=60):
        return wait_until(lambda: (j := self.job(job_id)).state in states and j, timeout=timeout,
                          interval=WAIT_POLL, what=f"job {job_id} to reach {states}")

    def release(self, image: bytes, version: str, hardware=("unix",)):
        """A signed release of `image` for the hardware types (default: unix)."""
        return create_release(self.store, self.blobs, self.key, image, version, list(hardware))

    def run(self, coro, timeout=30):
        """Run a coroutine on the control center's loop (e.g. center.set_keys)."""
        return self.center.run(coro, timeout)

    def close(self) -> None:
        """Stop the devices, the spy and the center, close the store (and stop an own broker);
        goes on past a failing step so that nothing is left running."""
        steps = [p.stop for p in self.devices.values()]
        steps += [s.close for s in (self.spy,) if s is not None]
        steps += [c.stop for c in (self.center,) if c is not None]
        steps.append(self.store.dispose)
        if self._stop_broker:
            steps.append(self.broker.stop)
        errors = []
        for step in steps:
            try:
                step()
            except Exception as exc:  # noqa: BLE001 (the first one is raised below)
                errors.append(exc)
        if errors:
            raise errors[0]
