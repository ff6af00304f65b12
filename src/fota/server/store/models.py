"""ORM models of the control center (SQLAlchemy 2 typed declarative).

The same models run on SQLite (default) and PostgreSQL. All datetimes are
timezone-aware UTC, on both backends (see ``UTCDateTime``).

Migrations live in ``migrations/versions``; any change here needs a new revision
(tests compare the migrated schema with this metadata).
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.hybrid import hybrid_property
from sqlalchemy.ext.mutable import MutableDict, MutableList
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

__all__ = [
    "TOKEN_ROLES",
    "ApiToken",
    "AuditEvent",
    "Base",
    "Campaign",
    "CampaignDevice",
    "DashboardSession",
    "CenterWorker",
    "Deployment",
    "Device",
    "IngestCounter",
    "Job",
    "JSONType",
    "NAMING_CONVENTION",
    "Release",
    "StatusEvent",
    "UTCDateTime",
    "utcnow",
]


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """A DateTime that only stores and returns aware UTC datetimes.

    PostgreSQL keeps ``timestamp with time zone``; SQLite has no time zones, so the
    value is stored as naive UTC and made aware again when read. Naive datetimes are
    refused when binding (they are ambiguous).
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"UTCDateTime needs a datetime, got {type(value).__name__}")
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("naive datetime: use an aware UTC datetime (e.g. fota.server.store.utcnow())")
        value = value.astimezone(timezone.utc)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


def JSONType() -> JSON:  # noqa: N802  (used like a type class)
    """Generic JSON everywhere, JSONB on PostgreSQL (comparable, indexable).

    A new instance per column: ``Mutable*.as_mutable`` keys on the type instance.
    """
    return JSON().with_variant(postgresql.JSONB(), "postgresql")

# Deterministic constraint/index names on every backend (Alembic needs names).
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Release(Base):
    """A signed firmware release (bundle of files or a full image)."""

    __tablename__ = "releases"
    # AUTOINCREMENT on SQLite: ids are never reused, even after deletes.
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    version: Mapped[str] = mapped_column(String(64), unique=True)
    hardware: Mapped[list[str]] = mapped_column(JSONType())
    kind: Mapped[str] = mapped_column(String(16))  # 'bundle' | 'image'
    size: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    manifest: Mapped[str] = mapped_column(Text)  # the exact signed JSON text
    signature: Mapped[str] = mapped_column(String(128))  # hex
    key_id: Mapped[str] = mapped_column(String(16))
    blob_path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # anti-rollback: devices refuse a release whose counter is below the one they run
    security_counter: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    # Optional payload encryption: the release's AES-256 key wrapped by the key-encryption key
    # (fota.server.kek: "kek1:<hex>"); None for plain releases.
    enc_key: Mapped[str | None] = mapped_column(String(160))
    # Optional: campaigns send this release only to devices running at least this version.
    min_version: Mapped[str | None] = mapped_column(String(64))
    # When the release was deleted (fota.server.release_delete): its image and patches are gone,
    # the row stays for the deployments, campaigns and audit events that name it.
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    deployments: Mapped[list[Deployment]] = relationship(back_populates="release")

    @hybrid_property
    def live(self) -> bool:
        """Not deleted: a release that may be offered, deployed or used as a delta base
        (``select(Release).where(Release.live)`` in a query)."""
        return self.deleted_at is None

    @live.inplace.expression
    @classmethod
    def _live_expression(cls):
        return cls.deleted_at.is_(None)

    def __repr__(self) -> str:
        return f"Release(id={self.id!r}, version={self.version!r}, kind={self.kind!r})"


class Delta(Base):
    """A cached delta patch from one image (base) to another (target), at one window size, in
    one format.

    The patch bytes live in the blob store (content-addressed by ``sha256``); ``wbits`` is its
    window (2**wbits bytes), ``format`` its patch format (docs/delta.md)."""

    __tablename__ = "deltas"
    __table_args__ = (UniqueConstraint("base_sha256", "target_sha256", "wbits", "format", name="uq_deltas_pair"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    base_sha256: Mapped[str] = mapped_column(String(64))
    base_size: Mapped[int] = mapped_column(Integer)
    target_sha256: Mapped[str] = mapped_column(String(64))
    wbits: Mapped[int] = mapped_column(Integer)
    format: Mapped[int] = mapped_column(Integer, default=1, server_default=text("1"))
    size: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    blob_path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Device(Base):
    """A device known to the control center; ``id`` is the device id (MQTT user)."""

    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    hardware: Mapped[str | None] = mapped_column(String(64))
    version: Mapped[str | None] = mapped_column(String(64))
    online: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # Mutable wrappers: in-place changes (device.tags.append(...)) are persisted.
    inventory: Mapped[dict[str, Any]] = mapped_column(MutableDict.as_mutable(JSONType()), default=dict)
    tags: Mapped[list[str]] = mapped_column(MutableList.as_mutable(JSONType()), default=list)
    password_hash: Mapped[str | None] = mapped_column(Text)  # Mosquitto "$7$..." line
    # The same password's bcrypt hash, for a NATS cluster's users file (fota.server.natsconfig);
    # None for devices provisioned before migration 0018 (until their credentials are rotated).
    password_bcrypt: Mapped[str | None] = mapped_column(Text)
    # The device's AES-256 key that release keys are wrapped with, itself wrapped by the
    # key-encryption key (fota.server.kek); set at provisioning.
    enc_key: Mapped[str | None] = mapped_column(String(160))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # When the center received the online flag `online` holds: an older flag ingested later (by
    # another worker) does not overwrite it (fota.server.fleet.online_values).
    online_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    jobs: Mapped[list[Job]] = relationship(back_populates="device")

    def __repr__(self) -> str:
        return f"Device(id={self.id!r}, hardware={self.hardware!r}, version={self.version!r})"


class Deployment(Base):
    """A release rolled out to a target (devices / tags / hardware selector)."""

    __tablename__ = "deployments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    release_id: Mapped[int] = mapped_column(ForeignKey("releases.id"))
    target: Mapped[Any] = mapped_column(JSONType())
    state: Mapped[str] = mapped_column(String(16), default="active", server_default=text("'active'"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # battery percent a device needs to download and install (sent in the command); None: no gate
    min_battery: Mapped[int | None] = mapped_column(Integer)
    # seconds from created_at until unfinished jobs end 'timed_out'; None: wait for ever
    timeout_s: Mapped[int | None] = mapped_column(Integer)
    # payload transport: 'mqtt' (chunks from the center) or 'http' (a signed URL, to devices
    # that declare it; docs/http-transport.md)
    transport: Mapped[str] = mapped_column(String(8), default="mqtt", server_default=text("'mqtt'"))

    release: Mapped[Release] = relationship(back_populates="deployments")
    jobs: Mapped[list[Job]] = relationship(
        back_populates="deployment", cascade="all, delete-orphan", order_by="Job.id"
    )

    def __repr__(self) -> str:
        return f"Deployment(id={self.id!r}, release_id={self.release_id!r}, state={self.state!r})"


class Job(Base):
    """One device's part of a deployment. ``id`` is the job id sent on the wire."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_device_id_state", "device_id", "state"),
        # (state, last_sent_at): the unanswered-command scan (fota.server.unanswered) reads only
        # the `sent` jobs that are due, in send order, not every `sent` job sorted; queries on the
        # state alone use its prefix.
        Index("ix_jobs_state_last_sent_at", "state", "last_sent_at"),
        # AUTOINCREMENT on SQLite: job ids strictly increase, never reused.
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    deployment_id: Mapped[int] = mapped_column(ForeignKey("deployments.id"), index=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    # 'update' (the release's update command) or 'cancel' (a cancel command for job `target_job`;
    # the job id of a cancel is only its place in the device's job-id order).
    kind: Mapped[str] = mapped_column(String(16), default="update", server_default=text("'update'"))
    target_job: Mapped[int | None] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default="pending", server_default=text("'pending'"))
    code: Mapped[str | None] = mapped_column(String(32))
    reason: Mapped[str | None] = mapped_column(Text)
    progress: Mapped[float] = mapped_column(Float, default=0.0, server_default=text("0"))
    bytes_total: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    # chunk bytes the server published for this job
    bytes_served: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # How often its command was published and when last (fota.server.unanswered re-sends one no
    # device answered; an expired one is signed again, fota.server.expiry); sent_at is the first.
    sends: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    last_sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The delta patch (deltas.id) this job was sent as; None: the full image. No foreign key:
    # see migration 0004.
    delta_id: Mapped[int | None] = mapped_column(Integer)
    # The worker (center_workers.id) that claimed this job to send it; None: not claimed yet.
    worker: Mapped[str | None] = mapped_column(String(64))

    deployment: Mapped[Deployment] = relationship(back_populates="jobs")
    device: Mapped[Device] = relationship(back_populates="jobs")

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, device_id={self.device_id!r}, state={self.state!r})"


class StatusEvent(Base):
    """A status message received from a device (deduplicated on device/epoch/boot/seq)."""

    __tablename__ = "status_events"
    __table_args__ = (UniqueConstraint("device_id", "epoch", "boot", "seq", name="uq_status_dedup"),
                      # the retention's age limit (fota.server.retention) deletes by it
                      Index("ix_status_events_received_at", "received_at"))

    id: Mapped[int] = mapped_column(
        Integer().with_variant(BigInteger(), "postgresql"), primary_key=True, autoincrement=True
    )
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    # indexed: campaigns look up a wave's jobs' confirmations by job (a scan of the whole history before)
    job_id: Mapped[int | None] = mapped_column(Integer, index=True)
    state: Mapped[str] = mapped_column(String(16))
    code: Mapped[str | None] = mapped_column(String(32))
    reason: Mapped[str | None] = mapped_column(Text)
    progress: Mapped[float | None] = mapped_column(Float)
    version: Mapped[str | None] = mapped_column(String(64))
    # The device's boot epoch (random, new when its agent state is created; 0: none sent): a
    # device whose boot counter starts over sends statuses of a new epoch.
    epoch: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    boot: Mapped[int] = mapped_column(Integer)
    seq: Mapped[int] = mapped_column(Integer)
    # the fields without a column of their own (fota.server.statuses.stored_payload: ok, uptime, ...)
    payload: Mapped[Any] = mapped_column(JSONType())
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # None: the status took effect (or, for rejected / keys / health, simply happened). Otherwise
    # why it did not move its job (fota.server.ingest.IGNORED_WHY): it is kept, marked, and left out
    # of the device's history by default.
    ignored: Mapped[str | None] = mapped_column(String(16))

    def __repr__(self) -> str:
        return (f"StatusEvent(id={self.id!r}, device_id={self.device_id!r}, boot={self.boot!r}, "
                f"seq={self.seq!r}, state={self.state!r})")


class IngestCounter(Base):
    """Totals a control-center worker counts about statuses it did not store, or deleted:
    ``refused_oversize``, ``refused_invalid``, ``rate_limited``, ``pruned`` (/metrics sums them).

    One row per (worker, name): each worker adds to its own rows, so workers never wait for
    each other's counters."""

    __tablename__ = "ingest_counters"

    worker: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))


class CenterWorker(Base):
    """A running control-center worker (one process, one MQTT session whose id is ``id``).

    Heartbeats keep it alive; a worker silent for longer than the lease is adopted by a live
    one (``adopted_by``), which drains its MQTT session and then deletes this row.
    """

    __tablename__ = "center_workers"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # = its MQTT client id
    host: Mapped[str] = mapped_column(String(64))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    adopted_by: Mapped[str | None] = mapped_column(String(64))

    def __repr__(self) -> str:
        return f"CenterWorker(id={self.id!r}, host={self.host!r}, pid={self.pid!r}, adopted_by={self.adopted_by!r})"


TOKEN_ROLES = ("read", "admin")


class ApiToken(Base):
    """An operator's API token. Only the SHA-256 of the secret is stored, never the secret."""

    __tablename__ = "api_tokens"
    __table_args__ = (
        CheckConstraint("role IN ('read', 'admin')", name="role"),
        # AUTOINCREMENT on SQLite: ids are never reused.
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # unique, revoked ones included: the name is the actor in the audit log
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # 'read' | 'admin'
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the secret
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    def __repr__(self) -> str:  # never the hash either
        return f"ApiToken(id={self.id!r}, name={self.name!r}, role={self.role!r}, revoked={self.revoked!r})"


class DashboardSession(Base):
    """A web dashboard sign-in session (fota.server.dashboard.sessions), shared by every API process
    on this database. Holds the SHA-256 of the session id (the cookie value), never the id and
    never the token's secret: the session acts as its token (token_id), checked on every request."""

    __tablename__ = "dashboard_sessions"

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 hex of the cookie value
    token_id: Mapped[int] = mapped_column(ForeignKey("api_tokens.id"), index=True)
    csrf: Mapped[str] = mapped_column(String(64))  # the session's CSRF token (useless without the cookie)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # refreshed at most every sessions.USED_RESOLUTION; idle expiry and pruning go by it
    used_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)

    def __repr__(self) -> str:  # neither hash nor CSRF token
        return f"DashboardSession(token_id={self.token_id!r}, used_at={self.used_at!r})"


class AuditEvent(Base):
    """Who changed what, when: one row per state-changing operator action (API or CLI)."""

    __tablename__ = "audit_events"
    # AUTOINCREMENT on SQLite: ids strictly increase, a deleted row's id is never reused.
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(
        Integer().with_variant(BigInteger(), "postgresql"), primary_key=True, autoincrement=True
    )
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(64))  # token name, or "cli:<os user>"
    action: Mapped[str] = mapped_column(String(64))  # e.g. "release.create"
    target: Mapped[str] = mapped_column(String(128))  # e.g. "release:1.1.0"
    detail: Mapped[dict[str, Any]] = mapped_column(JSONType(), default=dict)

    def __repr__(self) -> str:
        return (f"AuditEvent(id={self.id!r}, actor={self.actor!r}, action={self.action!r}, "
                f"target={self.target!r})")


class Campaign(Base):
    """A staged rollout of a release: target filter, waves, pacing (see docs/campaigns.md).

    Its whole state lives here and in ``campaign_devices``: any worker can run its next step.
    """

    __tablename__ = "campaigns"
    __table_args__ = (Index("ix_campaigns_state", "state"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    release_id: Mapped[int] = mapped_column(ForeignKey("releases.id"))
    # the deployment that holds the campaign's jobs (the control center sends them)
    deployment_id: Mapped[int] = mapped_column(ForeignKey("deployments.id"))
    spec: Mapped[dict[str, Any]] = mapped_column(JSONType())  # filter, waves, pacing (validated)
    state: Mapped[str] = mapped_column(String(16), default="draft", server_default=text("'draft'"))
    wave: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))  # current wave index
    reason: Mapped[str | None] = mapped_column(Text)  # why it paused / aborted / waits
    rate: Mapped[float | None] = mapped_column(Float)  # current starts per minute (grows)
    rate_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # when `rate` was last set
    # failed devices per wave an operator accepted by resuming after a failure-threshold pause
    accepted: Mapped[dict[str, Any]] = mapped_column(MutableDict.as_mutable(JSONType()), default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    release: Mapped[Release] = relationship()
    deployment: Mapped[Deployment] = relationship()

    def __repr__(self) -> str:
        return f"Campaign(id={self.id!r}, name={self.name!r}, state={self.state!r}, wave={self.wave!r})"


class CampaignDevice(Base):
    """One device's part of a campaign: its wave, state and current attempt."""

    __tablename__ = "campaign_devices"
    __table_args__ = (
        UniqueConstraint("campaign_id", "device_id"),
        Index("ix_campaign_devices_campaign_id_state", "campaign_id", "state"),
        Index("ix_campaign_devices_device_id_state", "device_id", "state"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id"))
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    wave: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    job_id: Mapped[int | None] = mapped_column(Integer)  # the current attempt's update job
    step: Mapped[str | None] = mapped_column(String(16))  # download | install | confirm
    step_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # when `step` began
    next_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # retry not before
    confirmed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # probation began
    confirm_boot: Mapped[int | None] = mapped_column(Integer)  # (boot, seq) of the confirmation
    confirm_seq: Mapped[int | None] = mapped_column(Integer)
    confirm_epoch: Mapped[int | None] = mapped_column(Integer)  # its epoch and status_events id (a
    confirm_event: Mapped[int | None] = mapped_column(Integer)  # report of another epoch: by arrival)
    code: Mapped[str | None] = mapped_column(String(32))
    reason: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    def __repr__(self) -> str:
        return (f"CampaignDevice(campaign_id={self.campaign_id!r}, device_id={self.device_id!r}, "
                f"wave={self.wave!r}, state={self.state!r})")
