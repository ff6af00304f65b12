"""Commands that expired before their device took them (docs/protocol.md §4, §9).

Every command the control center signs carries `exp` (`time` + the center's command TTL). A
device that sleeps past it refuses the command (`rejected`, `E_EXPIRED`) and persists nothing,
so the same job with a fresh signature is still accepted. When such a refusal comes for a job
that is still `sent` (the device never took it), the job goes back to `pending`: the sender
signs and publishes its command again. After MAX_RESENDS re-sends the job ends `failed`
`E_EXPIRED` (a device that never stays awake for a TTL's worth of its session queue). The
count is that of the job's stored `E_EXPIRED` refusals, so it survives a restart.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from fota.device import protocol
from fota.server.deployments import PENDING, SENT
from fota.server.store import Job, StatusEvent, utcnow

if TYPE_CHECKING:
    from fota.server.ingest import BatchResult

__all__ = ["MAX_RESENDS", "refused"]

MAX_RESENDS = 3  # fresh copies of a job's command after E_EXPIRED refusals; the next one fails it


def refused(s: Session, result: BatchResult, jobs: dict) -> None:
    """(in the batch's transaction, its jobs locked) the jobs of ``result.expired`` whose device
    refused their command as expired: re-send (pending) or fail them; result.job_states follow.

    jobs: job id -> the batch's row of it (device_id, state, deployment_id)."""
    now = utcnow()
    for job_id, device_id in sorted(result.expired.items()):
        job = jobs.get(job_id)
        if job is None or job.device_id != device_id or job.state != SENT:
            continue  # not its job, or the device already took a copy (or the job ended)
        refusals = s.scalar(select(func.count()).select_from(StatusEvent).where(
            StatusEvent.job_id == job_id, StatusEvent.device_id == device_id,
            StatusEvent.state == protocol.REJECTED, StatusEvent.code == protocol.E_EXPIRED))
        if refusals > MAX_RESENDS:
            values = {"state": protocol.FAILED, "code": protocol.E_EXPIRED,
                      "reason": f"the device refused the command as expired {refusals} times "
                                "(it slept longer than the command TTL each time)"}
            result.finished.add(job.deployment_id)
        else:
            # Any live worker may sign it again (the one that sent it may be gone).
            values = {"state": PENDING, "worker": None}
        s.execute(update(Job).where(Job.id == job_id, Job.state == SENT).values(updated_at=now, **values))
        job.state = values["state"]
        result.job_states[job_id] = job.state
