"""What the dashboard shows, read from the store: plain data for the pages (fota.server.dashboard.pages).

Lists are paginated by keyset (the last row's sort key and id, never OFFSET) and every per-device
lookup goes through an index (devices' primary key, jobs by device, statuses by device), so a page
costs about the same with 100 or 100,000 devices. A campaign is counted by the database
(campaign_brief: fota.server.campaigns.campaign_summary, which counts with GROUP BY, without
reading every device's row), deployments through their jobs.
"""
from __future__ import annotations

import base64
import json
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import and_, exists, func, literal, or_, select, text
from sqlalchemy.orm import aliased

from fota.error_codes import explain
from fota.server.campaigns import campaign_summary, get_campaign
from fota.server.campaigns.spec import CampaignSpec
from fota.server.campaigns.states import ACTIVE as CAMPAIGN_ACTIVE, FAILED, IN_FLIGHT, PROBATION
from fota.server.deployments import ACTIVE as DEPLOYMENT_ACTIVE, UPDATE
from fota.server.releases import check_release_key
from fota.server.store import Store, utcnow
from fota.server.store.models import AuditEvent, Campaign, CampaignDevice, Deployment, Delta, Device, Job, Release, StatusEvent

__all__ = ["DeviceFilter", "PAGE_SIZE", "SORTS", "campaign_view", "deployment_view", "device_page",
           "device_view", "fleet_view", "releases_view"]

PAGE_SIZE = 50
SORTS = ("id", "last_seen", "version", "hardware")
TIMELINE = 100            # newest statuses on a device page
AUDIT_ROWS = 50
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _tag_count_sql(dialect: str) -> str:
    if dialect == "postgresql":
        return "SELECT t.value, count(*) FROM devices, jsonb_array_elements_text(devices.tags) AS t(value) GROUP BY 1"
    return "SELECT j.value, count(*) FROM devices, json_each(devices.tags) AS j GROUP BY 1"


def _has_tag(dialect: str, tag: str):
    """devices.tags (a JSON list) holds `tag`."""
    if dialect == "postgresql":
        return Device.tags.op("@>")(func.jsonb_build_array(tag))
    return exists(select(literal(1)).select_from(text("json_each(devices.tags)")).where(text("json_each.value = :tag")
                                                                                         .bindparams(tag=tag)))


def _latest_jobs(s, device_ids: list[str]) -> dict[str, Job]:
    """Each device's newest update job (by the jobs-by-device index)."""
    if not device_ids:
        return {}
    newest = (select(func.max(Job.id)).where(Job.device_id.in_(device_ids), Job.kind == UPDATE)
              .group_by(Job.device_id))
    return {j.device_id: j for j in s.scalars(select(Job).where(Job.id.in_(newest)))}


# ---- fleet ---------------------------------------------------------------------------------------
def fleet_view(store: Store) -> dict[str, Any]:
    with store.session() as s:
        online = dict(s.execute(select(Device.online, func.count()).group_by(Device.online)).all())
        versions = s.execute(select(Device.version, func.count()).group_by(Device.version)
                             .order_by(func.count().desc())).all()
        hardware = s.execute(select(Device.hardware, func.count()).group_by(Device.hardware)
                             .order_by(func.count().desc())).all()
        tags = sorted(s.execute(text(_tag_count_sql(store.engine.dialect.name))).all(), key=lambda r: -r[1])
        campaigns = [c.id for c in s.scalars(select(Campaign).where(Campaign.state.in_(CAMPAIGN_ACTIVE))
                                             .order_by(Campaign.id))]
        in_campaigns = select(Campaign.deployment_id)
        deployments = [d.id for d in s.scalars(select(Deployment).where(Deployment.state == DEPLOYMENT_ACTIVE,
                                                                         Deployment.id.not_in(in_campaigns))
                                               .order_by(Deployment.id))]
    return {"online": online.get(True, 0), "offline": online.get(False, 0),
            "versions": [(v or "unknown", n) for v, n in versions],
            "hardware": [(h or "unknown", n) for h, n in hardware],
            "tags": [(t, n) for t, n in tags],
            "campaigns": [campaign_brief(store, c) for c in campaigns],
            "deployments": [deployment_brief(store, d) for d in deployments]}


# ---- devices -------------------------------------------------------------------------------------
@dataclass
class DeviceFilter:
    q: str | None = None           # device id starts with
    tag: str | None = None
    hardware: str | None = None
    version: str | None = None
    state: str | None = None       # state of the device's newest update job
    online: bool | None = None
    sort: str = "id"
    desc: bool = False
    after: str | None = None       # keyset cursor (encode_cursor)


def encode_cursor(value: Any, device_id: str) -> str:
    if isinstance(value, datetime):
        value = {"t": value.isoformat()}
    return base64.urlsafe_b64encode(json.dumps([value, device_id]).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[Any, str]:
    """(sort value, device id); ValueError for anything else."""
    try:
        value, device_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except Exception:
        raise ValueError("bad cursor") from None
    if isinstance(value, dict):
        value = datetime.fromisoformat(value["t"])
    if not isinstance(device_id, str) or not isinstance(value, (str, datetime)):
        raise ValueError("bad cursor")
    return value, device_id


def _sort_key(sort: str):
    """The sort column with NULLs as the smallest value (a keyset needs a total order)."""
    if sort == "last_seen":
        return func.coalesce(Device.last_seen, literal(EPOCH, Device.last_seen.type))
    if sort in ("version", "hardware"):
        return func.coalesce(getattr(Device, sort), "")
    return Device.id


def device_page(store: Store, f: DeviceFilter, size: int = PAGE_SIZE) -> dict[str, Any]:
    """One page of devices matching f, in f's order; `next` is the cursor of the following page."""
    key = _sort_key(f.sort if f.sort in SORTS else "id")
    query = select(Device, key.label("k"))
    if f.q:
        # a prefix as a range of the primary key: an index seek on both databases
        query = query.where(Device.id >= f.q, Device.id < f.q + "\U0010ffff")
    if f.hardware:
        query = query.where(Device.hardware == f.hardware)
    if f.version:
        query = query.where(Device.version == f.version)
    if f.online is not None:
        query = query.where(Device.online.is_(f.online))
    if f.tag:
        query = query.where(_has_tag(store.engine.dialect.name, f.tag))
    if f.state:
        newest = aliased(Job)
        latest = (select(func.max(newest.id)).where(newest.device_id == Device.id, newest.kind == UPDATE)
                  .scalar_subquery())
        query = query.where(exists(select(Job.id).where(Job.id == latest, Job.state == f.state)))
    if f.after:
        value, last_id = decode_cursor(f.after)
        if isinstance(value, datetime) != (f.sort == "last_seen"):
            raise ValueError("a cursor of another sort order")
        if key is Device.id:
            query = query.where(Device.id < last_id if f.desc else Device.id > last_id)
        elif f.desc:
            query = query.where(or_(key < value, and_(key == value, Device.id < last_id)))
        else:
            query = query.where(or_(key > value, and_(key == value, Device.id > last_id)))
    if key is Device.id:
        query = query.order_by(Device.id.desc() if f.desc else Device.id)
    else:
        query = query.order_by(key.desc(), Device.id.desc()) if f.desc else query.order_by(key, Device.id)
    with store.session() as s:
        rows = s.execute(query.limit(size + 1)).all()
        more = len(rows) > size
        rows = rows[:size]
        jobs = _latest_jobs(s, [d.id for d, _ in rows])
        devices = [{"id": d.id, "hardware": d.hardware, "version": d.version, "online": d.online,
                    "tags": list(d.tags or []), "last_seen": d.last_seen,
                    "battery": (d.inventory or {}).get("battery"),
                    "job": _job_brief(jobs.get(d.id))} for d, _ in rows]
    nxt = encode_cursor(rows[-1][1] if key is not Device.id else rows[-1][0].id, rows[-1][0].id) if more else None
    return {"devices": devices, "next": nxt}


def _job_brief(job: Job | None) -> dict[str, Any] | None:
    if job is None:
        return None
    return {"id": job.id, "deployment": job.deployment_id, "state": job.state, "progress": job.progress or 0.0,
            "code": job.code, "reason": job.reason, "meaning": explain(job.code), "updated_at": job.updated_at}


def _slots(inventory: dict[str, Any]) -> tuple[str | None, str | None]:
    """(running, previous) versions from the inventory's slots."""
    slots, active = inventory.get("slots"), inventory.get("active")
    if not isinstance(slots, dict):
        return inventory.get("version"), None
    running = slots.get(active, inventory.get("version"))
    others = [v for k, v in slots.items() if k != active and v]
    return running, others[0] if others else None


def device_view(store: Store, device_id: str) -> dict[str, Any] | None:
    """Everything the device page shows; None for an unknown device."""
    with store.session() as s:
        d = s.get(Device, device_id)
        if d is None:
            return None
        inventory = dict(d.inventory or {})
        health = s.scalars(select(StatusEvent).where(StatusEvent.device_id == device_id, StatusEvent.state == "health")
                           .order_by(StatusEvent.id.desc()).limit(1)).first()
        job = _latest_jobs(s, [device_id]).get(device_id)
        events = list(s.scalars(select(StatusEvent).where(StatusEvent.device_id == device_id)
                                .order_by(StatusEvent.id.desc()).limit(TIMELINE)))
        # who did what to it: the deployments and campaigns that held a job for it
        deployment_ids = set(s.scalars(select(Job.deployment_id).where(Job.device_id == device_id).distinct()))
        campaigns = set(s.scalars(select(Campaign.name).join(CampaignDevice, CampaignDevice.campaign_id == Campaign.id)
                                  .where(CampaignDevice.device_id == device_id)))
        targets = [f"deployment:{i}" for i in deployment_ids] + [f"campaign:{n}" for n in campaigns]
        audit = list(s.scalars(select(AuditEvent).where(AuditEvent.target.in_(targets))
                               .order_by(AuditEvent.id.desc()).limit(AUDIT_ROWS))) if targets else []
        running, previous = _slots(inventory)
        return {
            "id": d.id, "hardware": d.hardware, "version": d.version, "online": d.online, "tags": list(d.tags or []),
            "last_seen": d.last_seen, "created_at": d.created_at, "running": running, "previous": previous,
            "battery": inventory.get("battery"), "external": inventory.get("external"),
            "agent_state": inventory.get("state"),
            "health": None if health is None else {"ok": (health.payload or {}).get("ok"), "reason": health.reason,
                                                   "at": health.received_at, "version": health.version},
            "job": _job_brief(job),
            "timeline": [{"at": e.received_at, "job": e.job_id, "state": e.state, "code": e.code,
                          "meaning": explain(e.code), "reason": e.reason, "progress": e.progress,
                          "version": e.version, "ignored": e.ignored} for e in events],
            "audit": [{"at": a.at, "actor": a.actor, "action": a.action, "target": a.target, "detail": a.detail}
                      for a in audit],
        }


# ---- releases ------------------------------------------------------------------------------------
def releases_view(store: Store, trust: dict | None) -> list[dict[str, Any]]:
    with store.session() as s:
        releases = list(s.scalars(select(Release).where(Release.live).order_by(Release.id.desc())))
        running = dict(s.execute(select(Device.version, func.count()).group_by(Device.version)).all())
        deltas = Counter(s.scalars(select(Delta.target_sha256)))
        deployments = Counter(s.scalars(select(Deployment.release_id)))
        rows = []
        for r in releases:
            trusted, why = None, None
            if trust is not None:
                try:
                    check_release_key(r, trust)
                    trusted = True
                except Exception as exc:  # ReleaseError: revoked, not certified, expired
                    trusted, why = False, str(exc)
            rows.append({"version": r.version, "kind": r.kind, "hardware": list(r.hardware), "size": r.size,
                         "counter": r.security_counter, "key_id": r.key_id, "trusted": trusted, "why": why,
                         "encrypted": r.enc_key is not None, "deltas": deltas.get(r.sha256, 0),
                         "devices": running.get(r.version, 0), "deployments": deployments.get(r.id, 0),
                         "created_at": r.created_at})
    return rows


# ---- campaigns and deployments -------------------------------------------------------------------
def _job_counts(s, deployment_id: int) -> tuple[dict[str, int], float]:
    rows = s.execute(select(Job.state, func.count(), func.sum(Job.progress))
                     .where(Job.deployment_id == deployment_id, Job.kind == UPDATE).group_by(Job.state)).all()
    counts = {st: n for st, n, _ in rows}
    total = sum(counts.values())
    return counts, (sum(p or 0.0 for *_, p in rows) / total if total else 1.0)


def deployment_brief(store: Store, deployment_id: int) -> dict[str, Any]:
    with store.session() as s:
        d = s.get(Deployment, deployment_id)
        counts, progress = _job_counts(s, deployment_id)
        return {"id": d.id, "release": d.release.version, "state": d.state, "target": d.target,
                "created_at": d.created_at, "counts": counts, "total": sum(counts.values()), "progress": progress}


def deployment_view(store: Store, deployment_id: int) -> dict[str, Any] | None:
    with store.session() as s:
        if s.get(Deployment, deployment_id) is None:
            return None
        campaign = s.scalar(select(Campaign.name).where(Campaign.deployment_id == deployment_id))
        jobs = list(s.scalars(select(Job).where(Job.deployment_id == deployment_id, Job.kind == UPDATE)
                              .order_by(Job.id)))
        view = {**deployment_brief(store, deployment_id), "campaign": campaign,
                "jobs": [{**_job_brief(j), "device": j.device_id} for j in jobs]}
    view["failed"] = [j for j in view["jobs"] if j["code"]]
    return view


LISTED = 200  # failed devices and probation clocks listed on a campaign page, at most


def campaign_brief(store: Store, ref: str | int, now: datetime | None = None) -> dict[str, Any]:
    """A campaign as fota.server.campaigns.campaign_summary(devices=False) describes it (counted by
    the database, so that the fleet page and a live campaign page may ask every second), plus
    `deployment` and `job_progress`."""
    now = now or utcnow()
    c = get_campaign(store, ref)  # CampaignNotFound for an unknown ref
    brief = campaign_summary(store, c.id, devices=False, now=now)
    total = brief["total"]
    if c.state == "draft":
        moved = 0.0
    else:
        with store.session() as s:
            # each targeted device's current job's progress (queued devices: 0), over the targeted
            # devices: moves with every download, and only forward unless a job is retried
            moved = s.scalar(select(func.sum(Job.progress)).join(CampaignDevice, CampaignDevice.job_id == Job.id)
                             .where(CampaignDevice.campaign_id == c.id)) or 0.0
    return {**brief, "deployment": c.deployment_id, "job_progress": min(1.0, moved / total) if total else 0.0}


def campaign_view(store: Store, ref: str | int, now: datetime | None = None) -> dict[str, Any]:
    """campaign_brief plus what an operator watches: probation clocks, an ETA from the pace so
    far, and the failed devices with their errors in words (the first LISTED of each)."""
    now = now or utcnow()
    view = campaign_brief(store, ref, now)
    view["now"] = now
    spec = CampaignSpec.parse(view["spec"])
    view["probation"] = spec.probation
    view["thresholds"] = {"max_in_flight": spec.max_in_flight, "on_failure": spec.on_failure}
    with store.session() as s:
        def rows(state):  # by the (campaign_id, state) index
            return list(s.scalars(select(CampaignDevice).where(CampaignDevice.campaign_id == view["id"],
                                                               CampaignDevice.state == state)
                                  .order_by(CampaignDevice.wave, CampaignDevice.device_id).limit(LISTED)))
        view["clocks"] = [{"device": r.device_id, "left": max(0.0, spec.probation - (now - r.confirmed_at).total_seconds())}
                          for r in rows(PROBATION) if r.confirmed_at is not None]
        view["failed"] = [{"device": r.device_id, "wave": r.wave + 1, "code": r.code, "reason": r.reason,
                           "meaning": explain(r.code)} for r in rows(FAILED)]
    counts = view["counts"]
    view["failed_more"] = max(0, counts.get(FAILED, 0) - len(view["failed"]))
    view["in_flight"] = counts.get(IN_FLIGHT, 0) + counts.get(PROBATION, 0)
    return view

