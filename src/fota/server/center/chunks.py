"""The chunk server: a device's chunk-window request (fota/v1/<dev>/req) -> its chunks on
fota/v1/<dev>/data (QoS 0, binary: an 8-byte header, job and index, then the bytes).

Served from the job cache (fota.server.center.jobs), never from the database on the hot path.
Of several workers, a job's requests are served by the worker that sent it, in order: another
worker that receives one (shared subscriptions hand requests to any member) forwards it.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import struct
from dataclasses import dataclass
from typing import Callable

from fota.device import protocol
from fota.server.center.connection import CenterConnection, forward_topic
from fota.server.center.inventory import is_int
from fota.server.center.jobs import JobCache, JobInfo
from fota.server.deployments import TERMINAL_STATES
from fota.server.statuses import MAX_ID

log = logging.getLogger(__name__)

REORDER_WAIT = 0.3   # s a worker holds a chunk request that overtook the one before it


@dataclass(frozen=True)
class ChunkRequest:
    job: int
    first: int
    count: int
    chunk: int


FIELDS = ("job", "first", "count", "chunk")
TEXT_REQUEST = re.compile(rb"(0|[1-9][0-9]{0,9}) (0|[1-9][0-9]{0,9}) (0|[1-9][0-9]{0,9}) (0|[1-9][0-9]{0,9})")


def parse_request(payload: bytes) -> ChunkRequest:
    """A chunk-window request (§5): a JSON object, or the text form `job first count chunk`
    (four decimal integers, single spaces); ValueError if malformed or out of bounds."""
    text = TEXT_REQUEST.fullmatch(payload)
    if text:
        values = dict(zip(FIELDS, map(int, text.groups())))
    else:
        msg = json.loads(payload)
        if not isinstance(msg, dict):
            raise ValueError("not a JSON object")
        values = {name: msg.get(name) for name in FIELDS}
        if not all(is_int(v) for v in values.values()):
            raise ValueError("job, first, count and chunk must be integers")
    req = ChunkRequest(**values)
    if not 1 <= req.job <= MAX_ID or not 0 <= req.first <= MAX_ID:
        raise ValueError(f"job must be 1..{MAX_ID} and first 0..{MAX_ID}")
    if not 1 <= req.count <= protocol.MAX_WINDOW:
        raise ValueError(f"count must be 1..{protocol.MAX_WINDOW}")
    if not protocol.MIN_CHUNK_SIZE <= req.chunk <= protocol.MAX_CHUNK_SIZE:
        raise ValueError(f"chunk must be {protocol.MIN_CHUNK_SIZE}..{protocol.MAX_CHUNK_SIZE}")
    return req


class ChunkServer:
    def __init__(self, jobs: JobCache, mqtt: CenterConnection, client_id: str, *, worker: bool,
                 live: Callable[[], frozenset[str]], count_served: Callable[[int, int], None]):
        self.jobs = jobs
        self.mqtt = mqtt
        self.client_id = client_id
        self.worker = worker             # one of several workers (share_group)
        self.live = live                 # the workers whose heartbeat is fresh
        self.count_served = count_served  # (job, bytes): written to jobs.bytes_served with the next batch
        jobs.on_end = self._forget
        self._next_first: dict[int, int] = {}   # job -> first chunk after the last window served
        self._parked: dict[int, list] = {}      # job -> requests waiting for the one before them
        # counters (benchmarks, diagnostics)
        self.requests = 0            # chunk requests served
        self.ignored_requests = 0    # malformed, foreign, unknown or finished jobs
        self.chunks = 0              # chunks published
        self.bytes_published = 0     # data payload bytes published, headers included
        self.forwarded = 0           # chunk requests handed to the job's own worker

    async def serve(self, device_id: str, payload: bytes, forwarded: bool = False) -> None:
        try:
            req = parse_request(payload)
        except ValueError as exc:
            self.ignored_requests += 1
            log.warning("bad chunk request from %s ignored: %s", device_id, exc)
            return
        info = self.jobs.get(req.job)
        if info is None:
            info = await self.jobs.fetch(req.job)
        if info is None or info.device_id != device_id or info.blob is None or info.state in TERMINAL_STATES:
            self.ignored_requests += 1
            log.info("chunk request from %s for job %s not served", device_id, req.job)
            return
        if not self.mqtt.connected:
            return
        if not forwarded and info.owner != self.client_id and info.owner in self.live():
            # The shared subscription hands a device's requests to any worker. Served by two,
            # a window's chunks could overtake the previous one's, and the device, which takes
            # chunks only in order, would drop them and wait for its chunk timeout (measured: 2
            # workers 3.5x slower than 1). The job's own worker serves all of it, in order.
            self.mqtt.publish(forward_topic(info.owner, device_id), payload, qos=0)
            self.forwarded += 1
            return
        if self.worker:
            # A forwarded request travels one hop more than the device's next one: a request
            # beyond the job's next chunk waits (REORDER_WAIT at most) for the one before it.
            expected = self._next_first.get(req.job)
            if expected is not None and req.first > expected:
                parked = self._parked.setdefault(req.job, [])
                parked.append((device_id, req, info))
                if len(parked) == 1:
                    asyncio.get_running_loop().call_later(REORDER_WAIT, self._release_parked, req.job)
                return
        self._send_window(device_id, req, info)

    def _release_parked(self, job_id: int, only_next: bool = False) -> None:
        """Serve a job's parked requests in order: all of them (their wait is over), or
        (only_next) those that now follow on from the last window served."""
        parked = sorted(self._parked.pop(job_id, []), key=lambda p: p[1].first)
        while parked and (not only_next or parked[0][1].first <= self._next_first[job_id]):
            device_id, req, info = parked.pop(0)
            if self.mqtt.connected:
                self._send_window(device_id, req, info)
        if parked:
            self._parked[job_id] = parked
            asyncio.get_running_loop().call_later(REORDER_WAIT, self._release_parked, job_id)

    def _send_window(self, device_id: str, req: ChunkRequest, info: JobInfo) -> None:
        blob = info.blob
        if blob is None:
            return
        count = min(req.count, -(-len(blob) // req.chunk) - req.first)
        if count <= 0:
            self.ignored_requests += 1
            return
        served = 0
        messages = []
        for index in range(req.first, req.first + count):
            data = blob[index * req.chunk:(index + 1) * req.chunk]
            message = struct.pack(protocol.CHUNK_HEADER, req.job, index) + data
            messages.append(message)
            served += len(data)
            self.bytes_published += len(message)
        # The window in one write, not a client.publish per chunk (fota.gmqtt_adapter: what it buys).
        self.mqtt.publish_qos0(protocol.topic(device_id, protocol.DATA), messages)
        self.requests += 1
        self.chunks += count
        self.count_served(req.job, served)
        if self.worker:
            self._next_first[req.job] = req.first + count
            if req.job in self._parked:
                self._release_parked(req.job, only_next=True)

    def _forget(self, job_id: int) -> None:
        """A job ended: nothing of it waits any more."""
        self._next_first.pop(job_id, None)
        self._parked.pop(job_id, None)
