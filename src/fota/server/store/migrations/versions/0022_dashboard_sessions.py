"""dashboard_sessions: the web dashboard's sign-in sessions in the database, so every `fota api`
process on one database shares them and a restart keeps them (fota.server.dashboard.sessions).
A row holds the SHA-256 of the session id, the token it acts as, its CSRF token and when it was
last used; never the session id nor the token's secret. Self-contained: no import of the models
(UTCDateTime is DateTime(timezone=True)).

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-05
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0022"
down_revision: str | None = "0021"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "dashboard_sessions",
        sa.Column("id_hash", sa.String(64), nullable=False),
        sa.Column("token_id", sa.Integer(), nullable=False),
        sa.Column("csrf", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["token_id"], ["api_tokens.id"], name="fk_dashboard_sessions_token_id_api_tokens"),
        sa.PrimaryKeyConstraint("id_hash", name="pk_dashboard_sessions"),
    )
    op.create_index("ix_dashboard_sessions_token_id", "dashboard_sessions", ["token_id"])
    op.create_index("ix_dashboard_sessions_used_at", "dashboard_sessions", ["used_at"])


def downgrade() -> None:
    op.drop_index("ix_dashboard_sessions_used_at", table_name="dashboard_sessions")
    op.drop_index("ix_dashboard_sessions_token_id", table_name="dashboard_sessions")
    op.drop_table("dashboard_sessions")
