"""Dataset checks: intake warnings, duplicate/leakage counts and where the test split comes from.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("warnings", sa.JSON(), nullable=False, server_default="[]"))
        batch.add_column(sa.Column("duplicates", sa.JSON(), nullable=False, server_default="{}"))
        batch.add_column(sa.Column("test_split", sa.JSON(), nullable=False, server_default="{}"))


def downgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("test_split")
        batch.drop_column("duplicates")
        batch.drop_column("warnings")
