"""usage_hourly: hourly usage rollups, maintained with every usage batch (filled from the
existing usage records here, so reports that read them are right at once)

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-30 11:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

# Frozen copies of the schema's values as of this revision (a migration never imports code
# that may change later).
DIMENSIONS = (
    "team", "cost_center", "model", "served_model", "adapter", "key_id", "user", "endpoint",
    "currency",
)  # fmt: skip
LENGTHS = {"key_id": 32, "user": 256, "adapter": 200, "endpoint": 32, "currency": 3}
BOUNDS_MS = (10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)
BUCKETS = len(BOUNDS_MS) + 1


def upgrade() -> None:
    op.create_table(
        "usage_hourly",
        sa.Column("hour", sa.DateTime(timezone=True), nullable=False),
        *(
            sa.Column(d, sa.String(length=LENGTHS.get(d, 128)), server_default="", nullable=False)
            for d in DIMENSIONS
        ),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cached_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cost_micros", sa.BigInteger(), nullable=False),
        sa.Column("latency_ms_sum", sa.Float(), nullable=False),
        sa.Column("ttft_ms_sum", sa.Float(), nullable=False),
        sa.Column("ttft_count", sa.BigInteger(), nullable=False),
        *(
            sa.Column(f"{h}_{i}", sa.BigInteger(), server_default="0", nullable=False)
            for h in ("lat", "ttft")
            for i in range(BUCKETS)
        ),
        sa.PrimaryKeyConstraint("hour", *DIMENSIONS, name=op.f("pk_usage_hourly")),
        sqlite_with_rowid=False,  # rows kept in key order: a month is one sequential range
    )
    with op.batch_alter_table("usage_hourly", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_usage_hourly_team_hour"), ["team", "hour"], unique=False
        )
    # Existing usage records, aggregated as the usage writer does (`metering/hourly.py`).
    op.execute(sa.text(_backfill(op.get_bind().dialect.name)))


def _bucket(col: str, i: int) -> str:
    """1 when `col` falls in histogram bucket i (value <= its bound, above the one before)."""
    conds = []
    if i > 0:
        conds.append(f"{col} > {BOUNDS_MS[i - 1]}")
    if i < len(BOUNDS_MS):
        conds.append(f"{col} <= {BOUNDS_MS[i]}")
    return f"SUM(CASE WHEN {col} IS NOT NULL AND {' AND '.join(conds)} THEN 1 ELSE 0 END)"


def _backfill(dialect: str) -> str:
    if dialect == "postgresql":
        hour = "date_trunc('hour', ts AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'"
    else:  # SQLite keeps SQLAlchemy's text form of a UTC time
        hour = "strftime('%Y-%m-%d %H:00:00.000000', ts)"
    dims = ", ".join(f'"{d}"' for d in DIMENSIONS)
    dim_exprs = ", ".join(f"COALESCE(\"{d}\", '')" for d in DIMENSIONS)
    hists = [f"{h}_{i}" for h in ("lat", "ttft") for i in range(BUCKETS)]
    hist_exprs = [_bucket(col, i) for col in ("latency_ms", "ttft_ms") for i in range(BUCKETS)]
    return (
        f"INSERT INTO usage_hourly (hour, {dims}, requests, errors, prompt_tokens, "
        f"cached_tokens, completion_tokens, cost_micros, latency_ms_sum, ttft_ms_sum, "
        f"ttft_count, {', '.join(hists)}) "
        f"SELECT {hour}, {dim_exprs}, COUNT(*), "
        f"SUM(CASE WHEN outcome != 'ok' THEN 1 ELSE 0 END), SUM(prompt_tokens), "
        f"SUM(cached_tokens), SUM(completion_tokens), SUM(cost_micros), SUM(latency_ms), "
        f"COALESCE(SUM(ttft_ms), 0), COUNT(ttft_ms), {', '.join(hist_exprs)} "
        f"FROM usage GROUP BY {hour}, {dim_exprs}"
    )


def downgrade() -> None:
    with op.batch_alter_table("usage_hourly", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_usage_hourly_team_hour"))
    op.drop_table("usage_hourly")
