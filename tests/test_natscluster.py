"""The managed NATS cluster (fota.server.natscluster): 3 real nats-server processes with JetStream,
MQTT listeners and routes; devices as paho MQTT 3.1.1 clients on different nodes."""
from __future__ import annotations

import asyncio
import json
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from fota.server.natscluster import MQTT_QOS1_PREFIX, MQTT_QOS_HEADER, NatsCluster
from fota.tools.waiting import wait_until

nats = pytest.importorskip("nats")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with NatsCluster(tmp_path_factory.mktemp("nats"), server_password="server-secret") as c:
        c.add_devices({"dev1": "pw1", "dev2": "pw2"})
        yield c


class Device:
    """A paho MQTT 3.1.1 client with a persistent session, recording what it receives."""

    def __init__(self, device_id, password, port):
        self.got: list[tuple[str, int, bytes]] = []
        self.granted = None
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, clean_session=False,
                                  protocol=mqtt.MQTTv311)
        self.client.username_pw_set(device_id, password)
        self.client.on_message = lambda c, u, m: self.got.append((m.topic, m.qos, m.payload))
        self.client.on_subscribe = self._on_subscribe
        self.rc = self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_subscribe(self, client, userdata, mid, codes, properties):
        self.granted = [c.value for c in codes]
        self.subscribed.set()

    def subscribe(self, topics):
        self.subscribed.clear()
        self.client.subscribe(topics)
        assert self.subscribed.wait(5)
        return self.granted

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


async def _server(cluster):
    nc = await nats.connect(cluster.server_url.split(","))
    return nc, nc.jetstream()


def test_device_acl_own_subjects_only(cluster):
    """Like the Mosquitto ACL: a device subscribes and publishes only its own fota topics."""
    dev = Device("dev1", "pw1", cluster.mqtt_ports[0])
    try:
        assert dev.subscribe([("fota/v1/dev1/cmd", 1), ("fota/v1/dev1/data", 0), ("fota/v1/dev2/cmd", 1),
                              ("fota/v1/+/cmd", 1), ("#", 0)]) == [1, 0, 128, 128, 128]

        async def check():
            # on the device's node: on another one the subscription's interest reaches node 1 over
            # the route some time after flush(), and the status could pass before it (1 run in 6)
            nc = await nats.connect(cluster.server_url.split(",")[0])
            seen = []

            async def record(msg):
                seen.append(msg.subject)
            await nc.subscribe("fota.v1.>", cb=record)
            await nc.flush()
            dev.client.publish("fota/v1/dev1/status", b"mine", qos=1).wait_for_publish(5)
            dev.client.publish("fota/v1/dev2/status", b"forged", qos=1)
            dev.client.publish("fota/v1/dev1/cmd", b"to myself", qos=0)
            await asyncio.sleep(0.5)
            await nc.close()
            return seen
        assert asyncio.run(check()) == ["fota.v1.dev1.status"]
    finally:
        dev.close()
    # a device account is for MQTT only: as a NATS client it is refused
    with pytest.raises(Exception):
        asyncio.run(nats.connect(f"nats://dev1:pw1@127.0.0.1:{cluster.nodes[0].ports.client}",
                                 allow_reconnect=False, connect_timeout=2))


def test_qos1_from_nats_reaches_offline_device_on_another_node(cluster):
    """What the center's commands rely on: a JetStream publish on $MQTT.msgs.<subject> with the
    QoS header is a QoS 1 message for the device's persistent session, kept while it is offline
    and delivered when it reconnects to another node. A core publish is QoS 0: it is lost."""
    dev = Device("dev2", "pw2", cluster.mqtt_ports[0])
    assert dev.subscribe([("fota/v1/dev2/cmd", 1)]) == [1]
    dev.close()

    async def send():
        nc, js = await _server(cluster)
        await nc.publish("fota.v1.dev2.cmd", b"core")
        await js.publish(MQTT_QOS1_PREFIX + "fota.v1.dev2.cmd", b"command", headers={MQTT_QOS_HEADER: "1"})
        await nc.close()
    asyncio.run(send())
    dev = Device("dev2", "pw2", cluster.mqtt_ports[2])
    try:
        wait_until(lambda: dev.got, 10)
        assert dev.got == [("fota/v1/dev2/cmd", 1, b"command")]
    finally:
        dev.close()


def test_home_on_a_nats_cluster_gives_devices_a_nodes_mqtt_listener(cluster, tmp_path):
    """broker_url nats://a,nats://b,nats://c (the workers' setting): what `fota device add`
    writes into a device's config is a node's MQTT listener, where the device's account connects
    (before, the comma-separated list did not parse at all)."""
    import json

    from fota.server.home import Home, HomeError
    from fota.server.natscluster import mqtt_ping
    home = Home(tmp_path / "home")
    cfg = home.config()
    cfg.update(broker_url=cluster.server_url, broker_mqtt_port=cluster.mqtt_ports[1])
    home.save_config(cfg)
    host, port = home.device_broker
    assert (host, port) == ("127.0.0.1", cluster.mqtt_ports[1])
    mqtt_ping(host, port, "dev1", "pw1", timeout=5)  # the device's own account is accepted there
    cfg["broker_hostname"] = "nats.example"  # a DNS name with every node's address
    del cfg["broker_mqtt_port"]
    home.save_config(cfg)
    assert home.device_broker == ("nats.example", 1883)
    (home.path / "config.json").write_text(json.dumps({**cfg, "broker_mqtt_port": "1883"}))
    with pytest.raises(HomeError, match="broker_mqtt_port"):
        home.device_broker


def test_session_cap_is_the_nodes_consumer_limit(tmp_path):
    """Each device's persistent session is one consumer on $MQTT_msgs (its QoS 1 `cmd`
    subscription), and nats-server 2.15 caps a stream at 1,000 consumers unless configured:
    NatsCluster's max_sessions is that cap (it applies to every stream: each node's MQTT layer
    holds a consumer on the retained-messages stream, so it must exceed the node count). Set to
    4, the fifth device's QoS 1 subscription is refused; the default is far above a fleet."""
    from fota.server.natscluster import MAX_SESSIONS
    assert MAX_SESSIONS >= 1_000_000
    with NatsCluster(tmp_path / "nats", server_password="server-secret", max_sessions=4) as c:
        c.add_devices({f"d{i}": f"p{i}" for i in range(1, 6)})
        devices = []
        try:
            granted = []
            for i in range(1, 6):
                devices.append(Device(f"d{i}", f"p{i}", c.mqtt_ports[i % 3]))
                granted.append(devices[-1].subscribe([(f"fota/v1/d{i}/cmd", 1)]))
            assert granted == [[1], [1], [1], [1], [128]]
        finally:
            for d in devices:
                d.close()


def test_simulated_device_reconnects_when_its_subscription_is_refused(tmp_path):
    """A simulated device whose `cmd` subscription is refused (SUBACK 0x80; here: the cluster's
    session cap is full) does what the device agent does (fota.device.mqtt raises on it): it
    drops the connection and connects again, backing off, until the subscription is granted; then
    a QoS 1 command reaches it. Without this it stayed connected and deaf to its commands."""
    from test_core import ROOT_KEY, TRUST

    from fota.sim.device import SimDevice
    from fota.tools import signing

    with NatsCluster(tmp_path / "nats", server_password="server-secret", max_sessions=4) as c:
        c.add_devices({f"d{i}": f"p{i}" for i in range(1, 6)})
        holders = [Device(f"d{i}", f"p{i}", c.mqtt_ports[0]) for i in range(1, 5)]
        for i, d in enumerate(holders, 1):  # the cap's 4 sessions taken
            assert d.subscribe([(f"fota/v1/d{i}/cmd", 1)]) == [1]
        sim = SimDevice("d5", "p5", host="127.0.0.1", port=c.mqtt_ports[1], root_key=signing.public_key_bytes(ROOT_KEY),
                        trust=TRUST, capacity=16 * 1024)
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        try:
            asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loop).result(5)
            loop.call_soon_threadsafe(sim.start)
            wait_until(lambda: sim.refused_subscriptions >= 2, 30, what="two refusals, with a reconnect between")
            assert sim.connects >= 2
            # a session freed: a clean-session login of d1 deletes its session and its consumer
            holders[0].close()
            free = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="d1", clean_session=True,
                               protocol=mqtt.MQTTv311)
            free.username_pw_set("d1", "p1")
            free.connect("127.0.0.1", c.mqtt_ports[0])
            free.loop_start()
            time.sleep(1.0)
            free.disconnect()
            free.loop_stop()
            wait_until(lambda: sim._refused == 0 and sim.client is not None and not sim._lost, 60,
                       what="the subscription granted after the back-off")
            refused = sim.refused_subscriptions

            async def send():
                nc, js = await _server(c)
                await js.publish(MQTT_QOS1_PREFIX + "fota.v1.d5.cmd", b"{}", headers={MQTT_QOS_HEADER: "1"})
                await nc.close()
            asyncio.run(send())
            wait_until(lambda: sim.commands, 10, what="the command delivered to the device")
            assert sim.refused_subscriptions == refused
        finally:
            asyncio.run_coroutine_threadsafe(sim.stop(), loop).result(30)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            for d in holders[1:]:
                d.close()


def test_node_config_carries_mqtt_options_and_refuses_the_unsafe_ones(tmp_path):
    """NatsCluster(mqtt_options=) reaches every node's `mqtt {}` block; none by default. The
    settings measured to break a guarantee or to do nothing are refused (docs/operations.md §4a)."""
    from fota.server.natscluster import MQTT_OPTIONS, REFUSED_MQTT_OPTIONS, NodePorts, node_config

    def mqtt_block(**kw):
        conf = node_config("n1", NodePorts(1, 2, 3, 4), [5, 6], tmp_path, **kw)
        line = next(ln for ln in conf.splitlines() if ln.startswith("mqtt: "))
        return json.loads(line[len("mqtt: "):])

    assert MQTT_OPTIONS == {}
    assert mqtt_block() == {"listen": "127.0.0.1:3", "stream_replicas": 3}
    assert mqtt_block(mqtt={"consumer_memory_storage": True}) == {
        "listen": "127.0.0.1:3", "stream_replicas": 3, "consumer_memory_storage": True}
    for key in ("consumer_replicas", "consumer_inactive_threshold", "stream_replicas"):
        assert key in REFUSED_MQTT_OPTIONS
        with pytest.raises(ValueError, match=key):
            mqtt_block(mqtt={key: 1})
    cluster = NatsCluster(tmp_path / "nats", server_password="pw", mqtt_options={"consumer_memory_storage": True})
    cluster._write()
    for node in cluster.nodes:
        assert '"consumer_memory_storage": true' in node.conf.read_text()


def _session_consumers(cluster) -> list[dict]:
    """The consumers on $MQTT_msgs (here: the devices' sessions) with their config and cluster."""
    import urllib.request
    node = next(n for n in cluster.nodes if n.running)
    url = f"http://127.0.0.1:{node.ports.monitor}/jsz?accounts=true&streams=true&consumers=true&config=true"
    with urllib.request.urlopen(url, timeout=5) as r:
        data = json.load(r)
    return [c for acc in data.get("account_details") or [] for st in acc.get("stream_detail") or []
            if st["name"] == "$MQTT_msgs" for c in st.get("consumer_detail") or []]


@pytest.mark.parametrize("memory", [False, True], ids=["default", "consumer_memory_storage"])
def test_sleeping_devices_command_and_a_restart_of_every_node(tmp_path, memory):
    """A device's session consumer is replicated on the 3 nodes (R3) in either case. By default
    (file storage) the command queued for a sleeping device survives a restart of every node;
    with mqtt_options consumer_memory_storage (cheaper sessions) it is lost (the session itself is
    kept: a command sent after the device reconnected arrives). Measured on nats-server 2.15.1:
    the reason it is not the default (docs/operations.md §4a)."""
    options = {"consumer_memory_storage": True} if memory else None
    with NatsCluster(tmp_path / "nats", server_password="server-secret", mqtt_options=options) as c:
        c.add_devices({"dev1": "pw1"})
        dev = Device("dev1", "pw1", c.mqtt_ports[1])
        assert dev.subscribe([("fota/v1/dev1/cmd", 1)]) == [1]
        dev.close()
        [consumer] = _session_consumers(c)
        assert bool(consumer["config"].get("mem_storage")) is memory

        async def members():  # as the consumer's leader reports them
            nc, js = await _server(c)
            try:
                info = await js.consumer_info("$MQTT_msgs", consumer["name"])
                return {info.cluster.leader} | {r.name for r in info.cluster.replicas or []}
            finally:
                await nc.close()
        assert asyncio.run(members()) == {n.name for n in c.nodes}  # R3

        async def send(payload):
            nc, js = await _server(c)
            await js.publish(MQTT_QOS1_PREFIX + "fota.v1.dev1.cmd", payload, headers={MQTT_QOS_HEADER: "1"})
            await nc.close()
        asyncio.run(send(b"queued"))
        c.stop()
        c.start(timeout=60)
        dev = None
        try:
            deadline = time.monotonic() + 30
            while dev is None:  # the first CONNECTs after a restart may be refused
                try:
                    dev = Device("dev1", "pw1", c.mqtt_ports[0])
                    wait_until(lambda: dev.client.is_connected(), 5)
                except Exception:
                    if dev is not None:
                        dev.close()
                    dev = None
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            if not memory:
                wait_until(lambda: dev.got, 15, what="the queued command after the restart")
                assert dev.got == [("fota/v1/dev1/cmd", 1, b"queued")]
            else:
                # The queued command, had it survived, would come before one sent now (the
                # session's consumer delivers in stream order): only the new one arrives.
                asyncio.run(send(b"after"))
                wait_until(lambda: dev.got, 15, what="a command sent after the reconnection")
                time.sleep(0.5)
                assert dev.got == [("fota/v1/dev1/cmd", 1, b"after")]
        finally:
            if dev is not None:
                dev.close()
