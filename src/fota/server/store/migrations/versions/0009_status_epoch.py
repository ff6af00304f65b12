"""Status de-duplication that survives a device starting over: status_events.epoch (the device's
random boot epoch, 0 for statuses without one) joins the unique key, which becomes
(device_id, epoch, boot, seq).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # On SQLite a unique constraint changes only with a rebuild of the table (batch mode): no
    # other table has a foreign key into status_events, so the rebuild is safe (see 0002).
    with op.batch_alter_table("status_events") as batch:
        batch.add_column(sa.Column("epoch", sa.Integer(), server_default=sa.text("0"), nullable=False))
        batch.drop_constraint("uq_status_dedup", type_="unique")
        batch.create_unique_constraint("uq_status_dedup", ["device_id", "epoch", "boot", "seq"])


def downgrade() -> None:
    # Statuses that differ only by epoch would collide: keep the first of each (device, boot, seq).
    op.execute("DELETE FROM status_events WHERE id NOT IN (SELECT MIN(id) FROM status_events "
               "GROUP BY device_id, boot, seq)")
    with op.batch_alter_table("status_events") as batch:
        batch.drop_constraint("uq_status_dedup", type_="unique")
        batch.create_unique_constraint("uq_status_dedup", ["device_id", "boot", "seq"])
        batch.drop_column("epoch")
