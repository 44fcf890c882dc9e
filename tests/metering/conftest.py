"""A migrated, empty database on SQLite and on PostgreSQL, for the metering tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from bastion.store.db import make_engine, upgrade
from bastion.store.schema import usage, usage_hourly


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.Engine]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/r.db"
    else:
        url = request.getfixturevalue("pg_url")
    eng = make_engine(url)
    upgrade(eng)
    with eng.begin() as conn:  # the PostgreSQL database is shared by the session's tests
        conn.execute(usage.delete())
        conn.execute(usage_hourly.delete())
    yield eng
    eng.dispose()
