"""money: usage cost in integer micro-units; key budgets as exact decimal strings

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 04:30:00
"""

from __future__ import annotations

import math
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_BUDGETS = ("budget_day", "budget_month")
_keys = sa.table("api_keys", sa.column("id", sa.String), sa.column("limits", sa.JSON))


def upgrade() -> None:
    with op.batch_alter_table("usage", schema=None) as batch_op:
        batch_op.add_column(sa.Column("cost_micros", sa.BigInteger(), nullable=True))
    # A float cost carries ~15 significant digits: rounding to the micro-unit keeps every one
    # that meant anything.
    op.execute("UPDATE usage SET cost_micros = CAST(ROUND(cost * 1000000) AS BIGINT)")
    with op.batch_alter_table("usage", schema=None) as batch_op:
        batch_op.alter_column("cost_micros", existing_type=sa.BigInteger(), nullable=False)
        batch_op.drop_column("cost")
    # A key's budget was enforced as floor(value x 1e6) micro-units: the same amount, exactly.
    _convert_key_budgets(lambda v: str(Decimal(math.floor(float(v) * 1_000_000)).scaleb(-6)))


def downgrade() -> None:
    with op.batch_alter_table("usage", schema=None) as batch_op:
        batch_op.add_column(sa.Column("cost", sa.Float(), nullable=True))
    op.execute("UPDATE usage SET cost = cost_micros / 1000000.0")
    with op.batch_alter_table("usage", schema=None) as batch_op:
        batch_op.alter_column("cost", existing_type=sa.Float(), nullable=False)
        batch_op.drop_column("cost_micros")
    _convert_key_budgets(float)


def _convert_key_budgets(convert: Callable[[Any], Any]) -> None:
    conn = op.get_bind()
    rows = conn.execute(sa.select(_keys.c.id, _keys.c.limits)).all()
    for key_id, limits in rows:
        if not limits or not any(limits.get(b) is not None for b in _BUDGETS):
            continue
        new = {k: convert(v) if k in _BUDGETS and v is not None else v for k, v in limits.items()}
        conn.execute(_keys.update().where(_keys.c.id == key_id).values(limits=new))
