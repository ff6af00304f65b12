"""ix_jobs_state becomes ix_jobs_state_last_sent_at (state, last_sent_at): the unanswered-command
scan (fota.server.unanswered) then reads only the due `sent` jobs in send order instead of every
`sent` job, sorted, every few seconds (about 100,000 of them while a large deployment runs).
Queries on the state alone use the new index's prefix.

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-05
"""
from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0020"
down_revision: str | None = "0019"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_jobs_state_last_sent_at", "jobs", ["state", "last_sent_at"])
    op.drop_index("ix_jobs_state", table_name="jobs")


def downgrade() -> None:
    op.create_index("ix_jobs_state", "jobs", ["state"])
    op.drop_index("ix_jobs_state_last_sent_at", table_name="jobs")
