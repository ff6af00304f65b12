"""A bcrypt hash of each device's broker password: devices.password_bcrypt (NATS users file).

Devices provisioned before keep NULL: their plain password is not known, so they get a NATS user
only once their credentials are rotated (fota broker nats-config lists them).

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-05
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("devices", sa.Column("password_bcrypt", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("password_bcrypt")
