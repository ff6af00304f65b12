"""Optional payload encryption: devices.enc_key, releases.enc_key.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("devices", sa.Column("enc_key", sa.String(64), nullable=True))
    op.add_column("releases", sa.Column("enc_key", sa.String(64), nullable=True))


def downgrade() -> None:
    op.drop_column("releases", "enc_key")
    op.drop_column("devices", "enc_key")
