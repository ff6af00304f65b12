"""Deployments: a release rolled out to devices, one Job (= wire job id) per device."""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import exists, insert, literal, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from fota.device import protocol
from fota.server import names
from fota.server.releases import ReleaseError, get_release, lock_live
from fota.server.store import Deployment, Device, Job, Release, StatusEvent, Store, utcnow
from fota.server.store.inlists import chunks

__all__ = ["ACTIVE", "CANCEL", "CANCELLED", "DONE", "FINAL_STATES", "HISTORY_LIMIT", "HISTORY_MAX_LIMIT", "PENDING",
           "SENT", "TERMINAL_STATES", "TIMED_OUT", "TRANSPORTS", "UPDATE", "DeploymentError", "DeploymentNotFound",
           "DeploymentStateError", "cancel_deployment", "create_deployment", "deployment_summary", "device_history",
           "expire_jobs", "finish_deployments", "history_page", "list_deployments",
           "recent_deployments"]

# Job states on the server side: 'pending' (not yet sent), 'sent', then the device's states,
# or 'timed_out' (set by the control center: no final status within the deployment's timeout).
# A command the device refuses for good (fota.server.ingest.JOB_ENDING_REFUSALS) ends 'failed'
# with the device's code.
PENDING = "pending"
SENT = "sent"
TIMED_OUT = "timed_out"
FINAL_STATES = tuple(protocol.TERMINAL_STATES) + (TIMED_OUT,)  # in display order
TERMINAL_STATES = frozenset(FINAL_STATES)
# Job kinds: the release's update command, or a cancel command for another job (target_job).
UPDATE = "update"
TRANSPORTS = ("mqtt", "http")  # a deployment's payload transport (Deployment.transport)
CANCEL = "cancel"
# A timed-out job in one of these states gets a cancel command (the device may still run it).
CANCELLABLE_STATES = (SENT, protocol.DOWNLOADING, protocol.POSTPONED)
# Deployment states.
ACTIVE = "active"
DONE = "done"            # every update job ended
CANCELLED = "cancelled"  # by an operator (cancel_deployment): nothing more is sent


class DeploymentError(ValueError):
    """A deployment cannot be created or found."""


class DeploymentNotFound(DeploymentError):
    """No deployment with that id."""


class DeploymentStateError(DeploymentError):
    """The deployment's state (or owner) does not allow the action."""


def _select_devices(s, release: Release, device_ids: Iterable[str] | None,
                    tag: str | None) -> list[str]:
    """The ids of the target devices, in the order given (explicit ids) or of their ids (tag)."""
    hardware = set(release.hardware)
    # Plain rows, not ORM objects: a deployment may target tens of thousands of devices.
    if device_ids is not None:
        ids = list(dict.fromkeys(device_ids))
        if not ids:
            raise DeploymentError("no device given")
        for device_id in ids:  # before the query: an id with a NUL breaks PostgreSQL's
            names.check(device_id, names.DEVICE_ID, "device id", DeploymentError)
        found: dict[str, str] = {}
        for part in chunks(ids):
            found.update(s.execute(select(Device.id, Device.hardware).where(Device.id.in_(part))).all())
        unknown = [i for i in ids if i not in found]
        if unknown:
            raise DeploymentError(f"unknown device(s): {', '.join(unknown)}")
        wrong = [f"{i} ({found[i]})" for i in ids if found[i] not in hardware]
        if wrong:
            raise DeploymentError(f"release {release.version} is for hardware {', '.join(release.hardware)}; "
                                  f"not for: {', '.join(wrong)}")
        return ids
    tagged = [(d.id, d.hardware) for d in s.execute(select(Device.id, Device.hardware, Device.tags)
                                                    .order_by(Device.id)) if tag in (d.tags or [])]
    if not tagged:
        raise DeploymentError(f"no device has tag {tag!r}")
    # A tag may span hardware types: target the devices this release is built for.
    devices = [device_id for device_id, hw in tagged if hw in hardware]
    if not devices:
        raise DeploymentError(f"no device with tag {tag!r} has hardware {', '.join(release.hardware)} "
                              f"(release {release.version})")
    return devices


def create_deployment(store: Store, release: Release | str | int, device_ids: Iterable[str] | None = None,
                      tag: str | None = None, *, min_battery: int | None = None,
                      timeout: int | None = None, transport: str = "mqtt") -> Deployment:
    """Target explicit devices or a tag; creates one pending Job per device.

    min_battery: battery percent (0..100; 0 = none) a device needs before it downloads and before it
    installs (it postpones the job until then). timeout: seconds after which jobs that did
    not finish end 'timed_out' (the device may be asleep or gone). transport: how the payload
    travels, 'mqtt' (chunks) or 'http' (a signed URL, to devices that declare http; the others
    get chunks: docs/http-transport.md).

    The returned deployment has its jobs loaded (``deployment.jobs``, in job-id order).

    DeploymentError for an unknown device, no matching device, hardware the release
    is not built for, or a limit out of range.
    """
    if (device_ids is None) == (tag is None):
        raise DeploymentError("give either device ids or a tag")
    if min_battery is not None and (isinstance(min_battery, bool) or not isinstance(min_battery, int)
                                    or not 0 <= min_battery <= 100):
        raise DeploymentError("min_battery must be a percentage 0..100")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int)
                                or not 1 <= timeout <= names.MAX_DB_INT):
        raise DeploymentError(f"timeout must be 1..{names.MAX_DB_INT} seconds")
    if tag is not None:
        names.check(tag, names.NAME, "tag", DeploymentError)
    if transport not in TRANSPORTS:
        raise DeploymentError(f"transport must be one of {', '.join(TRANSPORTS)}")
    if not isinstance(release, Release):
        release = get_release(store, release)
    with store.session() as s:
        try:
            lock_live(s, release)  # not deleted meanwhile (fota.server.release_delete)
        except ReleaseError as exc:
            raise DeploymentError(str(exc)) from None
        devices = _select_devices(s, release, device_ids, tag)
        target: dict[str, Any] = {"devices": devices} if tag is None else {"tag": tag}
        now = utcnow()
        deployment = Deployment(release_id=release.id, target=target, state=ACTIVE, created_at=now,
                                min_battery=min_battery or None, timeout_s=timeout, transport=transport)
        s.add(deployment)
        s.flush()
        # One executemany INSERT, rows in the devices' order (an ORM unit of work cost ~0.25 ms
        # per job: 10 s for 40,000); then the jobs read back once, for deployment.jobs.
        s.execute(insert(Job.__table__), [
            {"deployment_id": deployment.id, "device_id": device_id, "kind": UPDATE, "state": PENDING,
             "bytes_total": release.size, "created_at": now, "updated_at": now} for device_id in devices])
        jobs = list(s.scalars(select(Job).where(Job.deployment_id == deployment.id).order_by(Job.id)))
        set_committed_value(deployment, "jobs", jobs)
        for job in jobs:  # usable detached, as the ORM-built ones were
            set_committed_value(job, "deployment", deployment)
    return deployment


def expire_jobs(session: Session, now: datetime) -> dict[int, set[int]]:
    """End the unfinished jobs of active deployments whose timeout passed: state 'timed_out'.

    Returns {deployment id: ids of the jobs it timed out}. A device that comes back later
    and reports is recorded (status history) but does not change the job any more.

    A job whose command went out and that has not passed its download (sent, downloading,
    postponed) gets a signed cancel command queued behind it: a device asleep since then finds
    the update and the cancel in its broker session when it wakes, starts and stops, and keeps
    its firmware, rather than installing an update its operator already counts as timed out.
    One that is verifying or installing finishes (a device never stops half-installed); its
    later statuses are kept in the history.
    """
    expired: dict[int, set[int]] = {}
    deployments = session.execute(select(Deployment.id, Deployment.created_at, Deployment.timeout_s)
                                  .where(Deployment.state == ACTIVE, Deployment.timeout_s.is_not(None))
                                  .order_by(Deployment.id)).all()
    for dep_id, created_at, timeout_s in deployments:
        if created_at + timedelta(seconds=timeout_s) > now:
            continue
        # One UPDATE per deployment (the ORM wrote each of 40,000 jobs on its own: 4-6 s).
        reason = literal(f"no final status within {timeout_s} s of the deployment's start (last state: ") \
            + Job.state + literal(")")
        cancellable = session.execute(select(Job.id, Job.device_id).where(
            Job.deployment_id == dep_id, Job.kind == UPDATE, Job.state.in_(CANCELLABLE_STATES))).all()
        ids = session.scalars(update(Job).where(Job.deployment_id == dep_id, Job.kind == UPDATE,
                                                Job.state.not_in(TERMINAL_STATES))
                              .values(state=TIMED_OUT, code=None, reason=reason).returning(Job.id)).all()
        if ids:
            expired[dep_id] = set(ids)
        _queue_cancels(session, dep_id, cancellable, now)
    return expired


def finish_deployments(session: Session, deployment_ids: set[int]) -> None:
    """Mark ``done`` those of the (active) deployments whose update jobs all ended."""
    session.flush()
    # NOT EXISTS stops at a deployment's first open job (reading all of them cost a row per
    # open job of a big deployment at every batch that ended one of its jobs).
    for ids in chunks(sorted(deployment_ids)):
        session.execute(update(Deployment).where(
            Deployment.id.in_(ids), Deployment.state == ACTIVE,  # (a cancelled one stays cancelled)
            ~exists().where(Job.deployment_id == Deployment.id, Job.kind == UPDATE,
                            Job.state.not_in(TERMINAL_STATES))).values(state=DONE))


def _queue_cancels(session: Session, deployment_id: int, jobs: Iterable[tuple[int, str]], now: datetime) -> None:
    """A cancel job (a signed `cancel` command, sent behind the update) for each (job id, device id)."""
    rows = [{"deployment_id": deployment_id, "device_id": device_id, "kind": CANCEL, "target_job": job_id,
             "state": PENDING, "created_at": now, "updated_at": now} for job_id, device_id in jobs]
    if rows:
        session.execute(insert(Job), rows)


def cancel_deployment(session: Session, deployment_id: int, now: datetime) -> dict[str, list[int]]:
    """An operator stops a deployment: it ends ('cancelled') and nothing more of it is sent.

    Pending jobs end 'cancelled' without being sent. Jobs whose command went out and that have
    not passed their download (sent, downloading, postponed) get a signed cancel command queued
    behind it, as a timeout does; they end when their device reports (`cancelled`, or the state
    it reached first). Jobs past the download finish on the device (it never stops
    half-installed). A campaign's deployment is refused: `fota campaign abort` stops it.

    Returns {"withdrawn": pending job ids, "cancelling": ids that got a cancel command,
    "finishing": ids left to finish}. DeploymentNotFound, DeploymentStateError.
    """
    dep = session.scalars(select(Deployment).where(Deployment.id == deployment_id).with_for_update()).first()
    if dep is None:
        raise DeploymentNotFound(f"no deployment {deployment_id}")
    campaign = dep.target.get("campaign") if isinstance(dep.target, dict) else None
    if campaign is not None:
        raise DeploymentStateError(f"deployment {deployment_id} belongs to campaign {campaign!r}: "
                                   f"use 'fota campaign abort {campaign}'")
    if dep.state != ACTIVE:
        raise DeploymentStateError(f"deployment {deployment_id} is {dep.state}: nothing to cancel")
    open_jobs = session.execute(select(Job.id, Job.device_id, Job.state, Job.worker).where(
        Job.deployment_id == deployment_id, Job.kind == UPDATE, Job.state.not_in(TERMINAL_STATES))
        .order_by(Job.id).with_for_update()).all()
    # A pending job a sender has claimed may be on its way out right now: a cancel follows it.
    cancelling = [(job_id, device_id) for job_id, device_id, state, worker in open_jobs
                  if state in CANCELLABLE_STATES or (state == PENDING and worker is not None)]
    withdrawn = [job_id for job_id, _, state, _ in open_jobs if state == PENDING]
    for ids in chunks(withdrawn):
        session.execute(update(Job).where(Job.id.in_(ids), Job.state == PENDING).values(
            state=protocol.CANCELLED, reason="deployment cancelled before the command was sent", updated_at=now))
    _queue_cancels(session, deployment_id, cancelling, now)
    dep.state = CANCELLED
    return {"withdrawn": withdrawn,
            "cancelling": [job_id for job_id, _, state, _ in open_jobs if state in CANCELLABLE_STATES],
            "finishing": [job_id for job_id, _, state, _ in open_jobs
                          if state not in CANCELLABLE_STATES and state != PENDING]}


def list_deployments(store: Store) -> list[Deployment]:
    """All deployments, oldest first."""
    with store.session() as s:
        return list(s.scalars(select(Deployment).order_by(Deployment.id)))


def recent_deployments(store: Store, limit: int = 20) -> list[dict[str, Any]]:
    """The newest ``limit`` deployments, newest first: id, release version, state, created_at."""
    with store.session() as s:
        rows = s.scalars(select(Deployment).order_by(Deployment.id.desc()).limit(limit))
        return [{"id": d.id, "release": d.release.version, "state": d.state, "created_at": d.created_at}
                for d in rows]


def deployment_summary(store: Store, deployment_id: int) -> dict[str, Any]:
    """State of a deployment and of each of its jobs, as plain data."""
    with store.session() as s:
        deployment = s.get(Deployment, deployment_id) if names.as_id(deployment_id) else None
        if deployment is None:
            raise DeploymentError(f"no deployment {deployment_id}")
        jobs = [{"job": j.id, "device": j.device_id, "state": j.state, "code": j.code,
                 "reason": j.reason, "progress": j.progress, "bytes_served": j.bytes_served,
                 "sent_at": j.sent_at, "sends": j.sends, "updated_at": j.updated_at,
                 "delta": j.delta_id is not None}
                for j in deployment.jobs if j.kind == UPDATE]
        return {
            "id": deployment.id,
            "release": deployment.release.version,
            "state": deployment.state,
            "target": deployment.target,
            "created_at": deployment.created_at,
            "min_battery": deployment.min_battery,
            "timeout": deployment.timeout_s,
            "transport": deployment.transport,
            "counts": dict(Counter(j["state"] for j in jobs)),
            "progress": sum(j["progress"] or 0.0 for j in jobs) / len(jobs) if jobs else 1.0,
            "jobs": jobs,
        }


HISTORY_LIMIT = 100       # statuses per page by default
HISTORY_MAX_LIMIT = 1000  # and at most


def history_page(store: Store, device_id: str, limit: int = HISTORY_LIMIT, cursor: int | None = None,
                 newest_first: bool = False, include_ignored: bool = False) -> tuple[list[StatusEvent], int | None]:
    """One page of a device's statuses that took effect (include_ignored: all of them, see
    device_history) in the order they were stored (status ids), oldest first or newest first,
    and the cursor of the next page (None: this is the last one).

    cursor: the ``next`` of the previous page (a status id; the page starts after it)."""
    if not 1 <= limit <= HISTORY_MAX_LIMIT:
        raise DeploymentError(f"limit must be 1..{HISTORY_MAX_LIMIT}")
    query = select(StatusEvent).where(StatusEvent.device_id == device_id)
    if not include_ignored:
        query = query.where(StatusEvent.ignored.is_(None))
    if cursor is not None:
        query = query.where(StatusEvent.id < cursor if newest_first else StatusEvent.id > cursor)
    query = query.order_by(StatusEvent.id.desc() if newest_first else StatusEvent.id).limit(limit + 1)
    with store.session() as s:
        rows = list(s.scalars(query))
    if len(rows) > limit:
        return rows[:limit], rows[limit - 1].id
    return rows, None


def device_history(store: Store, device_id: str, include_ignored: bool = False) -> list[StatusEvent]:
    """The statuses a device reported that took effect, in the order received.

    include_ignored: also those that did not (a job of another device, no such job, a job
    already ended), each marked with why (``StatusEvent.ignored``). `rejected`, `keys` and
    `health` statuses are reports of what the device did: always included."""
    with store.session() as s:
        query = (select(StatusEvent).where(StatusEvent.device_id == device_id)
                 .order_by(StatusEvent.received_at, StatusEvent.boot, StatusEvent.seq, StatusEvent.id))
        if not include_ignored:
            query = query.where(StatusEvent.ignored.is_(None))
        return list(s.scalars(query))
