"""Several control-center workers: the worker registry (center_workers) and which worker
claimed a pending job (jobs.worker).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "center_workers",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("host", sa.String(64), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("adopted_by", sa.String(64), nullable=True),
    )
    op.add_column("jobs", sa.Column("worker", sa.String(64), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "worker")
    op.drop_table("center_workers")
