"""The jobs the chunk server serves, in memory: so the hot path never touches the database.

The sender adds a job as it sends its command; a job another worker sent (or sent before this
center restarted) is read on its first chunk request, in batches. Ingestion and the sender's
expiry pass set the states they learn; ``refresh`` re-reads the states of live jobs changed
outside this process. A job's blob is dropped once it is terminal.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

from sqlalchemy import select

from fota.server.deployments import TERMINAL_STATES
from fota.server.delta import load_delta
from fota.server.releases import blob_file, read_blob
from fota.server.store import Deployment, Job, Release, Store
from fota.server.store.inlists import IN_LIST_MAX, chunks, id_ranges, in_ranges

log = logging.getLogger(__name__)

DbCall = Callable[..., Awaitable]


@dataclass
class JobInfo:
    """What the chunk server needs to know about a job."""
    device_id: str
    state: str
    blob: bytes | None  # None once terminal (nothing more to serve)
    owner: str | None = None  # the worker that claimed and sent it (jobs.worker)


def release_blob(blobs_dir: Path, release: Release, remote=None) -> bytes:
    """(DB thread) a release's image; blobs_dir/<sha256> if the stored path is gone (another
    machine, a moved data directory); else, with ``remote`` (object storage:
    fota.server.objectstore.S3Payloads), read from there into blobs_dir (checked against the
    sha256, kept as a local copy)."""
    if not Path(release.blob_path).is_file():
        # Blobs are content-addressed: look in ours, then in the bucket.
        local = blob_file(blobs_dir, release.sha256, remote)
        release.blob_path = str(local or blobs_dir / release.sha256)  # detached copy, not saved
    return read_blob(release)


class JobCache:
    def __init__(self, store: Store, blobs_dir: Path, db: DbCall):
        self.store = store
        self.blobs_dir = blobs_dir
        self.db = db                     # runs a function on the database thread
        self.on_end: Callable[[int], None] = lambda job_id: None  # a cached job became terminal
        # Where blobs missing from blobs_dir are read (object storage: get_blob, put_blob), or None.
        self.remote = None
        self._jobs: dict[int, JobInfo] = {}
        self._loading: dict[int, asyncio.Future] = {}  # job id -> its read from the database, in flight
        self._to_load: list[int] = []    # job ids for the next batch read

    def __iter__(self):
        return iter(self._jobs.items())

    def get(self, job_id: int) -> JobInfo | None:
        return self._jobs.get(job_id)

    def add(self, job_id: int, info: JobInfo) -> None:
        self._jobs.setdefault(job_id, info)

    def set_state(self, job_id: int, state: str) -> None:
        info = self._jobs.get(job_id)
        if info is not None:
            info.state = state
            if state in TERMINAL_STATES:
                info.blob = None
                self.on_end(job_id)

    async def fetch(self, job_id: int) -> JobInfo | None:
        """A job, read from the database if it is not cached (another worker sent it, or this
        one restarted). Requests for it that arrive while it is being read wait for that one
        read: a device has several requests out at once, and each read queues behind the
        status batches on the database thread."""
        info = self._jobs.get(job_id)
        if info is not None:
            return info
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
            infos = await self.db(self._load_jobs, job_ids)
        except Exception:
            log.exception("reading %d job(s) for the chunk server failed", len(job_ids))
            infos = {}
        for job_id in job_ids:
            future = self._loading.pop(job_id, None)
            if future is not None and not future.done():
                future.set_result(infos.get(job_id))

    def _load_jobs(self, job_ids: list[int]) -> dict[int, JobInfo]:
        """(DB thread) jobs the cache does not know yet: one query for all, not one per job (a
        worker took 500 reads per 1,000 jobs)."""
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
                blob = load_delta(self.store, delta_id, self.blobs_dir, self.remote)
            else:
                blob = release_blob(self.blobs_dir, release, self.remote)
            infos[job_id] = JobInfo(device_id, state, blob, owner)
        return infos

    async def refresh(self) -> None:
        """Re-read the states of the live cached jobs (changed by another worker, a cancel, ...)."""
        live = [job_id for job_id, info in self._jobs.items() if info.state not in TERMINAL_STATES]
        if live:
            for job_id, state in (await self.db(self.states_by_id, live)).items():
                if state != self._jobs[job_id].state:
                    self.set_state(job_id, state)

    def states_by_id(self, job_ids: list[int]) -> dict[int, str]:
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
