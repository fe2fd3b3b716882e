"""Sharded jobs: one job spread over several workers, its shards claimed one by one.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("sharded", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("shards", sa.JSON(), nullable=True))
    op.create_table(
        "job_shards",
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("shard_id", sa.String(length=64), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("stage", sa.String(length=16), nullable=False),
        sa.Column("depends_on", sa.JSON(), nullable=False),
        sa.Column("weight", sa.Float(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("worker", sa.String(length=200), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_job_shards_job_id_jobs", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "shard_id", name="pk_job_shards"),
    )
    op.create_index("ix_job_shards_status", "job_shards", ["status"])


def downgrade() -> None:
    op.drop_index("ix_job_shards_status", table_name="job_shards")
    op.drop_table("job_shards")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("shards")
        batch.drop_column("sharded")
