"""Status intake: what devices report (status, inventory, online) -> the database, in batches.

A message is decoded and checked at the door (fota.server.statuses: size and field limits, a
rate limit per device), queued, and written with the others of its batch in one transaction
(fota.server.ingest; a batch closes after ``flush_interval`` seconds or ``flush_max`` messages).
A QoS 1 message is acknowledged to the broker only after its batch committed, so a crash never
loses a status; a database that is down keeps the batch (unacknowledged) and is retried. The
same batch carries the chunk server's served-byte counts and the counts of statuses not stored
(ingest_counters). Every ``retention_interval`` the status history is pruned
(fota.server.retention).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter, defaultdict
from typing import Any, Awaitable, Callable

from sqlalchemy.exc import IntegrityError, OperationalError

from fota.aiowait import within
from fota.device import protocol
from fota.server import counters
from fota.server.deployments import finish_deployments
from fota.server.ingest import BatchResult, Incoming, write_batch
from fota.server.retention import Retention, prune, sweep_devices
from fota.server.statuses import OVERSIZE, DropLog, StatusLimiter, StatusRefused, parse_status
from fota.server.store import Store, utcnow

log = logging.getLogger(__name__)

DB_RETRY_DELAY = 1.0             # database unreachable: keep the batch, retry after this


class StatusIntake:
    def __init__(self, store: Store, db: Callable[..., Awaitable], db_aside: Callable[..., Awaitable], *,
                 client_id: str, set_job_state: Callable[[int, str], None],
                 on_inventory: Callable[[str, dict], None], fenced: Callable[[], bool],
                 flush_interval: float, flush_max: int, status_limiter: StatusLimiter,
                 retention: Retention | None, retention_interval: float):
        self.store = store
        self.db = db                     # runs a function on the database thread
        self.db_aside = db_aside         # the same, for long passes (retention)
        self.client_id = client_id       # whose ingest_counters row the counts go to
        self.set_job_state = set_job_state  # a batch moved a job: tell the job cache
        self.on_inventory = on_inventory    # each inventory received (key pushes)
        self.fenced = fenced
        self.flush_interval = flush_interval
        self.flush_max = flush_max
        # Per-device status rate limit (fota.server.statuses.StatusLimiter).
        self.status_limiter = status_limiter
        # Status history retention (fota.server.retention); None: keep everything.
        self.retention = retention
        self.retention_interval = retention_interval
        self.closing = False
        # Called with the device ids of each committed batch (Home Assistant's entities); None: nobody.
        self.on_written: Callable[[set[str]], None] | None = None
        # counters (benchmarks, diagnostics)
        self.statuses = 0            # status events stored
        self.duplicates = 0          # status duplicates dropped
        self.garbage = 0             # undecodable messages dropped (refused statuses included)
        self.refused = 0             # statuses refused at parsing (oversize, NUL, NaN, out of range ...)
        self.rate_limited = 0        # statuses over their device's rate (StatusLimiter), not stored
        self.pruned = 0              # statuses deleted by the retention policy
        self.batches = 0             # batch transactions written (the one-by-one retries not counted)
        self.batch_write_s = 0.0     # seconds inside those transactions, on the database thread
        self.batch_wait_s = 0.0      # seconds they waited for the database thread (busy with other calls)
        self._drop_log = DropLog(log)
        self._counts: Counter[str] = Counter()   # ingest_counters deltas not written yet
        self._touched: set[str] = set()  # devices with statuses stored since the last retention pass
        self._sweep_after = ""           # the retention's walk over the whole fleet
        self._queue: list[Incoming] = []
        self._served: defaultdict[int, int] = defaultdict(int)  # job -> bytes not yet in the DB
        self._wakeup = asyncio.Event()    # something to flush
        self._full = asyncio.Event()      # flush_max messages queued

    # ------------------------------------------------------------ at the door

    async def receive(self, device_id: str, suffix: str, payload: bytes) -> None:
        """A status, inventory or online message; returns once it is stored (or dropped)."""
        data = self._decode(device_id, suffix, payload)
        if data is None:
            return  # garbage is acknowledged: redelivering it would not help
        if suffix == protocol.STATUS and not self.status_limiter.allow(
                device_id, data, asyncio.get_running_loop().time()):
            self.rate_limited += 1
            self._count_drop(device_id, counters.RATE_LIMITED, "over its status rate limit")
            return  # acknowledged, not stored: redelivering it would only repeat the flood
        done = asyncio.get_running_loop().create_future()
        self._enqueue(Incoming(suffix, device_id, data, utcnow(), done))
        # Acknowledge only once the batch holding this message committed. (If the center
        # stops first, the ack goes to a closed connection and the broker redelivers the
        # message to the kept session.)
        await done

    def count_served(self, job_id: int, nbytes: int) -> None:
        """Chunk bytes served for a job: added to jobs.bytes_served with the next batch."""
        self._served[job_id] += nbytes
        self._wakeup.set()

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
                self.on_inventory(device_id, inventory)
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

    # ------------------------------------------------------------ batches

    def _enqueue(self, item: Incoming) -> None:
        self._queue.append(item)
        self._wakeup.set()
        if len(self._queue) >= self.flush_max:
            self._full.set()

    def close(self) -> None:
        """Stop gathering: the flush loop writes what is queued and returns."""
        self.closing = True
        self._wakeup.set()

    def release_unwritten(self) -> None:
        """(after the flush loop ended) Messages not written (arrived during shutdown, or the
        database is down): their acknowledgements go nowhere now, so the broker redelivers them
        next time."""
        for item in self._queue:
            if item.done is not None and not item.done.done():
                item.done.set_result(None)
        self._queue = []

    async def run(self) -> None:
        """The batch writer; returns after ``close`` once everything queued is written (or the
        database is down)."""
        while True:
            await self._wakeup.wait()
            if not self.closing:
                try:  # gather a batch: up to flush_interval, or until flush_max messages
                    await within(self._full.wait(), self.flush_interval)
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
            if self.closing and (not ok or (not self._queue and not self._served and not self._counts)):
                return

    async def _flush(self, batch: list[Incoming], served: dict[int, int], counts: dict[str, int]) -> bool:
        """Write a batch, then release its acknowledgements; False if the database is unavailable."""
        try:
            result = await self.db(self._write_timed, time.monotonic(), batch, served, counts)
        except OperationalError as exc:
            # The database is unreachable or locked: keep everything (unacknowledged) and retry.
            self._queue[:0] = batch
            for job_id, n in served.items():
                self._served[job_id] += n
            self._counts.update(counts)
            self._wakeup.set()
            if self.closing:
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
            self.set_job_state(job_id, state)
        self._touched.update(item.device_id for item in batch if item.kind == protocol.STATUS)
        if self.on_written is not None and batch:
            self.on_written({item.device_id for item in batch})
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
                result = await self.db(self.write_batch, items, served_part, counts_part)
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

    def _write_timed(self, submitted: float, batch: list[Incoming], served: dict[int, int],
                     counts: dict[str, int]) -> BatchResult:
        """(DB thread) write_batch, its time counted (batch_wait_s, batch_write_s)."""
        start = time.monotonic()
        self.batch_wait_s += start - submitted
        try:
            return self.write_batch(batch, served, counts)
        finally:
            self.batches += 1
            self.batch_write_s += time.monotonic() - start

    def write_batch(self, batch: list[Incoming], served: dict[int, int],
                    counts: dict[str, int] | None = None) -> BatchResult:
        """(DB thread) one transaction for a batch of messages, served-byte counters and the
        counters of statuses not stored."""
        with self.store.session() as s:
            result = write_batch(s, batch, served)
            if result.finished:
                finish_deployments(s, result.finished)
            if counts:
                counters.add(s, self.client_id, counts)
        return result

    # ------------------------------------------------------------ retention

    async def run_retention(self) -> None:
        """Every retention_interval: prune the status history (fota.server.retention) of the
        devices heard from since the last pass and of the next few others; forget idle rate buckets."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.retention_interval)
            self.status_limiter.forget_idle(loop.time())
            self._drop_log.forget_idle(loop.time())
            if self.retention is None or self.fenced():
                continue
            touched, self._touched = self._touched, set()
            try:
                # The campaign thread on PostgreSQL (ingestion is not held up), the DB thread on SQLite.
                self.pruned += await self.db_aside(self._prune, touched)
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
