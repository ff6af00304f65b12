"""Deployment limits: deployments.min_battery (battery gate) and deployments.timeout_s.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("deployments", sa.Column("min_battery", sa.Integer(), nullable=True))
    op.add_column("deployments", sa.Column("timeout_s", sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_column("deployments", "timeout_s")
    op.drop_column("deployments", "min_battery")
