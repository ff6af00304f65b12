"""The attack suite: real Mosquitto, real MicroPython devices, real control center.

Each case asserts the precise status the device reports, and that it still runs, and reports,
its old version. docs/security.md lists these tests next to the attack and the defence.
"""
from __future__ import annotations

import json
import os
import threading
import time

from sqlalchemy import select

from fota.device import protocol as P
from fota.examples import hello_files
from fota.server import workers
from fota.server.center import CLIENT_ID
from fota.server.center import jobs as center_jobs
from fota.server.center.chunks import ChunkServer
from fota.server.center.connection import CenterConnection
from fota.server.broker import SERVER_USER
from fota.server.deployments import create_deployment
from fota.server.releases import create_release, update_command
from fota.server.store import StatusEvent
from fota.testkit.center import CenterThread
from fota.testkit.checked_mqtt import acknowledged, close, connect
from fota.testkit.fleet import Fleet
from fota.tools.waiting import wait_until
from fota.tools.bundle import pack_files
from fota.tools.keyring import Signer
from fota.tools.signing import generate_private_key

# Short transfer deadlines, so that stalls and endless data end within the test.
FAST = {"chunk_timeout_ms": 500, "stall_timeout_ms": 3000}


def _release(fleet, version, *, counter=0, padding=0, hw=("unix",)):
    files = hello_files(version)
    if padding:
        files["blob.bin"] = os.urandom(padding)
    return create_release(fleet.store, fleet.blobs, fleet.key, pack_files(files), version, list(hw), counter=counter)


def _outcome(fleet, dev, job, states=("failed", "rejected")):
    return wait_until(lambda: [s for s in fleet.spy.of(dev, job) if s["state"] in states], what=f"job {job} outcome")[0]


def _assert_unharmed(fleet, dev, version="1.0.0"):
    """Still running (never crashed, no reboot into the attack), on the old version, and saying so."""
    time.sleep(0.3)
    proc = fleet.devices[dev]
    assert proc.pid is not None and all(code == 3 for code in proc.exits), proc.log_text()[-2000:]
    assert fleet.running_version(dev) == version
    row = fleet.device_row(dev)
    assert row.online and row.version == version and row.inventory["version"] == version


def _device(fleet, dev, **settings):
    fleet.add_device(dev, **settings)
    fleet.wait_online(dev)
    return dev


def test_attack_forged_signature(fleet):
    dev = _device(fleet, "atk-forged")
    rel = _release(fleet, "2.0.0")
    env = json.loads(update_command(501, dev, rel, fleet.signer))
    env["sig"] = env["sig"][:-4] + ("0000" if env["sig"][-4:] != "0000" else "1111")
    fleet.spy.publish(dev, P.CMD, json.dumps(env))
    st = _outcome(fleet, dev, 501)
    assert (st["state"], st["code"]) == ("rejected", P.E_BAD_SIGNATURE)
    _assert_unharmed(fleet, dev)


def test_attack_valid_signature_by_uncertified_key(fleet):
    dev = _device(fleet, "atk-uncert")
    rogue = Signer(generate_private_key())
    rel = create_release(fleet.store, fleet.blobs, rogue.key, pack_files(hello_files("6.6.6")), "6.6.6", ["unix"])
    fleet.spy.publish(dev, P.CMD, update_command(502, dev, rel, rogue))
    st = _outcome(fleet, dev, 502)
    assert (st["state"], st["code"]) == ("rejected", P.E_UNKNOWN_KEY)
    # Even inside an authentic command, a manifest by the rogue key is refused.
    fleet.spy.publish(dev, P.CMD, update_command(503, dev, rel, fleet.signer))
    st = _outcome(fleet, dev, 503)
    assert (st["state"], st["code"]) == ("failed", P.E_UNKNOWN_KEY)
    _assert_unharmed(fleet, dev)


def test_attack_revoked_key_after_rotation_without_reflash(fleet):
    dev = _device(fleet, "atk-revoked")
    old = fleet.signer
    old_release = _release(fleet, "2.0.0")
    new = fleet.keyring.rotate()  # new signing key certified by the root; the old one revoked
    pushed = fleet.run(fleet.center.center.set_keys(new, fleet.keyring.keys_update()))
    assert pushed >= 1
    wait_until(lambda: [s for s in fleet.spy.of(dev) if s["state"] == "keys" and s["keys"] == 2], what="key update")
    wait_until(lambda: fleet.device_row(dev).inventory.get("keys") == 2, what="inventory with keys v2")
    # The rotated key updates the device for real (no reflash)...
    fleet.signer = new
    rel = create_release(fleet.store, fleet.blobs, new.key, pack_files(hello_files("2.1.0")), "2.1.0", ["unix"])
    dep = create_deployment(fleet.store, rel, device_ids=[dev])
    assert fleet.wait_job(dep.jobs[0].id).state == "confirmed"
    fleet.wait_online(dev, version="2.1.0")
    # ...and the stolen old key can no longer sign commands, nor releases.
    fleet.spy.publish(dev, P.CMD, update_command(601, dev, old_release, old))
    assert (_outcome(fleet, dev, 601)["code"]) == P.E_KEY_REVOKED
    fleet.spy.publish(dev, P.CMD, update_command(602, dev, old_release, new))
    st = _outcome(fleet, dev, 602)
    assert (st["state"], st["code"]) == ("failed", P.E_KEY_REVOKED)
    _assert_unharmed(fleet, dev, "2.1.0")
    # Replaying the key update changes nothing.
    fleet.spy.publish(dev, P.CMD, fleet.keyring.keys_update())
    wait_until(lambda: [s for s in fleet.spy.of(dev) if s["code"] == P.E_STALE_KEYS], what="stale keys")


def test_attack_downgrade_below_security_counter(fleet):
    dev = _device(fleet, "atk-down")
    rel = _release(fleet, "3.0.0", counter=5)
    dep = create_deployment(fleet.store, rel, device_ids=[dev])
    assert fleet.wait_job(dep.jobs[0].id).state == "confirmed"
    fleet.wait_online(dev, version="3.0.0")
    assert fleet.boot_record(dev)["counter"] == 5
    old = _release(fleet, "2.9.9", counter=4)
    dep = create_deployment(fleet.store, old, device_ids=[dev])
    j = fleet.wait_job(dep.jobs[0].id)
    assert (j.state, j.code) == ("failed", P.E_DOWNGRADE)
    _assert_unharmed(fleet, dev, "3.0.0")
    # The documented way back: the old code re-released with a counter not lower.
    again = _release(fleet, "2.9.9-rerelease", counter=5)
    dep = create_deployment(fleet.store, again, device_ids=[dev])
    assert fleet.wait_job(dep.jobs[0].id).state == "confirmed"


def test_attack_replayed_old_command(fleet):
    dev = _device(fleet, "atk-replay")
    first = _release(fleet, "2.0.0")
    dep1 = create_deployment(fleet.store, first, device_ids=[dev])
    captured = update_command(dep1.jobs[0].id, dev, first, fleet.signer)
    assert fleet.wait_job(dep1.jobs[0].id).state == "confirmed"
    second = _release(fleet, "2.1.0")
    dep2 = create_deployment(fleet.store, second, device_ids=[dev])
    assert fleet.wait_job(dep2.jobs[0].id).state == "confirmed"
    fleet.wait_online(dev, version="2.1.0")
    fleet.spy.publish(dev, P.CMD, captured)  # replayed later: would downgrade to 2.0.0
    st = wait_until(lambda: [s for s in fleet.spy.of(dev, dep1.jobs[0].id) if s["state"] == "rejected"], what="replay")
    assert st[0]["code"] == P.E_STALE_JOB
    _assert_unharmed(fleet, dev, "2.1.0")


def test_attack_command_signed_90_days_ago(fleet):
    """A command captured (or stuck in a queue) long ago, validly signed, with a job id the device
    never saw: its `exp` passed long before the device's trusted time, so it is refused E_EXPIRED
    and nothing is written."""
    dev = _device(fleet, "atk-old")
    rel = _release(fleet, "2.0.0")
    long_ago = int(time.time()) - 90 * 86400
    fleet.spy.publish(dev, P.CMD, update_command(9000, dev, rel, fleet.signer, now=long_ago))
    st = _outcome(fleet, dev, 9000)
    assert (st["state"], st["code"]) == ("rejected", P.E_EXPIRED)
    assert not (fleet.root(dev) / "journal.json").exists()
    _assert_unharmed(fleet, dev)
    assert json.loads((fleet.root(dev) / "agent.json").read_text())["last_job"] == 0  # nor its job id


def test_attack_command_for_device_a_sent_to_device_b(fleet):
    a = _device(fleet, "atk-a")
    b = _device(fleet, "atk-b")
    rel = _release(fleet, "2.0.0")
    fleet.spy.publish(b, P.CMD, update_command(701, a, rel, fleet.signer))
    st = _outcome(fleet, b, 701)
    assert (st["state"], st["code"]) == ("rejected", P.E_WRONG_DEVICE)
    _assert_unharmed(fleet, b)


def test_attack_manifest_of_x_with_chunks_of_y(fleet, monkeypatch):
    dev = _device(fleet, "atk-mix")
    x = _release(fleet, "2.0.0", padding=8000)
    y = _release(fleet, "2.0.1", padding=8000)
    assert x.size == y.size
    real = center_jobs.read_blob
    monkeypatch.setattr(center_jobs, "read_blob", lambda rel: real(y) if rel.version == "2.0.0" else real(rel))
    dep = create_deployment(fleet.store, x, device_ids=[dev])
    j = fleet.wait_job(dep.jobs[0].id)
    assert (j.state, j.code) == ("failed", P.E_HASH_MISMATCH)
    _assert_unharmed(fleet, dev)


def test_attack_endless_data_beyond_the_signed_size(fleet, monkeypatch):
    dev = _device(fleet, "atk-endless", **FAST)
    rel = _release(fleet, "2.0.0", padding=5000)
    real = center_jobs.read_blob
    monkeypatch.setattr(center_jobs, "read_blob",
                        lambda r: real(r) + os.urandom(300_000) if r.version == "2.0.0" else real(r))
    dep = create_deployment(fleet.store, rel, device_ids=[dev])
    j = fleet.wait_job(dep.jobs[0].id, timeout=60)
    assert (j.state, j.code) == ("failed", P.E_TIMEOUT)
    assert any(s["code"] == P.E_BAD_CHUNK for s in fleet.spy.of(dev, dep.jobs[0].id))
    image = fleet.root(dev) / "slots" / "b" / "image.bin"
    assert not image.exists() or image.stat().st_size <= rel.size  # never wrote past the signed size
    _assert_unharmed(fleet, dev)


def test_attack_stalled_transfer(fleet, monkeypatch):
    dev = _device(fleet, "atk-stall", **FAST)
    rel = _release(fleet, "2.0.0", padding=100_000)
    served = []
    real_serve = ChunkServer.serve

    async def serve_then_stall(self, device_id, payload):
        if not served:  # a slow-retrieval attacker: one window of data, then nothing
            served.append(payload)
            await real_serve(self, device_id, payload)
    monkeypatch.setattr(ChunkServer, "serve", serve_then_stall)
    dep = create_deployment(fleet.store, rel, device_ids=[dev])
    j = fleet.wait_job(dep.jobs[0].id, timeout=60)
    assert (j.state, j.code) == ("failed", P.E_TIMEOUT) and "no chunk for" in j.reason
    _assert_unharmed(fleet, dev)


def test_attack_wrong_hardware_type(fleet):
    dev = _device(fleet, "atk-hw")
    rel = _release(fleet, "2.0.0", hw=("esp32",))
    fleet.spy.publish(dev, P.CMD, update_command(801, dev, rel, fleet.signer))
    st = _outcome(fleet, dev, 801)
    assert (st["state"], st["code"]) == ("failed", P.E_HW_MISMATCH)
    _assert_unharmed(fleet, dev)


def _as_device(fleet, dev):
    """Device `dev`'s stolen credentials, used from another machine (any client id it likes)."""
    return connect(fleet.broker, dev, fleet.passwords[dev], f"stolen-{dev}-{time.monotonic_ns()}")


def test_attack_device_credentials_publish_command_to_another_device(fleet):
    # A's account only, A itself switched off: its client id is its username, so a running A and
    # the stolen session would take the id from each other in turn.
    a = "atk-cred-a"
    fleet.add_device(a, start=False)
    b = _device(fleet, "atk-cred-b")
    rel = _release(fleet, "2.0.0")
    stolen, _ = _as_device(fleet, a)
    try:
        # A validly signed command (captured elsewhere), pushed with A's broker account.
        acknowledged(stolen.publish(P.topic(b, P.CMD), update_command(901, b, rel, fleet.signer), qos=1))
        time.sleep(2.0)
        assert fleet.spy.of(b, 901) == []  # the broker never delivered it
        assert fleet.running_version(b) == "1.0.0"
    finally:
        stolen.disconnect()
        stolen.loop_stop()


def test_attack_device_subscribes_to_another_devices_topics(fleet):
    a = "atk-sub-a"
    fleet.add_device(a, start=False)  # the account only (see above)
    b = _device(fleet, "atk-sub-b")
    spy_a, got = _as_device(fleet, a)
    try:
        spy_a.subscribe([(f"fota/v1/{b}/#", 1), ("fota/v1/+/cmd", 1), ("#", 1)])
        time.sleep(0.3)
        rel = _release(fleet, "2.0.0")
        dep = create_deployment(fleet.store, rel, device_ids=[b])
        assert fleet.wait_job(dep.jobs[0].id).state == "confirmed"
        assert [t for t in got if f"/{b}/" in t] == []  # nothing of B's reached A
    finally:
        spy_a.disconnect()
        spy_a.loop_stop()


# ---------------------------------------------------------------- session takeover by client id

def _record_disconnects(monkeypatch) -> list[str]:
    """Client ids of the control centers (and workers) the broker disconnected."""
    kicked: list[str] = []
    real = CenterConnection._on_disconnect

    def on_disconnect(self, client, packet, exc=None):
        if not self.closing:
            kicked.append(self.client_id)
        return real(self, client, packet, exc)
    monkeypatch.setattr(CenterConnection, "_on_disconnect", on_disconnect)
    return kicked


def _forget_session(broker, client_id):
    """Delete a persistent session this test made on the session's broker (clean connect)."""
    c, _ = connect(broker, SERVER_USER, broker.users[SERVER_USER], client_id, port=broker.service_port)
    close(c)


def test_attack_device_credentials_take_over_other_client_ids(tmp_path, broker, sqlite_url, monkeypatch):
    """A device's account asks for another device's client id, the control center's and a
    worker's, with a clean session: the broker would kick the owner and destroy its session
    (a sleeping device's queued command lost). Its client id is its own username instead."""
    kicked = _record_disconnects(monkeypatch)
    # The real center id (not a test's own); commands go out to sleeping devices too.
    fleet = Fleet(tmp_path, broker, sqlite_url, client_id=CLIENT_ID, require_online=False)
    worker = None
    try:
        # A worker beside the center, only to have a worker's id to attack (both store B's
        # statuses: the second write of each is refused as a duplicate, and logged).
        worker = CenterThread(fleet.store, broker.server_url, fleet.blobs, signer=fleet.signer, share_group="atk",
                              client_id=workers.new_worker_id(), campaign_interval=None).start()
        a = "atk-ids-a"
        fleet.add_device(a, start=False)
        b = _device(fleet, "atk-ids-b")
        fleet.devices[b].stop()  # B sleeps; its persistent session keeps what comes for it
        wait_until(lambda: not fleet.device_row(b).online, what=f"{b} offline")
        dep = create_deployment(fleet.store, _release(fleet, "2.0.0"), device_ids=[b])
        wait_until(lambda: fleet.job(dep.jobs[0].id).state == "sent", what="the command queued for B")
        time.sleep(0.3)
        for victim in (b, CLIENT_ID, worker.center.client_id):
            stolen, _ = connect(broker, a, fleet.passwords[a], victim)
            time.sleep(0.5)
            close(stolen)
        fleet.devices[b].start()  # B wakes up: its command is still there
        j = fleet.wait_job(dep.jobs[0].id, timeout=30)
        assert j.state == "confirmed", (j.state, j.code, j.reason)
        assert kicked == []  # neither the center nor the worker lost its connection
    finally:
        if worker is not None:
            worker.stop()
        fleet.close()
        _forget_session(broker, CLIENT_ID)


def test_attack_takeover_loop_of_the_center_id_loses_no_acknowledged_status(tmp_path, broker, sqlite_url,
                                                                              monkeypatch):
    """A device publishes 120 QoS 1 statuses while another device's account connects again and
    again with the control center's client id: every status the device got a PUBACK for is
    stored (a takeover with a clean session used to drop the statuses queued for the center)."""
    kicked = _record_disconnects(monkeypatch)
    fleet = Fleet(tmp_path, broker, sqlite_url, client_id=CLIENT_ID)
    try:
        a, c = "atk-loop-a", "atk-loop-c"
        for dev in (a, c):
            fleet.add_device(dev, start=False)
        stop = threading.Event()
        attempts = []

        def take_over():
            while not stop.is_set():
                stolen, _ = connect(broker, a, fleet.passwords[a], CLIENT_ID)
                attempts.append(1)
                time.sleep(0.02)
                close(stolen)
        attacker = threading.Thread(target=take_over, daemon=True)
        attacker.start()
        device, _ = connect(broker, c, fleet.passwords[c], c, clean=False)
        acked = set()
        try:
            for seq in range(1, 121):
                msg = {"job": None, "state": "idle", "code": None, "reason": None, "boot": 1, "seq": seq}
                info = device.publish(P.topic(c, P.STATUS), json.dumps(msg), qos=1)
                info.wait_for_publish(5)
                if info.is_published():
                    acked.add(seq)
                time.sleep(0.01)
        finally:
            stop.set()
            attacker.join(10)
            close(device)
        assert len(attempts) >= 10 and len(acked) == 120

        def stored():
            with fleet.store.session() as s:
                return set(s.scalars(select(StatusEvent.seq).where(StatusEvent.device_id == c)))
        deadline = time.monotonic() + 15
        while not acked <= stored() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sorted(acked - stored()) == [] and kicked == []
    finally:
        fleet.close()
        _forget_session(broker, CLIENT_ID)
