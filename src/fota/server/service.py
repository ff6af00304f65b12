"""The control center: sends update commands, serves chunks, records what devices report.

One MQTT connection (gmqtt, MQTT 5, persistent session ``fota-center``) and three duties:

* job sender: pending Jobs -> `update` command on fota/v1/<dev>/cmd (QoS 1), Job 'sent';
* ingestion: status / inventory / online messages are queued and written in batches
  (one transaction per 50 ms or 200 messages); a QoS 1 message is acknowledged to the
  broker only after its batch committed, so a crash never loses a status;
* chunk server: fota/v1/<dev>/req -> chunks on fota/v1/<dev>/data (QoS 0), from an
  in-memory job cache so the hot path never touches the database;
* workers (``share_group``): several control centers share the work through MQTT v5 shared
  subscriptions and the database: each claims the pending jobs it sends
  (``FOR UPDATE SKIP LOCKED``), serves any chunk request, and drains the MQTT session of a
  worker that died (fota.server.workers; docs/operations.md §3);
* campaigns: every ``campaign_interval`` seconds one step of each active campaign
  (fota.server.campaigns.CampaignEngine), which adds the jobs the sender then sends and
  ``cancel`` jobs (signed cancel commands) on abort or timeout;
* keys (``keyring``): a rotation or revocation (``fota keys rotate|revoke`` rewrites the
  keyring's files) is picked up within ``keys_interval`` seconds: new commands are signed with
  the new key and the root-signed key update is queued (QoS 1) for every device whose trust
  version is older, asleep or offline too.

All database work runs on one worker thread: the event loop (and so the chunk server)
never blocks on it, and SQLite never sees two writers of ours at once. (On PostgreSQL the
campaign steps run on a second thread: row locks keep them apart from other writers.)
"""
from __future__ import annotations

import asyncio
import json
import logging
import ssl
import struct
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, TypeVar
from urllib.parse import unquote, urlsplit

from gmqtt import Client as MQTTClient
from gmqtt import Subscription
from gmqtt.mqtt.constants import MQTTv50
from sqlalchemy import case, exists, func, or_, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, aliased

from fota.device import protocol
from fota.server import counters, workers
from fota.server.broker import LEGACY_CENTER_ID
from fota.server.campaigns import CampaignEngine
from fota.server.delta import DEFAULT_WBITS, get_delta, load_delta
from fota.server.deployments import ACTIVE, CANCEL, DONE, PENDING, SENT, TERMINAL_STATES, TIMED_OUT, UPDATE, expire_jobs
from fota.server.ingest import REJECTED, BatchResult, Incoming, write_batch
from fota.server.releases import ReleaseError, read_blob, update_command, wrap_release_key
from fota.server.kek import Kek
from fota.server.retention import DEFAULT_INTERVAL as RETENTION_INTERVAL
from fota.server.retention import Retention, prune, sweep_devices
from fota.server.statuses import MAX_ID, OVERSIZE, DropLog, StatusLimiter, StatusRefused, parse_status
from fota.tools.keyring import COMMAND_TTL, Keyring, Signer
from fota.tools.signing import SigningError
from fota.server.store import Deployment, Device, Job, Release, Store, utcnow
from fota.server.store.inlists import IN_LIST_MAX, chunks, id_ranges, in_ranges

__all__ = ["ControlCenter", "parse_request", "parse_status"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# The ':' makes it an id no device can take (device ids are [A-Za-z0-9_-]; fota.server.broker).
CLIENT_ID = "fota:center"
KEEPALIVE = 30
SESSION_EXPIRY = 0xFFFFFFFF      # MQTT 5: keep the session (and queued statuses) forever
RECONNECT_DELAY = 1              # s between reconnect attempts (gmqtt's default, 6 s, stalls
                                 # every download that long after a broker restart)
SEND_BATCH = 500                 # pending jobs claimed per sender pass
CACHE_REFRESH_INTERVAL = 5.0     # re-read states of cached jobs changed outside this process
EXPIRE_INTERVAL = 1.0            # how often deployment timeouts are checked
DB_RETRY_DELAY = 1.0             # database unreachable: keep the batch, retry after this
ACK_OK = 0                       # MQTT 5 PUBACK reason code "success"
DRAIN_QUIET = 1.0                # a dead worker's session is drained once quiet this long
KEYS_INTERVAL = 1.0              # s between looks at the keyring's files (rotation, revocation)
# MQTT 5 Maximum Packet Size the center announces in its CONNECT: the broker discards a larger
# message instead of sending it (MQTT 5.0 §3.1.2.11.4), so a flood of huge statuses costs the
# center nothing. What it receives is small: statuses (at most protocol.MAX_STATUS_BYTES, the
# larger are refused and counted up to this size), inventories, chunk requests.
MAX_PACKET = 16384


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------- message parsing

@dataclass(frozen=True)
class ChunkRequest:
    job: int
    first: int
    count: int
    chunk: int


def parse_request(payload: bytes) -> ChunkRequest:
    """A chunk-window request (§5); ValueError if malformed or out of bounds."""
    msg = json.loads(payload)
    if not isinstance(msg, dict):
        raise ValueError("not a JSON object")
    values = {name: msg.get(name) for name in ("job", "first", "count", "chunk")}
    if not all(_is_int(v) for v in values.values()):
        raise ValueError("job, first, count and chunk must be integers")
    req = ChunkRequest(**values)
    if not 1 <= req.job <= MAX_ID or not 0 <= req.first <= MAX_ID:
        raise ValueError(f"job must be 1..{MAX_ID} and first 0..{MAX_ID}")
    if not 1 <= req.count <= protocol.MAX_WINDOW:
        raise ValueError(f"count must be 1..{protocol.MAX_WINDOW}")
    if not protocol.MIN_CHUNK_SIZE <= req.chunk <= protocol.MAX_CHUNK_SIZE:
        raise ValueError(f"chunk must be {protocol.MIN_CHUNK_SIZE}..{protocol.MAX_CHUNK_SIZE}")
    return req


def _publish_packet(topic: bytes, payload: bytes) -> bytes:
    """An MQTT 5 PUBLISH packet: QoS 0, no retain, no properties (MQTT 5.0 §3.3)."""
    length = 2 + len(topic) + 1 + len(payload)  # topic length, topic, properties length 0, payload
    header = bytearray(b"\x30")
    while True:
        length, byte = divmod(length, 128)
        header.append(byte | 0x80 if length else byte)
        if not length:
            break
    return b"".join((header, len(topic).to_bytes(2, "big"), topic, b"\0", payload))


REORDER_WAIT = 0.3   # s a worker holds a chunk request that overtook the one before it
FORWARD_PREFIX = "fota/fwd/"  # fota/fwd/<worker>/<device>: chunk requests between workers


def _forward_topic(worker_id: str, device_id: str) -> str:
    return f"{FORWARD_PREFIX}{worker_id}/{device_id}"


def _split_topic(topic: str) -> tuple[str, str] | None:
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] + "/" + parts[1] + "/" != protocol.PREFIX:
        return None
    if not protocol.valid_device_id(parts[2]):
        return None
    return parts[2], parts[3]


# ---------------------------------------------------------------- in-memory state

@dataclass
class _JobInfo:
    """What the chunk server needs to know about a job."""
    device_id: str
    state: str
    blob: bytes | None  # None once terminal (nothing more to serve)
    owner: str | None = None  # the worker that claimed and sent it (jobs.worker)


@dataclass
class _Outgoing:
    job_id: int
    device_id: str
    command: bytes
    info: _JobInfo
    delta_id: int | None = None
    keys_behind: bool = False  # the device's last inventory reports an older trust version


# ---------------------------------------------------------------- the service

class ControlCenter:
    """The asyncio control center. ``await start()`` ... ``await stop()``."""

    def __init__(self, store: Store, broker_url: str, blobs_dir: str | Path, *,
                 chunk: int = protocol.DEFAULT_CHUNK_SIZE, window: int = protocol.DEFAULT_WINDOW,
                 poll_interval: float = 0.2, client_id: str = CLIENT_ID,
                 flush_interval: float = 0.05, flush_max: int = 200, require_online: bool = True,
                 signer: Signer | None = None, keys_update: bytes | None = None,
                 ssl_context: ssl.SSLContext | None = None, delta_wbits: int | None = DEFAULT_WBITS,
                 campaign_interval: float | None = 1.0, share_group: str | None = None,
                 lease: float = workers.LEASE, heartbeat_interval: float = workers.HEARTBEAT,
                 command_ttl: int = COMMAND_TTL,
                 kek: Kek | None = None, keyring: Keyring | None = None, keys_interval: float = KEYS_INTERVAL,
                 status_limiter: StatusLimiter | None = None, retention: Retention | None = Retention(),
                 retention_interval: float = RETENTION_INTERVAL):
        if not protocol.MIN_CHUNK_SIZE <= chunk <= protocol.MAX_CHUNK_SIZE:
            raise ValueError(f"chunk must be {protocol.MIN_CHUNK_SIZE}..{protocol.MAX_CHUNK_SIZE}")
        if not 1 <= window <= protocol.MAX_WINDOW:
            raise ValueError(f"window must be 1..{protocol.MAX_WINDOW}")
        if delta_wbits is not None and not 9 <= delta_wbits <= 15:
            raise ValueError("delta_wbits must be 9..15, or None for no delta updates")
        if not _is_int(command_ttl) or command_ttl < 1:
            raise ValueError("command_ttl must be a positive number of seconds")
        # Seconds a signed command stays acceptable (its `exp`); a device that refuses one as
        # expired gets it signed again (fota.server.expiry).
        self.command_ttl = command_ttl
        self.store = store
        # Largest delta window used (a device's own limit may be lower); None: full images only.
        self.delta_wbits = delta_wbits
        self.deltas_sent = 0         # update commands sent as a delta
        self.broker_url = broker_url
        self.blobs_dir = Path(blobs_dir)
        self.chunk = chunk
        self.window = window
        self.poll_interval = poll_interval
        # share_group: one of several workers (shared subscriptions $share/<group>/..., a
        # persistent session per worker start, registered in center_workers); None: the only one.
        self.share_group = share_group
        if share_group is not None and client_id == CLIENT_ID:
            client_id = workers.new_worker_id()
        self.client_id = client_id
        self.lease = lease
        self.heartbeat_interval = heartbeat_interval
        self.adopted: list[str] = []     # dead workers whose sessions this one drained
        self.drained = 0                 # messages received on those sessions
        self._adopting: set[str] = set()
        self._live: frozenset[str] = frozenset()  # workers whose heartbeat is fresh (refreshed by ours)
        self.forwarded = 0               # chunk requests handed to the job's own worker
        self._next_first: dict[int, int] = {}   # job -> first chunk after the last window served
        self._parked: dict[int, list] = {}      # job -> requests waiting for the one before them
        self._fenced = False             # declared dead by the others: stop at once
        self.lost: asyncio.Event | None = None  # set when fenced (the process should exit)
        self.ssl_context = ssl_context  # mqtts:// only; None: the system's CAs
        self.flush_interval = flush_interval
        self.flush_max = flush_max
        # A command to a device that never connected is dropped by the broker (no session
        # yet), so by default jobs wait until their device is online.
        self.require_online = require_online
        # Step the campaigns (fota.server.campaigns) every campaign_interval seconds; None: never
        # (another worker, or a test driving the engine with its own clock, does it).
        self.campaign_interval = campaign_interval
        self._campaigns = CampaignEngine(store) if campaign_interval else None
        if signer is None:
            raise ValueError("a signer is needed: devices accept only signed commands")
        self.signer = signer
        # The root-signed key update (fota.tools.keyring): pushed to every device whose
        # inventory reports an older trust version.
        self.keys_update = keys_update
        self.keys_version = json.loads(json.loads(keys_update)["body"])["version"] if keys_update else 0
        self.key_updates = 0         # key updates published
        self._keys_pushed: dict[str, int] = {}  # device -> trust version last pushed to it by us
        # keyring: watched for rotations and revocations (None: keys change only by set_keys).
        self.keyring = keyring
        self.keys_interval = keys_interval
        self._keys_seen = keyring.fingerprint() if keyring is not None else None
        self._keys_lock = asyncio.Lock()
        # The key-encryption key that opens the stored release and device keys (encrypted releases).
        self.kek = kek

        # counters (benchmarks, diagnostics)
        self.requests = 0            # chunk requests served
        self.ignored_requests = 0    # malformed, foreign, unknown or finished jobs
        self.chunks = 0              # chunks published
        self.bytes_published = 0     # data payload bytes published, headers included
        self.commands = 0            # update commands published
        self.statuses = 0            # status events stored
        self.duplicates = 0          # status duplicates dropped
        self.garbage = 0             # undecodable messages dropped (refused statuses included)
        self.refused = 0             # statuses refused at parsing (oversize, NUL, NaN, out of range ...)
        self.rate_limited = 0        # statuses over their device's rate (StatusLimiter), not stored
        self.pruned = 0              # statuses deleted by the retention policy
        # Per-device status rate limit (fota.server.statuses.StatusLimiter; its defaults here).
        self.status_limiter = status_limiter if status_limiter is not None else StatusLimiter()
        self._drop_log = DropLog(log)
        self._counts: Counter[str] = Counter()   # ingest_counters deltas not written yet
        # Status history retention (fota.server.retention); None: keep everything.
        self.retention = retention
        self.retention_interval = retention_interval
        self._touched: set[str] = set()  # devices with statuses stored since the last retention pass
        self._sweep_after = ""           # the retention's walk over the whole fleet

        self._jobs: dict[int, _JobInfo] = {}
        self._loading: dict[int, asyncio.Future] = {}  # job id -> its read from the database, in flight
        self._to_load: list[int] = []    # job ids for the next batch read
        self._queue: list[Incoming] = []
        self._served: defaultdict[int, int] = defaultdict(int)  # job -> bytes not yet in the DB
        self._client: MQTTClient | None = None
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fota-db")
        # Campaign steps get a thread of their own on PostgreSQL (a big step must not hold up
        # ingestion); on SQLite they share the one DB thread (one writer of ours at a time).
        self._campaign_db = self._db if store.engine.dialect.name == "sqlite" else \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="fota-campaigns")
        self._tasks: list[asyncio.Task] = []
        self._wakeup = asyncio.Event()    # something to flush
        self._full = asyncio.Event()      # flush_max messages queued
        self._subscribed = asyncio.Event()
        self._closing = False

    # ------------------------------------------------------------ lifecycle

    async def start(self, timeout: float = 10.0) -> None:
        url = urlsplit(self.broker_url)
        if url.scheme not in ("mqtt", "mqtts") or not url.hostname:
            raise ValueError(f"broker URL must look like mqtt://user:password@host:port, not {self.broker_url!r}")
        if self.ssl_context is not None and url.scheme != "mqtts":
            raise ValueError("an ssl_context needs an mqtts:// broker URL")
        client = MQTTClient(self.client_id, clean_session=False, optimistic_acknowledgement=False,
                            session_expiry_interval=SESSION_EXPIRY, maximum_packet_size=MAX_PACKET)
        if url.username:
            client.set_auth_credentials(unquote(url.username), unquote(url.password or ""))
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_disconnect = self._on_disconnect
        client.reconnect_delay = RECONNECT_DELAY
        self._client = client
        self.lost = asyncio.Event()
        if self.share_group is not None:
            await self._db_call(workers.register, self.store, self.client_id, self.lease)
        self._tasks = [asyncio.create_task(self._flush_loop(), name="fota-flush")]
        tls = (self.ssl_context or True) if url.scheme == "mqtts" else False
        try:
            await client.connect(url.hostname, url.port or (8883 if url.scheme == "mqtts" else 1883),
                                 ssl=tls, keepalive=KEEPALIVE, version=MQTTv50)
            await asyncio.wait_for(self._subscribed.wait(), timeout)
        except BaseException:
            await self.stop()
            raise
        self._tasks.append(asyncio.create_task(self._send_loop(), name="fota-sender"))
        if self._campaigns is not None:
            self._tasks.append(asyncio.create_task(self._campaign_loop(), name="fota-campaigns"))
        if self.share_group is not None:
            self._tasks.append(asyncio.create_task(self._worker_loop(), name="fota-workers"))
        elif self.client_id == CLIENT_ID:
            self._tasks.append(asyncio.create_task(self._drain_legacy(), name="fota-drain-legacy"))
        self._tasks.append(asyncio.create_task(self._keys_loop(), name="fota-keys"))
        self._tasks.append(asyncio.create_task(self._retention_loop(), name="fota-retention"))
        log.info("control center connected to %s:%s as %s", url.hostname, url.port, self.client_id)

    async def stop(self) -> None:
        """Stop sending, write what is queued (and acknowledge it), disconnect."""
        self._closing = True
        self._wakeup.set()
        for task in self._tasks:
            if task.get_name() != "fota-flush":
                task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("control center task %s failed", task.get_name())
        self._tasks = []
        if self._client is not None:
            try:
                await self._client.disconnect()
            except Exception:
                log.exception("MQTT disconnect failed")
            self._client = None
        if self.share_group is not None and not self._fenced:
            # Our session keeps its share of the statuses (and what we did not acknowledge):
            # a live worker adopts it at once; with none alive, the next one to start does.
            try:
                await self._db_call(workers.retire, self.store, self.client_id)
            except Exception:
                log.exception("could not retire worker %s (it is adopted after its lease)", self.client_id)
        # Messages not written (arrived during shutdown, or the database is down): their
        # acknowledgements go nowhere now, so the broker redelivers them next time.
        for item in self._queue:
            if item.done is not None and not item.done.done():
                item.done.set_result(None)
        self._queue = []
        self._db.shutdown(wait=True)
        self._campaign_db.shutdown(wait=True)

    async def __aenter__(self) -> ControlCenter:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def _db_call(self, fn: Callable[..., T], *args) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._db, partial(fn, *args))

    # ------------------------------------------------------------ MQTT callbacks

    def _on_connect(self, client: MQTTClient, session_present: int, rc: int, properties: Any) -> None:
        # retain_handling 1: retained inventory/online only for a new subscription, so a
        # reconnect with a kept session does not replay the whole fleet's flags.
        if not client.subscriptions:
            subs = [Subscription(topic, qos=qos, retain_handling_options=1) for topic, qos in self._filters()]
            client.subscribe(subs)
        else:
            for sub in client.subscriptions:
                client.resubscribe(sub)
        log.info("connected to the broker (session present: %s)", bool(session_present))

    def _filters(self, shared: bool = True) -> list[tuple[str, int]]:
        """The topic filters and their QoS: shared ones ($share/<group>/...) for a worker
        (shared=False: a single center's, whatever this one is)."""
        group = self.share_group if shared else None
        share = f"$share/{group}/" if group is not None else ""
        filters = [(share + protocol.PREFIX + "+/" + suffix, 1)
                   for suffix in (protocol.STATUS, protocol.INVENTORY, protocol.ONLINE)]
        filters.append((share + protocol.PREFIX + "+/" + protocol.REQ, 0))
        if group is not None:
            filters.append((_forward_topic(self.client_id, "+"), 0))
        return filters

    def _on_subscribe(self, client: MQTTClient, mid: int, qos: Any, properties: Any) -> None:
        self._subscribed.set()

    def _on_disconnect(self, client: MQTTClient, packet: Any, exc: Any = None) -> None:
        if self._fenced:
            client.stop_reconnect()  # our session is another worker's now: never take it back
        elif not self._closing:
            log.warning("disconnected from the broker; gmqtt reconnects")

    async def _on_message(self, client: MQTTClient, topic: str, payload: bytes, qos: int,
                          properties: Any) -> int:
        """Returns the PUBACK reason code; gmqtt acknowledges when this returns."""
        if topic.startswith(FORWARD_PREFIX):  # a chunk request another worker handed to us
            await self._serve(topic.rsplit("/", 1)[1], payload, forwarded=True)
            return ACK_OK
        parts = _split_topic(topic)
        if parts is None:
            log.warning("message on unexpected topic %r ignored", topic)
            return ACK_OK
        device_id, suffix = parts
        try:
            if suffix == protocol.REQ:
                await self._serve(device_id, payload)
                return ACK_OK
            data = self._decode(device_id, suffix, payload)
            if data is None:
                return ACK_OK  # garbage is acknowledged: redelivering it would not help
            if suffix == protocol.STATUS and not self.status_limiter.allow(
                    device_id, data, asyncio.get_running_loop().time()):
                self.rate_limited += 1
                self._count_drop(device_id, counters.RATE_LIMITED, "over its status rate limit")
                return ACK_OK  # acknowledged, not stored: redelivering it would only repeat the flood
            done = asyncio.get_running_loop().create_future()
            self._enqueue(Incoming(suffix, device_id, data, utcnow(), done))
            # Acknowledge only once the batch holding this message committed. (If the
            # center stops first, the ack goes to a closed connection and the broker
            # redelivers the message to the kept session.)
            await done
        except Exception:
            log.exception("%s message from %s could not be handled", suffix, device_id)
        return ACK_OK

    async def set_keys(self, signer: Signer, keys_update: bytes) -> int:
        """Switch to a rotated signing key and push the root-signed key update to every device
        whose trust version is older (fota.tools.keyring); returns how many it was pushed to.

        Offline and sleeping devices get it queued on their persistent sessions (QoS 1), ahead
        of any command signed with the new key. A device that never connected has no session:
        it gets the update when it publishes its inventory. Of several workers only one pushes
        (the first live one by id), so a device gets it once.
        """
        self.signer = signer
        self.keys_update = keys_update
        self.keys_version = json.loads(json.loads(keys_update)["body"])["version"]
        if self.share_group is not None and min(self._live | {self.client_id}) != self.client_id:
            return 0
        devices = await self._db_call(self._devices_behind, self.keys_version)
        for device_id, inventory in devices:
            self._sync_keys(device_id, inventory)
        log.info("keys v%d (signing key %s): key update queued for %d device(s)", self.keys_version,
                 signer.kid, len(devices))
        return len(devices)

    def _devices_behind(self, version: int) -> list[tuple[str, dict]]:
        """(DB thread) devices whose last inventory reports a trust version below ``version``."""
        with self.store.session() as s:
            rows = s.execute(select(Device.id, Device.inventory)).all()
        return [(device_id, inventory) for device_id, inventory in rows
                if _is_int((inventory or {}).get("keys")) and inventory["keys"] < version]

    async def _keys_loop(self) -> None:
        """Pick up a rotation or revocation written to the keyring while we run."""
        if self.keyring is None:
            return
        await asyncio.sleep(self.keys_interval)  # workers: the live ones are known after a heartbeat
        try:  # a rotation made while no center ran: queue its key update for sleeping devices too
            await self.set_keys(self.signer, self.keys_update)
        except Exception:
            log.exception("pushing the key update failed")
        while True:
            await asyncio.sleep(self.keys_interval)
            try:
                await self.reload_keys()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reloading the keys failed")

    async def reload_keys(self) -> bool:
        """Switch to the keyring's keys if its files changed; True if they did."""
        async with self._keys_lock:  # the sender and the keys loop both look: one switch, one push
            return await self._reload_keys()

    async def _reload_keys(self) -> bool:
        seen = self.keyring.fingerprint()
        if seen == self._keys_seen:
            return False
        try:
            signer, keys_update = self.keyring.current()
        except SigningError as exc:  # a rotation still writing its files: look again shortly
            log.info("keys changed but not usable yet: %s", exc)
            return False
        self._keys_seen = seen
        if signer.kid == self.signer.kid and keys_update == self.keys_update:
            return False
        log.warning("keys changed: signing key %s (was %s), trust version %s", signer.kid, self.signer.kid,
                    json.loads(json.loads(keys_update)["body"])["version"])
        await self.set_keys(signer, keys_update)
        return True

    def _sync_keys(self, device_id: str, inventory: dict) -> None:
        """Send the current key update to a device that reports an older trust version."""
        version = inventory.get("keys")
        if self.keys_update and _is_int(version) and version < self.keys_version and self._client:
            self._client.publish(protocol.topic(device_id, protocol.CMD), self.keys_update, qos=1)
            self._keys_pushed[device_id] = self.keys_version
            self.key_updates += 1
            log.info("key update v%d sent to %s (has v%d)", self.keys_version, device_id, version)

    def _decode(self, device_id: str, suffix: str, payload: bytes) -> Any:
        try:
            if suffix == protocol.STATUS:
                try:
                    return parse_status(payload)
                except StatusRefused as exc:
                    self.garbage += 1
                    self.refused += 1
                    self._count_drop(device_id, counters.OVERSIZE if exc.kind == OVERSIZE else counters.INVALID,
                                     f"refused: {exc}")
                    return None
            if suffix == protocol.INVENTORY:
                if not payload:
                    return None  # a cleared retained message
                inventory = json.loads(payload)
                if not isinstance(inventory, dict):
                    raise ValueError("not a JSON object")
                self._sync_keys(device_id, inventory)
                return inventory
            if suffix == protocol.ONLINE:
                if payload in (b"1", b"0"):
                    return payload == b"1"
                if not payload:
                    return None
                raise ValueError("expected 1 or 0")
            raise ValueError("unexpected topic suffix")
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError included
            self.garbage += 1
            log.warning("bad %s message from %s ignored: %s", suffix, device_id, exc)
            return None

    def _count_drop(self, device_id: str, counter: str, why: str) -> None:
        """A status not stored: counted (ingest_counters, written with the next batch), logged
        at most once a minute per device."""
        self._counts[counter] += 1
        self._drop_log.dropped(device_id, why, asyncio.get_running_loop().time())
        self._wakeup.set()

    # ------------------------------------------------------------ chunk server

    async def _serve(self, device_id: str, payload: bytes, forwarded: bool = False) -> None:
        try:
            req = parse_request(payload)
        except ValueError as exc:
            self.ignored_requests += 1
            log.warning("bad chunk request from %s ignored: %s", device_id, exc)
            return
        info = self._jobs.get(req.job)
        if info is None:
            info = await self._job_info(req.job)
        if info is None or info.device_id != device_id or info.blob is None or info.state in TERMINAL_STATES:
            self.ignored_requests += 1
            log.info("chunk request from %s for job %s not served", device_id, req.job)
            return
        client = self._client
        if client is None or not client.is_connected:
            return
        if not forwarded and info.owner != self.client_id and info.owner in self._live:
            # The shared subscription hands a device's requests to any worker. Served by two,
            # a window's chunks could overtake the previous one's, and the device, which takes
            # chunks only in order, would drop them and wait for its chunk timeout (measured: 2
            # workers 3.5x slower than 1). The job's own worker serves all of it, in order.
            client.publish(_forward_topic(info.owner, device_id), payload, qos=0)
            self.forwarded += 1
            return
        if self.share_group is not None:
            # A forwarded request travels one hop more than the device's next one: a request
            # beyond the job's next chunk waits (REORDER_WAIT at most) for the one before it.
            expected = self._next_first.get(req.job)
            if expected is not None and req.first > expected:
                parked = self._parked.setdefault(req.job, [])
                parked.append((device_id, req, info))
                if len(parked) == 1:
                    asyncio.get_running_loop().call_later(REORDER_WAIT, self._release_parked, req.job)
                return
        self._send_window(client, device_id, req, info)

    def _release_parked(self, job_id: int, only_next: bool = False) -> None:
        """Serve a job's parked requests in order: all of them (their wait is over), or
        (only_next) those that now follow on from the last window served."""
        parked = sorted(self._parked.pop(job_id, []), key=lambda p: p[1].first)
        client = self._client
        while parked and (not only_next or parked[0][1].first <= self._next_first[job_id]):
            device_id, req, info = parked.pop(0)
            if client is not None and client.is_connected:
                self._send_window(client, device_id, req, info)
        if parked:
            self._parked[job_id] = parked
            asyncio.get_running_loop().call_later(REORDER_WAIT, self._release_parked, job_id)

    def _send_window(self, client: MQTTClient, device_id: str, req: Any, info: _JobInfo) -> None:
        blob = info.blob
        if blob is None:
            return
        count = min(req.count, -(-len(blob) // req.chunk) - req.first)
        if count <= 0:
            self.ignored_requests += 1
            return
        topic = protocol.topic(device_id, protocol.DATA).encode()
        served = 0
        packets = []
        for index in range(req.first, req.first + count):
            data = blob[index * req.chunk:(index + 1) * req.chunk]
            message = struct.pack(protocol.CHUNK_HEADER, req.job, index) + data
            packets.append(_publish_packet(topic, message))
            served += len(data)
            self.bytes_published += len(message)
        # The window in one write (gmqtt's publish() costs a Message, a packet build and a
        # send() per chunk): event-loop CPU of a 10,000-device deployment 19 s -> 14 s.
        client._connection.send_package(b"".join(packets))
        self.requests += 1
        self.chunks += count
        self._served[req.job] += served
        self._wakeup.set()
        if self.share_group is not None:
            self._next_first[req.job] = req.first + count
            if req.job in self._parked:
                self._release_parked(req.job, only_next=True)

    async def _job_info(self, job_id: int) -> _JobInfo | None:
        """A job this worker has not cached (another worker sent it, or this one restarted).
        Requests for it that arrive while it is being read wait for that one read: a device
        has several requests out at once, and each read queues behind the status batches on
        the database thread."""
        loading = self._loading.get(job_id)
        if loading is None:
            loading = self._loading[job_id] = asyncio.get_running_loop().create_future()
            self._to_load.append(job_id)
            if len(self._to_load) == 1:  # the first of a batch: it reads them all, in one query
                asyncio.create_task(self._load_batch())
        info = await asyncio.shield(loading)
        return self._jobs.setdefault(job_id, info) if info is not None else None

    async def _load_batch(self) -> None:
        job_ids, self._to_load = self._to_load, []
        try:
            infos = await self._db_call(self._load_jobs, job_ids)
        except Exception:
            log.exception("reading %d job(s) for the chunk server failed", len(job_ids))
            infos = {}
        for job_id in job_ids:
            future = self._loading.pop(job_id, None)
            if future is not None and not future.done():
                future.set_result(infos.get(job_id))

    def _load_jobs(self, job_ids: list[int]) -> dict[int, _JobInfo]:
        """(DB thread) jobs the cache does not know yet (another worker sent them, or this one
        restarted): one query for all, not one per job (a worker took 500 reads per 1,000 jobs)."""
        with self.store.session() as s:
            rows = [row for ids in chunks(sorted(set(job_ids))) for row in s.execute(
                select(Job.id, Job.device_id, Job.state, Job.delta_id, Release, Job.worker)
                .join(Deployment, Job.deployment_id == Deployment.id)
                .join(Release, Deployment.release_id == Release.id)
                .where(Job.id.in_(ids)))]
        infos = {}
        for job_id, device_id, state, delta_id, release, owner in rows:
            if state in TERMINAL_STATES:
                blob = None
            elif delta_id is not None:
                # Sent as a patch: serve the same patch (None if lost: the device times out).
                blob = load_delta(self.store, delta_id)
            else:
                blob = self._blob(release)
            infos[job_id] = _JobInfo(device_id, state, blob, owner)
        return infos

    def _blob(self, release: Release) -> bytes:
        """(DB thread) a release's image; blobs_dir/<sha256> if the stored path is gone."""
        if not Path(release.blob_path).is_file():
            # The data directory moved; blobs are content-addressed, so look in ours.
            release.blob_path = str(self.blobs_dir / release.sha256)  # detached copy, not saved
        return read_blob(release)

    def _set_job_state(self, job_id: int, state: str) -> None:
        info = self._jobs.get(job_id)
        if info is not None:
            info.state = state
            if state in TERMINAL_STATES:
                info.blob = None
                self._next_first.pop(job_id, None)
                self._parked.pop(job_id, None)

    # ------------------------------------------------------------ job sender

    async def _send_loop(self) -> None:
        last_refresh = last_expiry = asyncio.get_running_loop().time()
        while True:
            sent = 0
            try:
                if self._client is not None and self._client.is_connected:
                    sent = await self._send_pending()
                now = asyncio.get_running_loop().time()
                if now - last_expiry >= EXPIRE_INTERVAL:
                    last_expiry = now
                    for job_id in await self._db_call(self._expire):
                        self._set_job_state(job_id, TIMED_OUT)
                if now - last_refresh >= CACHE_REFRESH_INTERVAL:
                    last_refresh = now
                    await self._refresh_cache()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("job sender pass failed")
            # After a full batch more jobs are probably pending: claim them at once.
            await asyncio.sleep(0 if sent >= SEND_BATCH else self.poll_interval)

    async def _campaign_loop(self) -> None:
        while True:
            try:
                await asyncio.get_running_loop().run_in_executor(self._campaign_db, self._campaigns.tick)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("campaign step failed")
            await asyncio.sleep(self.campaign_interval)

    # ------------------------------------------------------------ workers (share_group)

    async def _worker_loop(self) -> None:
        """Heartbeat; adopt a dead worker and drain its session (one at a time)."""
        drain: asyncio.Task | None = None
        while True:
            try:
                alive = await self._db_call(workers.heartbeat, self.store, self.client_id, sorted(self._adopting))
                if not alive:
                    self._fence()
                    return
                # Requests go to a job's own worker only while it answers its heartbeats (2 missed:
                # served here), not for the whole lease: a dead one's devices must not stall.
                fresh = min(self.lease, 2 * self.heartbeat_interval)
                self._live = frozenset(await self._db_call(workers.live_workers, self.store, fresh))
                if drain is None or drain.done():
                    dead = await self._db_call(workers.adopt_stale, self.store, self.client_id, self.lease)
                    if dead is not None:
                        self._adopting.add(dead)
                        drain = asyncio.create_task(self._drain(dead), name=f"fota-drain-{dead}")
            except asyncio.CancelledError:
                if drain is not None:
                    drain.cancel()
                raise
            except Exception:
                log.exception("worker heartbeat/adoption failed")
            await asyncio.sleep(self.heartbeat_interval)

    def _fence(self) -> None:
        """Another worker declared us dead and took our session: stop sending and leave."""
        log.error("worker %s was declared dead (no heartbeat for %.0fs): stopping", self.client_id, self.lease)
        self._fenced = True
        if self.lost is not None:
            self.lost.set()
        if self._client is not None:
            self._client.stop_reconnect()

    async def _drain_legacy(self) -> None:
        """A home upgraded from a fota whose center connected as LEGACY_CENTER_ID may still
        hold that persistent session, with statuses the devices were acknowledged for: ingest
        them and delete it (no session: connect, see none, leave)."""
        await self._drain(LEGACY_CENTER_ID, worker=False)

    async def _drain(self, dead: str, worker: bool = True) -> None:
        """Take over a dead worker's persistent session: ingest what it queued (acknowledged after
        commit, as ours), unsubscribe it from the group, and delete it once it is quiet.

        worker=False: the session of an earlier single center (LEGACY_CENTER_ID), not registered
        as a worker; nothing to do if the broker has no such session."""
        loop = asyncio.get_running_loop()
        url = urlsplit(self.broker_url)
        state = {"last": loop.time(), "busy": 0, "count": 0, "present": True}
        unsubscribed = asyncio.Event()

        async def on_message(client, topic, payload, qos, properties):
            state["last"] = loop.time()
            state["busy"] += 1
            state["count"] += 1
            self.drained += 1
            try:
                return await self._on_message(client, topic, payload, qos, properties)
            finally:
                state["busy"] -= 1
                state["last"] = loop.time()

        client = MQTTClient(dead, clean_session=False, optimistic_acknowledgement=False,
                            session_expiry_interval=SESSION_EXPIRY, maximum_packet_size=MAX_PACKET)
        if url.username:
            client.set_auth_credentials(unquote(url.username), unquote(url.password or ""))
        client.on_message = on_message
        client.on_connect = lambda client, session_present, *args: state.update(present=bool(session_present))
        client.on_unsubscribe = lambda *args: unsubscribed.set()
        client.set_config({"reconnect_retries": 0})
        tls = (self.ssl_context or True) if url.scheme == "mqtts" else False
        try:
            await client.connect(url.hostname, url.port or (8883 if url.scheme == "mqtts" else 1883),
                                 ssl=tls, keepalive=KEEPALIVE, version=MQTTv50)
            if not worker and not state["present"]:
                await client.disconnect(session_expiry_interval=0)  # the one our connect made
                return
            # No new message is routed to the session after UNSUBACK; what it queued before
            # arrives on connect (Mosquitto sends the whole queue: no in-flight limit).
            client.unsubscribe([topic for topic, _ in self._filters(shared=worker)])
            await asyncio.wait_for(unsubscribed.wait(), 30)
            while state["busy"] or loop.time() - state["last"] < DRAIN_QUIET:
                await asyncio.sleep(0.1)
            await client.disconnect(session_expiry_interval=0)  # the broker deletes the session
            if worker:
                await self._db_call(workers.forget, self.store, dead)
                self.adopted.append(dead)
                log.warning("adopted dead worker %s: drained %d message(s) from its session", dead, state["count"])
            else:
                log.warning("drained %d message(s) from the session of the earlier control center id %s "
                            "and deleted it", state["count"], dead)
        except asyncio.CancelledError:
            if client.is_connected:  # stopping: the session stays, drained at the next start
                await client.disconnect()
            raise
        except Exception:
            # Its row goes stale again without our heartbeats: adopted again later.
            log.exception("draining the session of %s failed", dead)
            if client.is_connected:
                await client.disconnect()
        finally:
            self._adopting.discard(dead)

    async def _send_pending(self) -> int:
        """Publish the commands of pending jobs and mark them sent; how many were sent."""
        if self._fenced:
            return 0
        if self.keyring is not None:
            # A rotation made just before a deployment: sign its commands with the new key.
            await self.reload_keys()
        outgoing = await self._db_call(self._claim_pending)
        if not outgoing:
            return 0
        client = self._client
        for out in outgoing:
            # Cache first, so that the device's first request finds the job.
            self._jobs.setdefault(out.job_id, out.info)
            if out.keys_behind and self._keys_pushed.get(out.device_id) != self.keys_version:
                # The key update goes ahead of the command on the same session (QoS 1 keeps the
                # order): the device must trust the new key before it checks the command. (Another
                # worker may not have pushed it yet.)
                client.publish(protocol.topic(out.device_id, protocol.CMD), self.keys_update, qos=1)
                self._keys_pushed[out.device_id] = self.keys_version
                self.key_updates += 1
            client.publish(protocol.topic(out.device_id, protocol.CMD), out.command, qos=1)
            self.commands += 1
        await self._db_call(self._mark_sent, [out.job_id for out in outgoing],
                            {out.job_id: (out.delta_id, len(out.info.blob or b"")) for out in outgoing
                             if out.delta_id is not None})
        self.deltas_sent += sum(1 for out in outgoing if out.delta_id is not None)
        log.info("sent %d update command(s)", len(outgoing))
        return len(outgoing)

    def _claim_pending(self) -> list[_Outgoing]:
        """(DB thread) claim the oldest pending jobs (jobs.worker = us), with their commands.

        A job is claimed only by one worker (row locks, SKIP LOCKED: a job another worker is
        claiming is skipped) and only when no older job of its device is still pending, so a
        device's commands leave in job-id order even when several workers send."""
        older = aliased(Job)
        query = (select(Job.id, Job.device_id, Device.inventory, Device.enc_key, Release, Job.kind, Job.target_job,
                        Deployment.min_battery)
                 .join(Deployment, Job.deployment_id == Deployment.id)
                 .join(Release, Deployment.release_id == Release.id)
                 .join(Device, Job.device_id == Device.id)
                 .where(Job.state == PENDING, or_(Job.worker.is_(None), Job.worker == self.client_id),
                        ~exists().where(older.device_id == Job.device_id, older.id < Job.id,
                                        older.state == PENDING))
                 .order_by(Job.id).limit(SEND_BATCH).with_for_update(of=Job, skip_locked=True))
        if self.require_online:
            query = query.where(Device.online.is_(True))
        with self.store.session() as s:
            rows = s.execute(query).all()
            for ids in chunks([row[0] for row in rows]):
                s.execute(update(Job).where(Job.id.in_(ids)).values(worker=self.client_id))
        outgoing = []
        for job_id, device_id, inventory, device_key, release, kind, target_job, min_battery in rows:
            keys = (inventory or {}).get("keys")
            behind = bool(self.keys_update) and _is_int(keys) and keys < self.keys_version
            if kind == CANCEL:
                command = self.signer.command({"type": "cancel", "job": job_id, "device": device_id,
                                               "target": target_job}, ttl=self.command_ttl)
                outgoing.append(_Outgoing(job_id, device_id, command, _JobInfo(device_id, SENT, None, self.client_id),
                                          keys_behind=behind))
                continue
            chunk = self.chunk
            max_chunk = (inventory or {}).get("max_chunk")
            if _is_int(max_chunk) and protocol.MIN_CHUNK_SIZE <= max_chunk < chunk:
                chunk = max_chunk  # never more than the device accepts
            try:
                wrapped = wrap_release_key(release, device_id, device_key, self.kek)
            except ReleaseError as exc:
                log.error("job %d not sent: %s", job_id, exc)
                continue
            patch = self._delta_for(release, inventory or {})
            command = update_command(job_id, device_id, release, self.signer, chunk, self.window,
                                     wrapped_key=wrapped, delta=patch.descriptor() if patch else None,
                                     min_battery=min_battery, ttl=self.command_ttl)
            blob = patch.data if patch else self._blob(release)
            outgoing.append(_Outgoing(job_id, device_id, command, _JobInfo(device_id, SENT, blob, self.client_id),
                                      patch.id if patch else None, keys_behind=behind))
        return outgoing

    def _delta_for(self, release: Release, inventory: dict[str, Any]):
        """(DB thread) the patch from the device's running image to `release`, or None: no
        delta when the device takes none, runs an image no release has, or the patch would not
        be smaller than the image."""
        image, wbits = inventory.get("image"), inventory.get("delta_wbits")
        if self.delta_wbits is None or release.enc_key or not isinstance(image, str) or not _is_int(wbits) \
                or wbits < 9:
            return None
        with self.store.session() as s:
            base = s.scalars(select(Release).where(Release.sha256 == image.lower(),
                                                   Release.kind == release.kind).order_by(Release.id)).first()
        if base is None or base.sha256 == release.sha256:
            return None
        try:
            return get_delta(self.store, self.blobs_dir, base, release, min(self.delta_wbits, wbits), self._blob)
        except Exception:  # a patch is an optimisation: never let it stop the update
            log.exception("delta %s -> %s failed; sending the full image", base.version, release.version)
            return None

    def _expire(self) -> list[int]:
        """(DB thread) time out the jobs of deployments past their timeout; their ids."""
        with self.store.session() as s:
            expired = expire_jobs(s, utcnow())
            if expired:
                self._finish_deployments(s, set(expired))
        for dep_id, job_ids in expired.items():
            log.warning("deployment %d: %d job(s) timed out", dep_id, len(job_ids))
        return [job_id for job_ids in expired.values() for job_id in job_ids]

    def _mark_sent(self, job_ids: list[int], deltas: dict[int, tuple[int, int]] | None = None) -> None:
        """(DB thread) pending -> sent; a status may already have moved a job further.

        deltas: job id -> (delta id, patch size) for jobs sent as a patch."""
        now = utcnow()
        with self.store.session() as s:
            for job_id, (delta_id, size) in (deltas or {}).items():
                s.execute(update(Job).where(Job.id == job_id).values(delta_id=delta_id, bytes_total=size))
            for ids in chunks(job_ids):  # one UPDATE per row (a new row version on PostgreSQL), not two
                s.execute(update(Job).where(Job.id.in_(ids), or_(Job.sent_at.is_(None), Job.state == PENDING))
                          .values(sent_at=func.coalesce(Job.sent_at, now),
                                  state=case((Job.state == PENDING, SENT), else_=Job.state))
                          .execution_options(synchronize_session=False))

    async def _refresh_cache(self) -> None:
        live = [job_id for job_id, info in self._jobs.items() if info.state not in TERMINAL_STATES]
        if live:
            for job_id, state in (await self._db_call(self._job_states_by_id, live)).items():
                if state != self._jobs[job_id].state:
                    self._set_job_state(job_id, state)

    def _job_states_by_id(self, job_ids: list[int]) -> dict[int, str]:
        """(DB thread) job id -> state in the database, for the jobs of ``job_ids`` that exist.

        Read by id ranges, not an IN-list: the cache's live jobs (tens of thousands in a big
        rollout) are mostly runs of consecutive ids, so a few ranges cover them."""
        wanted = set(job_ids)
        states: dict[int, str] = {}
        with self.store.session() as s:
            for ranges in chunks(id_ranges(wanted), IN_LIST_MAX // 2):
                states.update(row for row in s.execute(select(Job.id, Job.state).where(in_ranges(Job.id, ranges)))
                              if row[0] in wanted)
        return states

    def job_states(self, deployment_id: int) -> dict[str, str]:
        """device id -> job state of a deployment (read from the database)."""
        with self.store.session() as s:
            rows = s.execute(select(Job.device_id, Job.state).where(Job.deployment_id == deployment_id))
            return dict(rows.all())

    # ------------------------------------------------------------ batched ingestion

    def _enqueue(self, item: Incoming) -> None:
        self._queue.append(item)
        self._wakeup.set()
        if len(self._queue) >= self.flush_max:
            self._full.set()

    async def _flush_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            if not self._closing:
                try:  # gather a batch: up to flush_interval, or until flush_max messages
                    await asyncio.wait_for(self._full.wait(), self.flush_interval)
                except TimeoutError:
                    pass
            batch, self._queue = self._queue[:self.flush_max], self._queue[self.flush_max:]
            served, self._served = dict(self._served), defaultdict(int)
            counts, self._counts = dict(self._counts), Counter()
            if len(self._queue) < self.flush_max:
                self._full.clear()
            if not self._queue:
                self._wakeup.clear()
            try:
                ok = await self._flush(batch, served, counts) if batch or served or counts else True
            except Exception:  # never let the writer die: every status would stall behind it
                log.exception("writing a batch of %d message(s) failed; dropped", len(batch))
                for item in batch:
                    if item.done is not None and not item.done.done():
                        item.done.set_result(None)
                ok = True
            if self._closing and (not ok or (not self._queue and not self._served and not self._counts)):
                return

    async def _flush(self, batch: list[Incoming], served: dict[int, int], counts: dict[str, int]) -> bool:
        """Write a batch, then release its acknowledgements; False if the database is unavailable."""
        try:
            result = await self._db_call(self._write_batch, batch, served, counts)
        except OperationalError as exc:
            # The database is unreachable or locked: keep everything (unacknowledged) and retry.
            self._queue[:0] = batch
            for job_id, n in served.items():
                self._served[job_id] += n
            self._counts.update(counts)
            self._wakeup.set()
            if self._closing:
                log.error("database unavailable while stopping; %d message(s) stay unacknowledged: %s",
                          len(self._queue), exc)
                return False
            log.error("database write failed, retrying in %.0fs: %s", DB_RETRY_DELAY, exc)
            await asyncio.sleep(DB_RETRY_DELAY)
            return False
        except Exception:
            log.exception("batch write failed; writing its %d message(s) one by one", len(batch))
            result = await self._write_one_by_one(batch, served, counts)
        for job_id, state in result.job_states.items():
            self._set_job_state(job_id, state)
        self._touched.update(item.device_id for item in batch if item.kind == protocol.STATUS)
        self.statuses += result.stored
        self.duplicates += result.duplicates
        for item in batch:
            if item.done is not None and not item.done.done():
                item.done.set_result(None)
        return True

    async def _write_one_by_one(self, batch: list[Incoming], served: dict[int, int],
                                counts: dict[str, int]) -> BatchResult:
        total = BatchResult()
        traced = False
        for items, served_part, counts_part in [([], served, counts)] + [([item], {}, {}) for item in batch]:
            try:
                result = await self._db_call(self._write_batch, items, served_part, counts_part)
            except IntegrityError:
                # (device, epoch, boot, seq) stored meanwhile by another writer: a duplicate
                total.duplicates += 1
                continue
            except Exception as exc:
                # A message the database refuses on its own is dropped (and acknowledged):
                # redelivering it would wedge the session. One traceback a batch, not one each.
                what = (items[0].kind, items[0].device_id) if items else ("served-bytes counters", "-")
                if traced:
                    log.error("dropping %s from %s: %s", *what, exc)
                else:
                    log.exception("dropping %s from %s", *what)
                traced = True
                continue
            total.job_states.update(result.job_states)
            total.stored += result.stored
            total.duplicates += result.duplicates
        return total

    def _write_batch(self, batch: list[Incoming], served: dict[int, int],
                     counts: dict[str, int] | None = None) -> BatchResult:
        """(DB thread) one transaction for a batch of messages, served-byte counters and the
        counters of statuses not stored."""
        with self.store.session() as s:
            result = write_batch(s, batch, served)
            if result.finished:
                self._finish_deployments(s, result.finished)
            if counts:
                counters.add(s, self.client_id, counts)
        return result

    # ------------------------------------------------------------ retention

    async def _retention_loop(self) -> None:
        """Every retention_interval: prune the status history (fota.server.retention) of the
        devices heard from since the last pass and of the next few others; forget idle rate buckets."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.retention_interval)
            self.status_limiter.forget_idle(loop.time())
            self._drop_log.forget_idle(loop.time())
            if self.retention is None or self._fenced:
                continue
            touched, self._touched = self._touched, set()
            try:
                # The campaign thread on PostgreSQL (ingestion is not held up), the DB thread on SQLite.
                self.pruned += await loop.run_in_executor(self._campaign_db, self._prune, touched)
            except asyncio.CancelledError:
                raise
            except Exception:
                self._touched |= touched  # next pass
                log.exception("status history retention pass failed")

    def _prune(self, touched: set[str]) -> int:
        """(DB thread) one retention pass."""
        swept = sweep_devices(self.store, self._sweep_after, self.retention.sweep)
        if swept:
            self._sweep_after = swept[-1]
        return prune(self.store, self.retention, touched | set(swept), utcnow(), self.client_id)

    @staticmethod
    def _finish_deployments(s: Session, deployment_ids: set[int]) -> None:
        s.flush()
        # NOT EXISTS stops at a deployment's first open job (reading all of them cost a row per
        # open job of a big deployment at every batch that ended one of its jobs).
        for ids in chunks(sorted(deployment_ids)):
            s.execute(update(Deployment).where(
                Deployment.id.in_(ids), Deployment.state == ACTIVE,  # (a cancelled one stays cancelled)
                ~exists().where(Job.deployment_id == Deployment.id, Job.kind == UPDATE,
                                Job.state.not_in(TERMINAL_STATES))).values(state=DONE))
