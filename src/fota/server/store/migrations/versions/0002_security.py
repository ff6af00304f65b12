"""Operator access control and anti-rollback: api_tokens, audit_events, releases.security_counter.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28

Self-contained on purpose (no import of the models), like 0001.
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# revision identifiers, used by Alembic.
revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _json() -> sa.types.TypeEngine:
    return sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    # Existing releases get counter 0: the lowest, which every device accepts. A plain
    # ADD COLUMN, not batch mode: on SQLite a table rebuild would drop `releases` under the
    # foreign keys of `deployments` (foreign keys are on, and cannot be turned off in the
    # migration's transaction).
    op.add_column("releases", sa.Column("security_counter", sa.Integer(), server_default=sa.text("0"),
                                        nullable=False))
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("expires_at", _ts(), nullable=True),
        sa.Column("revoked", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("last_used_at", _ts(), nullable=True),
        sa.CheckConstraint("role IN ('read', 'admin')", name="ck_api_tokens_role"),
        sa.PrimaryKeyConstraint("id", name="pk_api_tokens"),
        sa.UniqueConstraint("name", name="uq_api_tokens_name"),
        sa.UniqueConstraint("token_hash", name="uq_api_tokens_token_hash"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer().with_variant(sa.BigInteger(), "postgresql"), autoincrement=True,
                  nullable=False),
        sa.Column("at", _ts(), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("target", sa.String(length=128), nullable=False),
        sa.Column("detail", _json(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_events"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_audit_events_at", "audit_events", ["at"])


def downgrade() -> None:
    op.drop_index("ix_audit_events_at", table_name="audit_events")
    op.drop_table("audit_events")
    op.drop_table("api_tokens")
    # a plain DROP COLUMN (SQLite >= 3.35, PostgreSQL): no table rebuild (see upgrade)
    op.drop_column("releases", "security_counter")
