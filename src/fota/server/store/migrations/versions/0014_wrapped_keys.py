"""Wrapped secret keys: devices.enc_key and releases.enc_key hold a key wrapped by the
key-encryption key (fota.server.kek, "kek1:" + 120 hex characters), longer than the 64 hex
characters of a plain key.

The keys themselves are wrapped outside Alembic (a migration cannot see the KEK): every fota
command that opens a home's database wraps the plain keys it finds (kek.wrap_plain_keys).

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-04
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("devices", "releases")


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.alter_column("enc_key", existing_type=sa.String(64), type_=sa.String(160), existing_nullable=True)


def downgrade() -> None:
    # Wrapped keys do not fit 64 characters: a downgrade needs them unwrapped first (not done here).
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.alter_column("enc_key", existing_type=sa.String(160), type_=sa.String(64), existing_nullable=True)
