"""releases.deleted_at: when a release was deleted (fota.server.releases.delete_release). The row
stays, since deployments, jobs, campaigns and the audit log name it; its image and the patches
from and to it are removed. Self-contained: no import of the models (UTCDateTime is
DateTime(timezone=True)).

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-05
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0021"
down_revision: str | None = "0020"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("releases", sa.Column("deleted_at", sa.DateTime(timezone=True)))


def downgrade() -> None:
    with op.batch_alter_table("releases") as batch:
        batch.drop_column("deleted_at")
