"""Staged rollout campaigns: campaigns, campaign_devices, jobs.kind/target_job, releases.min_version.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27

Self-contained on purpose (no import of the models), like 0001.
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _json() -> sa.types.TypeEngine:
    return sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    # Plain ADD COLUMNs (no batch rebuild: see 0002).
    op.add_column("releases", sa.Column("min_version", sa.String(64), nullable=True))
    op.add_column("jobs", sa.Column("kind", sa.String(16), server_default=sa.text("'update'"), nullable=False))
    op.add_column("jobs", sa.Column("target_job", sa.Integer(), nullable=True))
    op.create_table(
        "campaigns",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("release_id", sa.Integer(), nullable=False),
        sa.Column("deployment_id", sa.Integer(), nullable=False),
        sa.Column("spec", _json(), nullable=False),
        sa.Column("state", sa.String(16), server_default=sa.text("'draft'"), nullable=False),
        sa.Column("wave", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("rate", sa.Float(), nullable=True),
        sa.Column("rate_at", _ts(), nullable=True),
        sa.Column("accepted", _json(), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("started_at", _ts(), nullable=True),
        sa.Column("finished_at", _ts(), nullable=True),
        sa.ForeignKeyConstraint(["release_id"], ["releases.id"], name="fk_campaigns_release_id_releases"),
        sa.ForeignKeyConstraint(["deployment_id"], ["deployments.id"],
                                name="fk_campaigns_deployment_id_deployments"),
        sa.PrimaryKeyConstraint("id", name="pk_campaigns"),
        sa.UniqueConstraint("name", name="uq_campaigns_name"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_campaigns_state", "campaigns", ["state"])
    op.create_table(
        "campaign_devices",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("campaign_id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("step", sa.String(16), nullable=True),
        sa.Column("step_at", _ts(), nullable=True),
        sa.Column("next_at", _ts(), nullable=True),
        sa.Column("confirmed_at", _ts(), nullable=True),
        sa.Column("confirm_boot", sa.Integer(), nullable=True),
        sa.Column("confirm_seq", sa.Integer(), nullable=True),
        sa.Column("code", sa.String(32), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("updated_at", _ts(), nullable=False),
        sa.ForeignKeyConstraint(["campaign_id"], ["campaigns.id"],
                                name="fk_campaign_devices_campaign_id_campaigns"),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], name="fk_campaign_devices_device_id_devices"),
        sa.PrimaryKeyConstraint("id", name="pk_campaign_devices"),
        sa.UniqueConstraint("campaign_id", "device_id", name="uq_campaign_devices_campaign_id_device_id"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_campaign_devices_campaign_id_state", "campaign_devices", ["campaign_id", "state"])
    op.create_index("ix_campaign_devices_device_id_state", "campaign_devices", ["device_id", "state"])


def downgrade() -> None:
    op.drop_index("ix_campaign_devices_device_id_state", table_name="campaign_devices")
    op.drop_index("ix_campaign_devices_campaign_id_state", table_name="campaign_devices")
    op.drop_table("campaign_devices")
    op.drop_index("ix_campaigns_state", table_name="campaigns")
    op.drop_table("campaigns")
    op.drop_column("jobs", "target_job")
    op.drop_column("jobs", "kind")
    op.drop_column("releases", "min_version")
