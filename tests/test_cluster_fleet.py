"""A deployment over simulated devices on a 3-node NATS cluster (fota.server.natscluster) with two
control-center workers on PostgreSQL (fota.server.center.natsconn), and a node SIGKILLed while
the devices download, or while they reboot and confirm: every device confirms, no status a device was acknowledged for is lost, no
device is updated twice. Devices connect over MQTT 3.1.1 to random nodes, and again to random
nodes after the kill."""
from __future__ import annotations

import json
import os
import secrets
import struct
import threading

import pytest
from gmqtt.storage import PersistentStorage
from sqlalchemy import func, select

from fota.device import protocol as P
from fota.server.center import natsconn
from fota.server.deployments import create_deployment
from fota.server.natscluster import NatsCluster
from fota.server.releases import create_release
from fota.server.store import Job, StatusEvent, Store
from fota.sim import FailurePlan, SimFleet, device_ids, provision
from fota.testkit.center import CenterThread
from fota.tools.keyring import Keyring
from fota.tools.waiting import wait_until

from test_sim import SimThread
from test_workers import _count, _online  # the same counts as the MQTT 5 workers' fleet test

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
        i = 1
        while packet[i] & 0x80:  # remaining length (varint)
            i += 1
        i += 1
        (tlen,) = struct.unpack_from("!H", packet, i)
        topic = packet[i + 2:i + 2 + tlen].decode()
        payload = packet[i + 2 + tlen + 2:]  # after the packet id (MQTT 3.1.1: no properties)
        if topic.endswith("/" + P.STATUS):
            body = json.loads(payload)
            with self._lock:
                self.keys.add((topic.split("/")[2], body["boot"], body["seq"]))


def _stream_state(cluster) -> str:
    """The stream and the consumer as the cluster sees them (a failure's diagnostics)."""
    import asyncio

    import nats

    async def read():
        nc = await nats.connect(cluster.server_url.split(",")[1:], connect_timeout=2, allow_reconnect=False)
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


# When the node dies: once half of the 24 devices download, or once the first one confirmed (the
# others installing, rebooting into the new image, on trial or about to confirm).
PHASES = {"download": (("downloading",), 12), "confirm": (("confirmed",), 1)}


@pytest.mark.parametrize("phase", PHASES)
def test_node_killed_every_device_confirms_nothing_lost_nothing_twice(tmp_path, monkeypatch, phase):
    from db_fixtures import postgres_database
    monkeypatch.setattr(natsconn, "ACK_WAIT", 3.0)  # a dead node's unacknowledged statuses come back soon
    acked = AckedStatuses(monkeypatch)
    n, size = 24, 32 * 1024
    with postgres_database() as url, \
            NatsCluster(tmp_path / "nats", server_password=secrets.token_urlsafe(12)) as cluster:
        store = Store(url)
        keyring = Keyring(tmp_path / "keys")
        keyring.init()
        ids = device_ids(n, "nc")
        passwords = provision(store, ids)
        cluster.add_devices(passwords)
        settings = dict(signer=keyring.signer(), keys_update=keyring.keys_update(), share_group="nats-test",
                        campaign_interval=None, lease=5.0, heartbeat_interval=0.5)
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
                                   plan=FailurePlan(slow=1.0, chunk_delay=0.05))
            for i, device in enumerate(fleet.devices.values()):
                device.profile.chunk_delay = 0.03 + 0.005 * i
            sim = SimThread(fleet).start()
            wait_until(lambda: _online(store) == n, timeout=30, what=f"{n} devices online")
            rel = create_release(store, tmp_path / "blobs", keyring.signer().key, os.urandom(size), "2.0.0",
                                 ["sim"], kind="image")
            create_deployment(store, rel, device_ids=ids)
            states, count = PHASES[phase]
            wait_until(lambda: _count(store, states) >= count, timeout=30, interval=0.02,
                       what=f"the deployment at {phase}")
            on_victim = sum(1 for d in fleet.devices.values() if d.port == cluster.mqtt_ports[0])
            cluster.kill_node(0)
            assert _count(store, ("confirmed",)) < n, "all confirmed before the kill: slow the devices down"
            try:
                wait_until(lambda: _count(store, ("confirmed",)) == n, timeout=120, interval=0.2,
                           what="every device confirmed")
            finally:
                with store.session() as s:
                    print("jobs:", s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
                print("devices:", fleet.summary())
                print("pulled:", [(c.center.mqtt.pulled, c.center.mqtt.connected, c.center.statuses) for c in centers])
                print("stream:", _stream_state(cluster))
                for d in fleet.devices.values():
                    if d.confirmed_at is None:
                        print("  ", d.id, "port", d.port, "connects", d.connects, "client", d.client is not None,
                              "lost", d._lost, "state", d.core.state if d.core else None, "boots", d.boots)
            assert all(d.running_version() == "2.0.0" for d in fleet.devices.values())
            # the devices of the dead node reconnected to the others
            assert on_victim > 0 and sum(d.connects for d in fleet.devices.values()) >= n + on_victim
            # no status a device was acknowledged for is lost (some come back after ACK_WAIT)
            wait_until(lambda: acked.keys <= _stored(store), timeout=20, what="every acknowledged status stored")
            # updated once: one job each, one install each, one confirmation each
            with store.session() as s:
                jobs = s.execute(select(Job.device_id, func.count()).where(Job.kind == "update")
                                 .group_by(Job.device_id)).all()
                states = s.execute(select(StatusEvent.device_id, StatusEvent.state)).all()
            assert sorted(jobs) == [(i, 1) for i in ids]
            for dev in ids:
                mine = [state for d, state in states if d == dev]
                assert mine.count("installing") == 1 and mine.count("confirmed") == 1, (dev, mine)
            assert all(d.boots == 2 for d in fleet.devices.values())  # one reboot into the new image
            # both workers took statuses from the stream
            assert all(c.center.mqtt.pulled > 0 for c in centers)
            print(f"devices on the killed node: {on_victim}; statuses acknowledged: {len(acked.keys)}; "
                  f"redelivered: {sum(c.center.mqtt.redelivered for c in centers)}; "
                  f"published again by devices: {sum(d.resent for d in fleet.devices.values())}")
        finally:
            if sim is not None:
                sim.stop()
            for c in centers:
                c.stop()
            store.dispose()
