"""The control center's connection to a NATS cluster (fota.server.natscluster), in place of MQTT 5.

Devices speak MQTT 3.1.1 to any node; the workers speak NATS (nats-py) to all of them. The same
interface as fota.server.center.connection.CenterConnection, so intake, chunk server, sender and
key pusher are the same code on both brokers:

* statuses, inventories and online flags (QoS 1 from the devices): nats-server's MQTT layer
  stores each QoS 1 PUBLISH in its JetStream stream $MQTT_msgs (subject $MQTT.msgs.<subject>,
  interest retention, replicated) before it sends the PUBACK; all workers pull from one durable
  consumer (the group's) on that stream, filtered to fota.v1.*.{status,inventory,online}, so
  the message is kept until a worker acknowledged it, and each goes to one worker, which
  acknowledges it only once on_message returned (= stored). (A stream of our own capturing the
  plain subjects was measured to miss statuses a device had been acknowledged for while a node
  died: the PUBACK does not wait for such a capture.) A worker or node that dies with
  messages unacknowledged: JetStream hands them to a worker again after ACK_WAIT (the intake is
  idempotent on (device, boot, seq)). This replaces MQTT 5's $share and the session drains.
* chunk requests (QoS 0 from the devices): a core NATS queue group, one worker each.
* to devices: QoS 0 (chunks) as core publishes on the topic's subject; QoS 1 (commands, key
  updates) as JetStream publishes on $MQTT.msgs.<subject> with the Nmqtt-Pub header, which is
  what nats-server's MQTT layer stores a QoS 1 PUBLISH as: a device's persistent session gets it
  as QoS 1, also when offline at the time (a core publish would reach MQTT subscribers as QoS 0
  and be lost for a device that is not connected). Retried until the stream acknowledged it,
  with a message id, so a retry is not stored twice.
* Home Assistant's install commands (homeassistant=True; QoS 1 from Home Assistant's MQTT
  client, docs/home-assistant.md): a second durable consumer of the group on $MQTT_msgs,
  filtered to fota.ha.*.install, so each command goes to one worker (the $share subscription's
  guarantee on Mosquitto), is kept while no worker runs and is acknowledged once handled. The
  bridge's retained messages go through an MQTT connection of its own (center/hamqtt.py).
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import ssl
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

from fota.aiowait import cancel_and_wait, within
from fota.device import protocol
from fota.server.center.connection import FORWARD_PREFIX, OnMessage
from fota.server.natscluster import MQTT_QOS1_PREFIX, MQTT_QOS_HEADER, MQTT_RETAINED_DELETE

log = logging.getLogger(__name__)

STREAM = "$MQTT_msgs"             # nats-server's MQTT layer: its QoS 1 messages (interest retention)
INGESTED = (protocol.STATUS, protocol.INVENTORY, protocol.ONLINE)
DEFAULT_GROUP = "fota-center"    # the consumer and queue group of a single center
ACK_WAIT = 30.0                  # s before an unacknowledged status goes to a worker again
FETCH_BATCH = 200                # messages per pull (the intake's flush_max)
MAX_ACK_PENDING = 20000
RETRY_DELAY = 0.5
HA_CONSUMER = "-homeassistant"   # the group's Home Assistant commands consumer: <group>-homeassistant
HA_COMMANDS = f"{MQTT_QOS1_PREFIX}fota.ha.*.install"   # fota.server.homeassistant.command_filter()


def subject(topic: str) -> str:
    """An MQTT topic's NATS subject (fota's topics have no '.', ' ', '*' or '>')."""
    return topic.replace("/", ".")


def topic(subject_: str) -> str:
    return subject_.replace(".", "/")


@dataclass(frozen=True)
class NatsAddress:
    """nats://user:password@host:port,nats://...: every node of the cluster (a client reconnects to
    any of them). tls://…: every node over TLS (fota.server.natscluster's TLS nodes), verified
    with ssl_context (None: the system's CAs) and the URL's host name; the TLS handshake comes
    first (the nodes' `handshake_first`), so the password is never sent to a node that did not
    prove itself, and a node that does not speak TLS is not talked to at all."""
    servers: tuple[str, ...]
    ssl_context: ssl.SSLContext | None = None

    @classmethod
    def parse(cls, url: str, ssl_context: ssl.SSLContext | None = None) -> NatsAddress:
        servers = tuple(u.strip() for u in url.split(",") if u.strip())
        for server in servers:
            parts = urlsplit(server)
            if parts.scheme not in ("nats", "tls") or not parts.hostname:
                raise ValueError(f"a NATS broker URL looks like nats://user:password@host:port, not {server!r}")
        if not servers:
            raise ValueError("no NATS server given")
        schemes = {urlsplit(s).scheme for s in servers}
        if len(schemes) > 1:
            raise ValueError("a NATS broker URL lists nodes with nats:// and with tls://: all or none over TLS")
        if ssl_context is not None and schemes != {"tls"}:
            raise ValueError("an ssl_context needs tls:// NATS URLs (every node over TLS)")
        return cls(servers, ssl_context)

    @property
    def tls(self) -> bool:
        return urlsplit(self.servers[0]).scheme == "tls"

    @property
    def replicas(self) -> int:
        return min(3, len(self.servers))


def is_nats_url(url: str) -> bool:
    return url.lstrip().startswith(("nats://", "tls://"))


class NatsConnection:
    sessions = False   # nothing to drain when a worker dies: JetStream redelivers (workgroup)

    def __init__(self, client_id: str, share_group: str | None, on_message: OnMessage,
                 fenced: Callable[[], bool], homeassistant: bool = False):
        self.client_id = client_id
        self.group = share_group or DEFAULT_GROUP
        self.homeassistant = homeassistant   # take Home Assistant's install commands
        self.on_message = on_message
        self.fenced = fenced
        self.closing = False
        self.on_reconnect: Callable[[], None] | None = None
        self.ack_wait = ACK_WAIT
        self.nc = None
        self.js = None
        self._last_error: BaseException | None = None
        self._tasks: list[asyncio.Task] = []
        self._outbox: asyncio.Queue | None = None      # core publishes, in order
        self._inflight: set[asyncio.Task] = set()      # QoS 1 publishes not yet stored
        # counters (tests, diagnostics)
        self.pulled = 0
        self.redelivered = 0

    async def start(self, address: NatsAddress, timeout: float) -> None:
        from nats.aio.client import Client  # the `cluster` extra
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        secure = {}
        if address.tls:  # nats-py upgrades to TLS only when the INFO asks for it; first: always
            secure = dict(tls=address.ssl_context or ssl.create_default_context(), tls_handshake_first=True)
        # The first connection within `timeout`, as on MQTT: nats-py would otherwise try the nodes
        # forever (max_reconnect_attempts=-1), also when none can ever be reached (a certificate
        # of a CA not trusted, a wrong password). The last error is raised.
        self._last_error = None
        nc = Client()
        try:
            await within(nc.connect(
                servers=list(address.servers), name=self.client_id, connect_timeout=2, reconnect_time_wait=0.5,
                max_reconnect_attempts=-1, allow_reconnect=True, error_cb=self._on_error,
                disconnected_cb=self._on_disconnected, reconnected_cb=self._on_reconnected, **secure), timeout)
        except asyncio.TimeoutError:
            await nc.close()
            if self._last_error is not None:
                raise self._last_error
            raise
        self.nc = nc
        self.js = self.nc.jetstream(timeout=5)
        # The consumer reads the MQTT layer's own stream: a device's QoS 1 PUBLISH is stored there
        # (as $MQTT.msgs.<subject>) before its PUBACK, and kept while a consumer is interested.
        config = ConsumerConfig(
            durable_name=self.group, ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.ack_wait, max_ack_pending=MAX_ACK_PENDING, max_deliver=-1,
            filter_subjects=[f"{MQTT_QOS1_PREFIX}fota.v1.*.{s}" for s in INGESTED])
        deadline = asyncio.get_running_loop().time() + timeout
        while True:  # a cluster just started may still elect its leaders; the stream exists once
            try:     # an MQTT client connected (fota.server.natscluster.NatsCluster.warm_up)
                await self.js.add_consumer(STREAM, config)
                break
            except Exception as exc:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                log.info("JetStream stream %s not ready (%s): retrying", STREAM, exc)
                await asyncio.sleep(RETRY_DELAY)
        pull = await self.js.pull_subscribe_bind(self.group, STREAM)
        loops = [self._pull_loop(pull, self.group)]
        ha_consumer = self.group + HA_CONSUMER
        if self.homeassistant:
            await self.js.add_consumer(STREAM, ConsumerConfig(
                durable_name=ha_consumer, ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
                ack_wait=self.ack_wait, max_deliver=-1, filter_subject=HA_COMMANDS))
            loops.append(self._pull_loop(await self.js.pull_subscribe_bind(ha_consumer, STREAM), ha_consumer))
        else:  # Home Assistant turned off: its consumer would keep commands nobody takes
            try:
                await self.js.delete_consumer(STREAM, ha_consumer)
            except Exception:
                pass  # none (the usual case)
        await self.nc.subscribe(subject(protocol.PREFIX) + "*." + protocol.REQ, queue=self.group,
                                cb=self._on_core)
        await self.nc.subscribe(subject(FORWARD_PREFIX) + self.client_id + ".*", cb=self._on_core)
        self._outbox = asyncio.Queue()
        self._tasks = [asyncio.create_task(loop, name=f"fota-nats-pull-{i}") for i, loop in enumerate(loops)]
        self._tasks.append(asyncio.create_task(self._write_loop(), name="fota-nats-out"))

    async def stop(self) -> None:
        self.closing = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            # again and again: a pull's fetch can lose its cancellation (fota.aiowait), and the
            # batch it then hands on waits for an intake that has stopped writing
            await cancel_and_wait(task)
        self._tasks = []
        if self._inflight:  # commands the stream has not confirmed yet
            await asyncio.wait(self._inflight, timeout=5)
        if self.nc is not None:
            # close, not drain: what was pulled and not acknowledged goes to a live worker anyway
            try:
                await within(self.nc.close(), 5)
            except Exception:
                log.exception("NATS close failed")
            self.nc = None

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    # ------------------------------------------------------------ to devices

    def publish(self, topic_: str, payload: bytes, qos: int, retain: bool = False) -> bool:
        if self.nc is None:
            return False
        if retain:
            raise NotImplementedError("retained messages are not published through NATS")
        if qos == 0:
            self._outbox.put_nowait((subject(topic_), [payload]))
        else:
            task = asyncio.create_task(self._publish_qos1(subject(topic_), payload))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
        return True

    def publish_qos0(self, topic_: str, payloads: list[bytes]) -> None:
        self._outbox.put_nowait((subject(topic_), payloads))

    def forget_retained(self, topic_: str) -> None:
        """Tell every node's MQTT layer to forget the retained message of topic_ (after its empty
        retained message went out on a node's MQTT listener: fota.server.center.hamqtt). A node
        whose feed of retained messages died with another node (natscluster.MQTT_RETAINED_DELETE)
        would otherwise keep handing the old one to new subscribers."""
        if self._outbox is not None:
            notice = json.dumps({"subject": subject(topic_), "seq": 0}).encode()
            self._outbox.put_nowait((MQTT_RETAINED_DELETE, [notice]))

    def subscribe_retained(self, topic_: str, qos: int) -> None:
        raise NotImplementedError("Home Assistant needs the MQTT broker")

    def stop_reconnect(self) -> None:
        """Fenced: leave the cluster (our messages go to the live workers after ACK_WAIT)."""
        for task in self._tasks:
            task.cancel()
        if self.nc is not None:
            asyncio.ensure_future(self.nc.close())

    async def _publish_qos1(self, subject_: str, payload: bytes) -> None:
        headers = {MQTT_QOS_HEADER: "1", "Nats-Msg-Id": f"{self.client_id}:{secrets.token_hex(8)}"}
        while self.nc is not None:
            try:
                await self.js.publish(MQTT_QOS1_PREFIX + subject_, payload, headers=headers)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.closing and self.nc is None:
                    break
                log.warning("QoS 1 publish on %s not stored yet (%s): retrying", subject_, exc)
                await asyncio.sleep(RETRY_DELAY)

    async def _write_loop(self) -> None:
        while True:
            subject_, payloads = await self._outbox.get()
            try:
                for payload in payloads:
                    await self.nc.publish(subject_, payload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # QoS 0: lost, as on MQTT (the device asks again)
                log.info("publish on %s failed: %s", subject_, exc)

    # ------------------------------------------------------------ from devices

    async def _on_core(self, msg) -> None:
        await self.on_message(None, topic(msg.subject), msg.data, 0, {})

    async def _pull_loop(self, pull, durable: str) -> None:
        from nats.errors import TimeoutError as NatsTimeout

        while True:
            try:
                # wait_for: a pull whose request went to a node that died is not always answered
                msgs = await within(pull.fetch(FETCH_BATCH, timeout=1), 5)
            except asyncio.CancelledError:
                raise
            except NatsTimeout:
                continue
            except Exception as exc:
                if not self.closing:
                    log.info("JetStream pull failed (%s: %s): pulling anew", type(exc).__name__, exc)
                await asyncio.sleep(RETRY_DELAY)
                try:  # a fresh subscription: the old one may be tied to a dead node's routes
                    await pull.unsubscribe()
                except Exception:
                    pass
                try:
                    pull = await self.js.pull_subscribe_bind(durable, STREAM)
                except Exception as exc2:
                    log.info("JetStream pull subscription failed (%s): retrying", exc2)
                continue
            # The whole batch at once: the intake writes it in one transaction.
            await asyncio.gather(*(self._handle(m) for m in msgs))

    async def _handle(self, msg) -> None:
        self.pulled += 1
        if msg.metadata.num_delivered > 1:
            self.redelivered += 1  # a dead worker's or node's, unacknowledged for ack_wait
            log.info("redelivered: %s (delivery %d)", msg.subject, msg.metadata.num_delivered)
        await self.on_message(None, topic(msg.subject[len(MQTT_QOS1_PREFIX):]), msg.data, 1, {})
        try:
            await msg.ack()
        except Exception as exc:  # redelivered after ack_wait: stored again as a duplicate, dropped
            log.info("ack of %s failed: %s", msg.subject, exc)

    # ------------------------------------------------------------ connection events

    async def _on_error(self, exc) -> None:
        self._last_error = exc
        if not self.closing:
            log.info("NATS: %s", exc)

    async def _on_disconnected(self) -> None:
        if not self.closing:
            log.warning("disconnected from the NATS node; reconnecting to another")

    async def _on_reconnected(self) -> None:
        log.info("reconnected to NATS at %s", self.nc.connected_url.netloc if self.nc else "?")
        if self.on_reconnect is not None:
            self.on_reconnect()
