"""A campaign in two waves over simulated devices on a 3-node NATS cluster (fota.server.natscluster)
with two control-center workers on PostgreSQL (fota.server.center.natsconn), and a node SIGKILLed
while the first wave downloads, or while it reboots and confirms: every device confirms, the
campaign ends done, no status a device was acknowledged for is lost, no command is lost for
good (one the cluster dropped is sent again: fota.server.unanswered), no device is updated twice.
Devices connect over MQTT 3.1.1 to random nodes, and again to random nodes after the kill. A
worker SIGKILLed mid-deployment: the other finishes it."""
from __future__ import annotations

import json
import os
import secrets
import threading

import pytest
from gmqtt.storage import PersistentStorage
from sqlalchemy import func, select

from fota.device import protocol as P
from fota.gmqtt_adapter import publish_fields
from fota.server.campaigns import campaign_summary, create_campaign, start_campaign
from fota.server.center import natsconn
from fota.server.deployments import create_deployment
from fota.server.natscluster import NatsCluster
from fota.server.releases import create_release
from fota.server.store import Deployment, Device, Job, StatusEvent, Store
from fota.server.unanswered import requeue_unanswered
from fota.sim import FailurePlan, SimFleet, device_ids, provision
from fota.testkit.center import CenterThread
from fota.tools.keyring import Keyring
from fota.tools.waiting import wait_until

from test_sim import SimThread
from test_workers import _count, _online, stop_processes  # the same counts as the MQTT 5 workers' fleet test

pytest.importorskip("nats")
pytestmark = pytest.mark.postgres


class AckedStatuses:
    """Every status a simulated device's broker acknowledged (PUBACK): gmqtt drops the packet from
    its in-flight store then; (device, boot, seq) read from the packet."""

    def __init__(self, monkeypatch):
        self.keys: set[tuple[str, int, int]] = set()
        self._lock = threading.Lock()
        original = PersistentStorage.remove_message_by_mid

        def remove(storage, mid):
            packet = storage._messages.get(mid)
            if packet is not None:
                self._record(packet)
            return original(storage, mid)
        monkeypatch.setattr(PersistentStorage, "remove_message_by_mid", remove)

    def _record(self, packet: bytes) -> None:
        topic, payload, _ = publish_fields(packet)
        if topic.endswith("/" + P.STATUS):
            body = json.loads(payload)
            with self._lock:
                self.keys.add((topic.split("/")[2], body["boot"], body["seq"]))


def _stream_state(cluster) -> str:
    """The stream and the consumer as the cluster sees them (a failure's diagnostics)."""
    import asyncio

    import nats

    async def read():
        secure = {} if cluster.tls is None else dict(tls=cluster.ssl_context(), tls_handshake_first=True)
        nc = await nats.connect(cluster.server_url.split(",")[1:], connect_timeout=2, allow_reconnect=False,
                                **secure)
        try:
            js = nc.jetstream(timeout=3)
            si = await js.stream_info(natsconn.STREAM)
            ci = await js.consumer_info(natsconn.STREAM, "nats-test")
            return (f"messages {si.state.messages} last_seq {si.state.last_seq} leader {si.cluster.leader}; "
                    f"consumer pending {ci.num_pending} ack_pending {ci.num_ack_pending} waiting {ci.num_waiting} "
                    f"delivered {ci.delivered.stream_seq} leader {ci.cluster.leader}")
        finally:
            await nc.close()
    try:
        return asyncio.run(read())
    except Exception as exc:
        return f"unreadable: {exc!r}"


def _stored(store: Store) -> set[tuple[str, int, int]]:
    with store.session() as s:
        return set(s.execute(select(StatusEvent.device_id, StatusEvent.boot, StatusEvent.seq)).all())


def _resent(store: Store, victims: set[str]) -> str:
    """The jobs whose command was published more than once, and how many of their devices had been
    connected to the killed node (a diagnostic: where the cluster drops commands)."""
    with store.session() as s:
        rows = s.execute(select(Job.device_id, Job.sends).where(Job.sends > 1)).all()
    return f"{len(rows)} ({sum(1 for d, _ in rows if d in victims)} on the killed node), sends {[n for _, n in rows]}"


def _assert_updated_once(store: Store, ids: list[str]) -> None:
    """Each device updated once: one update job, one `installing` and one `confirmed` stored."""
    with store.session() as s:
        jobs = s.execute(select(Job.device_id, func.count()).where(Job.kind == "update")
                         .group_by(Job.device_id)).all()
        states = s.execute(select(StatusEvent.device_id, StatusEvent.state)).all()
    assert sorted(jobs) == [(i, 1) for i in ids]
    for dev in ids:
        mine = [state for d, state in states if d == dev]
        assert mine.count("installing") == 1 and mine.count("confirmed") == 1, (dev, mine)


UNANSWERED = 3.0  # s: a command the cluster dropped is sent again this soon (60 s by default)


# When the node dies: once half of the first wave's 12 devices download, or once the first one
# confirmed (the others installing, rebooting into the new image, on trial or about to confirm,
# the second wave not started).
PHASES = {"download": (("downloading",), 6), "confirm": (("confirmed",), 1)}


# tls: the nodes speak only TLS (MQTT listeners, client ports, routes; docs/operations.md §4a), the
# simulated devices and the workers verify them against the CA and reconnect over TLS after the kill.
# Two cases, not four: plain and TLS take the same paths once connected (the test run's time).
@pytest.mark.parametrize("phase,tls", [pytest.param("download", False, id="download"),
                                       pytest.param("confirm", True, id="confirm-tls")])
def test_node_killed_every_device_confirms_nothing_lost_nothing_twice(tmp_path, monkeypatch, phase, tls):
    from db_fixtures import postgres_database
    from fota.server.tls import ensure_tls
    monkeypatch.setattr(natsconn, "ACK_WAIT", 3.0)  # a dead node's unacknowledged statuses come back soon
    acked = AckedStatuses(monkeypatch)
    n, size = 24, 32 * 1024
    files = ensure_tls(tmp_path / "tls", stem="nats", client_auth=True) if tls else None
    with postgres_database() as url, \
            NatsCluster(tmp_path / "nats", server_password=secrets.token_urlsafe(12), tls=files) as cluster:
        store = Store(url)
        keyring = Keyring(tmp_path / "keys")
        keyring.init()
        ids = device_ids(n, "nc")
        passwords = provision(store, ids)
        cluster.add_devices(passwords)
        settings = dict(signer=keyring.signer(), keys_update=keyring.keys_update(), share_group="nats-test",
                        campaign_interval=0.2, lease=5.0, heartbeat_interval=0.5, unanswered_after=UNANSWERED,
                        ssl_context=cluster.ssl_context())
        centers, sim = [], None
        try:
            centers = [CenterThread(store, cluster.server_url, tmp_path / "blobs", **settings).start()
                       for _ in (1, 2)]
            # slow links, 30 to 145 ms a chunk (0.5 to 2.3 s for the image): the deployment is still
            # downloading at the kill, and when the first device confirms the others are spread
            # over every later phase (a fleet of equal links confirmed all at once, within the
            # store's ingest lag of the first: seen in 1 case of 13 on 2026-12-05)
            fleet = SimFleet.build(passwords, host="127.0.0.1", port=cluster.mqtt_ports,
                                   root_key=keyring.root_public(), trust=keyring.trust(),
                                   plan=FailurePlan(slow=1.0, chunk_delay=0.05), ssl=cluster.ssl_context())
            for i, device in enumerate(fleet.devices.values()):
                device.profile.chunk_delay = 0.03 + 0.005 * i
            sim = SimThread(fleet).start()
            wait_until(lambda: _online(store) == n, timeout=30, what=f"{n} devices online")
            rel = create_release(store, tmp_path / "blobs", keyring.signer().key, os.urandom(size), "2.0.0",
                                 ["sim"], kind="image")
            # a campaign in two waves of 12, the second once every device of the first succeeded:
            # its commands go out over time, some around the kill (the cluster dropped 1 to 3 of
            # 24 such commands in 3 of 4 runs before unanswered commands were sent again)
            create_campaign(store, "kill", "2.0.0", {"waves": [50, 100], "success": 100, "probation": 1,
                                                     "retries": 0})
            start_campaign(store, "kill")
            states, count = PHASES[phase]
            wait_until(lambda: _count(store, states) >= count, timeout=30, interval=0.02,
                       what=f"the campaign at {phase}")
            victims = {d.id for d in fleet.devices.values() if d.port == cluster.mqtt_ports[0]}
            on_victim = len(victims)
            cluster.kill_node(0)
            assert _count(store, ("confirmed",)) < n, "all confirmed before the kill: slow the devices down"
            try:
                wait_until(lambda: _count(store, ("confirmed",)) == n, timeout=120, interval=0.2,
                           what="every device confirmed")
                wait_until(lambda: campaign_summary(store, "kill", devices=False)["state"] == "done", timeout=30,
                           what="the campaign done")
                assert campaign_summary(store, "kill", devices=False)["counts"].get("succeeded") == n
            finally:
                with store.session() as s:
                    print("jobs:", s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
                print("devices:", fleet.summary())
                print("pulled:", [(c.center.mqtt.pulled, c.center.mqtt.connected, c.center.statuses) for c in centers])
                print("stream:", _stream_state(cluster))
                if _count(store, ("confirmed",)) < n:
                    with store.session() as s:
                        print("deployments:", s.execute(select(Deployment.id, Deployment.state)).all())
                    print("unanswered now:", requeue_unanswered(store, UNANSWERED))
                print("senders (fenced, unanswered, task done):",
                      [(c.center.workgroup.fenced, c.center.sender.unanswered,
                        [t.get_name() for t in c.center._tasks if t.done()]) for c in centers])
                for d in fleet.devices.values():
                    if d.confirmed_at is None:
                        with store.session() as s:
                            row = s.get(Device, d.id)
                            job = s.scalars(select(Job).where(Job.device_id == d.id)).first()
                            seen = (row.online, row.online_at, job and (job.state, job.sends, job.sent_at,
                                                                         job.last_sent_at))
                        print("  ", d.id, "port", d.port, "victim", d.id in victims, "connects", d.connects,
                              "client", d.client is not None, "lost", d._lost,
                              "state", d.core.state if d.core else None, "boots", d.boots, "commands", d.commands,
                              "center's view (online, online_at, job)", seen)
            assert all(d.running_version() == "2.0.0" for d in fleet.devices.values())
            # the devices of the dead node reconnected to the others
            assert on_victim > 0 and sum(d.connects for d in fleet.devices.values()) >= n + on_victim
            # no status a device was acknowledged for is lost (some come back after ACK_WAIT)
            wait_until(lambda: acked.keys <= _stored(store), timeout=20, what="every acknowledged status stored")
            # updated once: one job each, one install each, one confirmation each
            _assert_updated_once(store, ids)
            assert all(d.boots == 2 for d in fleet.devices.values())  # one reboot into the new image
            # both workers took statuses from the stream
            assert all(c.center.mqtt.pulled > 0 for c in centers)
            print(f"devices on the killed node: {on_victim}; statuses acknowledged: {len(acked.keys)}; "
                  f"redelivered: {sum(c.center.mqtt.redelivered for c in centers)}; "
                  f"published again by devices: {sum(d.resent for d in fleet.devices.values())}; "
                  f"commands sent again, unanswered: {sum(c.center.unanswered for c in centers)}; "
                  f"jobs sent more than once: {_resent(store, victims)}")
        finally:
            if sim is not None:
                sim.stop()
            for c in centers:
                c.stop()
            store.dispose()


def _start_nats_worker(home_path, log, ack_wait: float, flush_interval: float = 0.05, poll_interval: float = 0.2):
    """A worker (`fota worker`'s run_worker, lease 3 s) in a process of its own, with JetStream's ack
    wait shortened (as the node-kill test does in-process) so that a dead worker's unacknowledged
    statuses come back soon; flush_interval: how long it gathers statuses before it commits (and
    only then acknowledges) a batch; poll_interval: how often its sender claims pending jobs."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root / "src"), env.get("PYTHONPATH", "")])
    code = (f"import asyncio, logging; from fota.server.center import natsconn; natsconn.ACK_WAIT = {ack_wait}; "
            "from pathlib import Path; from fota.server.app import run_worker; from fota.server.home import Home; "
            "logging.basicConfig(level=logging.WARNING); logging.getLogger(natsconn.__name__).setLevel(logging.INFO); "
            f"raise SystemExit(asyncio.run(run_worker(Home(Path({str(home_path)!r})), 3.0, "
            f"flush_interval={flush_interval}, flush_max=1000000, poll_interval={poll_interval})))")
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"))


def _ack_pending(cluster, name: str) -> int | None:
    """Messages the group's durable consumer delivered and no worker acknowledged yet; None while
    the consumer does not exist (statuses published before it exists are not kept: interest
    retention, docs/operations.md §4a)."""
    import asyncio

    import nats

    async def read():
        nc = await nats.connect(cluster.server_url.split(","), connect_timeout=2, allow_reconnect=False)
        try:
            return (await nc.jetstream(timeout=3).consumer_info(natsconn.STREAM, name)).num_ack_pending
        finally:
            await nc.close()
    try:
        return asyncio.run(read())
    except Exception:
        return None


def test_worker_killed_mid_deployment_on_nats_the_other_finishes_nothing_lost_nothing_twice(tmp_path, monkeypatch):
    """Two workers (`fota worker`'s run_worker) in processes of their own on the 3-node cluster
    (broker_url: every node's NATS URL); the one that sent every job is SIGKILLed while the
    devices download. The other finishes the
    deployment: it takes the dead one's jobs' chunk requests (the queue group hands them to the
    live member; the dead owner is skipped once its lease ran out), gets the statuses the dead one
    pulled but never acknowledged again from the durable consumer after the ack wait, and adopts
    its row. Every device confirms, every status a device was acknowledged for is stored, no
    device is updated twice."""
    import signal
    import subprocess

    from db_fixtures import postgres_database
    from fota.server import workers
    from fota.server.app import SHARE_GROUP
    from fota.server.broker import SERVER_USER
    from fota.server.home import Home
    acked = AckedStatuses(monkeypatch)
    n, size = 16, 128 * 1024  # 64 chunks at 0.1 s each: the download lasts past the kill
    password = secrets.token_urlsafe(12)
    with postgres_database() as url, NatsCluster(tmp_path / "nats", server_password=password) as cluster:
        home = Home(tmp_path / "home")
        home.save_config({"database_url": url, "broker_url": cluster.server_url, "broker_port": 1,
                          "server_password": password})
        assert SERVER_USER in cluster.server_url
        keyring = home.keyring
        keyring.init()
        store = home.store()
        procs: list[subprocess.Popen] = []
        sim = None
        try:
            ids = device_ids(n, "nw")
            passwords = provision(store, ids)
            cluster.add_devices(passwords)
            # Worker A sends every command (B's sender looks for pending jobs only at its start and
            # then every 60 s) and commits (and only then acknowledges) the statuses it pulls every
            # 2 s, so that it certainly holds unacknowledged ones when it dies.
            procs = [_start_nats_worker(home.path, tmp_path / "worker-a.log", 3.0, flush_interval=2.0)]
            wait_until(lambda: len(workers.live_workers(store, lease=3)) == 1, timeout=60, what="worker A registered")
            (dead,) = workers.live_workers(store, lease=3)
            procs.append(_start_nats_worker(home.path, tmp_path / "worker-b.log", 3.0, poll_interval=60.0))
            wait_until(lambda: len(workers.live_workers(store, lease=3)) == 2, timeout=60, what="worker B registered")
            # registered first, then connected: devices report once the group's consumer exists
            wait_until(lambda: _ack_pending(cluster, SHARE_GROUP) is not None, timeout=60, what="the workers' consumer")
            fleet = SimFleet.build(passwords, host="127.0.0.1", port=cluster.mqtt_ports,
                                   root_key=keyring.root_public(), trust=keyring.trust(),
                                   plan=FailurePlan(slow=1.0, chunk_delay=0.1))
            sim = SimThread(fleet).start()
            wait_until(lambda: _online(store) == n, timeout=60, what=f"{n} devices online")
            rel = create_release(store, home.blobs, keyring.signer().key, os.urandom(size), "2.0.0", ["sim"],
                                 kind="image")
            dep = create_deployment(store, rel, device_ids=ids)
            wait_until(lambda: _count(store, ("pending",)) == 0, timeout=60, what="every command sent")
            with store.session() as s:
                owners = dict(s.execute(select(Job.worker, func.count()).where(Job.deployment_id == dep.id)
                                        .group_by(Job.worker)).all())
            assert owners == {dead: n}, owners
            wait_until(lambda: _count(store, ("downloading",)) >= n // 2, timeout=60, interval=0.02,
                       what="the deployment downloading")
            # A holds each batch it pulls for 2 s, B for 50 ms: statuses pulled and not acknowledged now are A's
            wait_until(lambda: (_ack_pending(cluster, SHARE_GROUP) or 0) > 0, timeout=10, interval=0.02,
                       what="statuses held by worker A")
            victim = procs[0]
            victim.send_signal(signal.SIGKILL)
            victim.wait(10)
            assert _count(store, ("confirmed",)) < n, "all confirmed before the kill: slow the devices down"
            try:
                wait_until(lambda: _count(store, ("confirmed",)) == n, timeout=180, interval=0.2,
                           what="every device confirmed by the surviving worker")
            finally:
                with store.session() as s:
                    print("jobs:", s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
                print("devices:", fleet.summary())
                print("open jobs by worker at the kill:", owners)
            # the survivor adopted the dead worker (its row gone); the dead one had open jobs
            wait_until(lambda: workers.count_workers(store) == 1, timeout=30, what="the dead worker forgotten")
            assert dead not in workers.live_workers(store, lease=3)
            assert all(p.poll() is None for p in procs if p is not victim)
            assert all(d.running_version() == "2.0.0" for d in fleet.devices.values())
            # no status a device was acknowledged for is lost (the dead worker's come back after the ack wait)
            wait_until(lambda: acked.keys <= _stored(store), timeout=30, what="every acknowledged status stored")
            _assert_updated_once(store, ids)
            assert all(d.boots == 2 for d in fleet.devices.values())
            # what A had pulled and not acknowledged went to B again after the ack wait (B logs each)
            redelivered = (tmp_path / "worker-b.log").read_text().count("redelivered: ")
            assert redelivered > 0
            print(f"statuses acknowledged: {len(acked.keys)}; dead worker's open jobs at the kill: {owners[dead]}; "
                  f"statuses redelivered to B: {redelivered}; devices' chunk timeouts: {fleet.summary()['timeouts']}")
        finally:
            if sim is not None:
                sim.stop()
            stop_processes(procs)
            store.dispose()
