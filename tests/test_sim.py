"""The fleet simulator against the session's real Mosquitto, a real SQLite store and the real
ControlCenter: simulated devices run the device's UpdateCore and boot selector."""
from __future__ import annotations

import asyncio
import json
import os
import struct
import threading
import time

import pytest
from sqlalchemy import func, select

from fota.device import core as C
from fota.device import ecdsa
from fota.device import protocol as P
from fota.server.deployments import create_deployment
from fota.server.releases import create_release
from fota.server.store import Job, StatusEvent, Store
from fota.sim import FailurePlan, SimFleet, device_ids, provision
from fota.sim.device import SimDevice
from fota.sim.verify import fast_verify
from fota.testkit.center import CenterThread
from fota.testkit.faultproxy import UP, FaultProxy
from fota.tools.waiting import wait_until
from fota.tools.keyring import Keyring


IMAGE = 16 * 1024


class SimThread:
    """A SimFleet on its own event loop in a background thread."""

    def __init__(self, fleet: SimFleet):
        self.fleet = fleet
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def call(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self):
        self.thread.start()
        self.call(self.fleet.start())
        self.call(self.fleet.wait_connected(60), timeout=90)
        return self

    def stop(self):
        self.call(self.fleet.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def add_users(broker, passwords: dict[str, str]) -> None:
    """Give the session broker many accounts with one reload."""
    broker.add_users(passwords)


@pytest.fixture
def setup(tmp_path, broker, sqlite_url):
    keyring = Keyring(tmp_path / "keys")
    keyring.init()
    signer = keyring.signer()
    store = Store(sqlite_url)
    center = CenterThread(store, broker.server_url, tmp_path / "blobs", signer=signer,
                          keys_update=keyring.keys_update()).start()
    made = []

    def make(n, prefix, plan=None, **settings):
        ids = device_ids(n, prefix)
        passwords = provision(store, ids)
        add_users(broker, passwords)
        return start(passwords, plan, **settings)

    def start(passwords, plan=None, port=None, **settings):
        """A simulator over provisioned devices (again: a restarted simulator, counters from 1);
        port: where they connect (a fault proxy's), else the broker."""
        ids = list(passwords)
        fleet = SimFleet.build(passwords, host=broker.host, port=port or broker.port, root_key=keyring.root_public(),
                               trust=keyring.trust(), plan=plan, **settings)
        sim = SimThread(fleet).start()
        made.append(sim)
        fleet.passwords = passwords
        # A device that announces its nap shows offline while it sleeps (maybe already now)
        shown = [i for i in ids if fleet.devices[i].profile.sleep_at is None
                 or not fleet.devices[i].profile.announce_nap]
        wait_until(lambda: _online(store, shown), timeout=60, what=f"{len(shown)} simulated devices online")
        return fleet, ids

    def release(version, size=IMAGE):
        return create_release(store, tmp_path / "blobs", signer.key, os.urandom(size), version, ["sim"],
                              kind="image")

    make.start, make.made = start, made
    yield store, make, release
    for sim in made:
        sim.stop()
    center.stop()
    store.dispose()


def _online(store, ids, online=True):
    """Every one of ids shown online (online=False: offline) in the registry."""
    from fota.server.store import Device
    with store.session() as s:
        return s.scalar(select(func.count()).select_from(Device).where(Device.id.in_(ids), Device.online.is_(online))) == len(ids)


def _job_states(store, deployment_id):
    with store.session() as s:
        return dict(s.execute(select(Job.device_id, Job.state).where(Job.deployment_id == deployment_id,
                                                                      Job.kind == "update")).all())


def _all_terminal(store, deployment_id):
    states = _job_states(store, deployment_id)
    return states if states and all(v in P.TERMINAL_STATES for v in states.values()) else None


def test_fast_verify_agrees_with_the_device_verifier(tmp_path):
    keyring = Keyring(tmp_path / "keys")
    keyring.init()
    signer = keyring.signer()
    env = signer.command({"type": "inventory", "job": 1, "device": "d"})
    import json
    from binascii import unhexlify
    e = json.loads(env)
    pub = signer.public if hasattr(signer, "public") else None
    cert = keyring.trust()["certs"][0]
    root = keyring.root_public()
    cases = [(root, cert["body"].encode(), unhexlify(cert["sig"]))]
    body, sig = cases[0][1], cases[0][2]
    cases += [(root, body + b" ", sig), (root, body, sig[:-1] + bytes([sig[-1] ^ 1])), (root, body, sig[:63]),
              (root[:-1] + bytes([root[-1] ^ 1]), body, sig), (b"\x04" + b"\x00" * 64, body, sig),
              (root, body, b"\x00" * 64)]
    for args in cases:
        assert fast_verify(*args) == ecdsa.verify(*args)
    assert fast_verify(*cases[0]) is True


# ---- the shipped executor inside the simulator (no broker: the core's actions run in-process) ----

class _Client:
    """Stands in for the device's gmqtt client: keeps the statuses the device publishes."""

    def __init__(self):
        self.statuses = []

    def publish(self, topic, payload, qos=0, retain=False):
        if topic.endswith("/" + P.STATUS):
            self.statuses.append(json.loads(payload))


def _sim_device(backend="flash", versions=None):
    """A booted, connected simulated device; versions: the slots' versions in its boot record."""
    from test_core import ROOT_KEY, TRUST
    from fota.device import boot as bootrec
    from fota.tools import signing
    dev = SimDevice("sim-x", "pw", host="127.0.0.1", port=1, root_key=signing.public_key_bytes(ROOT_KEY),
                    trust=TRUST, backend=backend, capacity=16 * 1024)
    if versions:
        record = bootrec.new_record()
        record["versions"].update(versions)
        dev.storage["boot.json"] = json.dumps(record)
    dev.boot()
    dev.client = _Client()
    asyncio.run(dev.execute(dev.core.connected_()))
    return dev


def _update(image, job=1):
    from test_core import SIGNING_KEY, cmd, make_update
    return cmd(make_update(SIGNING_KEY, image, job=job, hw=("sim",), device="sim-x", chunk=256, window=4))


def _chunk(image, i, job=1):
    return struct.pack(P.CHUNK_HEADER, job, i) + image[i * 256:(i + 1) * 256]


def test_sim_boot_record_stops_naming_the_slot_it_writes_over():
    """docs/reliability.md, power cuts, fix 6: the slot's version goes from the boot record before
    the slot is written (the simulator's own copy of the executor had lost it)."""
    dev = _sim_device(versions={"a": "1.0.0", "b": "0.9.0"})
    assert dev.boot_record()["versions"] == {"a": "1.0.0", "b": "0.9.0"}
    asyncio.run(dev.execute(dev.core.command(_update(os.urandom(2048)))))
    assert dev.core.state == P.DOWNLOADING
    assert dev.boot_record()["versions"] == {"a": "1.0.0", "b": None}


@pytest.mark.parametrize("error, code", [("BundleError", P.E_BAD_BUNDLE), ("DecryptError", P.E_DECRYPT),
                                         ("DeltaError", P.E_DELTA), ("FlashError", P.E_INSTALL)])
def test_sim_install_failure_reports_the_runners_code(monkeypatch, error, code):
    """A slot that refuses the image at install: the simulated device reports the code the
    MicroPython runner reports for that error (fota.device.executor.install_error)."""
    from fota.device.aes import DecryptError
    from fota.device.bundle import BundleError
    from fota.device.delta import DeltaError
    from fota.device.slots.sim import FlashError
    raised = {"BundleError": BundleError, "DecryptError": DecryptError, "DeltaError": DeltaError,
              "FlashError": FlashError}[error]

    def refuse(*args):
        raise raised("refused")
    dev = _sim_device()
    monkeypatch.setattr(dev.backend, "finalize", refuse)
    image = os.urandom(1024)
    asyncio.run(dev.execute(dev.core.command(_update(image))))
    for i in range(4):
        asyncio.run(dev.execute(dev.core.chunk(_chunk(image, i))))
    (failed,) = [s for s in dev.client.statuses if s["state"] == P.FAILED]
    assert (failed["job"], failed["code"], failed["reason"]) == (1, code, error + ": refused")
    assert dev.core.state == P.IDLE and "journal.json" not in dev.storage


@pytest.mark.parametrize("backend", ["flash", "hash"])
def test_sim_reboot_mid_download_resumes_from_the_journal(backend):
    """A reboot after the first checkpoint (4 chunks): the new boot resumes from what the backend
    kept (the flash backend: the start of the sector holding the checkpoint, here chunk 0) and
    the image verifies and installs."""
    image = os.urandom(24 * 256)
    dev = _sim_device(backend)
    asyncio.run(dev.execute(dev.core.command(_update(image))))
    for i in range(6):
        asyncio.run(dev.execute(dev.core.chunk(_chunk(image, i))))
    assert json.loads(dev.storage["journal.json"])["pos"] == 4
    dev.boot()  # the reboot: a new core from what is stored
    dev.client = _Client()
    asyncio.run(dev.execute(dev.core.connected_()))
    assert dev.core.state == P.DOWNLOADING
    first = dev.core.next
    assert first == (0 if backend == "flash" else 4)
    for i in range(first, 23):
        asyncio.run(dev.execute(dev.core.chunk(_chunk(image, i))))
    actions = dev.core.chunk(_chunk(image, 23))
    states = [json.loads(a[2])["state"] for a in actions if a[0] == C.A_PUBLISH]
    assert states == [P.VERIFYING, P.INSTALLING]
    *before, install = actions
    assert install[0] == C.A_INSTALL
    for action in before:  # the last chunk's write
        if action[0] != C.A_PUBLISH:
            dev.executor.run(action)
    assert [a[0] for a in dev.executor.run(install)][:2] == [C.A_SET_TRIAL, C.A_JOURNAL]


def test_deployment_over_simulated_devices_all_confirm(setup):
    store, make, release = setup
    fleet, ids = make(100, "simok", backend="flash", capacity=64 * 1024)
    rel = release("2.0.0")
    dep = create_deployment(store, rel, device_ids=ids)
    states = wait_until(lambda: _all_terminal(store, dep.id), timeout=120, what="all jobs terminal")
    assert set(states.values()) == {P.CONFIRMED}
    assert all(d.running_version() == "2.0.0" for d in fleet.devices.values())
    # each device rebooted into the new image once: the core was rebuilt from stored state
    assert all(d.boots == 2 for d in fleet.devices.values())


def test_unhealthy_devices_revert(setup):
    store, make, release = setup
    fleet, ids = make(60, "simbad", plan=FailurePlan(unhealthy=0.2, seed=7))
    bad = {i for i, d in fleet.devices.items() if d.profile.unhealthy}
    assert len(bad) == 12
    dep = create_deployment(store, release("2.0.0"), device_ids=ids)
    states = wait_until(lambda: _all_terminal(store, dep.id), timeout=120, what="all jobs terminal")
    assert {i for i, s in states.items() if s == P.REVERTED} == bad
    assert {i for i, s in states.items() if s == P.CONFIRMED} == set(ids) - bad
    for i in bad:
        d = fleet.devices[i]
        assert d.running_version() == "1.0.0"
        assert d.boots == 2 + 3  # boot, 3 failed trial boots, boot of the old image
    with store.session() as s:
        codes = set(s.scalars(select(Job.code).where(Job.deployment_id == dep.id, Job.state == P.REVERTED)))
        reverted_events = s.scalar(select(func.count()).select_from(StatusEvent).where(StatusEvent.state == P.REVERTED,
                                                                                     StatusEvent.device_id.in_(bad)))
    assert codes == {P.E_HEALTH}
    assert reverted_events == len(bad)


def test_sleeping_device_gets_its_command_when_it_wakes(setup):
    """Sleepers nap as a board does (the retained `online 0` first): the registry shows them
    offline while they sleep, and the center holds their jobs until their `online 1` is back,
    so the broker queues nothing for them; woken, they get the update and confirm."""
    store, make, release = setup
    # asleep until the test wakes them (sleep_for: a bound only)
    plan = FailurePlan(sleepy=0.25, sleep_at=0.0, sleep_for=300.0, slow=0.25, chunk_delay=0.25, seed=3)
    # the devices' clock is the wall clock: their wake-up is compared with the jobs' sent_at
    fleet, ids = make(20, "simnap", plan=plan, clock=time.time)
    sim = make.made[-1]
    sleepers = [d for d in fleet.devices.values() if d.profile.sleep_at is not None]
    assert len(sleepers) == 5
    asleep = {d.id for d in sleepers}
    wait_until(lambda: all(d.slept and d.client is None for d in sleepers), timeout=30, what="sleepers asleep")
    wait_until(lambda: _online(store, asleep, online=False), timeout=30, what="sleepers shown offline")
    dep = create_deployment(store, release("2.0.0"), device_ids=ids)
    # the awake devices' jobs all done: the sender went past the sleepers' and held them
    wait_until(lambda: all(v in P.TERMINAL_STATES for i, v in _job_states(store, dep.id).items() if i not in asleep),
               timeout=120, what="the awake devices' jobs terminal")
    with store.session() as s:
        held = s.execute(select(Job.device_id, Job.state, Job.sent_at).where(Job.deployment_id == dep.id,
                                                                             Job.device_id.in_(asleep))).all()
    assert {(i, state, sent) for i, state, sent in held} == {(i, "pending", None) for i in asleep}, held
    assert not any(d.commands for d in sleepers)  # nothing reached them while they slept
    for d in sleepers:
        sim.loop.call_soon_threadsafe(d.wake)
    states = wait_until(lambda: _all_terminal(store, dep.id), timeout=120, what="all jobs terminal")
    assert set(states.values()) == {P.CONFIRMED}
    with store.session() as s:
        sent = dict(s.execute(select(Job.device_id, Job.sent_at).where(Job.deployment_id == dep.id)).all())
    for d in sleepers:
        # sent once it was back (its `online 1` after the wake-up), handled after it woke
        assert d.woke_at is not None and sent[d.id].timestamp() >= d.woke_at, (d.id, sent[d.id], d.woke_at)
        assert d.commands and d.commands[0] >= d.woke_at
    # slow links: every one of the image's chunks waited chunk_delay before it was handled
    # (2 s in all: several times what a 16 KiB update takes here)
    slow = [d for d in fleet.devices.values() if d.profile.chunk_delay]
    assert len(slow) == 5
    for d in slow:
        assert d.chunks >= IMAGE // 2048 and d.confirmed_at - d.commands[0] >= (IMAGE // 2048) * 0.25


def test_a_status_whose_connection_died_unacknowledged_is_published_again(setup, broker):
    """The link dies just as the device sends the first status of its update (the broker never
    gets it, so never acknowledges it): the device publishes it again on its next connection
    (docs/protocol.md §9), and the center stores every status of the update, without a gap."""
    store, make, release = setup
    with FaultProxy(broker.port) as proxy:
        fleet, ids = make(1, "simcut", port=proxy.port)
        (device,) = fleet.devices.values()

        def settled():  # the connection's statuses are stored: nothing of it is in flight
            with store.session() as s:
                return s.scalar(select(func.count()).select_from(StatusEvent)
                                .where(StatusEvent.device_id == device.id, StatusEvent.state == P.HEALTH))
        wait_until(settled, timeout=30, what="the device's health report stored")
        assert proxy.cut_on_next(UP) == 1
        dep = create_deployment(store, release("2.0.0"), device_ids=ids)
        states = wait_until(lambda: _all_terminal(store, dep.id), timeout=120, what="the job terminal")
        assert states == {device.id: P.CONFIRMED}
        assert proxy.sessions[0].cut == "next up" and device.connects >= 2 and device.resent >= 1
        with store.session() as s:
            seqs = sorted(s.scalars(select(StatusEvent.seq).where(StatusEvent.device_id == device.id,
                                                                  StatusEvent.boot == 1)))
    # boot 1: online's health report, then the update's statuses up to `rebooting`, none missing
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) >= 4, seqs


def test_an_idle_device_whose_connection_dies_right_after_connack_connects_again(setup, broker):
    """Connections that end as they are made (here: cut after the CONNACK; seen on a NATS
    cluster whose node closed them while its JetStream re-elected leaders): the idle device
    connects again, and again, until a connection lasts; it never parks on a lost connection."""
    store, make, release = setup
    with FaultProxy(broker.port) as proxy:
        fleet, ids = make(1, "simack", port=proxy.port)
        (device,) = fleet.devices.values()
        proxy.cut_after_down = 4  # each new connection: its CONNACK (4 bytes), then the cut
        proxy.cut_all()
        wait_until(lambda: proxy.cuts >= 10, timeout=30, what="connections cut after their CONNACK")
        proxy.cut_after_down = None
        connects = device.connects
        wait_until(lambda: device.connects > connects and device.client is not None and not device._lost
                   and _online(store, ids), timeout=30, what="the device connected again")
        dep = create_deployment(store, release("2.0.0"), device_ids=ids)
        assert wait_until(lambda: _all_terminal(store, dep.id), timeout=60, what="the job terminal") \
            == {device.id: P.CONFIRMED}


def test_a_simulator_restarted_with_the_same_ids_is_heard(setup):
    """A new simulator process over the same device ids: every device's boot and status numbers
    start over, in a new epoch; its statuses are stored and its next job is confirmed."""
    store, make, release = setup
    fleet, ids = make(10, "simagain")
    first = create_deployment(store, release("2.0.0"), device_ids=ids)
    assert set(wait_until(lambda: _all_terminal(store, first.id), timeout=120, what="first").values()) == {P.CONFIRMED}
    (sim,) = [sim for sim in make.made if sim.fleet is fleet]
    sim.stop()  # the simulator process ends: its devices' stored state is gone with it
    make.made.remove(sim)
    make.start(fleet.passwords)  # restarted with the same ids (all connected): boot 1, seq 1 again
    second = create_deployment(store, release("2.1.0"), device_ids=ids)
    assert set(wait_until(lambda: _all_terminal(store, second.id), timeout=120, what="second").values()) \
        == {P.CONFIRMED}
    with store.session() as s:
        rows = s.execute(select(StatusEvent.device_id, StatusEvent.epoch, StatusEvent.boot, StatusEvent.seq)
                         .where(StatusEvent.device_id.in_(ids))).all()
    for device_id in ids:
        epochs = {epoch for d, epoch, _, _ in rows if d == device_id}
        assert len(epochs) == 2 and 0 not in epochs  # one per simulator run
        # the second run reused (boot, seq) pairs of the first: without the epoch, duplicates
        runs = [{(b, q) for d, e, b, q in rows if d == device_id and e == epoch} for epoch in epochs]
        assert runs[0] & runs[1]


def test_timed_out_jobs_are_cancelled_on_devices_that_wake_later(setup):
    """A deployment's timeout passes while its devices sleep: when they wake, the broker hands
    them the update and then the cancel the timeout queued; they keep their firmware."""
    store, make, release = setup
    # Naps without `online 0` (devices that leave without saying so): the center takes them for
    # online and sends, so the broker queues the update and the cancel in their sessions. An
    # announced nap would hold both jobs in the center, and nothing would reach the devices.
    plan = FailurePlan(sleepy=1.0, sleep_at=0.0, sleep_for=6.0, seed=5, announce_nap=False)
    fleet, ids = make(4, "simlate", plan=plan)
    wait_until(lambda: all(d.slept and d.client is None for d in fleet.devices.values()), timeout=30,
               what="all asleep")
    dep = create_deployment(store, release("2.0.0"), device_ids=ids, timeout=2)
    wait_until(lambda: set(_job_states(store, dep.id).values()) == {"timed_out"}, timeout=60,
               what="all jobs timed out")
    wait_until(lambda: all(d.woke_at for d in fleet.devices.values()), timeout=60, what="all awake")

    def histories():
        with store.session() as s:
            rows = s.execute(select(StatusEvent.device_id, StatusEvent.state).where(
                StatusEvent.job_id.in_(j.id for j in dep.jobs))).all()
        out = {}
        for device_id, state in rows:
            out.setdefault(device_id, []).append(state)
        return out if all(P.CANCELLED in out.get(i, ()) for i in ids) else None
    seen = wait_until(histories, timeout=60, what="cancelled reported by every device")
    assert all("rebooting" not in states for states in seen.values()), seen
    assert all(d.running_version() == "1.0.0" and d.boots == 1 for d in fleet.devices.values())
    assert set(_job_states(store, dep.id).values()) == {"timed_out"}  # the history does not move it


def test_fota_simulate_command_with_a_served_home(tmp_path):
    """The operator's path: fota serve (managed Mosquitto), fota simulate, fota deploy --tag sim.
    Serve and simulate start together on a new home: both create its database."""
    from test_cli import background, fota, stop, wait_listed
    home = tmp_path / "home"
    assert fota(home, "keys", "init").returncode == 0
    serve = background(home, "serve")
    sim = background(home, "simulate", "--devices", "30", "--unhealthy", "0.1", "--duration", "120")
    try:
        wait_listed(home, lambda listing: listing.count("sim-000") == 30 and listing.count("yes") == 30,
                    "simulated devices did not come online", sim, serve, timeout=60, interval=0.5)
        image = tmp_path / "fw.bin"
        image.write_bytes(os.urandom(8 * 1024))
        r = fota(home, "release", "create", str(image), "--version", "2.0.0", "--hardware", "sim")
        assert r.returncode == 0, r.stdout + r.stderr
        r = fota(home, "deploy", "2.0.0", "--tag", "sim")
        assert r.returncode == 0 and "30 device(s)" in r.stdout, r.stdout + r.stderr
        watch = fota(home, "status", "--watch", timeout=90)
        assert "27 confirmed" in watch.stdout and "3 reverted" in watch.stdout, watch.stdout
        secrets_file = home / "sim" / "sim.json"
        assert oct(secrets_file.stat().st_mode & 0o777) == "0o600"
    finally:
        out = stop(sim)
        serve_out = stop(serve)
    assert "Traceback" not in out + serve_out, out + serve_out
    assert "reverted 3" in out, out
    assert "unprovisioned" not in serve_out, serve_out


def test_hash_slots_refuse_an_image_whose_hash_is_not_the_manifests():
    """The simulator's light backend checks its slot's own hash against the manifest's at
    finalize, as a bootloader's image check would (the executor passes the manifest's sha256)."""
    import hashlib

    from fota.sim.slots import HashSlots, SlotError

    image = bytes(range(256)) * 20
    slots = HashSlots(capacity=64 * 1024)
    slots.begin("b", len(image))
    slots.write("b", 0, image)
    with pytest.raises(SlotError, match="sha256"):
        slots.finalize("b", len(image), sha256=hashlib.sha256(image + b"x").hexdigest())
    slots.finalize("b", len(image), sha256=hashlib.sha256(image).hexdigest().upper())
    assert slots.digest["b"] == hashlib.sha256(image).hexdigest()
