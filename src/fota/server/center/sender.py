"""The command sender: pending jobs -> signed commands on fota/v1/<dev>/cmd (QoS 1), jobs 'sent'.

Every ``poll_interval`` (at once after a full batch) it claims the oldest pending jobs
(jobs.worker = this center; of several workers each claims its own, ``FOR UPDATE SKIP
LOCKED``), signs an ``update`` command for each (as a delta when the device runs a known release
and the patch is smaller) or a ``cancel`` command (cancel jobs), publishes them and marks the jobs
sent. The same pass times out the jobs of deployments past their timeout (expire_jobs queues
their cancels) and, now and then, re-reads the states of cached jobs changed outside this
process. A command a device refuses as expired is signed again by ingestion
(fota.server.expiry); ``command_ttl`` is how long a signed command stays acceptable. A command
its online device never answered goes back to pending after ``unanswered_after`` seconds, with
back-off (fota.server.unanswered).
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from sqlalchemy import case, exists, func, or_, select, update
from sqlalchemy.orm import aliased

from fota.device import protocol
from fota.server.center.connection import CenterConnection
from fota.server.center.inventory import is_int
from fota.server.center.jobs import JobCache, JobInfo, release_blob
from fota.server.center.keys import KeyPusher
from fota.server.delta import best_delta
from fota.server.deployments import CANCEL, PENDING, SENT, TIMED_OUT, expire_jobs, finish_deployments
from fota.server.kek import Kek
from fota.server.payloadurls import HttpPayloads

if TYPE_CHECKING:
    from fota.server.objectstore import S3Payloads
from fota.server.releases import ReleaseError, update_command, wrap_release_key
from fota.server.store import Deployment, Device, Job, Release, Store, utcnow
from fota.server.store.inlists import chunks
from fota.server.unanswered import requeue_unanswered

log = logging.getLogger(__name__)

SEND_BATCH = 500                 # pending jobs claimed per sender pass
CACHE_REFRESH_INTERVAL = 5.0     # re-read states of cached jobs changed outside this process
EXPIRE_INTERVAL = 1.0            # how often deployment timeouts are checked
UNANSWERED_INTERVAL = 5.0        # how often unanswered commands are looked for (at most)


@dataclass
class Outgoing:
    job_id: int
    device_id: str
    command: bytes
    info: JobInfo | None  # None: not cached for the chunk server (transport http: read if ever asked)
    delta_id: int | None = None
    delta_size: int = 0
    keys_behind: bool = False  # the device's last inventory reports an older trust version


class CommandSender:
    def __init__(self, store: Store, db: Callable[..., Awaitable], jobs: JobCache, mqtt: CenterConnection,
                 keys: KeyPusher, *, client_id: str, blobs_dir: Path, chunk: int, window: int,
                 poll_interval: float, require_online: bool, delta_wbits: int | None, command_ttl: int,
                 kek: Kek | None, fenced: Callable[[], bool], http: HttpPayloads | S3Payloads | None = None,
                 unanswered_after: float | None = None):
        self.store = store
        self.db = db                     # runs a function on the database thread
        self.jobs = jobs
        self.mqtt = mqtt
        self.keys = keys
        self.client_id = client_id
        self.blobs_dir = blobs_dir
        self.chunk = chunk
        self.window = window
        self.poll_interval = poll_interval
        # A command to a device that never connected is dropped by the broker (no session
        # yet), so by default jobs wait until their device is online.
        self.require_online = require_online
        # Largest delta window used (a device's own limit may be lower); None: full images only.
        self.delta_wbits = delta_wbits
        self.command_ttl = command_ttl
        # The key-encryption key that opens the stored release and device keys (encrypted releases).
        self.kek = kek
        self.fenced = fenced             # declared dead by the other workers: send nothing
        # Transport http: where the signed payload URLs point (None: every job gets chunks).
        self.http = http
        # Seconds a sent command may go unanswered by its online device before it is sent again
        # (fota.server.unanswered); None: never.
        self.unanswered_after = unanswered_after
        self.unanswered = 0              # jobs put back to pending as unanswered
        self.http_sent = 0               # update commands sent with a payload URL
        self.commands = 0                # update commands published
        self.deltas_sent = 0             # update commands sent as a delta

    async def run(self) -> None:
        last_refresh = last_expiry = last_unanswered = asyncio.get_running_loop().time()
        while True:
            sent = 0
            try:
                if self.mqtt.connected:
                    sent = await self.send_pending()
                now = asyncio.get_running_loop().time()
                if now - last_expiry >= EXPIRE_INTERVAL:
                    last_expiry = now
                    for job_id in await self.db(self.expire):
                        self.jobs.set_state(job_id, TIMED_OUT)
                if self.unanswered_after is not None and not self.fenced() and \
                        now - last_unanswered >= min(UNANSWERED_INTERVAL, self.unanswered_after / 4):
                    last_unanswered = now
                    requeued = await self.db(requeue_unanswered, self.store, self.unanswered_after)
                    if requeued:
                        self.unanswered += len(requeued)
                        log.warning("%d command(s) unanswered by their online device: sending again (jobs %s)",
                                    len(requeued), ", ".join(map(str, requeued[:10])))
                if now - last_refresh >= CACHE_REFRESH_INTERVAL:
                    last_refresh = now
                    await self.jobs.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("job sender pass failed")
            # After a full batch more jobs are probably pending: claim them at once.
            await asyncio.sleep(0 if sent >= SEND_BATCH else self.poll_interval)

    async def send_pending(self) -> int:
        """Publish the commands of pending jobs and mark them sent; how many were sent."""
        if self.fenced():
            return 0
        if self.keys.keyring is not None:
            # A rotation made just before a deployment: sign its commands with the new key.
            await self.keys.reload_keys()
        outgoing = await self.db(self.claim_pending)
        if not outgoing:
            return 0
        for out in outgoing:
            # Cache first, so that the device's first request finds the job.
            if out.info is not None:
                self.jobs.add(out.job_id, out.info)
            if out.keys_behind:
                self.keys.push_ahead_of_command(out.device_id)
            self.mqtt.publish(protocol.topic(out.device_id, protocol.CMD), out.command, qos=1)
            self.commands += 1
        await self.db(self.mark_sent, [out.job_id for out in outgoing],
                      {out.job_id: (out.delta_id, out.delta_size) for out in outgoing
                       if out.delta_id is not None})
        self.deltas_sent += sum(1 for out in outgoing if out.delta_id is not None)
        log.info("sent %d update command(s)", len(outgoing))
        return len(outgoing)

    def claim_pending(self) -> list[Outgoing]:
        """(DB thread) claim the oldest pending jobs (jobs.worker = us), with their commands.

        A job is claimed only by one worker (row locks, SKIP LOCKED: a job another worker is
        claiming is skipped) and only when no older job of its device is still pending, so a
        device's commands leave in job-id order even when several workers send."""
        older = aliased(Job)
        query = (select(Job.id, Job.device_id, Device.inventory, Device.enc_key, Release, Job.kind, Job.target_job,
                        Deployment.min_battery, Deployment.transport)
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
        signer = self.keys.signer
        for job_id, device_id, inventory, device_key, release, kind, target_job, min_battery, transport in rows:
            behind = self.keys.behind(inventory)
            if kind == CANCEL:
                command = signer.command({"type": "cancel", "job": job_id, "device": device_id,
                                          "target": target_job}, ttl=self.command_ttl)
                outgoing.append(Outgoing(job_id, device_id, command, JobInfo(device_id, SENT, None, self.client_id),
                                         keys_behind=behind))
                continue
            # The chunk size the device asks for (§3; the default without one), never more than
            # this center sends (self.chunk) or the device accepts (max_chunk).
            wanted = (inventory or {}).get("chunk")
            if not (is_int(wanted) and protocol.MIN_CHUNK_SIZE <= wanted <= protocol.MAX_CHUNK_SIZE):
                wanted = protocol.DEFAULT_CHUNK_SIZE
            chunk = min(self.chunk, wanted)
            max_chunk = (inventory or {}).get("max_chunk")
            if is_int(max_chunk) and protocol.MIN_CHUNK_SIZE <= max_chunk < chunk:
                chunk = max_chunk  # never more than the device accepts
            try:
                wrapped = wrap_release_key(release, device_id, device_key, self.kek)
            except ReleaseError as exc:
                log.error("job %d not sent: %s", job_id, exc)
                continue
            patch = self.delta_for(release, inventory or {})
            http = None
            if transport == "http" and self._takes_http(job_id, inventory):
                try:
                    http = self.http.command_field(device_id, job_id, patch.sha256 if patch else release.sha256)
                except Exception:  # object storage unreachable: the job is not lost, it gets chunks
                    log.exception("job %d: no payload URL; sending chunks", job_id)
            command = update_command(job_id, device_id, release, signer, chunk, self.window,
                                     wrapped_key=wrapped, delta=patch.descriptor() if patch else None,
                                     min_battery=min_battery, ttl=self.command_ttl, http=http)
            self.http_sent += http is not None
            objects = self.jobs.remote
            if objects is not None and http is None:
                # Releases and patches are written to object storage when made; one made before
                # the storage was configured goes there when a job first uses it, so that a
                # worker without the file finds it there (a HEAD once per blob and process).
                try:
                    objects.put_blob(patch.sha256 if patch else release.sha256, patch.data if patch else None)
                except Exception:
                    log.exception("job %d: blob not stored in object storage", job_id)
            # Over http the device fetches from the blob server: the image is not read here.
            info = None if http else JobInfo(device_id, SENT, patch.data if patch else
                                             release_blob(self.blobs_dir, release, self.jobs.remote),
                                             self.client_id)
            outgoing.append(Outgoing(job_id, device_id, command, info, patch.id if patch else None,
                                     patch.size if patch else 0, keys_behind=behind))
        return outgoing

    def _takes_http(self, job_id: int, inventory: dict[str, Any] | None) -> bool:
        """Whether a job of an http deployment gets a payload URL: the center has one to give
        (HttpPayloads) and the device declares http in its inventory; else it gets chunks."""
        if self.http is None:
            log.warning("job %d: transport http, but this center has no http_url: sending chunks", job_id)
            return False
        transports = (inventory or {}).get("transports")
        return isinstance(transports, list) and "http" in transports

    def delta_for(self, release: Release, inventory: dict[str, Any]):
        """(DB thread) the patch from the device's running image to `release`, or None: no
        delta when the device takes none, runs an image no release has, or the patch would not
        be smaller than the image."""
        image, wbits = inventory.get("image"), inventory.get("delta_wbits")
        if self.delta_wbits is None or release.enc_key or not isinstance(image, str) or not is_int(wbits) \
                or wbits < 9:
            return None
        with self.store.session() as s:
            # A deleted release is no base: its image is gone (fota.server.release_delete).
            base = s.scalars(select(Release).where(Release.sha256 == image.lower(), Release.kind == release.kind,
                                                   Release.live).order_by(Release.id)).first()
        if base is None or base.sha256 == release.sha256:
            return None
        formats = inventory.get("delta_formats")
        # Agents before format 2 declare none: format 1.
        formats = {f for f in formats if is_int(f) and f in protocol.DELTA_FORMATS} \
            if isinstance(formats, list) else {1}
        try:
            return best_delta(self.store, self.blobs_dir, base, release, min(self.delta_wbits, wbits),
                              partial(release_blob, self.blobs_dir, remote=self.jobs.remote), formats,
                              self.jobs.remote)
        except Exception:  # a patch is an optimisation: never let it stop the update
            log.exception("delta %s -> %s failed; sending the full image", base.version, release.version)
            return None

    def expire(self) -> list[int]:
        """(DB thread) time out the jobs of deployments past their timeout; their ids."""
        with self.store.session() as s:
            expired = expire_jobs(s, utcnow())
            if expired:
                finish_deployments(s, set(expired))
        for dep_id, job_ids in expired.items():
            log.warning("deployment %d: %d job(s) timed out", dep_id, len(job_ids))
        return [job_id for job_ids in expired.values() for job_id in job_ids]

    def mark_sent(self, job_ids: list[int], deltas: dict[int, tuple[int, int]] | None = None) -> None:
        """(DB thread) pending -> sent; a status may already have moved a job further.

        deltas: job id -> (delta id, patch size) for jobs sent as a patch."""
        now = utcnow()
        with self.store.session() as s:
            for job_id, (delta_id, size) in (deltas or {}).items():
                s.execute(update(Job).where(Job.id == job_id).values(delta_id=delta_id, bytes_total=size))
            for ids in chunks(job_ids):  # one UPDATE per row (a new row version on PostgreSQL), not two
                s.execute(update(Job).where(Job.id.in_(ids), or_(Job.sent_at.is_(None), Job.state == PENDING))
                          .values(sent_at=func.coalesce(Job.sent_at, now), last_sent_at=now, sends=Job.sends + 1,
                                  state=case((Job.state == PENDING, SENT), else_=Job.state))
                          .execution_options(synchronize_session=False))
