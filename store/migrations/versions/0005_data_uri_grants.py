"""Datasets by reference: the buckets and prefixes each tenant's jobs may read.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "data_uri_grants",
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("uri", sa.String(length=1100), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name="fk_data_uri_grants_tenant_id_tenants",
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("tenant_id", "uri", name="pk_data_uri_grants"),
    )


def downgrade() -> None:
    op.drop_table("data_uri_grants")
