"""audit trail

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 15:34:09.006768
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_checkpoints",
        sa.Column("replica", sa.String(length=128), nullable=False),
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("head", sa.String(length=64), nullable=False),
        sa.Column("ts", sa.String(length=40), nullable=False),
        sa.Column("public_key", sa.String(length=64), nullable=False),
        sa.Column("signature", sa.String(length=128), nullable=False),
        sa.PrimaryKeyConstraint("replica", "seq", name=op.f("pk_audit_checkpoints")),
    )
    op.create_table(
        "audit_entries",
        sa.Column("replica", sa.String(length=128), nullable=False),
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=True),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("team", sa.String(length=128), nullable=True),
        sa.Column("user", sa.String(length=256), nullable=True),
        sa.Column("key_id", sa.String(length=64), nullable=True),
        sa.Column("model", sa.String(length=128), nullable=True),
        sa.Column("status", sa.Integer(), nullable=True),
        sa.Column("doc", sa.Text(), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=True),
        sa.Column("purged_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("replica", "seq", name=op.f("pk_audit_entries")),
    )
    with op.batch_alter_table("audit_entries", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_audit_entries_request_id"), ["request_id"], unique=False
        )
        batch_op.create_index("ix_audit_entries_team_ts", ["team", "ts"], unique=False)
        batch_op.create_index(batch_op.f("ix_audit_entries_ts"), ["ts"], unique=False)

    op.create_table(
        "audit_holds",
        sa.Column("team", sa.String(length=128), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("placed_by", sa.String(length=256), nullable=False),
        sa.Column("placed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("team", name=op.f("pk_audit_holds")),
    )
    op.create_table(
        "audit_keys",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("team", sa.String(length=128), nullable=False),
        sa.Column("wrapped", sa.LargeBinary(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("destroyed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_keys")),
    )
    with op.batch_alter_table("audit_keys", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_keys_team"), ["team"], unique=False)

    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("role", sa.String(length=16), server_default="member", nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_column("role")

    with op.batch_alter_table("audit_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_keys_team"))

    op.drop_table("audit_keys")
    op.drop_table("audit_holds")
    with op.batch_alter_table("audit_entries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_entries_ts"))
        batch_op.drop_index("ix_audit_entries_team_ts")
        batch_op.drop_index(batch_op.f("ix_audit_entries_request_id"))

    op.drop_table("audit_entries")
    op.drop_table("audit_checkpoints")
