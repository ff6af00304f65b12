"""devices.online_at: when the center received the online flag a device row holds, so that an
older flag ingested later by another worker (a device's `online 0` before a clean DISCONNECT and
its `online 1` a second later, taken by two workers) does not overwrite a newer one. NULL for the
existing rows: their next flag applies.

campaign_devices.confirm_epoch, confirm_event: the epoch and the status_events id of the
confirmation that started a device's probation, so that health reports of another epoch (the
device started over) are ordered by arrival, not by (boot, seq). NULL for the existing rows: their
reports are compared by (boot, seq) as before.

Revision ID: 0013
Revises: 0011
Create Date: 2026-12-04
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("devices", sa.Column("online_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("campaign_devices", sa.Column("confirm_epoch", sa.Integer(), nullable=True))
    op.add_column("campaign_devices", sa.Column("confirm_event", sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_column("campaign_devices", "confirm_event")
    op.drop_column("campaign_devices", "confirm_epoch")
    op.drop_column("devices", "online_at")
