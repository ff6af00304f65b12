"""Storage of the control center: SQLAlchemy 2 models, engine/sessions, Alembic migrations.

    from fota.server.store import Store, default_url, Device
    store = Store(default_url(data_dir))          # migrates to head
    with store.session() as s:                    # commit on success, rollback on error
        s.add(Device(id="dev-1", hardware="esp32"))
"""
from fota.server.store.db import (
    MIGRATIONS_DIR,
    Store,
    alembic_config,
    default_url,
    make_engine,
    migrate,
    normalize_url,
)
from fota.server.store.models import (
    Base,
    Campaign,
    CampaignDevice,
    CenterWorker,
    Delta,
    Deployment,
    Device,
    IngestCounter,
    Job,
    JSONType,
    Release,
    StatusEvent,
    UTCDateTime,
    utcnow,
)

__all__ = [
    "MIGRATIONS_DIR",
    "Base",
    "Campaign",
    "CampaignDevice",
    "CenterWorker",
    "Delta",
    "Deployment",
    "Device",
    "IngestCounter",
    "Job",
    "JSONType",
    "Release",
    "StatusEvent",
    "Store",
    "UTCDateTime",
    "alembic_config",
    "default_url",
    "make_engine",
    "migrate",
    "normalize_url",
    "utcnow",
]
