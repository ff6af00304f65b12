"""status_events.ignored: why a stored status did not take effect (a job of another device, no
such job, a job that had already ended); NULL for every status that did (and for the existing rows).

Revision ID: 0011
Revises: 0009
Create Date: 2026-12-04
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("status_events", sa.Column("ignored", sa.String(length=16), nullable=True))


def downgrade() -> None:
    op.drop_column("status_events", "ignored")
