"""A paho client on the server account that hears the whole fleet's topics: the base of the
status spies and counters of the tests and the benchmarks (subclasses handle the messages)."""
from __future__ import annotations

import secrets
import threading
import time

import paho.mqtt.client as mqtt

from fota.device import protocol as P
from fota.server.broker import SERVER_USER
from fota.tools.waiting import TimedOut, wait_until

STATUSES = P.PREFIX + "+/" + P.STATUS   # every device's status topic


class BrokerSpy:
    """Connects as the server to `broker` (anything with host, service_port, users and, optionally, tls)
    and subscribes to `topics` ((topic, qos) pairs) on every connect, so it re-subscribes after a
    reconnect. persistent: a session of its own that the broker keeps (clean_session=False), so
    it also gets what was published while a broker restart cut it off. The constructor returns
    once the broker acknowledged the subscriptions (SUBACK), and `settle` s later. Override
    _on_message."""

    def __init__(self, broker, *, name: str = "spy", topics=((STATUSES, 1),), persistent: bool = False,
                 reconnect_delay: float | None = None, settle: float = 0.0):
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{name}-{secrets.token_hex(4)}",
                                  clean_session=not persistent)
        tls = getattr(broker, "tls", None)
        if tls is not None:  # verify the broker against its CA
            self.client.tls_set(ca_certs=str(tls.cafile))
        self.client.username_pw_set(SERVER_USER, broker.users[SERVER_USER])
        subscriptions = list(topics)
        subscribed = threading.Event()
        self.client.on_connect = lambda client, *_: client.subscribe(subscriptions)
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = self._on_message
        if reconnect_delay is not None:
            self.client.reconnect_delay_set(reconnect_delay, 1)
        self.client.connect(broker.host, broker.service_port)
        self.client.loop_start()
        wait_until(self.client.is_connected, timeout=10, interval=0.01, what=f"{name} connected")
        if not subscribed.wait(10):
            raise TimedOut(f"no SUBACK for {name}'s subscriptions within 10 s")
        if settle:
            time.sleep(settle)

    def _on_message(self, client, userdata, msg) -> None:
        raise NotImplementedError

    def close(self) -> None:
        # DISCONNECT first: it wakes the network thread, which then ends at once; loop_stop()
        # first waits out the thread's 1 s select.
        self.client.disconnect()
        self.client.loop_stop()
