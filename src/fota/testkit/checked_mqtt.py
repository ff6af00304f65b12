"""paho-mqtt helpers that fail instead of passing quietly: a connection the broker refused and a
QoS 1 publish it never acknowledged are assertion errors (paho's connect() returns before the
CONNACK, and wait_for_publish(timeout) returns silently when the time is up)."""
from __future__ import annotations

import paho.mqtt.client as mqtt

from fota.tools.waiting import wait_until


def connect(broker, user, password, client_id, port=None, clean=True):
    """A paho client on `user`'s account asking for `client_id`; returns (client, topics received)
    once the broker accepted it (CONNACK 0), so a refused login cannot pass for a refused attack."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean)
    c.username_pw_set(user, password)
    got, connacks = [], []
    c.on_message = lambda cl, ud, m: got.append(m.topic)
    c.on_connect = lambda cl, ud, flags, rc, props: connacks.append(rc)
    c.connect(broker.host, port or broker.port)
    c.loop_start()
    wait_until(lambda: connacks, timeout=10, what=f"the CONNACK for {user}")
    assert not connacks[0].is_failure, f"the broker refused {user}: {connacks[0]}"
    return c, got


def close(client):
    client.disconnect()
    client.loop_stop()


def acknowledged(info, timeout=5.0):
    """Wait for the PUBACK of a QoS 1 publish; fail (not return) when none came."""
    info.wait_for_publish(timeout)
    assert info.is_published(), f"no PUBACK within {timeout} s"
