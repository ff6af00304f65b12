"""Delta patches in two formats: a `format` column in `deltas`, part of the pair's unique key.

A cached patch is one per base, target, window and format (docs/delta.md). Rows written while
the format was folded into `wbits` (window + 16 per format after the first) are split back into
the two columns.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-05
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_KEY = ("base_sha256", "target_sha256", "wbits")
NEW_KEY = ("base_sha256", "target_sha256", "wbits", "format")


def upgrade() -> None:
    with op.batch_alter_table("deltas") as batch:
        batch.add_column(sa.Column("format", sa.Integer, nullable=False, server_default=sa.text("1")))
        batch.drop_constraint("uq_deltas_pair", type_="unique")
        batch.create_unique_constraint("uq_deltas_pair", NEW_KEY)
    op.execute("UPDATE deltas SET format = wbits / 16 + 1, wbits = wbits % 16 WHERE wbits > 15")


def downgrade() -> None:
    # Patches of a later format have no place in the old key: drop them (the center recomputes
    # a patch it needs and does not find).
    op.execute("DELETE FROM deltas WHERE format <> 1")
    with op.batch_alter_table("deltas") as batch:
        batch.drop_constraint("uq_deltas_pair", type_="unique")
        batch.create_unique_constraint("uq_deltas_pair", OLD_KEY)
        batch.drop_column("format")
