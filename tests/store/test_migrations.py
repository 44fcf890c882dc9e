"""The Alembic migrations build exactly the schema the code uses, on SQLite and PostgreSQL."""

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from bastion.store.db import make_engine, upgrade
from bastion.store.schema import metadata


def _diff(url: str) -> list:
    engine = make_engine(url)
    upgrade(engine)
    upgrade(engine)  # idempotent
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    engine.dispose()
    return diff


def test_sqlite_schema_matches(tmp_path: Path) -> None:
    assert _diff(f"sqlite:///{tmp_path}/deep/er/b.db") == []


@pytest.mark.postgres
def test_postgres_schema_matches(pg_url: str) -> None:
    assert _diff(pg_url) == []
