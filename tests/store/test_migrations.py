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
def test_postgres_schema_matches() -> None:
    from tests.conftest import pg_database

    with pg_database(migrate=False) as url:  # from empty: the fixtures' databases are migrated
        assert _diff(url) == []


def test_db_upgrade_never_prints_the_password(tmp_path: Path) -> None:
    """`bastion db upgrade` runs in CI logs and terminals: the URL it reports hides its password
    (the machine's PostgreSQL trusts local connections, so any password is accepted here)."""
    import subprocess
    import sys

    import yaml

    from tests.conftest import pg_database

    with pg_database() as url:
        secret_url = url.replace("postgres@", "postgres:s3cret-pw@", 1)
        cfg = tmp_path / "b.yaml"
        cfg.write_text(yaml.safe_dump({"database": {"url": secret_url}}))
        out = subprocess.run(
            [sys.executable, "-m", "bastion.cli", "db", "upgrade", "--config", str(cfg)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    assert "s3cret-pw" not in out.stdout + out.stderr
    assert "postgres:***@127.0.0.1" in out.stdout
