"""Fixtures of the registry tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import pg_database


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh registry database on SQLite, then on PostgreSQL (a module may override it)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/r.db"
        return
    with pg_database() as url:
        yield url
