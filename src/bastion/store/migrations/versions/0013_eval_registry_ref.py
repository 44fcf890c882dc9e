"""eval_runs.registry_ref: the registry version (NAME@VERSION) a run evaluated, for promotion
gates (issue 14, item 5); eval_results.ttft_ms: time to the first token of each answer

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-30 10:45:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("eval_results", schema=None) as batch_op:
        batch_op.add_column(sa.Column("ttft_ms", sa.Float(), nullable=True))
    with op.batch_alter_table("eval_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("registry_ref", sa.String(length=200), nullable=True))
        batch_op.create_index(
            batch_op.f("ix_eval_runs_registry_ref"), ["registry_ref"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("eval_runs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_eval_runs_registry_ref"))
        batch_op.drop_column("registry_ref")
    with op.batch_alter_table("eval_results", schema=None) as batch_op:
        batch_op.drop_column("ttft_ms")
