"""Delta updates: the deltas table caches one patch per (base image, target image, window);
jobs.delta_id records which patch a job was sent as.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "deltas",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("base_sha256", sa.String(64), nullable=False),
        sa.Column("base_size", sa.Integer, nullable=False),
        sa.Column("target_sha256", sa.String(64), nullable=False),
        sa.Column("wbits", sa.Integer, nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("blob_path", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("base_sha256", "target_sha256", "wbits", name="uq_deltas_pair"),
    )
    # A plain column, no foreign key: adding one on SQLite needs a batch rebuild of jobs, which
    # drops the table's AUTOINCREMENT (job ids must never be reused). Deltas are never deleted.
    op.add_column("jobs", sa.Column("delta_id", sa.Integer, nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "delta_id")
    op.drop_table("deltas")
