"""How often a job's command was published, and when last: jobs.sends, jobs.last_sent_at
(fota.server.unanswered re-sends a command its online device never answered, with back-off).
Self-contained: no import of the models (UTCDateTime is DateTime(timezone=True)).

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-05
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0019"
down_revision: str | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("sends", sa.Integer(), nullable=False, server_default=sa.text("0")))
    op.add_column("jobs", sa.Column("last_sent_at", sa.DateTime(timezone=True)))
    # A job sent before this revision was sent once, at sent_at.
    op.execute("UPDATE jobs SET sends = 1, last_sent_at = sent_at WHERE sent_at IS NOT NULL")


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("last_sent_at")
        batch.drop_column("sends")
