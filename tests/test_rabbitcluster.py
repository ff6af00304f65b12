"""The test kit's RabbitMQ cluster (fota.testkit.rabbitcluster): 3 real RabbitMQ 3.10 nodes with
the MQTT plugin on loopback, devices as paho MQTT 3.1.1 clients on different nodes. What it must
hold for the bench that compares it with NATS and Mosquitto (bench/broker_sessions.py) to be
fair: one cluster, quorum session queues, per-device accounts limited to their own topics."""
from __future__ import annotations

import threading
import time

import paho.mqtt.client as mqtt
import pytest

from fota.server.broker import SERVER_USER
from fota.testkit.rabbitcluster import RabbitCluster, available
from fota.tools.waiting import wait_until

pytestmark = pytest.mark.skipif(not available(), reason="rabbitmq-server (Debian) not installed")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with RabbitCluster(tmp_path_factory.mktemp("rabbit")) as c:
        c.add_devices({"dev1": "pw1", "dev2": "pw2"})
        yield c


class Client:
    """A paho MQTT 3.1.1 client recording what it receives, its SUBACKs and its disconnects."""

    def __init__(self, client_id, user, password, port, clean=False):
        self.got: list[tuple[str, int, bytes]] = []
        self.granted = None
        self.disconnects = 0
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean,
                                  protocol=mqtt.MQTTv311)
        self.client.username_pw_set(user, password)
        self.client.on_message = lambda c, u, m: self.got.append((m.topic, m.qos, m.payload))
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = self._on_disconnect
        self.client.reconnect_delay_set(30, 30)  # a refused action ends the connection: stay off
        self.connected = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: rc == 0 and self.connected.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.connected.wait(10)

    def _on_subscribe(self, client, userdata, mid, codes, properties):
        self.granted = [c.value for c in codes]
        self.subscribed.set()

    def _on_disconnect(self, *args):
        self.disconnects += 1
        self.subscribed.set()

    def subscribe(self, topics, timeout=10):
        self.subscribed.clear()
        self.client.subscribe(topics)
        assert self.subscribed.wait(timeout)
        return self.granted

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def test_three_nodes_one_cluster(cluster):
    assert cluster.cluster_nodes() == sorted(n.node for n in cluster.nodes)


def test_device_acl_own_topics_only_and_sessions_are_quorum_queues(cluster):
    """Like the Mosquitto ACL: a device subscribes to and publishes on its own fota topics only.
    RabbitMQ 3.10 answers a refused publish or subscription by closing the connection (no SUBACK
    0x80); the forged message reaches no one. The persistent session's queue is a quorum queue."""
    server = Client("fota:test", SERVER_USER, cluster.server_password, cluster.mqtt_ports[2], clean=True)
    dev1 = Client("dev1", "dev1", "pw1", cluster.mqtt_ports[0])
    dev2 = Client("dev2", "dev2", "pw2", cluster.mqtt_ports[1])
    clients = [server, dev1, dev2]
    try:
        assert server.subscribe([("fota/v1/+/status", 1)]) == [1]
        assert dev1.subscribe([("fota/v1/dev1/cmd", 1), ("fota/v1/dev1/data", 0)]) == [1, 0]
        assert dev2.subscribe([("fota/v1/dev2/cmd", 1)]) == [1]
        dev1.client.publish("fota/v1/dev1/status", b"mine", qos=1).wait_for_publish(5)
        server.client.publish("fota/v1/dev2/cmd", b"for dev2", qos=1)
        wait_until(lambda: dev2.got and server.got, timeout=10, what="dev2's command and dev1's status")
        queues = cluster.nodes[0].ctl("list_queues", "name", "type", "--no-table-headers", "--quiet")
        types = dict(line.split("\t") for line in queues.strip().splitlines())
        assert types["mqtt-subscription-dev1qos1"] == "quorum" and types["mqtt-subscription-dev2qos1"] == "quorum"

        dev1.client.publish("fota/v1/dev2/status", b"forged", qos=1)
        wait_until(lambda: dev1.disconnects, timeout=10, what="dev1's connection closed after the forged publish")
        time.sleep(0.5)
        assert server.got == [("fota/v1/dev1/status", 1, b"mine")]

        dev1b = Client("dev1", "dev1", "pw1", cluster.mqtt_ports[1])  # same session, another node
        clients.append(dev1b)
        dev1b.subscribe([("fota/v1/dev2/cmd", 1)])
        assert dev1b.disconnects == 1 and dev1b.granted is None  # refused: the connection ended
        server.client.publish("fota/v1/dev2/cmd", b"again", qos=1)
        wait_until(lambda: len(dev2.got) == 2, timeout=10, what="dev2's second command")
        time.sleep(0.5)
        assert dev2.got == [("fota/v1/dev2/cmd", 1, b"for dev2"), ("fota/v1/dev2/cmd", 1, b"again")]
        assert not dev1.got and not dev1b.got
    finally:
        for c in clients:
            c.close()


def test_another_account_cannot_take_a_sleeping_devices_session(cluster):
    """RabbitMQ 3.10 does not force client id = username, but an account connecting with another
    device's client id is refused (CONNACK 3: it may not use that device's session queue), with a
    clean session or not, and the command queued for the sleeping device stays for it."""
    cluster.add_devices({"dev3": "pw3", "dev4": "pw4"})
    dev3 = Client("dev3", "dev3", "pw3", cluster.mqtt_ports[0])
    assert dev3.subscribe([("fota/v1/dev3/cmd", 1)]) == [1]
    dev3.close()  # asleep: its session stays
    server = Client("fota:test2", SERVER_USER, cluster.server_password, cluster.mqtt_ports[2], clean=True)
    try:
        server.client.publish("fota/v1/dev3/cmd", b"queued", qos=1).wait_for_publish(5)
        for clean in (True, False):
            intruder = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="dev3", clean_session=clean,
                                   protocol=mqtt.MQTTv311)
            intruder.username_pw_set("dev4", "pw4")
            answers = []
            intruder.on_connect = lambda c, u, f, rc, p: answers.append(str(rc))  # CONNACK 3
            intruder.on_message = lambda c, u, m: answers.append(m.payload)
            intruder.connect("127.0.0.1", cluster.mqtt_ports[1])
            intruder.loop_start()
            try:
                wait_until(lambda: answers, timeout=10, what="the intruder's CONNACK")
                time.sleep(0.5)
                assert answers == ["Server unavailable"], answers
            finally:
                intruder.disconnect()
                intruder.loop_stop()
        dev3 = Client("dev3", "dev3", "pw3", cluster.mqtt_ports[1])
        try:
            wait_until(lambda: dev3.got, timeout=10, what="dev3's queued command")
            assert dev3.got == [("fota/v1/dev3/cmd", 1, b"queued")]
        finally:
            dev3.close()
    finally:
        server.close()
