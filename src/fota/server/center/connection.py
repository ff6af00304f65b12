"""The control center's MQTT connection: gmqtt, MQTT 5, a persistent session, its topic filters.

A message is handed to ``on_message`` (the center's router), which returns the PUBACK reason
code: gmqtt acknowledges a QoS 1 message only when that returns, so a status is acknowledged
once it is stored. The same settings open the extra connections that drain a dead worker's
session (fota.server.center.workgroup).
"""
from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from typing import Any, Awaitable, Callable
from urllib.parse import unquote, urlsplit

from gmqtt import Client as MQTTClient
from gmqtt import Subscription
from gmqtt.mqtt.constants import MQTTv50

from fota.aiowait import within
from fota import gmqtt_adapter
from fota.device import protocol

log = logging.getLogger(__name__)

# The ':' makes it an id no device can take (device ids are [A-Za-z0-9_-]; fota.server.broker).
CLIENT_ID = "fota:center"
KEEPALIVE = 30
SESSION_EXPIRY = 0xFFFFFFFF      # MQTT 5: keep the session (and queued statuses) forever
RECONNECT_DELAY = 1              # s between reconnect attempts (gmqtt's default, 6 s, stalls
                                 # every download that long after a broker restart)
ACK_OK = 0                       # MQTT 5 PUBACK reason code "success"
# MQTT 5 Maximum Packet Size the center announces in its CONNECT: the broker discards a larger
# message instead of sending it (MQTT 5.0 §3.1.2.11.4), so a flood of huge statuses costs the
# center nothing. What it receives is small: statuses (at most protocol.MAX_STATUS_BYTES, the
# larger are refused and counted up to this size), inventories, chunk requests.
MAX_PACKET = 16384
FORWARD_PREFIX = "fota/fwd/"     # fota/fwd/<worker>/<device>: chunk requests between workers

OnMessage = Callable[[MQTTClient, str, bytes, int, Any], Awaitable[int]]


def forward_topic(worker_id: str, device_id: str) -> str:
    return f"{FORWARD_PREFIX}{worker_id}/{device_id}"


def split_topic(topic: str) -> tuple[str, str] | None:
    """(device id, suffix) of a fota/v1/<device>/<suffix> topic; None for any other."""
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] + "/" + parts[1] + "/" != protocol.PREFIX:
        return None
    if not protocol.valid_device_id(parts[2]):
        return None
    return parts[2], parts[3]


def topic_filters(share_group: str | None, client_id: str) -> list[tuple[str, int]]:
    """The topic filters and their QoS: shared ones ($share/<group>/...) for a worker of
    ``share_group``, plus its forwarded chunk requests; None: a single center's."""
    share = f"$share/{share_group}/" if share_group is not None else ""
    filters = [(share + protocol.PREFIX + "+/" + suffix, 1)
               for suffix in (protocol.STATUS, protocol.INVENTORY, protocol.ONLINE)]
    filters.append((share + protocol.PREFIX + "+/" + protocol.REQ, 0))
    if share_group is not None:
        filters.append((forward_topic(client_id, "+"), 0))
    return filters


@dataclass(frozen=True)
class BrokerAddress:
    """Where and how to connect: mqtt[s]://user:password@host:port."""
    host: str
    port: int
    username: str | None
    password: str
    tls: ssl.SSLContext | bool

    @classmethod
    def parse(cls, url: str, ssl_context: ssl.SSLContext | None = None) -> BrokerAddress:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(f"broker URL must look like mqtt://user:password@host:port, not {url!r}")
        if ssl_context is not None and parts.scheme != "mqtts":
            raise ValueError("an ssl_context needs an mqtts:// broker URL")
        secure = parts.scheme == "mqtts"
        return cls(parts.hostname, parts.port or (8883 if secure else 1883),
                   unquote(parts.username) if parts.username else None, unquote(parts.password or ""),
                   (ssl_context or True) if secure else False)

    def client(self, client_id: str) -> MQTTClient:
        """A client for a persistent MQTT 5 session that acknowledges a message only once it
        was handled."""
        client = MQTTClient(client_id, clean_session=False, optimistic_acknowledgement=False,
                            session_expiry_interval=SESSION_EXPIRY, maximum_packet_size=MAX_PACKET)
        if self.username:
            client.set_auth_credentials(self.username, self.password)
        return client

    async def connect(self, client: MQTTClient, version: int = MQTTv50) -> None:
        await client.connect(self.host, self.port, ssl=self.tls, keepalive=KEEPALIVE, version=version)
        gmqtt_adapter.check_connected(client)


class CenterConnection:
    """The center's own session: subscribes to its filters ((topic, qos) or (topic, qos, options):
    options are gmqtt Subscription keywords), reconnects, publishes."""

    sessions = True     # a dead worker's persistent session holds its share: drained (workgroup)

    def __init__(self, client_id: str, filters: list[tuple], on_message: OnMessage,
                 fenced: Callable[[], bool]):
        self.client_id = client_id
        self.filters = filters
        self.on_message = on_message
        self.fenced = fenced            # declared dead by the other workers: never reconnect
        self.closing = False
        self.client: MQTTClient | None = None
        self.on_reconnect: Callable[[], None] | None = None  # after each reconnect (not the first connect)
        self._subscribed = asyncio.Event()

    async def start(self, address: BrokerAddress, timeout: float) -> None:
        """Connect and wait until subscribed."""
        client = address.client(self.client_id)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self.on_message
        client.on_disconnect = self._on_disconnect
        client.reconnect_delay = RECONNECT_DELAY
        gmqtt_adapter.quiet_cancelled_reconnects(asyncio.get_running_loop())
        self.client = client
        await address.connect(client)
        await within(self._subscribed.wait(), timeout)

    async def stop(self) -> None:
        self.closing = True
        if self.client is not None:
            try:
                await self.client.disconnect()
            except Exception:
                log.exception("MQTT disconnect failed")
            self.client = None

    @property
    def connected(self) -> bool:
        return self.client is not None and self.client.is_connected

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> bool:
        """Publish if started (gmqtt queues a QoS 1 message while reconnecting); False if not."""
        if self.client is None:
            return False
        self.client.publish(topic, payload, qos=qos, retain=retain)
        return True

    def subscribe_retained(self, topic: str, qos: int) -> None:
        """An extra subscription that gets the broker's retained messages at every (re)subscribe,
        even with a kept session (retain handling 0), and not our own publishes (no_local)."""
        self.client.subscribe(Subscription(topic, qos=qos, no_local=True, retain_handling_options=0))

    def publish_qos0(self, topic: str, payloads: list[bytes]) -> None:
        """Several QoS 0 messages to one topic in one write (the chunk server's windows)."""
        gmqtt_adapter.publish_qos0(self.client, topic, payloads)

    def stop_reconnect(self) -> None:
        if self.client is not None:
            self.client.stop_reconnect()

    def _on_connect(self, client: MQTTClient, session_present: int, rc: int, properties: Any) -> None:
        # retain_handling 1: retained inventory/online only for a new subscription, so a
        # reconnect with a kept session does not replay the whole fleet's flags.
        if not client.subscriptions:
            client.subscribe([Subscription(topic, qos=qos, **{"retain_handling_options": 1, **dict(*options)})
                              for topic, qos, *options in self.filters])
        else:
            for sub in client.subscriptions:
                client.resubscribe(sub)
            if self.on_reconnect is not None:
                self.on_reconnect()
        log.info("connected to the broker (session present: %s)", bool(session_present))

    def _on_subscribe(self, client: MQTTClient, mid: int, qos: Any, properties: Any) -> None:
        self._subscribed.set()

    def _on_disconnect(self, client: MQTTClient, packet: Any, exc: Any = None) -> None:
        if self.fenced():
            client.stop_reconnect()  # our session is another worker's now: never take it back
        elif not self.closing:
            log.warning("disconnected from the broker; gmqtt reconnects")
