"""Payload transport per deployment: deployments.transport ('mqtt', the default, or 'http').

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-05
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("deployments", sa.Column("transport", sa.String(8), nullable=False,
                                           server_default=sa.text("'mqtt'")))


def downgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        batch.drop_column("transport")
