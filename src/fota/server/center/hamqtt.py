"""Home Assistant's MQTT side on a NATS cluster: the bridge's own MQTT 3.1.1 connection to a node.

On a NATS cluster the center speaks NATS (fota.server.center.natsconn), which has no retained
messages; nats-server's MQTT layer does (its $MQTT_rmsgs stream, replicated, shared by every
node). So the Home Assistant bridge publishes its discovery configs, states and availability
through an MQTT 3.1.1 connection of its own (nats-server refuses MQTT 5) to one node's MQTT
listener; Home Assistant, an MQTT client of any node, gets them retained. A clean session: the
bridge publishes everything again after each (re)connect, so nothing needs keeping.

gmqtt reconnects only to the host it first connected to; a dead node must not end the entities'
updates, so gmqtt's own reconnects are off and this tries the next node (round robin) itself.

Measured on nats-server 2.15.1: an empty retained message deletes the retained one as MQTT
specifies (a new subscriber gets nothing: tests/test_homeassistant_nats.py); a QoS 1 PUBLISH from
an MQTT client reaches NATS subscribers (header Nmqtt-Pub: 1) and is stored in $MQTT_msgs, and
its retain flag reaches neither (a retained one is stored in $MQTT_rmsgs too).

After a node's death an empty retained message alone is not enough: each node hands new
subscribers the retained messages of its own map, which an R1 consumer of $MQTT_rmsgs feeds, and
nats-server 2.15.1 places that consumer on a random node; a node whose consumer died with another
node kept handing the deleted config (from a cache of 2 min; the node-kill test of
tests/test_homeassistant_nats.py failed 5 of 5 runs so). So each empty retained message is
followed by the MQTT layer's own "forget it" notice over NATS (on_emptied:
natsconn.NatsConnection.forget_retained, natscluster.MQTT_RETAINED_DELETE; docs/home-assistant.md).

Install commands do not come through here: they arrive on the center's NATS connection
(natsconn, a durable JetStream consumer of the worker group), one worker each.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

from gmqtt import Client as MQTTClient
from gmqtt.mqtt.constants import MQTTv311

from fota.aiowait import cancel_and_wait, within
from fota import gmqtt_adapter
from fota.server.center.connection import RECONNECT_DELAY, BrokerAddress

log = logging.getLogger(__name__)

# Its own client id: a ':' (no device can take it) and the worker's id, so workers do not take
# each other's connections over.
SUFFIX = ":ha"
# s between full republications of the entities (HomeAssistantBridge.refresh). While JetStream
# re-elects the leaders of a dead node's streams (seconds), the MQTT layer's calls time out
# (seen on 2.15.1: sessions not persisted, subscriptions' consumers not created, a Home
# Assistant on another node not getting a retained config published then), and nothing tells
# the publisher whether its retained message was stored: every entity is published again this
# often, the removals of the last REMOVAL_REPEATS refreshes too, and the retained discovery configs
# are read again (relearn), so a lost removal is redone (and its notice sent again: on_emptied).
REFRESH = 60.0


def parse_urls(urls: str, ssl_context=None) -> list[BrokerAddress]:
    """mqtt[s]://user:password@host:port, comma-separated: the nodes' MQTT listeners."""
    addresses = [BrokerAddress.parse(u.strip(), ssl_context) for u in urls.split(",") if u.strip()]
    if not addresses:
        raise ValueError("no MQTT listener given for Home Assistant")
    return addresses


class HomeAssistantMqtt:
    """publish (topic, payload, qos, retain) and a retained-message subscription, to one node at a
    time. on_retained(topic, payload): a retained message the node holds (at each subscribe)."""

    def __init__(self, client_id: str, addresses: list[BrokerAddress],
                 on_retained: Callable[[str, bytes], Awaitable[None]]):
        self.client_id = client_id + SUFFIX
        self.addresses = addresses
        self.on_retained = on_retained
        self.on_reconnect: Callable[[], None] | None = None
        # called with the topic of each empty retained message published (the center: every
        # node forgets it, natsconn.NatsConnection.forget_retained)
        self.on_emptied: Callable[[str], None] | None = None
        self.retained_filter: tuple[str, int] | None = None
        self.closing = False
        self.client: MQTTClient | None = None
        self.node = 0                     # index of the node connected to (or tried last)
        self.connects = 0                 # connections made (tests, diagnostics)
        self._lost = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def start(self, timeout: float) -> None:
        """Connect to a node within timeout, then keep a connection (the next node when one goes)."""
        await within(self._connect_any(), timeout)
        self._task = asyncio.create_task(self._keep(), name="fota-homeassistant-mqtt")

    async def stop(self) -> None:
        self.closing = True
        if self._task is not None:
            await cancel_and_wait(self._task)
        if self.client is not None:
            try:
                await within(self.client.disconnect(), 5)
            except Exception:
                log.info("Home Assistant MQTT disconnect failed", exc_info=True)
            self.client = None

    @property
    def connected(self) -> bool:
        return self.client is not None and self.client.is_connected

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> bool:
        """False while no node is connected: the bridge publishes everything again on reconnect."""
        if not self.connected:
            return False
        self.client.publish(topic, payload, qos=qos, retain=retain)
        if retain and not payload and self.on_emptied is not None:
            self.on_emptied(topic)
        return True

    def subscribe_retained(self, topic: str, qos: int) -> None:
        """Subscribed at every connect: the node hands its retained messages each time."""
        self.retained_filter = (topic, qos)
        if self.connected:
            self.client.subscribe(topic, qos=qos)

    def relearn(self) -> None:
        """Subscribe again: the node hands its retained messages anew (MQTT 3.1.1 §3.8.4), so a
        config whose empty retained message was lost is seen, and removed again."""
        if self.connected and self.retained_filter is not None:
            self.client.subscribe(*self.retained_filter)

    # ------------------------------------------------------------ connecting

    async def _connect_any(self) -> None:
        """Try the nodes from the current one on, round after round, until one accepts."""
        while True:
            for _ in range(len(self.addresses)):
                address = self.addresses[self.node]
                client = self._client(address)
                try:
                    await within(address.connect(client, version=MQTTv311), 5)
                    self.client = client
                    self.connects += 1
                    if self.retained_filter is not None:
                        client.subscribe(*self.retained_filter)
                    log.info("Home Assistant MQTT connected to %s:%s", address.host, address.port)
                    return
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.info("Home Assistant MQTT: node %s:%s refused or unreachable (%s)",
                             address.host, address.port, exc)
                    try:
                        await client.disconnect()
                    except Exception:
                        pass
                    self.node = (self.node + 1) % len(self.addresses)
            await asyncio.sleep(RECONNECT_DELAY)

    def _client(self, address: BrokerAddress) -> MQTTClient:
        self._lost.clear()
        client = MQTTClient(self.client_id, clean_session=True)
        if address.username:
            client.set_auth_credentials(address.username, address.password)
        client.set_config({"reconnect_retries": 0})   # the next node is ours to pick (_keep)
        client.on_message = self._on_message
        client.on_disconnect = lambda *args: self._lost.set()
        gmqtt_adapter.quiet_cancelled_reconnects(asyncio.get_running_loop())
        return client

    async def _keep(self) -> None:
        while True:
            await self._lost.wait()
            if self.closing:
                return
            old, self.client = self.client, None
            if old is not None:
                try:
                    old.stop_reconnect()
                    await within(old.disconnect(), 2)
                except Exception:
                    pass
            log.warning("Home Assistant MQTT connection lost; connecting to another node")
            self.node = (self.node + 1) % len(self.addresses)
            await self._connect_any()
            if self.on_reconnect is not None:
                self.on_reconnect()

    async def _on_message(self, client: MQTTClient, topic: str, payload: bytes, qos: int,
                          properties: Any) -> int:
        # Our own publishes come back live (MQTT 3.1.1 has no no_local): only the retained
        # messages the node hands at subscribe count.
        if (properties or {}).get("retain"):
            try:
                await self.on_retained(topic, payload)
            except Exception:
                log.exception("retained message on %s could not be handled", topic)
        return 0
