"""adapter_deployments: registry adapters served under an alias on their base's deployments;
usage.adapter: the adapter version that served a call

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-30 10:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "adapter_deployments",
        sa.Column("alias", sa.String(length=128), nullable=False),
        sa.Column("adapter", sa.String(length=200), nullable=False),
        sa.Column("base_alias", sa.String(length=128), nullable=False),
        sa.Column("stage", sa.String(length=16), nullable=False),
        sa.Column("created_by", sa.String(length=256), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("alias", name=op.f("pk_adapter_deployments")),
    )
    with op.batch_alter_table("adapter_deployments", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_adapter_deployments_adapter"), ["adapter"], unique=False
        )
    with op.batch_alter_table("usage", schema=None) as batch_op:
        batch_op.add_column(sa.Column("adapter", sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("usage", schema=None) as batch_op:
        batch_op.drop_column("adapter")
    with op.batch_alter_table("adapter_deployments", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_adapter_deployments_adapter"))
    op.drop_table("adapter_deployments")
