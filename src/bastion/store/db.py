"""Connections and migrations. One code path for SQLite (default) and PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

MIGRATIONS = Path(__file__).parent / "migrations"
log = logging.getLogger("bastion.store")


def make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            # WAL: readers (CLI reports) never block the gateway's usage writer.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


def alembic_config(url: str) -> AlembicConfig:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(engine: Engine) -> bool:
    """Brings the schema to the newest revision; False (and not a word logged) if it was.
    A change is logged as one line; Alembic's own INFO chatter is kept out of every command."""
    logging.getLogger("alembic").setLevel(logging.WARNING)  # before it is imported: it logs then
    from alembic import command
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    heads = set(ScriptDirectory.from_config(cfg).get_heads())
    with engine.begin() as conn:
        current = set(MigrationContext.configure(conn).get_current_heads())
        if current == heads:
            return False
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    log.info(
        "database schema upgraded from %s to %s",
        ", ".join(sorted(current)) or "empty",
        ", ".join(sorted(heads)),
    )
    return True


def open_database(url: str) -> Engine:
    """The database at `url`, migrated to the newest schema."""
    engine = make_engine(url)
    upgrade(engine)
    return engine


class Database:
    """An opened database as a lifecycle component: its connections close when the gateway
    stops (after every other component, which may still write)."""

    def __init__(self, engine: Engine):
        self.engine = engine

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        await asyncio.to_thread(self.engine.dispose)
