"""devices.online_at: when the center received the online flag a device row holds, so that an
older flag ingested later by another worker (a device's `online 0` before a clean DISCONNECT and
its `online 1` a second later, taken by two workers) does not overwrite a newer one. NULL for the
existing rows: their next flag applies.

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


def downgrade() -> None:
    op.drop_column("devices", "online_at")
