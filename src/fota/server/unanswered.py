"""Commands no device answered: sent again while the device is online (docs/protocol.md §9).

A device answers every command that reaches it, within seconds: it takes the job (a status
moves the job past `sent`) or refuses it (a `rejected` status). A job still `sent` ``after``
seconds after its command was last published, while its device has been online for at least
that long (so a device waking up had the time to read its session's queue), means the command
was lost on the way; a broker's acknowledgement of the publish does not prove delivery
(measured: a NATS cluster dropped 1 to 3 of 24 commands published around a node's death,
docs/operations.md §4a). Such a job goes back to `pending`, and any live worker's sender signs
its command again (same job id, fresh `time` and `exp`) and publishes it. A copy that did arrive
after all is refused by the device as `E_DUPLICATE_JOB`, which changes nothing on the server.

Back-off: the n-th copy waits ``after`` × 2^(n-1) seconds after the last one; after
``MAX_UNANSWERED`` copies beyond the first the job is left `sent` for its deployment's or
campaign's timeout to end. Only jobs of active deployments are sent again (a cancelled
deployment's jobs get their cancel command, nothing more).
"""
from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select, update

from fota.server.deployments import ACTIVE, PENDING, SENT
from fota.server.store import Deployment, Device, Job, Store, utcnow
from fota.server.store.inlists import chunks

__all__ = ["MAX_UNANSWERED", "UNANSWERED_AFTER", "requeue_unanswered"]

UNANSWERED_AFTER = 60.0  # seconds without an answer before the first copy (a home's `command_resend`)
MAX_UNANSWERED = 4       # copies at most: after 1, 2, 4 and 8 × UNANSWERED_AFTER
SCAN_LIMIT = 2000        # jobs looked at per pass (the oldest sends first)


def requeue_unanswered(store: Store, after: float, now=None) -> list[int]:
    """(DB thread) unanswered `sent` jobs of online devices back to `pending`; the ids of those
    this call put back.

    Several workers may run this at once: the UPDATE re-checks `sent` and the last send's age,
    so a job another worker already sent again is not taken twice (nor counted here)."""
    now = now or utcnow()
    due = now - timedelta(seconds=after)
    with store.session() as s:
        rows = s.execute(
            select(Job.id, Job.sends, Job.last_sent_at)
            .join(Device, Job.device_id == Device.id)
            .join(Deployment, Job.deployment_id == Deployment.id)
            .where(Job.state == SENT, Job.last_sent_at <= due, Job.sends <= MAX_UNANSWERED,
                   Deployment.state == ACTIVE, Device.online.is_(True), Device.online_at <= due)
            .order_by(Job.last_sent_at).limit(SCAN_LIMIT)).all()
        # back-off: copy n (sends = n) waits after × 2^(n-1)
        due_ids = [job_id for job_id, sends, last in rows
                   if last <= now - timedelta(seconds=after * 2 ** max(sends - 1, 0))]
        requeued = []
        for part in chunks(due_ids):
            requeued += s.scalars(update(Job).where(Job.id.in_(part), Job.state == SENT, Job.last_sent_at <= due)
                                  .values(state=PENDING, worker=None).returning(Job.id)
                                  .execution_options(synchronize_session=False)).all()
    return sorted(requeued)
