"""Commands no device answered are sent again while the device is online (fota.server.unanswered,
docs/protocol.md §9): which jobs qualify, on SQLite and PostgreSQL, and end to end with a
control center, a real Mosquitto and simulated devices (the device code that ships) of which one
never gets its first command and one handles it too late, after the copy was sent."""
from __future__ import annotations

import asyncio
import os
from datetime import timedelta

from sqlalchemy import select, update

from fota.device import protocol as P
from fota.server.deployments import cancel_deployment, create_deployment
from fota.server.releases import create_release
from fota.server.store import Device, Job, StatusEvent, Store, utcnow
from fota.server.unanswered import MAX_UNANSWERED, requeue_unanswered
from fota.sim import SimFleet, device_ids, provision
from fota.testkit.center import CenterThread
from fota.tools.keyring import Keyring
from fota.tools.waiting import wait_until

from test_sim import SimThread, _all_terminal, _online, add_users
from test_workers import sim_deployment

AFTER = 60.0


def _sent(store: Store, job_id: int, *, ago: float, sends: int = 1, state: str = "sent") -> None:
    with store.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(
            state=state, sends=sends, sent_at=utcnow() - timedelta(seconds=ago),
            last_sent_at=utcnow() - timedelta(seconds=ago)))


def _online_since(store: Store, device_id: str, ago: float | None) -> None:
    with store.session() as s:
        s.execute(update(Device).where(Device.id == device_id).values(
            online=ago is not None, online_at=utcnow() - timedelta(seconds=ago or 0)))


def test_which_sent_jobs_are_sent_again(tmp_path, db_url):
    store = Store(db_url)
    try:
        ids = device_ids(8, "una")
        _, dep = sim_deployment(store, tmp_path, ids, os.urandom(1024))
        jobs = {j.device_id: j.id for j in dep.jobs}
        for dev in ids:
            _online_since(store, dev, 3600)
        _sent(store, jobs[ids[0]], ago=AFTER + 5)                    # due: sent again
        _sent(store, jobs[ids[1]], ago=AFTER - 5)                    # not yet
        _sent(store, jobs[ids[2]], ago=3 * AFTER, sends=2)           # second copy waits 2 × AFTER: due
        _sent(store, jobs[ids[3]], ago=1.5 * AFTER, sends=2)         # ... not yet
        _sent(store, jobs[ids[4]], ago=100 * AFTER, sends=MAX_UNANSWERED + 1)  # copies used up: left for the timeout
        _sent(store, jobs[ids[5]], ago=AFTER + 5, state="downloading")  # answered
        _sent(store, jobs[ids[6]], ago=AFTER + 5)
        _online_since(store, ids[6], AFTER - 5)                      # woke up just now: reads its queue first
        _sent(store, jobs[ids[7]], ago=AFTER + 5)
        _online_since(store, ids[7], None)                           # offline: its session keeps the command
        assert sorted(requeue_unanswered(store, AFTER)) == sorted([jobs[ids[0]], jobs[ids[2]]])
        with store.session() as s:
            states = dict(s.execute(select(Job.device_id, Job.state).where(Job.deployment_id == dep.id, Job.kind == "update")).all())
            worker = s.scalar(select(Job.worker).where(Job.id == jobs[ids[0]]))
        assert states[ids[0]] == states[ids[2]] == "pending" and worker is None  # any live worker sends it
        assert [states[i] for i in ids[3:]] == ["sent", "sent", "downloading", "sent", "sent"]
        # a second pass (another worker) finds nothing more: the first took them
        assert requeue_unanswered(store, AFTER) == []
        # a cancelled deployment's jobs get their cancel command, not their update again
        _sent(store, jobs[ids[1]], ago=AFTER + 5)
        with store.session() as s:
            cancel_deployment(s, dep.id, utcnow())
        assert jobs[ids[1]] not in requeue_unanswered(store, AFTER)
    finally:
        store.dispose()


def test_a_lost_command_is_sent_again_and_a_late_copy_changes_nothing(tmp_path, broker, sqlite_url):
    """Of three online devices, one never gets its first command (lost between broker and device,
    as on a NATS node's death) and one handles it only after the center sent the copy: every
    device confirms once, the lost one on the copy; the late one refuses the copy as a duplicate."""
    keyring = Keyring(tmp_path / "keys")
    keyring.init()
    store = Store(sqlite_url)
    center = CenterThread(store, broker.server_url, tmp_path / "blobs", signer=keyring.signer(),
                          keys_update=keyring.keys_update(), unanswered_after=1.0).start()
    sim = None
    try:
        ids = device_ids(3, "lost")
        passwords = provision(store, ids)
        add_users(broker, passwords)
        fleet = SimFleet.build(passwords, host=broker.host, port=broker.port, root_key=keyring.root_public(),
                               trust=keyring.trust())
        lost, late, fine = (fleet.devices[i] for i in ids)

        def first_command(device, how):
            """The device's first command: dropped (acknowledged to the broker, never handled), or
            handled late: once the device took the copy sent after 1 s (before its reboot)."""
            handle = device._on_message
            seen = []

            async def on_message(client, topic, payload, qos, properties):
                if topic.endswith("/" + P.CMD) and not seen:
                    seen.append(payload)
                    if how == "drop":
                        return 0
                    while not device.commands:
                        await asyncio.sleep(0.01)
                return await handle(client, topic, payload, qos, properties)
            device._on_message = on_message
        first_command(lost, "drop")
        first_command(late, "late")
        sim = SimThread(fleet).start()
        wait_until(lambda: _online(store, ids), timeout=30, what="3 devices online")
        rel = create_release(store, tmp_path / "blobs", keyring.signer().key, os.urandom(8 * 1024), "2.0.0",
                             ["sim"], kind="image")
        dep = create_deployment(store, rel, device_ids=ids)
        states = wait_until(lambda: _all_terminal(store, dep.id), timeout=60, what="all jobs terminal")
        assert set(states.values()) == {P.CONFIRMED}
        assert all(d.running_version() == "2.0.0" and d.boots == 2 for d in fleet.devices.values())
        with store.session() as s:
            sends = dict(s.execute(select(Job.device_id, Job.sends).where(Job.deployment_id == dep.id)).all())
            refused = s.execute(select(StatusEvent.device_id, StatusEvent.code)
                                .where(StatusEvent.state == P.REJECTED)).all()
        assert sends[lost.id] >= 2 and sends[late.id] >= 2 and sends[fine.id] == 1
        # only the late device saw two copies: it refused the second one, and nothing else changed
        assert {d for d, _ in refused} == {late.id} and {c for _, c in refused} == {P.E_DUPLICATE_JOB}
        assert center.center.unanswered >= 2
    finally:
        if sim is not None:
            sim.stop()
        center.stop()
        store.dispose()
