"""Database schema: what changes at run time (keys, teams created by API, usage).

Alembic migrations under `migrations/versions` create exactly this; a test compares them.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_name)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "pk": "pk_%(table_name)s",
    }
)

cost_centers = Table(
    "cost_centers",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("display_name", String(256), nullable=False, default=""),
    Column("source", String(16), nullable=False),  # config | api
    Column("created_at", DateTime(timezone=True), nullable=False),
)

teams = Table(
    "teams",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("cost_center", String(128), nullable=False),
    Column("models", JSON, nullable=True),
    Column("source", String(16), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("prefix", String(16), nullable=False),
    Column("name", String(256), nullable=False, default=""),
    Column("team", String(128), nullable=False, index=True),
    Column("user", String(256), nullable=True),
    Column("models", JSON, nullable=True),
    Column("limits", JSON, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=True),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
    # Bumped on every change so replicas can poll for what changed since their last look.
    Column("updated_at", DateTime(timezone=True), nullable=False, index=True),
)

usage = Table(
    "usage",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    Column("request_id", String(64), nullable=False, unique=True),
    Column("ts", DateTime(timezone=True), nullable=False, index=True),
    Column("endpoint", String(32), nullable=False),
    Column("key_id", String(32), nullable=True, index=True),
    Column("team", String(128), nullable=True),
    Column("cost_center", String(128), nullable=True),
    Column("user", String(256), nullable=True),
    Column("client_user", String(256), nullable=True),
    Column("model", String(128), nullable=True),
    Column("deployment", String(256), nullable=True),
    Column("stream", Boolean, nullable=False, default=False),
    Column("prompt_tokens", Integer, nullable=False, default=0),
    Column("cached_tokens", Integer, nullable=False, default=0),
    Column("completion_tokens", Integer, nullable=False, default=0),
    Column("cost", Float, nullable=False, default=0.0),
    Column("currency", String(3), nullable=True),
    Column("status", Integer, nullable=False),
    Column("outcome", String(32), nullable=False),  # ok | client_error | upstream_error | cancelled
    Column("error_code", String(64), nullable=True),
    Column("latency_ms", Float, nullable=False),
    Column("ttft_ms", Float, nullable=True),
)
Index("ix_usage_team_ts", usage.c.team, usage.c.ts)
