"""An index on status_events.job_id: the campaign engine reads a wave's confirmations by job id,
which scanned the whole status history without it.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-27
"""
from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_status_events_job_id", "status_events", ["job_id"])


def downgrade() -> None:
    op.drop_index("ix_status_events_job_id", table_name="status_events")
