"""Control center: bundles, releases, fleet, deployments, and the MQTT service against a real
Mosquitto with a scripted device (paho-mqtt) that follows docs/protocol.md."""
from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import struct
import threading
import uuid
from datetime import timedelta
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from sqlalchemy import select

from fota.device import protocol
from fota.server.broker import LEGACY_CENTER_ID, SERVER_USER
from fota.server.deployments import DeploymentError, create_deployment, deployment_summary, device_history
from fota.server.fleet import (
    FleetError,
    apply_inventory,
    apply_online,
    broker_password_hashes,
    get_device,
    list_devices,
    provision_device,
)
from fota.server.releases import ReleaseError, build_manifest, create_release, get_release, list_releases, read_blob
from fota.server.center import CLIENT_ID, ControlCenter
from fota.server.store import Device, Job, Store
from fota.testkit.checked_mqtt import acknowledged, close, connect
from fota.tools.waiting import wait_until_async
from fota.tools import bundle
from fota.tools.keyring import Signer
from fota.tools.signing import generate_private_key, key_id, public_key_bytes

APP = b"VERSION = '1.1.0'\n\ndef start():\n    print('hello')\n"


# ---------------------------------------------------------------- fixtures and helpers

SERVER_KEY = generate_private_key()


@pytest.fixture(scope="module")
def key():
    # One key signs releases and commands here (the control center's signing key).
    return SERVER_KEY


@pytest.fixture
def lite_store(sqlite_url):
    s = Store(sqlite_url)
    yield s
    s.dispose()


@pytest.fixture
def app_dir(tmp_path) -> Path:
    d = tmp_path / "app"
    (d / "lib").mkdir(parents=True)
    (d / "app.py").write_bytes(APP)
    (d / "lib" / "data.bin").write_bytes(os.urandom(5000))  # size not a multiple of the chunk
    (d / "__pycache__").mkdir()
    (d / "__pycache__" / "app.cpython-311.pyc").write_bytes(b"x")
    return d


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def verify_signature(pub65: bytes, sig_hex: str, message: bytes) -> None:
    sig = bytes.fromhex(sig_hex)
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), pub65).verify(der, message, ec.ECDSA(hashes.SHA256()))


class ScriptedDevice:
    """A device that follows docs/protocol.md closely enough to run an update end to end."""

    def __init__(self, port: int, device_id: str, password: str, pub65: bytes, *,
                 hardware: str = "unix", version: str = "1.0.0", auto: bool = True, chunk: int | None = None):
        self.id, self.pub65, self.hardware, self.version, self.auto = device_id, pub65, hardware, version, auto
        self.wanted_chunk = chunk   # the inventory's `chunk` (§3), if any
        self.req_format = 1         # 2 once a command said the center takes text requests (§5)
        self.port = port
        self.boot, self.seq = 1, 0
        self.commands: list[dict] = []
        self.chunks: list[tuple[int, int, bytes]] = []   # every data message received
        self.statuses: list[dict] = []
        self.image: bytes | None = None
        self.files: dict[str, bytes] | None = None
        self.ready = threading.Event()
        self.lock = threading.Lock()
        self.job = 0
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, clean_session=False,
                        protocol=mqtt.MQTTv311)
        c.username_pw_set(device_id, password)
        c.will_set(self.topic(protocol.ONLINE), b"0", qos=1, retain=True)
        c.on_connect = lambda client, *_: client.subscribe([(self.topic(protocol.CMD), 1),
                                                            (self.topic(protocol.DATA), 1)])
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        self.client = c

    def topic(self, suffix: str) -> str:
        return protocol.topic(self.id, suffix)

    def start(self) -> ScriptedDevice:
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        assert self.ready.wait(10), f"{self.id} did not connect"
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def publish(self, suffix: str, payload, qos: int = 1, retain: bool = False, wait: bool = True) -> None:
        """wait=False inside paho callbacks: the network thread cannot wait for its own PUBACK."""
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        info = self.client.publish(self.topic(suffix), payload, qos=qos, retain=retain)
        if wait:
            acknowledged(info)

    def inventory(self) -> dict:
        return {"device": self.id, "proto": 1, "hardware": self.hardware, "version": self.version,
                "active": "a", "slots": {"a": self.version, "b": None}, "backend": "files",
                "capacity": 1 << 20, "max_chunk": 8192, "port": "linux", "state": "idle", "job": self.job,
                **({"chunk": self.wanted_chunk} if self.wanted_chunk else {})}

    def status(self, job, state, code=None, reason=None, progress=None, **extra) -> dict:
        self.seq += 1
        msg = {"job": job, "state": state, "code": code, "reason": reason, "progress": progress,
               "bytes": extra.pop("bytes", None), "total": extra.pop("total", None),
               "version": self.version, "boot": self.boot, "seq": self.seq, **extra}
        self.statuses.append(msg)
        self.client.publish(self.topic(protocol.STATUS), json.dumps(msg), qos=1)
        return msg

    def request(self, job: int, first: int, count: int, chunk: int) -> None:
        if self.req_format == 2:
            payload = f"{job} {first} {count} {chunk}"
        else:
            payload = json.dumps({"job": job, "first": first, "count": count, "chunk": chunk})
        self.client.publish(self.topic(protocol.REQ), payload, qos=0)

    def _on_subscribe(self, client, *_):
        self.publish(protocol.ONLINE, b"1", retain=True, wait=False)
        self.publish(protocol.INVENTORY, self.inventory(), retain=True, wait=False)
        self.ready.set()

    def _on_message(self, client, userdata, msg):
        with self.lock:
            if msg.topic.endswith("/cmd"):
                # A signed envelope (§4): check the command signature, then use the body.
                env = json.loads(msg.payload)
                assert env["kid"] == key_id(self.pub65)
                verify_signature(self.pub65, env["sig"], env["body"].encode())
                self._on_command(json.loads(env["body"]))
            elif msg.topic.endswith("/data"):
                self._on_chunk(bytes(msg.payload))

    # update flow (§4.1, §5)
    def _on_command(self, cmd: dict) -> None:
        self.commands.append(cmd)
        if not self.auto or cmd["type"] != "update":
            return
        assert cmd["job"] > self.job
        assert cmd["device"] == self.id
        assert cmd["manifest_kid"] == key_id(self.pub65)
        verify_signature(self.pub65, cmd["manifest_sig"], cmd["manifest"].encode())
        manifest = json.loads(cmd["manifest"])
        assert self.hardware in manifest["hw"]
        self.job, self.manifest = cmd["job"], manifest
        self.chunk, self.window = cmd["chunk"], cmd["window"]
        self.req_format = cmd.get("req_format", 1)
        self.nchunks = math.ceil(manifest["size"] / self.chunk)
        self.buf, self.next, self.requested = bytearray(), 0, 0
        self.status(self.job, "downloading", progress=0.0, bytes=0, total=manifest["size"])
        self._request(self.window)

    def _request(self, n: int) -> None:
        n = min(n, self.nchunks - self.requested)
        if n > 0:
            self.request(self.job, self.requested, n, self.chunk)
            self.requested += n

    def _on_chunk(self, payload: bytes) -> None:
        job, index = struct.unpack(">II", payload[:8])
        self.chunks.append((job, index, payload[8:]))
        if not self.auto or job != self.job or index != self.next:
            return
        self.buf += payload[8:]
        self.next += 1
        if self.next == self.nchunks:
            self._finish()
        elif self.requested - self.next <= self.window // 2:
            self._request(max(1, self.window // 2))

    def _finish(self) -> None:
        job, size = self.job, self.manifest["size"]
        self.status(job, "downloading", progress=1.0, bytes=size, total=size)
        self.status(job, "verifying", progress=1.0, bytes=size, total=size)
        if hashlib.sha256(self.buf).hexdigest() != self.manifest["sha256"]:
            self.status(job, "failed", code=protocol.E_HASH_MISMATCH)
            return
        self.image = bytes(self.buf)
        self.status(job, "installing", progress=1.0)
        if self.manifest["kind"] == "bundle":
            self.files = bundle.unpack(self.image)
        self.status(job, "rebooting", progress=1.0)
        self.boot, self.seq, self.version = self.boot + 1, 0, self.manifest["version"]  # "reboot"
        self.status(job, "trial", progress=1.0)
        self.status(job, "confirmed", progress=1.0)
        self.publish(protocol.INVENTORY, self.inventory(), retain=True, wait=False)


def add_device(store, broker, key, hardware="unix", tags=(), **kw) -> ScriptedDevice:
    device_id = uid("dev")
    _, password = provision_device(store, device_id, hardware, tags)
    broker.add_user(device_id, password)
    return ScriptedDevice(broker.port, device_id, password, public_key_bytes(key), hardware=hardware, **kw)


def center_for(store, broker, tmp_path, **kw) -> ControlCenter:
    kw.setdefault("poll_interval", 0.05)
    kw.setdefault("signer", Signer(SERVER_KEY))
    return ControlCenter(store, broker.server_url, tmp_path / "blobs", client_id=uid("fota-center"), **kw)


# ---------------------------------------------------------------- bundles

def test_bundle_round_trip_and_layout():
    files = {"lib/b.py": b"B", "app.py": APP, "a.txt": b""}
    data = bundle.pack_files(files)
    assert bundle.unpack(data) == files
    # header, then files in sorted name order
    assert data[:7] == b"FOTB" + struct.pack(">BH", 1, 3)
    assert data[7:9] == struct.pack(">H", 5) and data[9:14] == b"a.txt"


def test_pack_dir_sorted_skips_pycache(app_dir):
    files = bundle.unpack(bundle.pack_dir(app_dir))
    assert list(files) == ["app.py", "lib/data.bin"]
    assert files["app.py"] == APP


@pytest.mark.parametrize("name", ["/abs.py", "a//b.py", "./a.py", "a/../b.py", "sp ace.py", "é.py", "x" * 256, ""])
def test_bundle_rejects_bad_names(name):
    with pytest.raises(bundle.BundleError):
        bundle.pack_files({"app.py": APP, name: b"x"})


def test_bundle_requires_app_and_exact_length(tmp_path):
    with pytest.raises(bundle.BundleError, match="app.py"):
        bundle.pack_files({"main.py": b""})
    (tmp_path / "lib.py").write_bytes(b"")
    with pytest.raises(bundle.BundleError, match="app.py"):
        bundle.pack_dir(tmp_path)
    assert bundle.unpack(bundle.pack_files({"app.mpy": b"M"})) == {"app.mpy": b"M"}
    good = bundle.pack_files({"app.py": APP})
    for bad in (good + b"\0", good[:-1], b"FOTX" + good[4:], good[:4] + b"\2" + good[5:]):
        with pytest.raises(bundle.BundleError):
            bundle.unpack(bad)


# ---------------------------------------------------------------- releases

def test_build_manifest_is_compact_sorted_json():
    text = build_manifest("1.2.0", ["esp32", "unix"], "image", b"abc")
    assert text == ('{"counter":0,"hw":["esp32","unix"],"kind":"image","sha256":"%s","size":3,"v":1,"version":"1.2.0"}'
                    % hashlib.sha256(b"abc").hexdigest())
    for args in (("", ["x"], "image", b"a"), ("1", [], "image", b"a"), ("1", ["x"], "zip", b"a"),
                 ("1", ["x"], "image", b""), ("v" * 65, ["x"], "image", b"a")):
        with pytest.raises(ReleaseError):
            build_manifest(*args)


def test_create_release_signs_and_stores(store, key, app_dir, tmp_path):
    blobs = tmp_path / "blobs"
    rel = create_release(store, blobs, key, app_dir, "1.1.0", ["unix", "esp32"])
    image = bundle.pack_dir(app_dir)
    assert (rel.kind, rel.size, rel.hardware) == ("bundle", len(image), ["unix", "esp32"])
    assert rel.manifest == build_manifest("1.1.0", ["unix", "esp32"], "bundle", image)
    assert rel.key_id == key_id(public_key_bytes(key)) and len(rel.signature) == 128
    verify_signature(public_key_bytes(key), rel.signature, rel.manifest.encode())
    assert Path(rel.blob_path) == (blobs / hashlib.sha256(image).hexdigest()).resolve()
    assert read_blob(rel) == image == Path(rel.blob_path).read_bytes()

    fw = tmp_path / "fw.bin"
    fw.write_bytes(os.urandom(3000))
    img = create_release(store, blobs, key, fw, "2.0.0", ["esp32"])
    assert img.kind == "image" and read_blob(img) == fw.read_bytes()
    assert create_release(store, blobs, key, b"raw", "2.0.1", ["esp32"]).kind == "image"

    with pytest.raises(ReleaseError, match="already exists"):
        create_release(store, blobs, key, app_dir, "1.1.0", ["unix"])
    with pytest.raises(ReleaseError, match="app.py"):
        create_release(store, blobs, key, tmp_path / "app" / "lib", "3.0.0", ["unix"])
    with pytest.raises(ReleaseError, match="invalid bundle"):
        create_release(store, blobs, key, b"FOTB junk", "3.0.0", ["unix"])
    assert [r.version for r in list_releases(store)] == ["1.1.0", "2.0.0", "2.0.1"]
    assert get_release(store, "2.0.0").id == img.id == get_release(store, img.id).id
    with pytest.raises(ReleaseError):
        get_release(store, "9.9.9")


def test_read_blob_detects_corruption(lite_store, key, tmp_path):
    rel = create_release(lite_store, tmp_path / "blobs", key, b"\1" * 100, "1.0.0", ["unix"])
    Path(rel.blob_path).write_bytes(b"\2" * 100)
    with pytest.raises(ReleaseError, match="corrupt"):
        read_blob(rel)


# ---------------------------------------------------------------- fleet and deployments

def test_provision_and_password_hashes(store):
    device, password = provision_device(store, "dev-1", "unix", ["lab", "lab"])
    assert device.tags == ["lab"] and device.password_hash.startswith("$7$") and len(password) >= 16
    for bad in ("", "a/b", "x" * 65, "dev 1", SERVER_USER, LEGACY_CENTER_ID, CLIENT_ID, "fota:w:host:1:ab"):
        with pytest.raises(FleetError):
            provision_device(store, bad, "unix")
    with pytest.raises(FleetError, match="already exists"):
        provision_device(store, "dev-1", "unix")
    hashes = broker_password_hashes(store, "$7$server")
    assert hashes == {"dev-1": device.password_hash, SERVER_USER: "$7$server"}
    assert get_device(store, "dev-1").hardware == "unix"
    with pytest.raises(FleetError):
        get_device(store, "nope")
    provision_device(store, "dev-2", "esp32", ["lab"])
    assert [d.id for d in list_devices(store, tag="lab", hardware="esp32")] == ["dev-2"]
    with store.session() as s:
        assert apply_inventory(s, "dev-1", {"version": "1.0.0", "hardware": "unix"}) is not None
        assert apply_online(s, "dev-1", True) is not None
        assert apply_online(s, "ghost", True) is None
    d = get_device(store, "dev-1")
    assert (d.version, d.online, d.inventory["version"]) == ("1.0.0", True, "1.0.0")
    with store.session() as s:  # a flag received before the stored one does not apply
        apply_online(s, "dev-1", False, d.online_at - timedelta(seconds=1))
    assert get_device(store, "dev-1").online


def test_create_deployment(store, key, tmp_path):
    rel = create_release(store, tmp_path / "blobs", key, b"\1" * 10, "1.0.0", ["unix"])
    provision_device(store, "u1", "unix", ["beta"])
    provision_device(store, "u2", "unix")
    provision_device(store, "e1", "esp32", ["beta"])
    dep = create_deployment(store, rel, device_ids=["u1", "u2", "u1"])
    assert [(j.device_id, j.state, j.bytes_total) for j in dep.jobs] == [("u1", "pending", 10), ("u2", "pending", 10)]
    assert dep.jobs[0].id < dep.jobs[1].id and dep.state == "active"
    by_tag = create_deployment(store, "1.0.0", tag="beta")  # e1 is not unix hardware: skipped
    assert [j.device_id for j in by_tag.jobs] == ["u1"]
    with pytest.raises(DeploymentError, match="unknown device.*nope"):
        create_deployment(store, rel, device_ids=["u1", "nope"])
    with pytest.raises(DeploymentError, match=r"e1 \(esp32\)"):
        create_deployment(store, rel, device_ids=["e1"])
    with pytest.raises(DeploymentError, match="no device has tag"):
        create_deployment(store, rel, tag="gamma")
    with pytest.raises(DeploymentError):
        create_deployment(store, rel)
    summary = deployment_summary(store, dep.id)
    assert summary["counts"] == {"pending": 2} and summary["release"] == "1.0.0"


# ---------------------------------------------------------------- the service, end to end

def test_update_end_to_end(store, broker, key, app_dir, tmp_path):
    """Command, exact chunks, statuses in order, job confirmed, deployment done (SQLite + PostgreSQL)."""
    rel = create_release(store, tmp_path / "blobs", key, app_dir, "1.1.0", ["unix"])
    image = read_blob(rel)
    dev = add_device(store, broker, key)

    async def scenario():
        center = center_for(store, broker, tmp_path, chunk=256, window=4)
        await center.start()
        try:
            dev.start()
            await wait_until_async(lambda: get_device(store, dev.id).online, what="device online")
            dep = create_deployment(store, rel, device_ids=[dev.id])
            await wait_until_async(lambda: center.job_states(dep.id)[dev.id] == "confirmed", what="confirmed")
            await wait_until_async(lambda: deployment_summary(store, dep.id)["state"] == "done", what="deployment done")
            await wait_until_async(lambda: deployment_summary(store, dep.id)["jobs"][0]["bytes_served"] == len(image),
                        what="bytes_served")
            return center, dep
        finally:
            await center.stop()
            dev.stop()

    center, dep = run(scenario())
    job_id = dep.jobs[0].id
    (cmd,) = dev.commands
    assert (cmd["type"], cmd["job"], cmd["chunk"], cmd["window"], cmd["req_format"]) == ("update", job_id, 256, 4, 2)
    assert (cmd["manifest"], cmd["manifest_sig"], cmd["manifest_kid"]) == (rel.manifest, rel.signature, rel.key_id)
    nchunks = math.ceil(len(image) / 256)
    assert [(j, i) for j, i, _ in dev.chunks] == [(job_id, i) for i in range(nchunks)]
    assert dev.image == image and dev.files == bundle.unpack(image)
    assert (center.chunks, center.requests > 1) == (nchunks, True)
    assert center.bytes_published == len(image) + 8 * nchunks
    history = device_history(store, dev.id)
    assert [(e.state, e.boot, e.seq) for e in history] == [(s["state"], s["boot"], s["seq"]) for s in dev.statuses]
    assert [e.state for e in history] == ["downloading", "downloading", "verifying", "installing",
                                          "rebooting", "trial", "confirmed"]
    with store.session() as s:
        job = s.get(Job, job_id)
        assert (job.state, job.progress, job.code, job.sent_at is not None) == ("confirmed", 1.0, None, True)
    device = get_device(store, dev.id)
    assert device.version == "1.1.0" and device.inventory["version"] == "1.1.0"


def test_stored_password_hash_works_with_mosquitto(lite_store, broker, key):
    """The hash kept in the store is what the broker's password file gets, and it is accepted."""
    device_id = uid("dev")
    _, password = provision_device(lite_store, device_id, "unix")
    broker.hashes.update(broker_password_hashes(lite_store, broker.hashes[SERVER_USER]))
    broker.broker.write_passwords(broker.hashes)
    broker.broker.reload()
    assert connack(broker.port, device_id, password) == 0
    assert connack(broker.port, device_id, "wrong") != 0


def connack(port: int, user: str, password: str) -> int:
    """The CONNACK reason code the broker gives these credentials."""
    result: list[int] = []
    done = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=uid("probe"))
    c.username_pw_set(user, password)

    def on_connect(client, userdata, flags, reason_code, properties):
        result.append(reason_code.value)
        done.set()
    c.on_connect = on_connect
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        assert done.wait(5)
    finally:
        c.disconnect()
        c.loop_stop()
    return result[0]


def test_ingestion_rules_and_chunk_access(lite_store, broker, key, tmp_path):
    """Jobs wait for their device; dedup; foreign jobs; rejected statuses; garbage; bad requests."""
    store = lite_store
    rel = create_release(store, tmp_path / "blobs", key, os.urandom(1000), "2.0.0", ["unix"])
    image = read_blob(rel)
    a = add_device(store, broker, key, auto=False, chunk=512)  # asks for 512-byte chunks (§3)
    b = add_device(store, broker, key, auto=False)
    dep = create_deployment(store, rel, device_ids=[a.id])
    job = dep.jobs[0].id

    def job_row():
        with store.session() as s:
            return s.get(Job, job)

    async def scenario():
        center = center_for(store, broker, tmp_path)
        await center.start()
        try:
            await asyncio.sleep(0.3)
            assert job_row().state == "pending" and not a.commands  # a has never connected
            a.start(), b.start()
            await wait_until_async(lambda: a.commands, what="command")
            # The outbox marks a job sent after its publish: the device may see it first.
            await wait_until_async(lambda: job_row().state == "sent", what="job marked sent")
            assert (a.commands[0]["chunk"], a.commands[0]["req_format"]) == (512, 2)

            # another device asking for a's job gets nothing
            b.request(job, 0, 4, 256)
            # a's requests: out-of-bounds ones are ignored, a good one is served exactly
            a.request(job, 0, 33, 256)
            a.request(job, 0, 2, 32)
            a.client.publish(a.topic(protocol.REQ), b"{not json", qos=0)
            a.req_format = 2
            a.request(job, 3, 8, 256)  # the last chunk only (1000 bytes = 4 chunks), in text
            await wait_until_async(lambda: len(a.chunks) == 1, what="chunk")
            await asyncio.sleep(0.2)
            assert a.chunks == [(job, 3, image[768:])] and b.chunks == []
            assert center.ignored_requests == 4 and center.requests == 1

            # garbage on the status topic does not stop anything
            for junk in (b"\xff\xfe", b"not json", b"[1]", b'{"state":"bogus","boot":1,"seq":1}',
                         b'{"state":"downloading","job":1}', b"[" * 10000):  # over 4096 bytes: refused unread
                a.publish(protocol.STATUS, junk)
            # a status from a device that is not provisioned (the server account may write anywhere)
            ghost, _ = connect(broker, SERVER_USER, broker.users[SERVER_USER], uid("ghost"), port=broker.service_port)
            acknowledged(ghost.publish(protocol.topic("ghost", protocol.STATUS),
                                       json.dumps({"job": job, "state": "failed", "boot": 1, "seq": 1}), qos=1))
            close(ghost)

            first = a.status(job, "downloading", progress=0.25, bytes=256, total=1000)
            a.client.publish(a.topic(protocol.STATUS), json.dumps(first), qos=1)  # same boot/seq again
            b.status(job, "failed", code="E_TIMEOUT")               # not b's job: event only, marked
            a.status(job, "rejected", code=protocol.E_BAD_CHUNK)   # rejected: event only
            await wait_until_async(lambda: len(device_history(store, a.id)) == 2
                        and device_history(store, b.id, include_ignored=True), what="statuses")
            await asyncio.sleep(0.2)
            row = job_row()
            assert (row.state, row.progress, row.code) == ("downloading", 0.25, None)
            assert center.duplicates == 1 and center.garbage == 6
            a.status(job, "failed", code=protocol.E_TIMEOUT, reason="stalled")
            await wait_until_async(lambda: center.job_states(dep.id)[a.id] == "failed", what="failed")
            await wait_until_async(lambda: deployment_summary(store, dep.id)["state"] == "done", what="done")
            a.request(job, 0, 1, 256)  # a finished job is not served any more
            await asyncio.sleep(0.2)
            assert len(a.chunks) == 1 and center.requests == 1
            return center
        finally:
            await center.stop()
            a.stop(), b.stop()

    center = run(scenario())
    assert [(e.state, e.seq) for e in device_history(store, a.id)] == [("downloading", 1), ("rejected", 2),
                                                                       ("failed", 3)]
    assert device_history(store, b.id) == []  # it took no effect
    (event,) = device_history(store, b.id, include_ignored=True)
    assert (event.job_id, event.state, event.ignored) == (job, "failed", "other_device")
    with store.session() as s:
        assert s.get(Device, "ghost") is None
        assert s.scalar(select(Job.bytes_served).where(Job.id == job)) == len(image) - 768
        assert s.get(Job, job).code == protocol.E_TIMEOUT


def test_statuses_queued_while_center_is_away(lite_store, broker, key, tmp_path):
    """Persistent session: statuses published while the center is down arrive when it is back."""
    store = lite_store
    rel = create_release(store, tmp_path / "blobs", key, os.urandom(300), "3.0.0", ["unix"])
    dev = add_device(store, broker, key, auto=False)
    client_id = uid("fota-center")

    async def scenario():
        center = ControlCenter(store, broker.server_url, tmp_path / "blobs", client_id=client_id, poll_interval=0.05,
                               signer=Signer(SERVER_KEY))
        await center.start()
        dev.start()
        dep = create_deployment(store, rel, device_ids=[dev.id])
        await wait_until_async(lambda: dev.commands, what="command")
        await center.stop()
        job = dep.jobs[0].id
        dev.status(job, "downloading", progress=0.0)
        dev.status(job, "failed", code=protocol.E_HW_MISMATCH)
        await asyncio.sleep(0.2)
        center = ControlCenter(store, broker.server_url, tmp_path / "blobs", client_id=client_id, poll_interval=0.05,
                               signer=Signer(SERVER_KEY))
        await center.start()
        try:
            await wait_until_async(lambda: center.job_states(dep.id)[dev.id] == "failed", what="queued statuses")
        finally:
            await center.stop()
            dev.stop()

    run(scenario())
    assert [e.state for e in device_history(store, dev.id)] == ["downloading", "failed"]
