"""The fleet benchmark's floor as issue 6 defines it: the same bytes pushed through the same broker
by bare paho-mqtt clients (no fota protocol, no database, no signatures, no reboots).

One paho publisher (server account) sends every device's image in chunk-sized QoS 0 messages,
interleaved across devices; N paho subscribers (device accounts, MQTT 3.1.1, one process) count
bytes until each has its whole image. paho has no asyncio: the N clients are driven by one
selector loop through paho's external-loop API (`socket()`, `loop_read()`, `loop_write()`,
`loop_misc()`), the documented way to run many clients without a thread each.
"""
from __future__ import annotations

import json
import selectors
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from fota.device import protocol as P
from fota.sim.run import raise_fd_limit


def _client(client_id: str, user: str, password: str) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                    clean_session=True)
    c.username_pw_set(user, password)
    return c


class _Loop:
    """Many paho clients on one selector: read when readable, write while they want to."""

    def __init__(self):
        self.sel = selectors.DefaultSelector()
        self.clients: list[mqtt.Client] = []

    def add(self, c: mqtt.Client, host: str, port: int, keepalive: int) -> None:
        c.connect(host, port, keepalive=keepalive)
        self.sel.register(c.socket(), selectors.EVENT_READ, c)
        self.clients.append(c)
        if c.want_write():
            c.loop_write()

    def run_once(self, timeout: float) -> None:
        for key, _ in self.sel.select(timeout):
            c = key.data
            c.loop_read()
            if c.want_write():
                c.loop_write()


def receivers(config_path: str) -> None:
    """(child process) N paho subscribers; prints 'ready', then the time the last byte came."""
    raise_fd_limit()
    config = json.loads(Path(config_path).read_text())
    want = config["bytes"]
    passwords = config["passwords"]
    got: dict[str, int] = {}
    state = {"subscribed": 0, "complete": 0, "last": 0.0}

    def on_connect(client, userdata, flags, reason_code, properties):
        client.subscribe(P.topic(userdata, P.DATA), qos=0)

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        state["subscribed"] += 1

    def on_message(client, userdata, msg):
        before = got.get(userdata, 0)
        got[userdata] = now = before + len(msg.payload)
        if now >= want > before:
            state["complete"] += 1
            if state["complete"] == len(passwords):
                state["last"] = time.time()

    loop = _Loop()
    t0 = time.monotonic()
    for dev, pw in passwords.items():
        c = _client(dev, dev, pw)
        c.user_data_set(dev)
        c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
        loop.add(c, config["host"], config["port"], keepalive=300)
        loop.run_once(0)
    while state["subscribed"] < len(passwords):
        loop.run_once(0.1)
    print(json.dumps({"event": "ready", "connect_s": time.monotonic() - t0}), flush=True)
    cpu0 = time.process_time()
    while not state["last"]:
        loop.run_once(1.0)
    print(json.dumps({"event": "done", "last_byte": state["last"], "cpu_s": time.process_time() - cpu0}),
          flush=True)
    for c in loop.clients:
        c.disconnect()
        c.loop_write()


def publish(host: str, port: int, user: str, password: str, messages) -> None:
    """One paho publisher, QoS 0, writing as fast as the socket takes it."""
    c = _client("floor-pub-paho", user, password)
    connected = []
    c.on_connect = lambda client, userdata, flags, rc, props: connected.append(rc)
    c.connect(host, port, keepalive=60)
    while not connected:
        c.loop(0.1)
    if connected[0] != 0:
        raise RuntimeError(f"floor publisher refused: {connected[0]}")
    sel = selectors.DefaultSelector()
    sel.register(c.socket(), selectors.EVENT_WRITE)
    for topic, data in messages:
        c.publish(topic, data, qos=0)   # paho writes at once when no loop thread runs
        while c.want_write():           # the socket was full: wait until it drains
            sel.select(1.0)
            c.loop_write()
    c.disconnect()
    while c.want_write():
        sel.select(1.0)
        c.loop_write()


if __name__ == "__main__":
    receivers(sys.argv[1])
