"""The control center: sends update commands, serves chunks, records what devices report.

One MQTT connection (gmqtt, MQTT 5, persistent session ``fota:center``) and a part for each job,
each in its own module, each given only what it needs:

* ``connection``: the MQTT session, its topic filters, reconnects; messages go to the router
  below (``_on_message``);
* ``natsconn`` (a ``nats://`` broker URL): the same interface on a NATS cluster, the devices
  still on MQTT 3.1.1 (a JetStream consumer for statuses, a queue group for chunk requests;
  docs/operations.md §4a);
* ``sender``: pending jobs -> signed ``update`` / ``cancel`` commands on fota/v1/<dev>/cmd (QoS 1),
  jobs 'sent'; deployment timeouts;
* ``chunks``: fota/v1/<dev>/req -> chunks on fota/v1/<dev>/data (QoS 0), from the in-memory
  job cache (``jobs``) so the hot path never touches the database;
* ``intake``: status / inventory / online messages checked, queued and written in batches
  (one transaction per 50 ms or 200 messages); a QoS 1 message is acknowledged to the broker
  only after its batch committed, so a crash never loses a status; status history retention;
* ``workgroup`` (``share_group``): several control centers share the work through MQTT v5
  shared subscriptions and the database: each claims the pending jobs it sends
  (``FOR UPDATE SKIP LOCKED``), serves any chunk request, and drains the MQTT session of a
  worker that died (docs/operations.md §3);
* ``keys`` (``keyring``): a rotation or revocation is picked up within ``keys_interval`` seconds:
  new commands are signed with the new key and the root-signed key update is queued (QoS 1) for
  every device whose trust version is older, asleep or offline too;
* ``homeassistant`` (fota.server.homeassistant, only when given settings): Home Assistant
  update entities of the devices that opted in, and their install commands (on a NATS cluster
  its retained messages go through the nodes' MQTT listeners: ``ha_mqtt``, center/hamqtt.py);
* campaigns: every ``campaign_interval`` seconds one step of each active campaign
  (fota.server.campaigns.CampaignEngine), which adds the jobs the sender then sends and
  ``cancel`` jobs on abort or timeout.

All database work runs on one worker thread (``dbthreads``): the event loop (and so the chunk
server) never blocks on it, and SQLite never sees two writers of ours at once. (On PostgreSQL
the campaign steps and retention passes run on a second thread: row locks keep them apart from
other writers.) The gmqtt private API the chunk server's fast path uses is in fota.gmqtt_adapter.
"""
from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gmqtt import Client as MQTTClient
from sqlalchemy import select

from fota.aiowait import cancel_and_wait
from fota.device import protocol
from fota.server import workers
from fota.server.campaigns import CampaignEngine
from fota.server.center.chunks import ChunkServer, parse_request
from fota.server.center.connection import (ACK_OK, CLIENT_ID, FORWARD_PREFIX, BrokerAddress, CenterConnection,
                                           split_topic, topic_filters)
from fota.server.center.dbthreads import DbThreads
from fota.server.center.hamqtt import REFRESH as HA_REFRESH
from fota.server.center.hamqtt import HomeAssistantMqtt, parse_urls
from fota.server.center.intake import StatusIntake
from fota.server.center.inventory import is_int
from fota.server.center.jobs import JobCache
from fota.server.center.natsconn import NatsAddress, NatsConnection, is_nats_url
from fota.server.center.keys import KEYS_INTERVAL, KeyPusher
from fota.server.center.sender import CommandSender
from fota.server.center.workgroup import Workgroup
from fota.server.delta import DEFAULT_WBITS
from fota.server.homeassistant import HomeAssistantBridge, HomeAssistantSettings, command_filter
from fota.server.kek import Kek
from fota.server.payloadurls import HttpPayloads

if TYPE_CHECKING:
    from fota.server.objectstore import S3Payloads
from fota.server.retention import DEFAULT_INTERVAL as RETENTION_INTERVAL
from fota.server.retention import Retention
from fota.server.statuses import StatusLimiter, parse_status
from fota.server.store import Job, Store
from fota.server.unanswered import UNANSWERED_AFTER
from fota.tools.keyring import COMMAND_TTL, Keyring, Signer

__all__ = ["CLIENT_ID", "ControlCenter", "parse_request", "parse_status"]

log = logging.getLogger(__name__)


class _Held:
    """An attribute of the center held by the part that uses it (read and set through the center)."""

    def __init__(self, part: str):
        self.part = part

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, center, owner=None):
        return self if center is None else getattr(getattr(center, self.part), self.name)

    def __set__(self, center, value) -> None:
        setattr(getattr(center, self.part), self.name, value)


class ControlCenter:
    """The asyncio control center. ``await start()`` ... ``await stop()``."""

    # counters (benchmarks, diagnostics) and settings, each held by its part
    commands = _Held("sender")           # update commands published
    deltas_sent = _Held("sender")        # update commands sent as a delta
    chunk = _Held("sender")
    window = _Held("sender")
    poll_interval = _Held("sender")
    require_online = _Held("sender")
    delta_wbits = _Held("sender")
    command_ttl = _Held("sender")
    unanswered_after = _Held("sender")   # seconds before an unanswered command is sent again; None: never
    unanswered = _Held("sender")         # jobs sent again because their online device never answered
    kek = _Held("sender")
    http = _Held("sender")               # transport http's URL settings (HttpPayloads), or None
    requests = _Held("chunk_server")          # chunk requests served
    ignored_requests = _Held("chunk_server")  # malformed, foreign, unknown or finished jobs
    chunks = _Held("chunk_server")            # chunks published
    bytes_published = _Held("chunk_server")   # data payload bytes published, headers included
    forwarded = _Held("chunk_server")         # chunk requests handed to the job's own worker
    statuses = _Held("intake")           # status events stored
    duplicates = _Held("intake")         # status duplicates dropped
    garbage = _Held("intake")            # undecodable messages dropped (refused statuses included)
    refused = _Held("intake")            # statuses refused at parsing
    rate_limited = _Held("intake")       # statuses over their device's rate, not stored
    pruned = _Held("intake")             # statuses deleted by the retention policy
    flush_interval = _Held("intake")
    flush_max = _Held("intake")
    status_limiter = _Held("intake")
    retention = _Held("intake")
    retention_interval = _Held("intake")
    signer = _Held("keys")
    keys_update = _Held("keys")
    keys_version = _Held("keys")
    key_updates = _Held("keys")          # key updates published
    keyring = _Held("keys")
    keys_interval = _Held("keys")
    adopted = _Held("workgroup")         # dead workers whose sessions this one drained
    drained = _Held("workgroup")         # messages received on those sessions
    lost = _Held("workgroup")            # set when fenced (the process should exit)
    lease = _Held("workgroup")
    heartbeat_interval = _Held("workgroup")

    def __init__(self, store: Store, broker_url: str, blobs_dir: str | Path, *,
                 chunk: int = protocol.MAX_CHUNK_SIZE, window: int = protocol.DEFAULT_WINDOW,
                 poll_interval: float = 0.2, client_id: str = CLIENT_ID,
                 flush_interval: float = 0.05, flush_max: int = 200, require_online: bool = True,
                 signer: Signer | None = None, keys_update: bytes | None = None,
                 ssl_context: ssl.SSLContext | None = None, delta_wbits: int | None = DEFAULT_WBITS,
                 campaign_interval: float | None = 1.0, share_group: str | None = None,
                 lease: float = workers.LEASE, heartbeat_interval: float = workers.HEARTBEAT,
                 command_ttl: int = COMMAND_TTL, unanswered_after: float | None = UNANSWERED_AFTER,
                 kek: Kek | None = None, keyring: Keyring | None = None, keys_interval: float = KEYS_INTERVAL,
                 status_limiter: StatusLimiter | None = None, retention: Retention | None = Retention(),
                 retention_interval: float = RETENTION_INTERVAL,
                 homeassistant: HomeAssistantSettings | None = None,
                 http: HttpPayloads | S3Payloads | None = None, objects: S3Payloads | None = None):
        if not protocol.MIN_CHUNK_SIZE <= chunk <= protocol.MAX_CHUNK_SIZE:
            raise ValueError(f"chunk must be {protocol.MIN_CHUNK_SIZE}..{protocol.MAX_CHUNK_SIZE}")
        if not 1 <= window <= protocol.MAX_WINDOW:
            raise ValueError(f"window must be 1..{protocol.MAX_WINDOW}")
        if delta_wbits is not None and not 9 <= delta_wbits <= 15:
            raise ValueError("delta_wbits must be 9..15, or None for no delta updates")
        if not is_int(command_ttl) or command_ttl < 1:
            raise ValueError("command_ttl must be a positive number of seconds")
        if unanswered_after is not None and not unanswered_after > 0:
            raise ValueError("unanswered_after must be a positive number of seconds, or None")
        if signer is None:
            raise ValueError("a signer is needed: devices accept only signed commands")
        self.store = store
        self.broker_url = broker_url
        self.blobs_dir = Path(blobs_dir)
        self.ssl_context = ssl_context  # mqtts:// or tls:// (NATS) only; None: the system's CAs
        # share_group: one of several workers (shared subscriptions $share/<group>/..., a
        # persistent session per worker start, registered in center_workers); None: the only one.
        self.share_group = share_group
        if share_group is not None and client_id == CLIENT_ID:
            client_id = workers.new_worker_id()
        self.client_id = client_id
        # Step the campaigns (fota.server.campaigns) every campaign_interval seconds; None: never
        # (another worker, or a test driving the engine with its own clock, does it).
        self.campaign_interval = campaign_interval
        self._campaigns = CampaignEngine(store) if campaign_interval else None

        self.db = DbThreads(store)
        fenced = lambda: self.workgroup.fenced  # noqa: E731 (read when asked: fenced later)
        filters = topic_filters(share_group, client_id)
        if homeassistant is not None:  # Home Assistant's install commands
            # Never a retained one from the past (retain handling 2); a live one shows its retain
            # flag (retain as published): the bridge ignores retained commands.
            filters.append(((f"$share/{share_group}/" if share_group is not None else "") + command_filter(), 1,
                            {"retain_handling_options": 2, "retain_as_published": True}))
        # broker_url nats://...,nats://...: a NATS cluster (fota.server.center.natsconn), same interface.
        self.nats = is_nats_url(broker_url)
        # On NATS, Home Assistant's retained messages go through the nodes' MQTT listeners
        # (fota.server.center.hamqtt); its commands through a consumer of the NATS connection.
        self.ha_mqtt: HomeAssistantMqtt | None = None
        if self.nats and homeassistant is not None:
            if not homeassistant.mqtt_url:
                raise ValueError("Home Assistant on a NATS cluster needs the nodes' MQTT listeners "
                                 "(HomeAssistantSettings.mqtt_url): retained messages live in their MQTT layer")
            self.ha_mqtt = HomeAssistantMqtt(client_id, parse_urls(homeassistant.mqtt_url, ssl_context),
                                             self._on_retained)
        self.mqtt = (NatsConnection(client_id, share_group, self._on_message, fenced,
                                    homeassistant=homeassistant is not None) if self.nats
                     else CenterConnection(client_id, filters, self._on_message, fenced))
        self.workgroup = Workgroup(store, self.db.call, self.mqtt, self._on_message, client_id=client_id,
                                   share_group=share_group, lease=lease, heartbeat_interval=heartbeat_interval)
        self.keys = KeyPusher(store, self.db.call, self.mqtt.publish, signer, keys_update, keyring=keyring,
                              keys_interval=keys_interval, pushes=self.workgroup.pushes_keys)
        self.jobs = JobCache(store, self.blobs_dir, self.db.call)
        self.intake = StatusIntake(
            store, self.db.call, self.db.call_aside, client_id=client_id, set_job_state=self.jobs.set_state,
            on_inventory=self.keys.sync, fenced=fenced, flush_interval=flush_interval, flush_max=flush_max,
            status_limiter=status_limiter if status_limiter is not None else StatusLimiter(),
            retention=retention, retention_interval=retention_interval)
        self.chunk_server = ChunkServer(self.jobs, self.mqtt, client_id, worker=share_group is not None,
                                        live=lambda: self.workgroup.live, count_served=self.intake.count_served)
        self.sender = CommandSender(
            store, self.db.call, self.jobs, self.mqtt, self.keys, client_id=client_id, blobs_dir=self.blobs_dir,
            chunk=chunk, window=window, poll_interval=poll_interval, require_online=require_online,
            delta_wbits=delta_wbits, command_ttl=command_ttl, kek=kek, fenced=fenced, http=http,
            unanswered_after=unanswered_after)
        # Object storage, the blobs' source of truth when configured (fota.server.objectstore):
        # patches made here are written there, and a blob missing from blobs_dir is read from
        # there (cached in blobs_dir) for the chunk server and the sender. ``objects``, else the
        # bucket of presigned URLs (http).
        self.jobs.remote = objects if objects is not None else (http if hasattr(http, "get_blob") else None)
        # None unless Home Assistant is enabled: nothing of it on the paths of fleets without it.
        # where its retained messages go: its own MQTT link on a NATS cluster, else the center's
        self.ha_link = self.ha_mqtt or self.mqtt
        self.homeassistant = None if homeassistant is None else HomeAssistantBridge(
            store, self.db.call, self.ha_link.publish, homeassistant,
            refresh=HA_REFRESH if self.ha_mqtt is not None else None)
        if self.homeassistant is not None:
            self.intake.on_written = self.homeassistant.touched
            self.ha_link.on_reconnect = self.homeassistant.republish
            if self.ha_mqtt is not None:
                self.homeassistant.on_refresh = self.ha_mqtt.relearn
                self.ha_mqtt.on_emptied = self.mqtt.forget_retained   # removals stick on every node
        self._tasks: list[asyncio.Task] = []

    # ------------------------------------------------------------ lifecycle

    async def start(self, timeout: float = 10.0) -> None:
        address = (NatsAddress.parse(self.broker_url, self.ssl_context) if self.nats
                   else BrokerAddress.parse(self.broker_url, self.ssl_context))
        await self.workgroup.register(address)
        self._tasks = [asyncio.create_task(self.intake.run(), name="fota-flush")]
        try:
            await self.mqtt.start(address, timeout)
        except BaseException:
            await self.stop()
            raise
        self._tasks.append(asyncio.create_task(self.sender.run(), name="fota-sender"))
        if self._campaigns is not None:
            self._tasks.append(asyncio.create_task(self._campaign_loop(), name="fota-campaigns"))
        if self.share_group is not None:
            self._tasks.append(asyncio.create_task(self.workgroup.run(), name="fota-workers"))
        elif self.client_id == CLIENT_ID and not self.nats:
            self._tasks.append(asyncio.create_task(self.workgroup.drain_legacy(), name="fota-drain-legacy"))
        self._tasks.append(asyncio.create_task(self.keys.run(), name="fota-keys"))
        self._tasks.append(asyncio.create_task(self.intake.run_retention(), name="fota-retention"))
        if self.homeassistant is not None:
            self.ha_link.subscribe_retained(self.homeassistant.retained_filter(), 1)
            if self.ha_mqtt is not None:
                try:
                    await self.ha_mqtt.start(timeout)
                except BaseException:
                    await self.stop()
                    raise
            self._tasks.append(asyncio.create_task(self.homeassistant.run(), name="fota-homeassistant"))
        log.info("control center connected to %s as %s", self.broker_url.rsplit("@", 1)[-1], self.client_id)

    async def stop(self) -> None:
        """Stop sending, write what is queued (and acknowledge it), disconnect."""
        self.mqtt.closing = True
        self.intake.close()
        for task in self._tasks:
            if task.get_name() != "fota-flush":
                task.cancel()
        for task in self._tasks:
            if task.get_name() != "fota-flush":
                await cancel_and_wait(task)
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("control center task %s failed", task.get_name())
        self._tasks = []
        if self.ha_mqtt is not None:
            await self.ha_mqtt.stop()
        await self.mqtt.stop()
        await self.workgroup.retire()
        self.intake.release_unwritten()
        self.db.shutdown()

    async def __aenter__(self) -> ControlCenter:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    # ------------------------------------------------------------ what comes in

    async def _on_message(self, client: MQTTClient, topic: str, payload: bytes, qos: int,
                          properties: Any) -> int:
        """Returns the PUBACK reason code; gmqtt acknowledges when this returns."""
        if topic.startswith(FORWARD_PREFIX):  # a chunk request another worker handed to us
            await self.chunk_server.serve(topic.rsplit("/", 1)[1], payload, forwarded=True)
            return ACK_OK
        if self.homeassistant is not None and self.homeassistant.handles(topic):
            try:
                await self.homeassistant.receive(topic, payload, bool((properties or {}).get("retain")))
            except Exception:
                log.exception("Home Assistant message on %s could not be handled", topic)
            return ACK_OK
        parts = split_topic(topic)
        if parts is None:
            log.warning("message on unexpected topic %r ignored", topic)
            return ACK_OK
        device_id, suffix = parts
        try:
            if suffix == protocol.REQ:
                await self.chunk_server.serve(device_id, payload)
            else:
                await self.intake.receive(device_id, suffix, payload)
        except Exception:
            log.exception("%s message from %s could not be handled", suffix, device_id)
        return ACK_OK

    async def _on_retained(self, topic: str, payload: bytes) -> None:
        """A retained discovery config a NATS node's MQTT layer holds (fota.server.center.hamqtt)."""
        await self.homeassistant.receive(topic, payload, True)

    # ------------------------------------------------------------ for operators, tests and benches

    async def set_keys(self, signer: Signer, keys_update: bytes) -> int:
        """Switch to a rotated signing key and push the key update to every device behind
        (fota.server.center.keys.KeyPusher.set_keys); how many it was pushed to."""
        return await self.keys.set_keys(signer, keys_update)

    async def reload_keys(self) -> bool:
        """Switch to the keyring's keys if its files changed; True if they did."""
        return await self.keys.reload_keys()

    def job_states(self, deployment_id: int) -> dict[str, str]:
        """device id -> job state of a deployment (read from the database)."""
        with self.store.session() as s:
            rows = s.execute(select(Job.device_id, Job.state).where(Job.deployment_id == deployment_id))
            return dict(rows.all())

    async def _campaign_loop(self) -> None:
        while True:
            try:
                await self.db.call_aside(self._campaigns.tick)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("campaign step failed")
            await asyncio.sleep(self.campaign_interval)

