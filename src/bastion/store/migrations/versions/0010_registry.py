"""registry: the model registry (base models and adapters, digests, approval state) and its
verified-digest cache

Revision ID: 0010
Revises: 0008
Create Date: 2026-11-30 07:20:00

Chained to 0008 while 0009 is being written on another branch: the merge re-chains it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "registry_models",
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("manifest_sha256", sa.String(length=64), nullable=False),
        sa.Column("files", sa.JSON(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("license", sa.String(length=256), nullable=True),
        sa.Column("owner", sa.String(length=256), nullable=True),
        sa.Column("intended_use", sa.Text(), nullable=True),
        sa.Column("risk_tier", sa.String(length=16), nullable=True),
        sa.Column("base", sa.String(length=200), nullable=True),
        sa.Column("lineage", sa.JSON(), nullable=False),
        sa.Column("created_by", sa.String(length=256), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("history", sa.JSON(), nullable=False),
        sa.Column("approval", sa.String(length=32), nullable=True),
        sa.PrimaryKeyConstraint("name", "version", name=op.f("pk_registry_models")),
    )
    with op.batch_alter_table("registry_models", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_registry_models_state"), ["state"], unique=False)
    op.create_table(
        "registry_digests",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("stat", sa.String(length=128), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("verified_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_registry_digests")),
    )


def downgrade() -> None:
    op.drop_table("registry_digests")
    with op.batch_alter_table("registry_models", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_registry_models_state"))
    op.drop_table("registry_models")
