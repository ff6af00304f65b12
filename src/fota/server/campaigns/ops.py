"""Operator actions on campaigns (create, start, pause, resume, abort) and their views.

Each action locks the campaign's row (``FOR UPDATE``, waiting for a worker's step to end)
and changes state only through the table in ``states``. Callers record the audit event in
the same transaction (``fota.server.audit.transaction``).
"""
from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fota.server import names
from fota.server.campaigns import pacing
from fota.server.campaigns import states as S
from fota.server.campaigns.engine import cancel_downloads, plan_targets, target_devices
from fota.server.campaigns.spec import CampaignError, CampaignNotFound, CampaignSpec
from fota.server.deployments import ACTIVE as DEPLOYMENT_ACTIVE
from fota.server.releases import ReleaseError, check_release_key, get_release, lock_live
from fota.server.store import Campaign, CampaignDevice, Deployment, Device, Job, Release, Store, utcnow
from fota.server.store.inlists import chunks

__all__ = ["abort_campaign", "campaign_summary", "check_campaign_key", "create_campaign", "get_campaign", "list_campaigns",
           "pause_campaign", "preview_campaign", "resume_campaign", "start_campaign"]


def _load(s: Session, ref: str | int, lock: bool = False) -> Campaign:
    query = select(Campaign)
    if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
        query = query.where(Campaign.id == names.as_id(ref))  # None (out of range): no row
    elif names.may_be_stored(ref):
        query = query.where(Campaign.name == ref)
    else:
        raise CampaignNotFound(f"no campaign {ref!r}")
    if lock:
        query = query.with_for_update()
    campaign = s.scalars(query).first()
    if campaign is None:
        raise CampaignNotFound(f"no campaign {ref!r}")
    return campaign


def get_campaign(store: Store, ref: str | int) -> Campaign:
    with store.session() as s:
        return _load(s, ref)


def list_campaigns(store: Store) -> list[Campaign]:
    with store.session() as s:
        return list(s.scalars(select(Campaign).order_by(Campaign.id)))


def _unknown_targets(s: Session, spec: CampaignSpec) -> list[str]:
    """What the spec names that the fleet does not have: device ids, tags no device carries."""
    ids = sorted(set(spec.filter.devices).union(*(w.devices for w in spec.waves)))
    found: set[str] = set()
    for chunk in chunks(ids):
        found.update(s.scalars(select(Device.id).where(Device.id.in_(chunk))))
    problems = []
    unknown = [i for i in ids if i not in found]
    if unknown:
        problems.append(f"unknown device(s): {', '.join(unknown)}")
    tags = sorted(set(spec.filter.tags).union(w.tag for w in spec.waves if w.tag))
    if tags:
        carried: set[str] = set()
        for device_tags in s.scalars(select(Device.tags)):
            carried.update(device_tags or [])
        problems += [f"no device has tag {tag!r}" for tag in tags if tag not in carried]
    return problems


def _validated(s: Session, store: Store, name: str, release: Release | str | int, spec: dict[str, Any] | None,
               trust: dict | None) -> tuple[CampaignSpec, Release, list[str]]:
    """The checks of create_campaign (also run by its preview): the spec, the name not taken, the
    release and its key, the hardware filter, the devices and tags named. Returns the parsed spec,
    the release and, for a dynamic campaign, what it names that is not in the fleet yet (a static
    campaign naming it is refused, as `fota deploy` is)."""
    names.check(name, names.CAMPAIGN_NAME, "campaign name", CampaignError)
    parsed = CampaignSpec.parse(spec)
    if s.scalar(select(Campaign.id).where(Campaign.name == name)) is not None:
        raise CampaignError(f"a campaign named {name!r} exists")
    if not isinstance(release, Release):
        try:
            release = get_release(store, release)
        except ReleaseError as exc:
            raise CampaignError(str(exc)) from None
    if trust is not None:
        _check_key(release, trust)
    unknown_hw = [h for h in parsed.filter.hardware if h not in release.hardware]
    if parsed.filter.hardware and len(unknown_hw) == len(parsed.filter.hardware):
        raise CampaignError(f"release {release.version} is for hardware {', '.join(release.hardware)}; "
                            f"the filter asks only for {', '.join(parsed.filter.hardware)}")
    unknown = _unknown_targets(s, parsed)
    if unknown and not parsed.dynamic:
        raise CampaignError("; ".join(unknown) + " (a dynamic campaign would wait for them)")
    return parsed, release, unknown


def _preview(s: Session, campaign_id: int | None, release: Release, spec: CampaignSpec,
             unknown: list[str]) -> dict[str, Any]:
    """What starting the campaign now would do: targeted devices per wave, skipped ones by reason."""
    plan = plan_targets(s, campaign_id, release, spec)
    sizes = Counter(plan.waves)
    return {"targeted": len(plan.eligible), "offline": sum(1 for d in plan.eligible if not d.online),
            "skipped": _by_reason(why for _, why in plan.skipped),
            "waves": [{"wave": i + 1, "devices": sizes[i]} for i in range(len(spec.waves))],
            "unknown": unknown}


def _by_reason(reasons) -> list[dict[str, Any]]:
    """Skipped devices grouped by their reason, the largest group first."""
    return [{"reason": why, "devices": n} for why, n in sorted(Counter(reasons).items(), key=lambda x: (-x[1], x[0]))]


def preview_campaign(store: Store, name: str, release: Release | str | int, spec: dict[str, Any] | None = None,
                     trust: dict | None = None) -> dict[str, Any]:
    """create_campaign's checks and what starting it now would target, without creating it:
    ``{"targeted", "offline", "skipped": [{"reason", "devices"}], "waves": [{"wave", "devices"}],
    "unknown"}`` (unknown: device ids and tags a dynamic campaign names that no device has yet)."""
    with store.session() as s:
        parsed, rel, unknown = _validated(s, store, name, release, spec, trust)
        return _preview(s, None, rel, parsed, unknown)


def create_campaign(store: Store, name: str, release: Release | str | int, spec: dict[str, Any] | None = None,
                    trust: dict | None = None) -> Campaign:
    """A draft campaign of ``release`` (nothing is sent before ``start_campaign``).

    trust: the keyring's trust document; given, a release signed by a key devices refuse is
    refused (releases.check_release_key). A static campaign naming a device id or a tag the
    fleet does not have is refused (CampaignError)."""
    with store.session() as s:
        parsed, release, _ = _validated(s, store, name, release, spec, trust)
        try:
            lock_live(s, release)  # not deleted meanwhile (fota.server.release_delete)
        except ReleaseError as exc:
            raise CampaignError(str(exc)) from None
        deployment = Deployment(release_id=release.id, target={"campaign": name}, state=DEPLOYMENT_ACTIVE,
                                transport=parsed.transport)
        s.add(deployment)
        s.flush()
        campaign = Campaign(name=name, release_id=release.id, deployment_id=deployment.id,
                            spec=parsed.to_json(), state=S.DRAFT, wave=0, accepted={})
        s.add(campaign)
        s.flush()
        return campaign


def _check_key(release: Release, trust: dict) -> None:
    try:
        check_release_key(release, trust)
    except ReleaseError as exc:
        raise CampaignError(str(exc)) from None


def check_campaign_key(store: Store, ref: str | int, trust: dict) -> None:
    """CampaignError unless devices holding ``trust`` accept the key that signed the campaign's
    release: checked before a campaign starts or resumes (a key may have been rotated since it
    was created)."""
    with store.session() as s:
        release = s.get(Release, _load(s, ref).release_id)
    _check_key(release, trust)


def start_campaign(store: Store, ref: str | int, now: datetime | None = None) -> Campaign:
    """Target the devices (spread over the waves) and let the engine start them."""
    now = now or utcnow()
    with store.session() as s:
        c = _load(s, ref, lock=True)
        c.state = S.advance(c.state, "start")
        c.started_at = now
        target_devices(s, c, CampaignSpec.parse(c.spec), now)
        return c


def pause_campaign(store: Store, ref: str | int, reason: str | None = None) -> Campaign:
    """No new device starts; devices in flight finish."""
    with store.session() as s:
        c = _load(s, ref, lock=True)
        c.state = S.advance(c.state, "pause")
        c.reason = reason or "paused by an operator"
        return c


def resume_campaign(store: Store, ref: str | int) -> Campaign:
    """Continue a paused campaign, or approve the next wave of a waiting one.

    A paused campaign whose current wave has settled (every device finished) goes on with
    the next wave: the operator accepts the wave as it is.

    Resuming after a failure-threshold pause accepts the failures so far (they no longer
    count against the threshold; new ones do).
    """
    with store.session() as s:
        c = _load(s, ref, lock=True)
        was = c.state
        c.state = S.advance(c.state, "resume")
        last = len(CampaignSpec.parse(c.spec).waves) - 1
        unsettled = s.scalar(select(func.count()).where(CampaignDevice.campaign_id == c.id,
                                                        CampaignDevice.wave == c.wave,
                                                        CampaignDevice.state.in_(S.UNSETTLED)))
        if was == S.WAITING or not unsettled:
            # approved, or the operator accepts a wave that settled below its success threshold
            c.wave = min(c.wave + 1, last)
        failed = Counter(s.scalars(select(CampaignDevice.wave).where(CampaignDevice.campaign_id == c.id,
                                                                     CampaignDevice.state == S.FAILED)))
        c.accepted = {str(w): n for w, n in failed.items()}
        c.reason = None
        return c


def abort_campaign(store: Store, ref: str | int, now: datetime | None = None) -> Campaign:
    """Stop: queued devices are dropped, downloads cancelled with the protocol's cancel command;
    a device past its download (installing, rebooting, on trial) finishes, so none is left
    half-installed. The campaign is ``aborting`` until nothing is in flight, then ``aborted``."""
    now = now or utcnow()
    with store.session() as s:
        c = _load(s, ref, lock=True)
        c.state = S.advance(c.state, "abort")
        c.reason = "aborted by an operator"
        if c.state == S.ABORTED:
            c.finished_at = now
        else:
            cancel_downloads(s, c, now)
        return c


FINISHED = (S.ABORTING, S.ABORTED, S.DONE)  # no device starts any more: the window no longer matters


def _eta(c: Campaign, counts: Counter, now: datetime) -> datetime | None:
    """When the campaign may end at the pace devices settled so far (a linear estimate; None while
    it is not running or before the first device settled). Window closures, approvals and pauses
    to come are not foreseen. counts: the campaign's devices by state."""
    if c.state != S.RUNNING or c.started_at is None:
        return None
    settled = counts.get(S.SUCCEEDED, 0) + counts.get(S.FAILED, 0) + counts.get(S.CANCELLED, 0)
    left = sum(counts.get(st, 0) for st in S.UNSETTLED)
    if not settled or not left:
        return None
    return now + (now - c.started_at) * left / settled


def campaign_summary(store: Store, ref: str | int, devices: bool = True, now: datetime | None = None,
                     device_states: list[str] | None = None, device_wave: int | None = None,
                     ) -> dict[str, Any]:
    """State, per-wave counts and (optionally) every device's state, as plain data.

    device_states, device_wave (1-based): list only the devices in one of these states, of that
    wave (the counts stay whole). A draft has a ``preview`` (preview_campaign); ``skipped`` groups
    the skipped devices by reason; ``eta`` and ``probation_ends_at`` are for the operator's clock.
    The counts come from the database (GROUP BY over the campaign-devices index), not from every
    device's row: the dashboard asks for a running campaign's summary every second; the rows are
    read only for the device list.
    """
    now = now or utcnow()
    with store.session() as s:
        c = _load(s, ref)
        spec = CampaignSpec.parse(c.spec)
        probation = timedelta(seconds=spec.probation)
        mine = CampaignDevice.campaign_id == c.id
        by_wave = s.execute(select(CampaignDevice.wave, CampaignDevice.state, func.count()).where(mine)
                            .group_by(CampaignDevice.wave, CampaignDevice.state)).all()
        # the last confirmation on probation in each wave: when the wave's probation ends
        confirmed = s.execute(select(CampaignDevice.wave, func.max(CampaignDevice.confirmed_at))
                              .where(mine, CampaignDevice.state == S.PROBATION)
                              .group_by(CampaignDevice.wave)).all()
        skipped = s.execute(select(CampaignDevice.reason, func.count()).where(mine, CampaignDevice.state == S.SKIPPED)
                            .group_by(CampaignDevice.reason)).all()
        ends = {w: t + probation for w, t in confirmed if t is not None}
        skipped_by: Counter = Counter()
        for why, n in skipped:
            skipped_by[why or ""] += n
        counts: Counter = Counter()
        for _, state, n in by_wave:
            counts[state] += n
        waves = []
        for index, wave in enumerate(spec.waves):
            wave_counts = {state: n for w, state, n in by_wave if w == index}
            waves.append({"wave": index + 1, "percent": wave.percent, "devices": wave.devices or None,
                          "tag": wave.tag, "success": wave.success, "failure": wave.failure,
                          "approval": wave.approval, "total": sum(n for st, n in wave_counts.items() if st != S.SKIPPED),
                          "counts": wave_counts, "current": index == c.wave, "probation_ends_at": ends.get(index)})
        total = sum(n for st, n in counts.items() if st != S.SKIPPED)
        starts_ahead = c.state not in FINISHED  # else no device starts any more: no window to show
        is_open = pacing.window_open(spec.window, now)
        summary = {
            "id": c.id, "name": c.name, "release": c.release.version, "state": c.state,
            "wave": c.wave + 1, "waves_total": len(spec.waves), "reason": c.reason,
            "rate": c.rate, "created_at": c.created_at, "started_at": c.started_at,
            "finished_at": c.finished_at, "spec": c.spec, "total": total,
            "counts": dict(counts),
            "progress": counts.get(S.SUCCEEDED, 0) / total if total else (1.0 if c.state == S.DONE else 0.0),
            "window_open": is_open if starts_ahead else None,
            "window_opens_at": pacing.window_opens_at(spec.window, now) if starts_ahead and not is_open else None,
            "probation_ends_at": max(ends.values(), default=None),
            "eta": _eta(c, counts, now),
            "skipped": _by_reason(skipped_by),
            "preview": _preview(s, c.id, c.release, spec, _unknown_targets(s, spec)) if c.state == S.DRAFT else None,
            "waves": waves,
            "now": now,
        }
        if devices:
            listed = select(CampaignDevice).where(mine)
            if device_states:
                listed = listed.where(CampaignDevice.state.in_(device_states))
            if device_wave is not None:
                listed = listed.where(CampaignDevice.wave == device_wave - 1)
            rows = list(s.scalars(listed.order_by(CampaignDevice.wave, CampaignDevice.device_id)))
            # The campaign's job states by a join (an IN-list of every job id breaks past the
            # database's bound-parameter cap).
            job_states = dict(s.execute(select(Job.id, Job.state).join(CampaignDevice, CampaignDevice.job_id == Job.id)
                                        .where(mine)).all())
            summary["devices"] = [
                {"device": r.device_id, "wave": r.wave + 1, "state": r.state, "attempts": r.attempts,
                 "job": r.job_id, "job_state": job_states.get(r.job_id), "code": r.code, "reason": r.reason,
                 "confirmed_at": r.confirmed_at,
                 "probation_ends_at": r.confirmed_at + probation
                 if r.state == S.PROBATION and r.confirmed_at is not None else None,
                 "updated_at": r.updated_at}
                for r in rows]
        return summary
