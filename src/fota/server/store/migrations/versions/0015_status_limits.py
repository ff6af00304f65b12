"""Status limits: counters of statuses not stored or deleted (ingest_counters), an index on
status_events.received_at for the retention's age limit, and payloads without the fields that
have columns (a reason was stored twice).

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-04
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "ingest_counters",
        sa.Column("worker", sa.String(64), nullable=False),
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("value", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.PrimaryKeyConstraint("worker", "name", name="pk_ingest_counters"),
    )
    op.create_index("ix_status_events_received_at", "status_events", ["received_at"])
    # Existing rows keep their payload as it was (the reason in it too): rewriting a large
    # history in a migration would hold the table for minutes; retention prunes old rows.


def downgrade() -> None:
    op.drop_index("ix_status_events_received_at", table_name="status_events")
    op.drop_table("ingest_counters")
