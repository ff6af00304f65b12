"""Worker coordination: one of several control centers in a shared subscription group.

Each worker heartbeats its row (fota.server.workers, the database side), knows which others are
alive (the chunk server forwards a job's requests to its own worker; one worker pushes key
updates), adopts a worker silent for ``lease`` seconds and drains its persistent session (what
the broker kept routing there is ingested, acknowledged after commit as ours, then the session is
deleted), and stops at once when the others declared it dead (fenced: its session is theirs).
A single center drains the session of an earlier fota's center id (LEGACY_CENTER_ID) once.
docs/operations.md §3.
"""
from __future__ import annotations

import asyncio
import logging

from fota.aiowait import within
from fota.server import workers
from fota.server.broker import LEGACY_CENTER_ID
from fota.server.center.connection import BrokerAddress, CenterConnection, OnMessage, topic_filters
from fota.server.store import Store

log = logging.getLogger(__name__)

DRAIN_QUIET = 1.0                # a dead worker's session is drained once quiet this long


class Workgroup:
    def __init__(self, store: Store, db, mqtt: CenterConnection, on_message: OnMessage, *, client_id: str,
                 share_group: str | None, lease: float, heartbeat_interval: float):
        self.store = store
        self.db = db                     # runs a function on the database thread
        self.mqtt = mqtt                 # our own session (reconnects stop once fenced)
        self.on_message = on_message     # what a drained session's messages go to
        self.client_id = client_id
        self.share_group = share_group   # None: the only center
        self.lease = lease
        self.heartbeat_interval = heartbeat_interval
        self.live: frozenset[str] = frozenset()  # workers whose heartbeat is fresh (refreshed by ours)
        self.fenced = False              # declared dead by the others: stop at once
        self.lost: asyncio.Event | None = None  # set when fenced (the process should exit)
        self.adopted: list[str] = []     # dead workers whose sessions this one drained
        self.drained = 0                 # messages received on those sessions
        self._adopting: set[str] = set()
        self._address: BrokerAddress | None = None

    def pushes_keys(self) -> bool:
        """Of several workers the first live one by id pushes key updates, so a device gets one."""
        return self.share_group is None or min(self.live | {self.client_id}) == self.client_id

    async def register(self, address: BrokerAddress) -> None:
        """Before connecting: our row (a worker), and where drain connections go."""
        self._address = address
        self.lost = asyncio.Event()
        if self.share_group is not None:
            await self.db(workers.register, self.store, self.client_id, self.lease)

    async def retire(self) -> None:
        """After disconnecting: our session keeps its share of the statuses (and what we did not
        acknowledge): a live worker adopts it at once; with none alive, the next one to start does."""
        if self.share_group is None or self.fenced:
            return
        try:
            await self.db(workers.retire, self.store, self.client_id)
        except Exception:
            log.exception("could not retire worker %s (it is adopted after its lease)", self.client_id)

    async def run(self) -> None:
        """Heartbeat; adopt a dead worker and drain its session (one at a time)."""
        drain: asyncio.Task | None = None
        while True:
            try:
                alive = await self.db(workers.heartbeat, self.store, self.client_id, sorted(self._adopting))
                if not alive:
                    self._fence()
                    return
                # Requests go to a job's own worker only while it answers its heartbeats (2 missed:
                # served here), not for the whole lease: a dead one's devices must not stall.
                fresh = min(self.lease, 2 * self.heartbeat_interval)
                self.live = frozenset(await self.db(workers.live_workers, self.store, fresh))
                if drain is None or drain.done():
                    dead = await self.db(workers.adopt_stale, self.store, self.client_id, self.lease)
                    if dead is not None:
                        self._adopting.add(dead)
                        drain = asyncio.create_task(self.drain(dead), name=f"fota-drain-{dead}")
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
        self.fenced = True
        if self.lost is not None:
            self.lost.set()
        self.mqtt.stop_reconnect()

    async def drain_legacy(self) -> None:
        """A home upgraded from a fota whose center connected as LEGACY_CENTER_ID may still
        hold that persistent session, with statuses the devices were acknowledged for: ingest
        them and delete it (no session: connect, see none, leave)."""
        await self.drain(LEGACY_CENTER_ID, worker=False)

    async def drain(self, dead: str, worker: bool = True) -> None:
        """Take over a dead worker's persistent session: ingest what it queued (acknowledged after
        commit, as ours), unsubscribe it from the group, and delete it once it is quiet.

        worker=False: the session of an earlier single center (LEGACY_CENTER_ID), not registered
        as a worker; nothing to do if the broker has no such session.

        On a broker without sessions (NATS: fota.server.center.natsconn) there is nothing to
        drain: what the dead worker did not acknowledge goes to a live one after the ack wait."""
        if not self.mqtt.sessions:
            if worker:
                await self.db(workers.forget, self.store, dead)
                self.adopted.append(dead)
                log.warning("adopted dead worker %s (JetStream redelivers what it did not acknowledge)", dead)
            self._adopting.discard(dead)
            return
        loop = asyncio.get_running_loop()
        state = {"last": loop.time(), "busy": 0, "count": 0, "present": True}
        unsubscribed = asyncio.Event()

        async def on_message(client, topic, payload, qos, properties):
            state["last"] = loop.time()
            state["busy"] += 1
            state["count"] += 1
            self.drained += 1
            try:
                return await self.on_message(client, topic, payload, qos, properties)
            finally:
                state["busy"] -= 1
                state["last"] = loop.time()

        client = self._address.client(dead)
        client.on_message = on_message
        client.on_connect = lambda client, session_present, *args: state.update(present=bool(session_present))
        client.on_unsubscribe = lambda *args: unsubscribed.set()
        client.set_config({"reconnect_retries": 0})
        try:
            await self._address.connect(client)
            if not worker and not state["present"]:
                await client.disconnect(session_expiry_interval=0)  # the one our connect made
                return
            # No new message is routed to the session after UNSUBACK; what it queued before
            # arrives on connect (Mosquitto sends the whole queue: no in-flight limit).
            client.unsubscribe([topic for topic, _ in topic_filters(self.share_group if worker else None,
                                                                   self.client_id)])
            await within(unsubscribed.wait(), 30)
            while state["busy"] or loop.time() - state["last"] < DRAIN_QUIET:
                await asyncio.sleep(0.1)
            await client.disconnect(session_expiry_interval=0)  # the broker deletes the session
            if worker:
                await self.db(workers.forget, self.store, dead)
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
