"""End to end: control center -> real Mosquitto -> real MicroPython device processes, and back."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from fota.device import protocol as P
from fota.examples import hello_files
from fota.server.center import jobs as center_jobs
from fota.server.deployments import create_deployment, device_history
from fota.server.releases import create_release, update_command
from fota.testkit.brokerspy import BrokerSpy
from fota.testkit.fleet import Fleet
from fota.tools.waiting import wait_until
from fota.tools.bundle import pack_files
from fota.tools.keyring import Signer
from fota.tools.signing import generate_private_key
from conftest import both_interpreters


def _release(fleet, version, *, broken=False, hw=("unix",), padding=0, key=None):
    files = hello_files(version, broken=broken)
    if padding:
        files["blob.bin"] = os.urandom(padding)
    return create_release(fleet.store, fleet.blobs, key or fleet.key, pack_files(files), version, list(hw))


def _states(fleet, device, job):
    return [s["state"] for s in fleet.spy.of(device, job)]


def _slot_b_files(fleet, device):
    b = fleet.root(device) / "slots" / "b"
    return sorted(p.name for p in b.rglob("*")) if b.exists() else []


def _slot_tree(fleet, device):
    b = fleet.root(device) / "slots" / "b"
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in b.rglob("*")}


@both_interpreters
def test_happy_path_three_devices_confirm_after_reboot(fleet):
    ids = ["happy-1", "happy-2", "happy-3"]
    for d in ids:
        fleet.add_device(d)
    fleet.wait_online(*ids)
    rel = _release(fleet, "1.1.0", padding=20000)
    dep = create_deployment(fleet.store, rel, device_ids=ids)
    for job in dep.jobs:
        j = fleet.wait_job(job.id)
        assert j.state == "confirmed", (j.state, j.code, j.reason)
    fleet.wait_online(*ids, version="1.1.0")
    for job in dep.jobs:
        d = job.device_id
        assert fleet.running_version(d) == "1.1.0"
        assert fleet.devices[d].reboots == 1
        history = [e.state for e in device_history(fleet.store, d) if e.job_id == job.id]
        # Every state, in order; progress repeats "downloading".
        compact = [s for i, s in enumerate(history) if i == 0 or s != history[i - 1]]
        assert compact == ["downloading", "verifying", "installing", "rebooting", "trial", "confirmed"]
        assert "hello app 1.1.0 started" in fleet.devices[d].log_text()


def _command(fleet, rel, job, device, signer=None, **changes):
    """An update command for `device`, signed by `signer` (default: the fleet's signing key)."""
    body = json.loads(json.loads(update_command(job, device, rel, fleet.signer))["body"])
    body.update(changes)
    return (signer or fleet.signer).command(body)


def _forge(envelope: bytes) -> bytes:
    env = json.loads(envelope)
    env["sig"] = env["sig"][:-2] + ("00" if env["sig"][-2:] != "00" else "01")
    return json.dumps(env).encode()


def test_forged_and_foreign_signatures_and_flipped_chunk_are_rejected(fleet, monkeypatch):
    dev = "victim-1"
    fleet.add_device(dev)
    fleet.wait_online(dev)
    # 1. a bit flipped in one chunk on the way: the chunk server's copy is altered (the
    #    stored blob is checked against its manifest when read, so corrupt it after that).
    flipped = _release(fleet, "2.0.3", padding=9000)
    real_read_blob = center_jobs.read_blob

    def read_flipped(release):
        data = bytearray(real_read_blob(release))
        if release.version == "2.0.3":
            data[5000] ^= 0x10
        return bytes(data)
    monkeypatch.setattr(center_jobs, "read_blob", read_flipped)
    dep = create_deployment(fleet.store, flipped, device_ids=[dev])
    j = fleet.wait_job(dep.jobs[0].id)
    assert (j.state, j.code) == ("failed", P.E_HASH_MISMATCH)
    assert "app" not in _slot_b_files(fleet, dev)  # the slot holds no bootable app
    slot_b_before = _slot_tree(fleet, dev)
    # Injected commands use job ids above the control center's.
    rel = _release(fleet, "2.0.0")
    # 2. the command's signature is forged.
    fleet.spy.publish(dev, P.CMD, _forge(_command(fleet, rel, 1001, dev)))
    # 3. signed by another key, which the device's root never certified.
    fleet.spy.publish(dev, P.CMD, _command(fleet, rel, 1002, dev, signer=Signer(generate_private_key())))
    # 4. an authentic command carrying a manifest edited after it was signed.
    fleet.spy.publish(dev, P.CMD, _command(fleet, rel, 1003, dev, manifest=rel.manifest.replace('"2.0.0"', '"2.0.1"')))
    codes = {}
    for job in (1001, 1002, 1003):
        st = wait_until(lambda: [s for s in fleet.spy.of(dev, job) if s["state"] in ("failed", "rejected")],
                        what=f"job {job}")
        codes[job] = (st[0]["state"], st[0]["code"])
    assert codes == {1001: ("rejected", P.E_BAD_SIGNATURE), 1002: ("rejected", P.E_UNKNOWN_KEY),
                     1003: ("failed", P.E_BAD_SIGNATURE)}
    assert _slot_tree(fleet, dev) == slot_b_before  # nothing written for a bad signature

    time.sleep(0.5)
    assert fleet.running_version(dev) == "1.0.0" and fleet.devices[dev].reboots == 0
    assert fleet.boot_record(dev)["trial"] is None
    assert fleet.device_row(dev).version == "1.0.0" and fleet.device_row(dev).online


def test_wrong_hardware_type_rejected_and_nothing_written(fleet):
    dev = "hw-1"
    fleet.add_device(dev)
    fleet.wait_online(dev)
    rel = _release(fleet, "3.0.0", hw=("esp32",))
    fleet.spy.publish(dev, P.CMD, _command(fleet, rel, 2001, dev))
    st = wait_until(lambda: [s for s in fleet.spy.of(dev, 2001) if s["state"] == "failed"], what="failure")
    assert st[0]["code"] == P.E_HW_MISMATCH and "esp32" in st[0]["reason"]
    assert _slot_b_files(fleet, dev) == []
    assert not (fleet.root(dev) / "journal.json").exists()
    assert fleet.running_version(dev) == "1.0.0"


@both_interpreters
def test_failing_health_check_reverts_after_three_trial_boots(fleet):
    dev = "sick-1"
    fleet.add_device(dev)
    fleet.wait_online(dev)
    rel = _release(fleet, "4.0.0", broken=True)
    dep = create_deployment(fleet.store, rel, device_ids=[dev])
    j = fleet.wait_job(dep.jobs[0].id, timeout=90)
    assert (j.state, j.code) == ("reverted", P.E_HEALTH)
    assert "trial boot failed 3 times" in j.reason and "sensor init failed" in j.reason
    assert fleet.running_version(dev) == "1.0.0"
    fleet.wait_online(dev, version="1.0.0")
    # One reboot into the trial, three failed trial boots each rebooting, then the old slot.
    assert fleet.devices[dev].reboots == 4


@both_interpreters
def test_kill_during_download_resumes_from_checkpoint(tmp_path, broker, sqlite_url, interpreter):
    # Small chunks and windows make the transfer long enough to kill it halfway.
    fleet = Fleet(tmp_path, broker, sqlite_url, chunk=512, window=4, interpreter=interpreter)
    try:
        dev = "cut-1"
        fleet.add_device(dev)
        fleet.wait_online(dev)
        rel = _release(fleet, "5.0.0", padding=400_000)
        dep = create_deployment(fleet.store, rel, device_ids=[dev])
        job = dep.jobs[0].id

        def progressed():
            ds = [s for s in fleet.spy.of(dev, job) if s["state"] == "downloading"]
            return ds and ds[-1]["bytes"] >= rel.size * 0.3 and ds[-1]
        at_kill = wait_until(progressed, timeout=60, interval=0.01, what="30% downloaded")
        assert fleet.devices[dev].kill()
        killed_at = time.monotonic()
        j = fleet.wait_job(job, timeout=120)
        assert j.state == "confirmed", (j.state, j.code, j.reason)
        after = [r for t, d, r in fleet.spy.requests if d == dev and t > killed_at + 0.05 and r["job"] == job]
        requested_after = sum(min(r["count"] * r["chunk"], rel.size - r["first"] * r["chunk"]) for r in after)
        remaining = rel.size - at_kill["bytes"]
        assert 0 < requested_after < remaining + 4 * 512
        assert fleet.running_version(dev) == "5.0.0"
    finally:
        fleet.close()


def malformed_commands(signer, dev):
    return [
        (b"this is not json", P.E_BAD_COMMAND),
        (b'{"type": "update", "job": 12}', P.E_BAD_COMMAND),  # not a signed envelope
        (signer.command({"type": "update", "job": "12", "device": dev}), P.E_BAD_COMMAND),
        (signer.command({"type": "update", "job": 12, "device": dev, "manifest": []}), P.E_BAD_COMMAND),
        (signer.command({"type": "format-flash", "job": 13, "device": dev}), P.E_UNKNOWN_COMMAND),
        (b'{"x": "' + b"A" * 9000 + b'"}', P.E_OVERSIZE),
        (b'{"x": "' + b"A" * 60000 + b'"}', P.E_OVERSIZE),  # dropped unread by the MQTT client
    ]


def test_malformed_messages_get_clear_errors_and_change_nothing(fleet):
    dev = "fuzz-1"
    proc = fleet.add_device(dev)
    fleet.wait_online(dev)
    cases = malformed_commands(fleet.signer, dev)
    for payload, _ in cases:
        fleet.spy.publish(dev, P.CMD, payload)
    for chunk in (b"", b"\x00\x01", b"\xff" * 40, b"\x00" * 50000):
        fleet.spy.publish(dev, P.DATA, chunk, qos=0)
    expected = [code for _, code in cases]
    got = wait_until(lambda: (c := [s["code"] for s in fleet.spy.of(dev) if s["state"] == "rejected"
                                    and s["code"] != P.E_BAD_CHUNK]) and len(c) >= len(expected) and c,
                     what="rejections")
    assert got == expected
    for s in fleet.spy.of(dev):
        assert s["state"] == "rejected" and s["reason"] and s["current"] == "idle"
    time.sleep(0.5)
    assert proc.starts == 1 and proc.exits == []
    assert fleet.running_version(dev) == "1.0.0"
    assert json.loads((fleet.root(dev) / "agent.json").read_text())["last_job"] == 0
    # The device still takes a real update afterwards.
    rel = _release(fleet, "6.0.0")
    dep = create_deployment(fleet.store, rel, device_ids=[dev])
    assert fleet.wait_job(dep.jobs[0].id).state == "confirmed"


def test_same_command_twice_runs_the_update_once(fleet):
    dev = "dup-1"
    fleet.add_device(dev)
    fleet.wait_online(dev)
    rel = _release(fleet, "7.0.0", padding=30000)
    dep = create_deployment(fleet.store, rel, device_ids=[dev])
    job = dep.jobs[0].id
    wait_until(lambda: fleet.spy.of(dev, job), what="first status")
    redelivery = update_command(job, dev, rel, fleet.signer)  # the same command again (QoS 1)
    fleet.spy.publish(dev, P.CMD, redelivery)
    assert fleet.wait_job(job).state == "confirmed"
    fleet.wait_online(dev, version="7.0.0")
    dup = wait_until(lambda: [s for s in fleet.spy.of(dev, job) if s["code"] == P.E_DUPLICATE_JOB],
                     what="duplicate notice")
    assert dup[0]["state"] == "rejected"
    assert fleet.devices[dev].reboots == 1
    assert _states(fleet, dev, job).count("confirmed") == 1
    # After the reboot a third delivery is still refused.
    fleet.spy.publish(dev, P.CMD, redelivery)
    wait_until(lambda: len([s for s in fleet.spy.of(dev, job) if s["code"] == P.E_DUPLICATE_JOB]) == 2,
               what="second duplicate notice")
    assert fleet.devices[dev].reboots == 1


@both_interpreters
def test_sim_flash_backend_installs_a_raw_image(fleet):
    # The same agent with the `sim` NOR-flash backend takes raw images instead of bundles.
    dev = "flash-1"
    slot_size = 128 * 1024
    fleet.add_device(dev, hardware="sim-board", backend="sim", capacity=slot_size)
    fleet.wait_online(dev)
    image = os.urandom(70_001)
    rel = create_release(fleet.store, fleet.blobs, fleet.key, image, "8.0.0", ["sim-board"], kind="image")
    dep = create_deployment(fleet.store, rel, device_ids=[dev])
    j = fleet.wait_job(dep.jobs[0].id)
    assert j.state == "confirmed", (j.state, j.code, j.reason)
    fleet.wait_online(dev, version="8.0.0")
    flash = (fleet.root(dev) / "flash.bin").read_bytes()
    assert flash[slot_size:slot_size + len(image)] == image
    rec = fleet.boot_record(dev)
    assert rec["active"] == "b" and rec["versions"] == {"a": "1.0.0", "b": "8.0.0"}
    inv = fleet.device_row(dev).inventory
    assert inv["backend"] == "sim" and inv["active"] == "b" and inv["slots"]["b"] == "8.0.0"
    # A bundle is not installable by a flash backend: refused before anything is written.
    bundle_rel = _release(fleet, "8.1.0", hw=("sim-board",))
    dep = create_deployment(fleet.store, bundle_rel, device_ids=[dev])
    j = fleet.wait_job(dep.jobs[0].id)
    assert (j.state, j.code) == ("failed", P.E_BAD_MANIFEST) and "kind" in j.reason


def test_encrypted_release_is_decrypted_by_the_device_only(fleet):
    dev = "secret-1"
    fleet.add_device(dev)
    fleet.wait_online(dev)
    files = hello_files("9.0.0")
    files["secret.txt"] = b"the launch code is 0000 " * 100
    rel = create_release(fleet.store, fleet.blobs, fleet.key, pack_files(files), "9.0.0", ["unix"], encrypt=True,
                         kek=fleet.kek)
    blob = Path(rel.blob_path).read_bytes()
    assert b"launch code" not in blob and b"VERSION" not in blob  # confidential on the wire and at rest
    assert json.loads(rel.manifest)["enc"]["alg"] == "aes-256-cbc"
    dep = create_deployment(fleet.store, rel, device_ids=[dev])
    j = fleet.wait_job(dep.jobs[0].id)
    assert j.state == "confirmed", (j.state, j.code, j.reason)
    fleet.wait_online(dev, version="9.0.0")
    app = fleet.root(dev) / "slots" / fleet.boot_record(dev)["active"] / "app"
    assert (app / "secret.txt").read_bytes() == files["secret.txt"]
    # A device whose key does not unwrap the release key refuses it before writing.
    other = "secret-2"
    fleet.add_device(other, enc_key="00" * 32)
    fleet.wait_online(other)
    dep = create_deployment(fleet.store, rel, device_ids=[other])
    j = fleet.wait_job(dep.jobs[0].id)
    assert (j.state, j.code) == ("failed", P.E_DECRYPT)
    assert fleet.running_version(other) == "1.0.0"


class _OnlineAndStatusSpy(BrokerSpy):
    """One connection hearing a device's `online` flags and statuses, in the order it got them."""

    def __init__(self, broker, device):
        self.seen: list[tuple[str, object]] = []
        super().__init__(broker, name="online-spy", topics=[(P.topic(device, P.ONLINE), 1),
                                                            (P.topic(device, P.STATUS), 1)])

    def _on_message(self, client, userdata, msg):
        if msg.topic.endswith("/" + P.ONLINE):
            self.seen.append(("online", msg.payload))
        else:
            self.seen.append(("status", json.loads(msg.payload)["state"]))


def test_device_publishes_online_0_before_its_clean_disconnect(fleet):
    """A reboot ends the connection with a DISCONNECT, which suppresses the will: the device says
    `online 0` itself first (protocol §1), so the center never takes a rebooting device for online."""
    dev = "offline-1"
    fleet.add_device(dev)
    fleet.wait_online(dev)
    spy = _OnlineAndStatusSpy(fleet.broker, dev)
    try:
        dep = create_deployment(fleet.store, _release(fleet, "1.2.0"), device_ids=[dev])
        assert fleet.wait_job(dep.jobs[0].id).state == "confirmed"
        fleet.wait_online(dev, version="1.2.0")
        seen = list(spy.seen)
    finally:
        spy.close()
    assert fleet.devices[dev].reboots == 1
    # The flag goes to 0 after the last status of the old run; the trial boot reports `trial` and
    # `confirmed` first and then sets it to 1 (§1.1).
    rebooting = seen.index(("status", "rebooting"))
    confirmed = seen.index(("status", "confirmed"))
    assert [m for m in seen[rebooting:confirmed] if m[0] == "online"] == [("online", b"0")], seen
    assert ("online", b"1") in seen[confirmed:], seen
    assert fleet.device_row(dev).online
