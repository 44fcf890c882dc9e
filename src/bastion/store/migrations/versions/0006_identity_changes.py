"""identity: database-assigned change sequence, sessions, four-eyes approvals

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 04:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "change_counters",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_change_counters")),
    )
    counters = sa.table("change_counters", sa.column("name"), sa.column("value"))
    op.bulk_insert(counters, [{"name": "api_keys", "value": 0}, {"name": "sessions", "value": 0}])
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("change_seq", sa.BigInteger(), server_default="0", nullable=False)
        )
        batch_op.add_column(sa.Column("created_by", sa.String(length=256), nullable=True))
        batch_op.add_column(sa.Column("approval", sa.String(length=32), nullable=True))
        batch_op.drop_index("ix_api_keys_updated_at")
        batch_op.create_index("ix_api_keys_change_seq", ["change_seq"], unique=False)
    op.create_table(
        "sessions",
        sa.Column("jti", sa.String(length=32), nullable=False),
        sa.Column("user", sa.String(length=256), nullable=False),
        sa.Column("team", sa.String(length=128), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_by", sa.String(length=256), nullable=True),
        sa.Column("change_seq", sa.BigInteger(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("jti", name=op.f("pk_sessions")),
    )
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.create_index("ix_sessions_user", ["user"], unique=False)
        batch_op.create_index("ix_sessions_expires_at", ["expires_at"], unique=False)
        batch_op.create_index("ix_sessions_change_seq", ["change_seq"], unique=False)
    op.create_table(
        "approvals",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("team", sa.String(length=128), nullable=True),
        sa.Column("subject", sa.JSON(), nullable=False),
        sa.Column("requested_by", sa.String(length=256), nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("decided_by", sa.String(length=256), nullable=True),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_approvals")),
    )


def downgrade() -> None:
    op.drop_table("approvals")
    op.drop_table("sessions")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_index("ix_api_keys_change_seq")
        batch_op.create_index("ix_api_keys_updated_at", ["updated_at"], unique=False)
        batch_op.drop_column("approval")
        batch_op.drop_column("created_by")
        batch_op.drop_column("change_seq")
    op.drop_table("change_counters")
