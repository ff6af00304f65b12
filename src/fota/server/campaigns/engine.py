"""The campaign engine: one step of a campaign is a function of the database and the time.

``CampaignEngine(store).tick()`` steps every active campaign once, each in its own
transaction, holding the campaign's row lock (``FOR UPDATE SKIP LOCKED`` on PostgreSQL: a
campaign another worker is stepping right now is skipped, not waited for). Devices are
started under their row lock too, so two workers never drive the same device. A step is
idempotent: it reads what devices reported (jobs, status events), decides, and writes;
running it twice, or on another worker after a crash, does no harm. No state is kept in
the process between ticks. The clock is injectable (``tick(now)``) for tests. On SQLite (no
row locks) a step takes the database's write lock first instead.
"""
from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import and_, func, insert, or_, select, update
from sqlalchemy.orm import Session

from fota.device import protocol as P
from fota.server.campaigns import pacing
from fota.server.campaigns import states as S
from fota.server.campaigns.spec import CampaignSpec, version_key
from fota.server.deployments import ACTIVE, DONE, PENDING, SENT, TERMINAL_STATES
from fota.server.store import Campaign, CampaignDevice, Deployment, Device, Job, Release, StatusEvent, Store, utcnow
from fota.server.store.inlists import chunks

__all__ = ["CampaignEngine", "TargetPlan", "cancel_downloads", "plan_targets", "target_devices", "PHASES"]

log = logging.getLogger(__name__)

# Job state -> the step whose timeout applies.
PHASES = {PENDING: "download", SENT: "download", P.DOWNLOADING: "download",
          P.VERIFYING: "install", P.INSTALLING: "install",
          P.REBOOTING: "confirm", P.TRIAL: "confirm"}
# A failure that another attempt cannot fix: no retry. (The command refusals among them
# arrive as `rejected` statuses that end the job: fota.server.ingest.JOB_ENDING_REFUSALS.)
PERMANENT_CODES = frozenset({P.E_HW_MISMATCH, P.E_DOWNGRADE, P.E_TOO_LARGE, P.E_BAD_MANIFEST,
                             P.E_UNKNOWN_KEY, P.E_KEY_REVOKED, P.E_KEY_EXPIRED, P.E_BAD_SIGNATURE,
                             P.E_DECRYPT, P.E_WRONG_DEVICE, P.E_BAD_COMMAND, P.E_UNKNOWN_COMMAND,
                             P.E_OVERSIZE})


def _set(row: CampaignDevice, now: datetime, state: str, code: str | None = None,
         reason: str | None = None) -> None:
    row.state = state
    row.code = code
    row.reason = reason
    row.updated_at = now


def _after_confirmation(row: CampaignDevice, event_id: int, epoch: int, boot: int, seq: int) -> bool:
    """Whether a status (a health report) came after the confirmation that started the row's
    probation in its device's order: by (boot, seq) within the confirmation's epoch; of another
    epoch (the device started over: its counters begin again, below the confirmation's) by
    arrival, the status_events id. A row without the confirmation's id (in probation since before
    migration 0013, or its confirmation not found): by (boot, seq), as before."""
    if row.confirm_event is not None and epoch != row.confirm_epoch:
        return event_id > row.confirm_event
    return (boot, seq) > (row.confirm_boot or 0, row.confirm_seq or 0)


# ---------------------------------------------------------------- targeting

def _order(campaign_id: int, device_id: str) -> str:
    # A stable shuffle: the canary is not always the alphabetically first devices.
    return hashlib.sha256(f"{campaign_id}:{device_id}".encode()).hexdigest()


def _held_by_older(s: Session, campaign_id: int | None, device_ids: list[str]) -> dict[str, str]:
    """device id -> name of an older active campaign that has not settled the device (campaign_id
    None: a campaign not created yet, younger than every other)."""
    held: dict[str, str] = {}
    for ids in chunks(device_ids):
        query = (select(CampaignDevice.device_id, Campaign.name)
                 .join(Campaign, Campaign.id == CampaignDevice.campaign_id)
                 .where(CampaignDevice.device_id.in_(ids), CampaignDevice.state.in_(S.UNSETTLED),
                        Campaign.state.in_(S.ACTIVE)))
        if campaign_id is not None:
            query = query.where(CampaignDevice.campaign_id < campaign_id)
        held.update((device_id, name) for device_id, name in s.execute(query))
    return held


def _eligibility(release: Release, device, held: dict[str, str]) -> str | None:
    """Why ``device`` is skipped, or None if this campaign may drive it."""
    if device.hardware not in release.hardware:
        return f"hardware {device.hardware} not in the release's {', '.join(release.hardware)}"
    if device.version == release.version:
        return f"already runs {release.version}"
    if release.min_version and (device.version is None
                                or version_key(device.version) < version_key(release.min_version)):
        return f"runs {device.version}, the release needs at least {release.min_version}"
    older = held.get(device.id)
    if older is not None:
        return f"held by campaign {older!r} (the older running campaign keeps the device)"
    return None


@dataclass
class TargetPlan:
    """What targeting finds: devices the campaign drives (with their wave index) and those it
    skips (with the reason). The same plan makes a campaign's preview and its start."""

    eligible: list = field(default_factory=list)       # device rows (id, hardware, version, online, tags, inventory)
    waves: list[int] = field(default_factory=list)     # wave index per eligible device
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (device id, reason)


def plan_targets(s: Session, campaign_id: int | None, release: Release, spec: CampaignSpec,
                 late_wave: int | None = None) -> TargetPlan:
    """The devices matching the filter that campaign ``campaign_id`` does not have yet (None: a
    campaign not created yet, for a preview), spread over the waves (late_wave given: all join
    that wave). Devices of another hardware type than the release's are skipped with the reason,
    never driven."""
    # Plain rows, not ORM objects: a campaign may target tens of thousands of devices.
    query = select(Device.id, Device.hardware, Device.version, Device.online, Device.tags, Device.inventory)
    if campaign_id is not None:
        query = query.where(~select(CampaignDevice.id).where(
            CampaignDevice.campaign_id == campaign_id, CampaignDevice.device_id == Device.id).exists())
    if spec.filter.hardware:
        query = query.where(Device.hardware.in_(spec.filter.hardware))
    if spec.filter.versions:
        query = query.where(Device.version.in_(spec.filter.versions))
    if spec.filter.online is not None:
        query = query.where(Device.online.is_(spec.filter.online))
    # An explicit device list may be long: one query per slice of it.
    queries = [query.where(Device.id.in_(ids)) for ids in chunks(sorted(spec.filter.device_set))] \
        if spec.filter.devices else [query]
    devices = sorted((d for q in queries for d in s.execute(q) if spec.filter.matches(d)),
                     key=lambda d: _order(campaign_id or 0, d.id))
    plan = TargetPlan()
    held = _held_by_older(s, campaign_id, [d.id for d in devices]) if devices else {}
    for device in devices:
        why = _eligibility(release, device, held)
        if why is None:
            plan.eligible.append(device)
        else:
            plan.skipped.append((device.id, why))
    plan.waves = [late_wave] * len(plan.eligible) if late_wave is not None else _assign_waves(spec, plan.eligible)
    return plan


def target_devices(s: Session, campaign: Campaign, spec: CampaignSpec, now: datetime,
                   late: bool = False) -> int:
    """Add the devices matching the filter that the campaign does not have yet; returns how many.

    At start (late=False) they are spread over the waves; late joiners (dynamic targeting)
    join the current wave. Devices of other hardware than the release's are added as skipped.
    """
    plan = plan_targets(s, campaign.id, campaign.release, spec, campaign.wave if late else None)
    rows = [{"campaign_id": campaign.id, "device_id": device_id, "wave": campaign.wave,
             "state": S.SKIPPED, "reason": why, "attempts": 0, "updated_at": now} for device_id, why in plan.skipped]
    rows += [{"campaign_id": campaign.id, "device_id": device.id, "wave": wave, "state": S.QUEUED,
              "reason": None, "attempts": 0, "updated_at": now} for device, wave in zip(plan.eligible, plan.waves)]
    if rows:
        s.execute(insert(CampaignDevice), rows)
    if late and plan.eligible:
        log.info("campaign %s: %d late device(s) joined wave %d", campaign.name, len(plan.eligible), campaign.wave + 1)
    return len(rows)


def _assign_waves(spec: CampaignSpec, devices: list) -> list[int]:
    """Wave index per device: groups take their members, percentages cumulative shares of the rest."""
    total = len(devices)
    wave_of: dict[str, int] = {}
    for index, wave in enumerate(spec.waves):
        for device in devices:
            if device.id in wave_of:
                continue
            if (wave.devices and device.id in wave.device_set) or (wave.tag and wave.tag in (device.tags or [])):
                wave_of[device.id] = index
    assigned = len(wave_of)
    free = [d for d in devices if d.id not in wave_of]
    for index, wave in enumerate(spec.waves):
        if wave.percent is None:
            continue
        want = max(0, math.ceil(total * wave.percent / 100) - assigned)
        for device in free[:want]:
            wave_of[device.id] = index
        free = free[want:]
        assigned += want
    last = len(spec.waves) - 1
    for device in free:  # in no group and past the last percentage: the last wave takes them
        wave_of[device.id] = last
    return [wave_of[d.id] for d in devices]


# ---------------------------------------------------------------- cancelling

def _cancel_job(s: Session, job: Job, now: datetime) -> None:
    """Queue a signed cancel command for ``job`` (the control center sends it in job-id order),
    unless one was queued already (an abort, then the download's timeout)."""
    if s.scalar(select(Job.id).where(Job.device_id == job.device_id, Job.kind == "cancel",
                                     Job.target_job == job.id).limit(1)) is None:
        s.add(Job(deployment_id=job.deployment_id, device_id=job.device_id, kind="cancel", target_job=job.id,
                  state=PENDING, created_at=now, updated_at=now))
    if job.state == PENDING:
        # Never sent: it must not be. (If a sender published it a moment ago, the cancel
        # command queued above follows it on the same topic.)
        job.state = P.CANCELLED
        job.reason = "campaign: cancelled before it was sent"


def cancel_downloads(s: Session, campaign: Campaign, now: datetime) -> int:
    """Abort: queued devices are dropped, downloads cancelled; past the download a device finishes.

    Returns how many cancel commands were queued.
    """
    rows = s.scalars(select(CampaignDevice).where(CampaignDevice.campaign_id == campaign.id,
                                                  CampaignDevice.state.in_((S.QUEUED, S.RETRY, S.IN_FLIGHT))))
    cancels = 0
    for row in rows:
        if row.state != S.IN_FLIGHT:
            _set(row, now, S.CANCELLED, reason="campaign aborted before this device started")
            continue
        job = s.get(Job, row.job_id)
        if job is not None and PHASES.get(job.state) == "download":
            _cancel_job(s, job, now)
            cancels += 1
    return cancels


# ---------------------------------------------------------------- the engine

class CampaignEngine:
    """Steps campaigns. Stateless between ticks: any number of engines may share a database."""

    def __init__(self, store: Store, clock: Callable[[], datetime] = utcnow):
        self.store = store
        self.clock = clock

    def tick(self, now: datetime | None = None) -> int:
        """Step every active campaign once; returns how many were stepped (locked ones are skipped)."""
        now = now or self.clock()
        with self.store.session() as s:
            ids = list(s.scalars(select(Campaign.id).where(Campaign.state.in_(S.ACTIVE)).order_by(Campaign.id)))
        stepped = 0
        for campaign_id in ids:
            with self.store.session() as s:
                if s.get_bind().dialect.name == "sqlite":
                    # SQLite has no row locks: write first, so this transaction holds the
                    # database's write lock before it reads (steps of several engines serialize).
                    s.execute(update(Campaign).where(Campaign.id == campaign_id).values(state=Campaign.state))
                campaign = s.scalars(select(Campaign).where(Campaign.id == campaign_id,
                                                            Campaign.state.in_(S.ACTIVE))
                                     .with_for_update(skip_locked=True)).first()
                if campaign is None:
                    continue
                self._step(s, campaign, now)
                stepped += 1
        return stepped

    # ------------------------------------------------------------ one step
    def _step(self, s: Session, c: Campaign, now: datetime) -> None:
        spec = CampaignSpec.parse(c.spec)
        if spec.dynamic and c.state in (S.RUNNING, S.PAUSED, S.WAITING):
            target_devices(s, c, spec, now, late=True)
            s.flush()
        rows = list(s.scalars(select(CampaignDevice).where(CampaignDevice.campaign_id == c.id,
                                                           CampaignDevice.state.in_((S.IN_FLIGHT, S.PROBATION)))))
        jobs: dict[int, Job] = {}
        for ids in chunks([r.job_id for r in rows if r.job_id]):
            jobs.update((j.id, j) for j in s.scalars(select(Job).where(Job.id.in_(ids))))
        confirmed = []
        for row in rows:
            job = jobs.get(row.job_id)
            if row.state == S.IN_FLIGHT and job is not None and job.state == P.CONFIRMED:
                confirmed.append(row)
            elif row.state == S.IN_FLIGHT:
                self._track(s, c, spec, row, job, now)
        self._confirmed(s, confirmed, now)
        self._probation(s, c, spec, [r for r in rows if r.state == S.PROBATION], now)
        s.flush()
        counts = self._counts(s, c.id)
        if c.state == S.ABORTING:
            if not any(counts[w][st] for w in counts for st in (S.IN_FLIGHT, S.PROBATION, S.QUEUED, S.RETRY)):
                c.state = S.advance(c.state, "nothing_in_flight")
                c.finished_at = now
                log.info("campaign %s aborted; nothing in flight any more", c.name)
            return
        if c.state == S.PAUSED and not spec.dynamic and not any(
                counts[w][st] for w in counts for st in S.UNSETTLED):
            # Nothing is left that resume could start: the campaign is over, with why it was
            # paused kept in its reason (docs/campaigns.md §6). A dynamic one stays paused.
            c.state = S.advance(c.state, "all_settled")
            c.finished_at = now
            c.reason = f"every device settled while paused ({c.reason or 'paused'})"
            log.info("campaign %s: %s", c.name, c.reason)
            return
        if self._failure_threshold(s, c, spec, counts, now):
            return
        if c.state == S.RUNNING:
            self._advance_waves(c, spec, counts, now)
        if c.state == S.RUNNING and pacing.window_open(spec.window, now):
            self._adjust_rate(s, c, spec, now)
            self._start(s, c, spec, counts, now)

    @staticmethod
    def _counts(s: Session, campaign_id: int) -> defaultdict[int, Counter]:
        counts: defaultdict[int, Counter] = defaultdict(Counter)
        for wave, state, n in s.execute(select(CampaignDevice.wave, CampaignDevice.state, func.count())
                                        .where(CampaignDevice.campaign_id == campaign_id)
                                        .group_by(CampaignDevice.wave, CampaignDevice.state)):
            counts[wave][state] = n
        return counts

    # ------------------------------------------------------------ in-flight devices
    def _track(self, s: Session, c: Campaign, spec: CampaignSpec, row: CampaignDevice, job: Job | None,
               now: datetime) -> None:
        if job is None:
            self._attempt_failed(row, spec, now, "E_LOST", "the campaign's job is gone", retry=c.state != S.ABORTING)
            return
        if job.state == P.REVERTED:
            _set(row, now, S.FAILED, job.code or P.E_HEALTH, job.reason or "reverted to the previous firmware")
            return
        if job.state == P.CANCELLED and c.state == S.ABORTING:
            _set(row, now, S.CANCELLED, None, job.reason or "cancelled: the campaign was aborted")
            return
        if job.state in (P.FAILED, P.CANCELLED):
            retry = job.code not in PERMANENT_CODES and c.state != S.ABORTING
            self._attempt_failed(row, spec, now, job.code, job.reason or job.state, retry=retry)
            return
        phase = PHASES.get(job.state, "download")
        # A whole attempt is bounded too: a device whose job went back and forth between steps
        # (each change restarts the step's clock) is not waited for longer than all steps' sum.
        attempt = sum(spec.timeouts.values())
        over = now - job.created_at > timedelta(seconds=attempt)
        if phase != row.step and not over:
            row.step, row.step_at, row.updated_at = phase, now, now
            return
        limit = spec.timeouts[phase]
        if over or (row.step_at is not None and now - row.step_at > timedelta(seconds=limit)):
            reason = (f"attempt not finished within {attempt} s (the steps' timeouts together; last state "
                      f"{job.state})" if over else f"no progress past {job.state} within {limit} s ({phase} timeout)")
            if phase == "download":
                _cancel_job(s, job, now)
                if job.state not in TERMINAL_STATES:
                    job.state, job.code, job.reason = P.FAILED, P.E_TIMEOUT, f"campaign: {reason}"
                self._attempt_failed(row, spec, now, P.E_TIMEOUT, reason, retry=c.state != S.ABORTING)
            else:
                # Past the download a device cannot be cancelled: it finishes on its own.
                _set(row, now, S.FAILED, P.E_TIMEOUT, reason)

    @staticmethod
    def _attempt_failed(row: CampaignDevice, spec: CampaignSpec, now: datetime, code: str | None,
                        reason: str, retry: bool) -> None:
        if retry and row.attempts <= spec.retries:
            _set(row, now, S.RETRY, code, reason)
            row.next_at = now + pacing.backoff_delay(spec.backoff, row.attempts)
        else:
            _set(row, now, S.FAILED, code, reason)

    @staticmethod
    def _confirmed(s: Session, rows: list[CampaignDevice], now: datetime) -> None:
        """Jobs that reached `confirmed`: probation starts; remember where the confirmation is in
        its device's order: its epoch, (boot, seq) and status_events id (_after_confirmation)."""
        if not rows:
            return
        where: dict[int, tuple[int, int, int, int]] = {}  # job -> (event id, epoch, boot, seq)
        for ids in chunks([r.job_id for r in rows]):
            for job_id, *found in s.execute(
                    select(StatusEvent.job_id, StatusEvent.id, StatusEvent.epoch, StatusEvent.boot, StatusEvent.seq)
                    .where(StatusEvent.job_id.in_(ids), StatusEvent.state == P.CONFIRMED,
                           # the one that took effect: not another device's status naming the job
                           StatusEvent.ignored.is_(None))):
                where[job_id] = max(where.get(job_id, tuple(found)), tuple(found))  # the last stored
        for row in rows:
            row.confirm_event, row.confirm_epoch, row.confirm_boot, row.confirm_seq = where.get(
                row.job_id, (None, None, None, None))
            row.confirmed_at = now
            _set(row, now, S.PROBATION)

    def _probation(self, s: Session, c: Campaign, spec: CampaignSpec, rows: list[CampaignDevice],
                   now: datetime) -> None:
        """Succeeded once healthy for the probation time; failed on an unhealthy report.

        Only health reports of the new version that came after the confirmation count
        (_after_confirmation; the wall clocks of device and server never meet).
        """
        if not rows:
            return
        reports: defaultdict[str, list] = defaultdict(list)
        for ids in chunks([r.device_id for r in rows]):
            for device_id, event_id, epoch, boot, seq, payload, reason in s.execute(
                    select(StatusEvent.device_id, StatusEvent.id, StatusEvent.epoch, StatusEvent.boot,
                           StatusEvent.seq, StatusEvent.payload, StatusEvent.reason)
                    .where(StatusEvent.device_id.in_(ids), StatusEvent.state == P.HEALTH,
                           StatusEvent.version == c.release.version)):
                reports[device_id].append(((event_id, epoch, boot, seq), payload, reason))
        # A device sends a health report right after it confirms (protocol §6); one that sent
        # none by the end of its probation plus the confirm step's timeout never will: failed.
        silence = spec.probation + spec.timeouts["confirm"]
        for row in rows:
            seen = [(p, reason) for place, p, reason in reports[row.device_id] if _after_confirmation(row, *place)]
            bad = [(p, reason) for p, reason in seen if not (isinstance(p, dict) and p.get("ok") is True)]
            since = now - row.confirmed_at if row.confirmed_at is not None else None
            if bad:
                reason = bad[0][1]  # the reason column (payloads hold only the fields without one)
                _set(row, now, S.FAILED, P.E_HEALTH, f"unhealthy during probation: {reason or 'no reason given'}")
            elif since is not None and since >= timedelta(seconds=spec.probation) and (seen or spec.probation == 0):
                _set(row, now, S.SUCCEEDED)
            elif since is not None and since > timedelta(seconds=silence):
                _set(row, now, S.FAILED, P.E_TIMEOUT, f"no health report of {c.release.version} within {silence} s "
                                                      "of the confirmation (probation + confirm timeout)")

    # ------------------------------------------------------------ thresholds and waves
    def _failure_threshold(self, s: Session, c: Campaign, spec: CampaignSpec, counts, now: datetime) -> bool:
        if c.state not in (S.RUNNING, S.WAITING, S.PAUSED):
            return False
        for index in range(min(c.wave, len(spec.waves) - 1) + 1):
            wave = spec.waves[index]
            total = sum(n for st, n in counts[index].items() if st != S.SKIPPED)
            failed = counts[index][S.FAILED] - int((c.accepted or {}).get(str(index), 0))
            if total and failed > wave.failure / 100 * total:
                reason = (f"wave {index + 1}: {counts[index][S.FAILED]} of {total} devices failed "
                          f"(threshold {wave.failure:g}%)")
                if spec.on_failure == "abort":
                    c.state = S.advance(c.state, "failure_threshold_abort")
                    c.reason = reason + "; aborting"
                    cancel_downloads(s, c, now)
                elif c.state != S.PAUSED:
                    c.state = S.advance(c.state, "failure_threshold")
                    c.reason = reason + "; paused"
                else:
                    return True
                log.warning("campaign %s: %s", c.name, c.reason)
                return True
        return False

    @staticmethod
    def _advance_waves(c: Campaign, spec: CampaignSpec, counts, now: datetime) -> None:
        last = len(spec.waves) - 1
        while True:
            wave = spec.waves[c.wave]
            total = sum(n for st, n in counts[c.wave].items() if st != S.SKIPPED)
            succeeded = counts[c.wave][S.SUCCEEDED]
            unsettled = sum(counts[c.wave][st] for st in S.UNSETTLED)
            if c.wave == last:
                # The success threshold gates the next wave; after the last one there is none:
                # the campaign is done once every device settled (failures were judged by the
                # failure threshold on the way).
                if spec.dynamic:  # open-ended: late devices may still join; an operator ends it
                    c.reason = None if any(counts[w][st] for w in counts for st in S.UNSETTLED) \
                        else "every targeted device settled; waiting for new devices (dynamic)"
                elif not any(counts[w][st] for w in counts for st in S.UNSETTLED):
                    c.state = S.advance(c.state, "all_settled")
                    c.finished_at = now
                    c.reason = None
                return
            if total and succeeded < wave.success / 100 * total:
                if not unsettled:
                    c.state = S.advance(c.state, "failure_threshold")
                    c.reason = (f"wave {c.wave + 1} settled below its success threshold: {succeeded} of {total} "
                                f"succeeded (needs {wave.success:g}%)")
                return
            if wave.approval:
                c.state = S.advance(c.state, "wave_needs_approval")
                c.reason = f"wave {c.wave + 1} succeeded; resume to start wave {c.wave + 2}"
                return
            c.wave += 1
            log.info("campaign %s: wave %d starts", c.name, c.wave + 1)

    # ------------------------------------------------------------ pacing and starts
    @staticmethod
    def _adjust_rate(s: Session, c: Campaign, spec: CampaignSpec, now: datetime) -> None:
        if spec.rate is None:
            return
        if c.rate is None or c.rate_at is None:
            c.rate, c.rate_at = spec.rate, now
            return
        if spec.rate_growth <= 1 or now - c.rate_at < timedelta(minutes=1):
            return
        failures = s.scalar(select(func.count()).where(
            CampaignDevice.campaign_id == c.id, CampaignDevice.state.in_((S.FAILED, S.RETRY)),
            CampaignDevice.updated_at >= c.rate_at))
        # exponential while the success rate holds; back to the base rate on any failure
        c.rate = spec.rate if failures else min(spec.max_rate or math.inf, c.rate * spec.rate_growth)
        c.rate_at = now

    def _start(self, s: Session, c: Campaign, spec: CampaignSpec, counts, now: datetime) -> None:
        in_flight = sum(counts[w][S.IN_FLIGHT] for w in counts)
        allowed = spec.max_in_flight - in_flight
        if c.rate is not None:
            span = timedelta(seconds=60 if c.rate >= 1 else 60 / c.rate)
            started = s.scalar(select(func.count()).where(Job.deployment_id == c.deployment_id,
                                                          Job.kind == "update", Job.created_at > now - span))
            allowed = min(allowed, pacing.starts_allowed(c.rate, started))
        if allowed <= 0:
            return
        release = c.release
        # Online devices only (a command to an offline device waits for it; its slot would idle);
        # each candidate row-locked, so a device another worker is starting now is skipped.
        candidates = s.execute(
            select(CampaignDevice.id, CampaignDevice.device_id, CampaignDevice.attempts, Device.hardware)
            .join(Device, Device.id == CampaignDevice.device_id)
            .where(CampaignDevice.campaign_id == c.id, CampaignDevice.wave <= c.wave, Device.online.is_(True),
                   or_(CampaignDevice.state == S.QUEUED,
                       and_(CampaignDevice.state == S.RETRY, CampaignDevice.next_at <= now)))
            .order_by(CampaignDevice.wave, CampaignDevice.id)
            .limit(allowed * 4 + 10)
            .with_for_update(of=[CampaignDevice, Device], skip_locked=True)).all()
        busy = self._busy(s, c, [row.device_id for row in candidates])
        chosen, foreign = [], []
        for row in candidates:
            if len(chosen) >= allowed:
                break
            if row.hardware not in release.hardware:  # re-provisioned meanwhile: never elsewhere
                foreign.append({"id": row.id, "state": S.SKIPPED, "updated_at": now,
                                "reason": f"hardware {row.hardware} not in the release's list"})
            elif row.device_id not in busy:
                chosen.append(row)
        if foreign:
            s.execute(update(CampaignDevice), foreign)
        if not chosen:
            return
        # Bulk statements (thousands of devices may start in one step); job ids in start order.
        jobs = s.execute(insert(Job).returning(Job.id, sort_by_parameter_order=True),
                         [{"deployment_id": c.deployment_id, "device_id": row.device_id, "kind": "update",
                           "state": PENDING, "bytes_total": release.size, "created_at": now, "updated_at": now}
                          for row in chosen]).scalars().all()
        # The campaign's deployment went `done` when its last open job ended (between waves): with
        # jobs open again it is active (what the API shows, and what re-sends unanswered commands).
        s.execute(update(Deployment).where(Deployment.id == c.deployment_id, Deployment.state == DONE)
                  .values(state=ACTIVE))
        s.execute(update(CampaignDevice), [
            {"id": row.id, "job_id": job_id, "attempts": row.attempts + 1, "step": "download", "step_at": now,
             "next_at": None, "state": S.IN_FLIGHT, "code": None, "reason": None, "updated_at": now}
            for row, job_id in zip(chosen, jobs)])
        log.info("campaign %s: started %d device(s)", c.name, len(chosen))

    @staticmethod
    def _busy(s: Session, c: Campaign, device_ids: list[str]) -> set[str]:
        """Devices another campaign drives (in flight, on probation) or with an open job of any deployment."""
        busy: set[str] = set()
        for ids in chunks(device_ids):
            busy.update(s.scalars(select(CampaignDevice.device_id).where(
                CampaignDevice.device_id.in_(ids), CampaignDevice.campaign_id != c.id,
                CampaignDevice.state.in_((S.IN_FLIGHT, S.PROBATION)))))
            busy.update(s.scalars(select(Job.device_id).where(
                Job.device_id.in_(ids), Job.kind == "update", Job.state.not_in(TERMINAL_STATES))))
        return busy
