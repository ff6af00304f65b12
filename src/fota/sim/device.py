"""One simulated device: the device's own UpdateCore and executor behind an asyncio runner.

The core's local actions (slots, journal, agent state, boot record, trust store, install result)
run in the shipped executor (fota.device.executor), as on the MicroPython runner; this module
adds the asyncio I/O around it. What a board keeps across a reset lives in `SimDevice.storage`
(JSON text per file: boot.json, agent.json, journal.json, keys.json) and in the slot backend. A
reboot publishes the retained `online 0` and disconnects cleanly (the runner's shut_down), throws
the core away, runs the boot selector on the stored boot record and builds a new core from what
is stored, exactly as the MicroPython runner (fota.device.runner) does after machine.reset().

The MQTT side is one gmqtt client per device (MQTT 3.1.1, its own broker account, persistent
session, will on `online`), so the broker's password file and ACL apply as to real devices.
A QoS 1 command is acknowledged only after the core handled it, as on the device. A QoS 1
status the broker had not acknowledged when its connection died is published again on the next
connection, as the device does (docs/protocol.md §9; gmqtt's in-flight store goes with its client).

Transport http (opt-in: `transports=("mqtt", "http")`, declared in the inventory as boards do):
the core's A_FETCH starts the device's own HTTP client (fota.device.http.Fetch, driven by asyncio
in fota.sim.httpfetch) in a task of the device; its chunks go to the core's fetched(), in order
with the MQTT messages, as the MicroPython runner feeds them. Fetched only while the broker
connection is up (the core's deadlines count connected time); a reconnect restarts it from the
next chunk.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from collections import deque

from gmqtt import Client as MQTTClient
from gmqtt import Message, Subscription
from gmqtt.mqtt.constants import MQTTv311

from fota import gmqtt_adapter
from fota.aiowait import within
from fota.device import boot as bootrec
from fota.device import core as C
from fota.device import protocol as P
from fota.device.executor import Executor, Reboot
from fota.device.runner import _superseded
from fota.device.mqtt import ticks_diff, ticks_ms
from fota.device.slots.sim import SimBackend, SimFlash
from fota.sim.httpfetch import AsyncFetch, HttpError
from fota.sim.slots import HashSlots

log = logging.getLogger(__name__)

DISCONNECT_TIMEOUT = 5.0  # s for a DISCONNECT to be written
ACK_TIMEOUT = 30.0        # s to wait for the broker's PUBACKs before a reboot or a nap
CONNECT_TIMEOUT = 30.0    # s for CONNECT..CONNACK (thousands connect at once)
HTTP_TIMEOUT = 10.0       # s for an http connect, and for a response's next bytes
FETCHED = "\0http"        # inbox marker of a fetched chunk (not an MQTT topic)


class Profile:
    """How one simulated device misbehaves.

    unhealthy: every trial boot of a new image fails its health check (the device reverts after
               max_trial_boots attempts, as the boot selector decides).
    chunk_delay: seconds added before each received chunk is handled (a slow link).
    sleep_at / sleep_for: seconds after start at which the device naps, and for how long: as a
               board before its deep sleep, it publishes its retained `online 0` (QoS 1, acknowledged)
               and disconnects cleanly (no will; the broker keeps its session), so the control
               center holds its jobs until its `online 1` is back; it reconnects when it wakes.
    announce_nap: False for a device that leaves without saying so (a firmware bug, or a dropped
               link whose will has not fired yet): its nap is a bare clean DISCONNECT, the center
               goes on taking it for online and sends, and the broker queues its QoS 1 commands
               in the session. Only for tests of that queue.
    """

    def __init__(self, unhealthy=False, chunk_delay=0.0, sleep_at=None, sleep_for=0.0, announce_nap=True):
        self.unhealthy = unhealthy
        self.chunk_delay = chunk_delay
        self.sleep_at = sleep_at
        self.sleep_for = sleep_for
        self.announce_nap = announce_nap

    def to_dict(self):
        return {"unhealthy": self.unhealthy, "chunk_delay": self.chunk_delay,
                "sleep_at": self.sleep_at, "sleep_for": self.sleep_for, "announce_nap": self.announce_nap}


class SimDevice:
    def __init__(self, device_id: str, password: str, *, host: str, port: int | list[int], root_key: bytes, trust: dict,
                 hardware: str = "sim", version: str = "1.0.0", capacity: int = 256 * 1024,
                 backend: str = "hash", verify=None, profile: Profile | None = None,
                 max_trial_boots: int = 3, keepalive: int = 60, tick: float = 1.0,
                 chunk_timeout_ms: int = 3000, stall_timeout_ms: int = 60000, trial_timeout_ms: int = 60000,
                 enc_key: str | None = None, clock=time.monotonic, ssl=None,
                 transports=("mqtt",), http_timeout: float = HTTP_TIMEOUT):
        self.id = device_id
        # payload transports declared in the inventory: ("mqtt", "http") takes http jobs
        self.transports = tuple(transports)
        if not set(self.transports) <= set(P.TRANSPORTS) or "mqtt" not in self.transports:
            raise ValueError("transports must include mqtt, and be among %s" % (P.TRANSPORTS,))
        self.http_timeout = http_timeout
        self.fetch: AsyncFetch | None = None
        self._fetch_task: asyncio.Task | None = None
        self._http_past = {"bytes_received": 0, "requests": 0, "connections": 0}  # of fetches discarded
        self.ssl = ssl  # an ssl.SSLContext (the broker's CA) for a TLS broker; None: plain MQTT
        self.password = password
        self.host = host
        # Several ports: the nodes of a clustered broker; each connect picks one at random.
        self.ports = list(port) if isinstance(port, (list, tuple)) else [port]
        self.port = self.ports[0]
        self.root_key = root_key
        self.trust = trust
        self.hardware = hardware
        self.capacity = capacity
        self.verify = verify
        self.profile = profile or Profile()
        self.max_trial_boots = max_trial_boots
        self.keepalive = keepalive
        self.tick = tick
        self.settings = C.Settings(chunk_timeout=chunk_timeout_ms, stall_timeout=stall_timeout_ms,
                                   trial_timeout=trial_timeout_ms)
        self.enc_key = enc_key  # unused: the image backends do not decrypt (like esp32/sim)
        self.clock = clock
        if backend == "hash":
            self.backend = HashSlots(capacity)
        elif backend == "flash":
            self.backend = SimBackend(SimFlash(2 * capacity), capacity)
        else:
            raise ValueError("backend must be 'hash' or 'flash', not %r" % backend)
        self.backend_name = backend
        # the device's persistent files (JSON text), as the runner keeps them on its filesystem
        self.storage: dict[str, str] = {"boot.json": json.dumps(bootrec.new_record(version))}
        self.executor = Executor(self.backend, _Files(self.storage), "", self._log)

        self.core: C.UpdateCore | None = None
        self.client: MQTTClient | None = None
        self.inbox: deque = deque()
        self._orphans: list = []   # command handlers whose PUBACK must not be sent
        self.pending: list = []
        self._unacked: list = []   # QoS 1 publishes of a lost connection without PUBACK (actions)
        self._wake = asyncio.Event()
        self._waiting = False      # the session loop is parked on _wake (chunks may skip it)
        self._fault: Exception | None = None
        self._lost = False
        self._stop = False
        self._task: asyncio.Task | None = None
        self.t0 = clock()
        self.slept = False
        self._nap_over = asyncio.Event()  # set: a nap ends now (wake(), stop())

        # observations (tests, benchmark)
        self.boots = 0
        self.connects = 0
        self.chunks = 0
        self.stale_chunks = 0   # chunks the core dropped (not the next expected: late or duplicate)
        self.timeouts = 0       # chunk timeouts that re-requested (core.tick asked for chunks)
        self.refused_subscriptions = 0  # SUBACKs with a failure code: dropped and reconnected
        self._refused = 0       # refusals in a row (the back-off's exponent)
        self.published = 0
        self.resent = 0         # QoS 1 statuses published again: their connection died before the PUBACK
        self.fetched = 0        # chunks that came over http
        self.fetch_starts = 0   # A_FETCH actions: a start, or a restart after a reconnect or timeout
        self.http_failures = 0  # attempts that failed (a cut, a reset, a 5xx): resumed after a back-off
        self.http_failure_kinds: dict[str, int] = {}  # "<phase> <exception>[ <errno>]" -> count
        self.http_errors: list[str] = []  # refusals that ended a job (E_HTTP_*)
        self.fetch_waits: list[float] = []  # s from a fetch's (re)start to its first chunk
        self._fetch_t0: float | None = None
        self.commands: list[float] = []    # clock() when a command reached the core
        self.woke_at: float | None = None
        self.confirmed_at: float | None = None
        self.reverted_at: float | None = None
        self.error: str | None = None

    # ---- persistent files ------------------------------------------------------------------
    def boot_record(self) -> dict:
        return json.loads(self.storage["boot.json"])

    def running_version(self) -> str | None:
        rec = self.boot_record()
        return rec["versions"].get(rec["active"])

    def now_ms(self) -> int:
        return int((self.clock() - self.t0) * 1000)

    def _log(self, *args):
        log.info("%s: %s", self.id, " ".join(str(a) for a in args))

    # ---- boot ------------------------------------------------------------------------------
    def boot(self) -> None:
        """Select the slot, run the health check of a trial image, build the core from storage."""
        self.boots += 1
        self._fetch_discard()  # a reset: no socket survives it
        ex = self.executor
        on_trial = ex.select(None, self.max_trial_boots)  # boot.json is stored from the start
        self.core = None
        self._unacked = []  # a restart forgets them, as the device's queue in RAM
        if on_trial and self.profile.unhealthy:
            # The new image's app does not come up: the runner records it and resets.
            ex.trial_failed("health check failed (simulated)")
            raise Reboot()
        agent = ex.agent_state(lambda: os.urandom(4))
        identity = {
            "id": self.id, "hardware": self.hardware, "root": self.root_key, "trust": ex.trust(self.trust),
            "capacity": self.backend.capacity, "kinds": self.backend.KINDS,
            "version": ex.record["versions"].get(ex.slot), "counter": ex.record.get("counter", 0),
            "time": 0, "enc_key": None, "transports": self.transports,
        }
        core = C.UpdateCore(identity, agent, self.settings, verify=self.verify)
        core.inventory_extra = {"active": ex.slot, "slots": ex.record["versions"], "backend": "sim",
                                "port": "fleetsim"}
        core.now = self.now_ms()
        self.core = core
        self.pending = []
        self._local_only(ex.start(core, on_trial))

    # ---- actions ---------------------------------------------------------------------------
    def _local_only(self, actions):
        # At boot nothing is connected: publishes wait for the first connection.
        self.pending.extend(actions)
        while self.pending and self.pending[0][0] != C.A_PUBLISH:
            self._local(self.pending[0])

    def _execute_now(self, actions) -> bool:
        """Run actions in order as far as they need no waiting; True if all ran.

        What is left (an action that waits for the broker's acknowledgements, or a publish
        while offline) stays in `pending` for the session loop's `execute`."""
        self.pending.extend(actions)
        while self.pending:
            action = self.pending[0]
            kind = action[0]
            if kind == C.A_PUBLISH:
                if self.client is None or self._lost:
                    return False
                _, suffix, payload, qos, retain = action
                self.client.publish(P.topic(self.id, suffix), payload, qos=qos, retain=retain)
                self.published += 1
                self.pending.pop(0)
            elif kind in (C.A_CLEAR_REPORT, C.A_REBOOT):
                return False
            else:
                self._local(action)
        return True

    async def execute(self, actions):
        """Run actions in order; a publish while offline keeps it and the rest for later."""
        self.pending.extend(actions)
        while not self._execute_now(()):
            action = self.pending[0]
            if action[0] == C.A_PUBLISH:
                return  # offline: the rest waits for the next connection
            # A_CLEAR_REPORT / A_REBOOT: only once the broker has acknowledged the statuses before
            # it (the report, the 'rebooting' status), as the device's blocking QoS 1 publish does.
            if not await self._acked():
                return
            self._local(action)

    async def _acked(self) -> bool:
        client = self.client
        if client is None or self._lost:
            return False
        try:
            await within(gmqtt_adapter.wait_acked(client), ACK_TIMEOUT)
        except TimeoutError:
            return False
        return not self._lost and client is self.client

    def _local(self, action):
        """Run pending[0], a local action, in the executor; then drop it from `pending` (the core's
        answer to an install runs next)."""
        kind = action[0]
        if kind == C.A_FETCH:
            self.pending.pop(0)
            self._fetch_start(action)  # no I/O here: the device's fetch task does it
            return
        if kind == C.A_CLEAR_REPORT and (self.executor.record.get("report") or {}).get("state") == P.REVERTED:
            self.reverted_at = self.clock()
        more = self.executor.run(action)
        if more:
            self.pending[1:1] = more
        self.pending.pop(0)
        if kind == C.A_CONFIRM:
            self.confirmed_at = self.clock()

    # ---- MQTT ------------------------------------------------------------------------------
    async def _on_message(self, client, topic, payload, qos, properties):
        if client is not self.client:
            return 0
        if qos == 0:
            if self._can_handle_now():
                # The common case, a chunk while the session loop waits: hand it to the core
                # here, without waking the loop (a task switch per chunk dominates at 10,000
                # devices). Same order and same actions as the loop would run.
                try:
                    self._handle_chunk(payload)
                except Exception as e:  # raised in the session loop, as if it had run there
                    self._fault = e
                if self.pending or self._fault:
                    self._wake.set()   # the loop finishes what must wait (the reboot)
                return 0
            self.inbox.append((topic, payload, None))
            self._wake.set()
            return 0
        done = asyncio.get_running_loop().create_future()
        self.inbox.append((topic, payload, done))
        self._wake.set()
        # gmqtt sends the PUBACK when this returns: only after the core handled the command.
        return await done

    def _can_handle_now(self) -> bool:
        return (self._waiting and not self.inbox and not self.pending and not self._lost
                and not self.profile.chunk_delay and self.core is not None)

    def _handle_chunk(self, payload) -> bool:
        core = self.core
        core.now = self.now_ms()
        self.chunks += 1
        before = core.next
        actions = core.chunk(payload)
        if core.next == before:
            self.stale_chunks += 1
        return self._execute_now(actions)

    def _handle_fetched(self, data) -> bool:
        core = self.core
        core.now = self.now_ms()
        self.fetched += 1
        if self._fetch_t0 is not None:
            self.fetch_waits.append(self.clock() - self._fetch_t0)
            self._fetch_t0 = None
        return self._execute_now(core.fetched(data))

    # ---- transport http ----------------------------------------------------------------------
    def _fetch_start(self, action):
        # As fota.device.runner: (re)start the fetch from the core's offset; a refusal found
        # here (a bad URL) is reported by the fetch task, outside this execute().
        _, http, offset, size, chunk = action
        self.fetch_starts += 1
        if self._fetch_t0 is None:  # a restart before any chunk counts from the first start
            self._fetch_t0 = self.clock()
        if self.fetch is None:
            self.fetch = AsyncFetch(self.http_timeout)
        self.fetch.begin(self.core.job.id, http, offset, size, chunk)
        if self._fetch_task is None or self._fetch_task.done():
            self._fetch_task = asyncio.create_task(self._fetch_run(), name="sim-http-" + self.id)

    def _fetching(self) -> bool:
        return self.fetch is not None and self.core is not None and self.fetch.wanted(self.core)

    async def _fetch_run(self):
        """The fetch task: step the device's Fetch while the job wants it and the broker
        connection is up; each chunk to the core, in order with the MQTT messages."""
        f = self.fetch
        while not self._stop and f is self.fetch and self._fetching():
            if self.client is None or self._lost:
                return  # connected_() starts it again from the next chunk
            if f.error is None and f.retry_at is not None:
                wait = ticks_diff(f.retry_at, ticks_ms())
                if wait > 0:
                    await asyncio.sleep(wait / 1000)
                    continue
            try:
                if f.error is not None:
                    raise f.error
                if f.needs_connect():
                    await f.connect()
                    if not self._fetching() or f.phase != 0:
                        continue  # restarted or ended while connecting
                data = f.step(0)
                if data is None and f.sock is not None:
                    # the Fetch's own deadline for the headers (it is stepped without waiting,
                    # so its count is kept here), else http_timeout for the next body bytes
                    waits_headers = f.phase == 1
                    limit = f.header_wait / 1000 if waits_headers else self.http_timeout
                    t0 = time.monotonic()
                    ready = await f.readable(max(0.0, limit))
                    if waits_headers and f.phase == 1:
                        f.header_wait -= (time.monotonic() - t0) * 1000
                    if not ready and f.phase != 0:
                        raise OSError(110, "no response bytes for %.0f s" % limit)
                    continue
            except HttpError as e:
                f.give_up()
                self.http_errors.append(e.reason)
                log.info("%s: http: %s", self.id, e.reason)
                self._feed_core(lambda: self.core.fetch_failed(e.code, e.reason))
                return
            except (OSError, ValueError, TimeoutError) as e:
                # Maybe not for good: on from the next chunk after a back-off (the core's stall
                # deadline ends the job if nothing gets through).
                kind = "%s %s%s" % (("request", "headers", "body")[min(f.phase, 2)] if not f.needs_connect()
                                    else "connect", type(e).__name__, " %s" % e.errno if getattr(e, "errno", None) else "")
                self.http_failure_kinds[kind] = self.http_failure_kinds.get(kind, 0) + 1
                f.failed()
                self.http_failures += 1
                log.info("%s: http fetch failed: %s", self.id, e)
                continue
            if data is None:
                continue
            if self._can_handle_now():
                try:
                    self._handle_fetched(data)
                except Exception as e:  # raised in the session loop, as if it had run there
                    self._fault = e
                if self.pending or self._fault:
                    self._wake.set()
            else:
                # The session loop is busy (a command, an action waiting for the broker, a slow
                # link's delay): the chunk waits in the inbox, and the fetch until it is taken.
                self.inbox.append((FETCHED, bytes(data), None))
                self._wake.set()
                while self.inbox and not self._stop and f is self.fetch:
                    await asyncio.sleep(0.005)

    def _feed_core(self, actions_of):
        if self.core is None:
            return
        self.core.now = self.now_ms()
        try:
            self._execute_now(actions_of())
        except Exception as e:
            self._fault = e
        self._wake.set()

    def _fetch_discard(self):
        task, self._fetch_task = self._fetch_task, None
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
        f, self.fetch = self.fetch, None
        if f is not None:
            f.discard()
            for name in self._http_past:
                self._http_past[name] += getattr(f, name)

    def http_counts(self) -> dict:
        """Bytes read from blob servers (headers included), GETs sent and connections opened, over
        every boot."""
        f = self.fetch
        return {name: n + (getattr(f, name) if f is not None else 0) for name, n in self._http_past.items()}

    def _on_disconnect(self, client, packet, exc=None):
        if client is self.client:
            self._lost = True
            self._wake.set()

    def _on_subscribe(self, client, mid, granted, properties=None):
        # A refused subscription (failure code 0x80; a NATS node whose JetStream did not create
        # the session's consumer in time): like the device (fota.device.mqtt raises MQTTError on
        # it and reconnects), drop this connection and connect again; the loop backs off
        # first. Without it the device would stay connected and deaf to its commands.
        if client is not self.client:
            return
        if any(q >= 0x80 for q in granted):
            self.refused_subscriptions += 1
            self._refused += 1
            self._lost = True
            self._wake.set()
        else:
            self._refused = 0

    async def _connect(self):
        client = MQTTClient(self.id, clean_session=False, optimistic_acknowledgement=False,
                            will_message=Message(P.topic(self.id, P.ONLINE), "0", qos=1, retain=True))
        client.set_config({"reconnect_retries": 0})  # reconnects are ours, with the core told
        client.set_auth_credentials(self.id, self.password)
        client.on_message = self._on_message
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        self.client = client
        self._lost = False
        self.port = random.choice(self.ports)
        try:
            await within(client.connect(self.host, self.port, ssl=self.ssl or False,
                                        keepalive=self.keepalive, version=MQTTv311), CONNECT_TIMEOUT)
        except BaseException:
            self.client = None
            try:
                await within(client.disconnect(), DISCONNECT_TIMEOUT)
            except Exception:
                pass
            raise
        client.subscribe([Subscription(P.topic(self.id, P.CMD), qos=1),
                          Subscription(P.topic(self.id, P.DATA), qos=0)])
        self.connects += 1
        # What the last connection published and the broker never acknowledged goes first, before
        # what waited for this connection; what every connection sends afresh anyway (online,
        # inventory, health) is dropped, as the device's runner does.
        again = [a for a in self._unacked if not _superseded(a)]
        self.pending[0:0] = again
        self.resent += len(again)
        self._unacked = []

    async def _close(self):
        client, self.client = self.client, None
        # Unhandled commands stay unacknowledged: the broker redelivers them to the next session.
        self._orphans += [done for _, _, done in self.inbox if done is not None]
        self.inbox.clear()
        if client is not None:
            prefix = P.topic(self.id, "")
            self._unacked += [(C.A_PUBLISH, topic[len(prefix):], payload.decode(), 1, retain)
                              for topic, payload, retain in gmqtt_adapter.unacked(client)
                              if topic.startswith(prefix)]
            try:
                # bounded: on a connection the broker dropped, gmqtt's disconnect can wait for
                # ever (seen with a NATS node's JetStream stall closing MQTT connections)
                await within(client.disconnect(), DISCONNECT_TIMEOUT)
            except Exception:
                pass
        # The connection is closed: releasing gmqtt's handlers now acknowledges nothing.
        for done in self._orphans:
            if not done.done():
                done.set_result(0)
        self._orphans = []
        if self.core is not None:
            self.core.disconnected()

    # ---- the loop ----------------------------------------------------------------------------
    def start(self) -> asyncio.Task:
        self._task = asyncio.create_task(self.run(), name="sim-" + self.id)
        return self._task

    def wake(self):
        """End the nap now (or the one to come at once), as a board's wake-up pin (tests)."""
        self._nap_over.set()

    async def stop(self):
        self._stop = True
        self._wake.set()
        self._nap_over.set()
        if self._task is not None:
            try:
                await within(self._task, 10)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
        self._fetch_discard()
        await self._close()

    async def run(self):
        while not self._stop:
            try:
                self.boot()
                await self._session()
            except Reboot:
                # fota.device.runner's shut_down before machine.reset(): go_offline, the retained
                # `online 0` first, then the clean DISCONNECT (which suppresses the will).
                await self._go_offline()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug in the simulator or the core: keep the fleet going
                self.error = "%s: %s" % (type(e).__name__, e)
                log.exception("simulated device %s failed", self.id)
                await self._close()
                return

    async def _session(self):
        backoff = 0.25
        while not self._stop:
            core = self.core
            if self.client is None:
                await self.execute(core.tick(self.now_ms()))
                try:
                    await self._connect()
                except (OSError, TimeoutError, Exception) as e:
                    log.info("%s: connect failed: %s", self.id, e)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 8.0)
                    continue
                backoff = 0.25
                core.now = self.now_ms()
                await self.execute(core.connected_())
            if self._nap_due():
                await self._nap()
                continue
            if not self.inbox and not self._lost:
                # Not when lost: its wake-up may have come before this clear (a connection that
                # ended as it was made: a broker closing it after the CONNACK, or before it while
                # gmqtt's one reconnect of its own got one); an idle core would sleep for ever.
                self._wake.clear()
                # An idle, connected core has no deadline: sleep until a message (thousands of
                # idle devices ticking 4 times a second would keep the process busy).
                idle = core.state == P.IDLE and not (self.profile.sleep_at is not None and not self.slept)
                # asyncio.timeout, not wait_for: no extra task per wait
                self._waiting = True
                try:
                    async with asyncio.timeout(None if idle else self.tick):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                finally:
                    self._waiting = False
            if self._fault is not None:
                fault, self._fault = self._fault, None
                raise fault
            if self.pending:
                await self.execute([])
            while self.inbox and not self._lost:
                topic, payload, done = self.inbox.popleft()
                if topic == FETCHED:
                    if self.profile.chunk_delay:
                        await asyncio.sleep(self.profile.chunk_delay)
                    if not self._handle_fetched(payload):
                        await self.execute([])
                elif topic.endswith("/" + P.DATA):
                    if self.profile.chunk_delay:
                        await asyncio.sleep(self.profile.chunk_delay)
                    if not self._handle_chunk(payload):
                        await self.execute([])
                else:
                    self.commands.append(self.clock())
                    core.now = self.now_ms()  # an idle core is not ticked: bring its clock forward
                    try:
                        await self.execute(core.command(payload))
                    except BaseException:
                        # A reboot while handling it: no PUBACK on this connection (the future is
                        # resolved only once it is closed), so the broker redelivers the command
                        # to the next boot, whose core refuses it as a duplicate.
                        if done is not None:
                            self._orphans.append(done)
                        raise
                    if done is not None and not done.done():
                        if self._lost:
                            self._orphans.append(done)
                        else:
                            done.set_result(0)
            if self._lost:
                await self._close()
                if self._refused:  # back off: 1, 2, 4, ... 32 s, with jitter (a refusing broker is overloaded)
                    await asyncio.sleep(min(2 ** (self._refused - 1), 32) * (1 + random.random()))
                continue
            await self.execute(self._tick(core))

    def _tick(self, core):
        actions = core.tick(self.now_ms())
        if any(a[0] == C.A_PUBLISH and a[1] == P.REQ for a in actions):
            self.timeouts += 1  # a chunk timeout re-requested
        return actions

    def _nap_due(self) -> bool:
        p = self.profile
        return (p.sleep_at is not None and not self.slept and self.clock() - self.t0 >= p.sleep_at)

    async def _nap(self):
        self.slept = True
        await self._go_offline(announce=self.profile.announce_nap)  # the session stays
        try:
            async with asyncio.timeout(self.profile.sleep_for):
                await self._nap_over.wait()
        except TimeoutError:
            pass
        self.woke_at = self.clock()

    async def _go_offline(self, announce: bool = True):
        """A clean disconnect, as fota.device.runner's go_offline before a reboot or a deep sleep:
        once the broker acknowledged what was published (the device's publishes block until their
        PUBACK), the retained `online 0` (QoS 1, acknowledged), then the DISCONNECT. A DISCONNECT
        suppresses the will: without the `0` the control center would go on taking the device for
        online (docs/protocol.md §1). announce=False: the bare DISCONNECT (Profile.announce_nap)."""
        if await self._acked() and announce:
            self.client.publish(P.topic(self.id, P.ONLINE), "0", qos=1, retain=True)
            await self._acked()   # not acknowledged (the link died): the will says 0 instead
        await self._close()


class _Files:
    """The executor's files (fota.device.fsutil's read_json, write_json, remove) over
    SimDevice.storage: JSON text by name."""

    def __init__(self, storage: dict[str, str]):
        self.storage = storage

    def read_json(self, path):
        text = self.storage.get(path)
        return json.loads(text) if text is not None else None

    def write_json(self, path, obj):
        self.storage[path] = json.dumps(obj)

    def remove(self, path):
        self.storage.pop(path, None)
