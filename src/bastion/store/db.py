"""Connections and migrations. One code path for SQLite (default) and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url

from bastion.core.errors import DeploymentError

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


#: Key of the PostgreSQL advisory lock `upgrade` holds: two upgrades started together (two
#: pods' init containers, a deploy job and a developer) run one after the other.
MIGRATION_LOCK = 0x62617374696F6E  # "bastion"
UPGRADE_HINT = "run `bastion db upgrade --config <file>` (with an account that may change it)"


def _revisions(engine: Engine) -> tuple[set[str], set[str], set[str]]:
    """(the database's revisions, the code's heads, every revision the code knows)."""
    logging.getLogger("alembic").setLevel(logging.WARNING)  # before it is imported: it logs then
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config(engine.url.render_as_string(False)))
    known = {r.revision for r in script.walk_revisions()}
    with engine.connect() as conn:
        current = set(MigrationContext.configure(conn).get_current_heads())
    return current, set(script.get_heads()), known


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """Held while one process migrates. PostgreSQL: a session advisory lock (needs no
    privilege, released if the process dies). SQLite: an exclusive lock on `<db>.migrate-lock`
    beside the file; SQLite's own write lock cannot be held across Alembic's connection, and
    an embedded database is only ever shared by processes on this host."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK})
                conn.commit()
        return
    database = engine.url.database
    if not database or database == ":memory:":
        yield
        return
    with open(f"{database}.migrate-lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def upgrade(engine: Engine) -> bool:
    """Brings the schema to the newest revision; False (and not a word logged) if it was.
    Serialised by a database-level lock, so concurrent upgrades apply each step once; at head
    it changes nothing and needs no schema privilege. A change is logged as one line;
    Alembic's own INFO chatter is kept out of every command (`_revisions`)."""
    current, heads, _known = _revisions(engine)
    if current == heads:
        return False
    from alembic import command

    with _migration_lock(engine):
        current, heads, _known = _revisions(engine)  # another process may have done it
        if current == heads:
            return False
        cfg = alembic_config(engine.url.render_as_string(hide_password=False))
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    log.info(
        "database schema upgraded from %s to %s",
        ", ".join(sorted(current)) or "empty",
        ", ".join(sorted(heads)),
    )
    return True


def upgrade_url(url: str) -> bool:
    """`bastion db upgrade`: the database at `url` brought to the newest schema."""
    engine = make_engine(url)
    try:
        return upgrade(engine)
    finally:
        engine.dispose()


def check_schema(engine: Engine) -> None:
    """Raises DeploymentError unless the schema is one this code can use: at head, or (during
    a rolling upgrade, migrations run first) at a newer revision this code does not know."""
    current, heads, known = _revisions(engine)
    if current == heads or (current and not current & known):
        return
    url = engine.url.render_as_string(hide_password=True)
    have = ", ".join(sorted(current)) or "empty"
    raise DeploymentError(
        f"the database schema at {url} is {have}, this Bastion needs "
        f"{', '.join(sorted(heads))}: {UPGRADE_HINT}"
    )


def durability_problem(engine: Engine) -> str | None:
    """What makes an acknowledged commit losable on this database, if anything: the audit
    shipper deletes its local copy of entries once PostgreSQL acknowledges them."""
    if engine.dialect.name != "postgresql":
        return None
    with engine.connect() as conn:
        mode = conn.execute(text("SHOW synchronous_commit")).scalar()
    if mode == "off":
        return (
            "PostgreSQL synchronous_commit is off for this role or database: a database crash "
            "can lose audit entries the gateway has already deleted locally; set it to on "
            "(docs/deploy.md#postgresql)"
        )
    return None


def open_database(url: str, migrate: bool = True) -> Engine:
    """The database at `url`: migrated to the newest schema, or (migrate=False) checked to be
    there already (DeploymentError naming the command to run if not)."""
    engine = make_engine(url)
    try:
        upgrade(engine) if migrate else check_schema(engine)
    except BaseException:
        engine.dispose()
        raise
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
