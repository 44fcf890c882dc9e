"""Teams and cost centers: declared in config, more may be added through the admin API.

Config entries are written to the database at start (source=config) so that keys, usage and
reports can refer to them; API-made ones (source=api) live only in the database.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Engine, select

from bastion.config import Settings
from bastion.store.db import open_database
from bastion.store.schema import cost_centers, teams


class IdentityError(ValueError):
    """A team, cost center or key operation is not possible (unknown name, duplicate, …)."""


class UnknownName(IdentityError):
    """A team, cost center or model the operation refers to does not exist (a 404)."""


class NameTaken(IdentityError):
    """The team or cost center to create exists already (a 409)."""


@dataclass(frozen=True, slots=True)
class Team:
    name: str
    cost_center: str
    models: frozenset[str] | None
    source: str


def sync_config(engine: Engine, settings: Settings) -> None:
    """Upserts the config's cost centers and teams; the file wins over earlier API edits."""
    now = datetime.now(UTC)
    with engine.begin() as conn:
        have_cc = {r.name for r in conn.execute(select(cost_centers.c.name))}
        for name, cc in settings.cost_centers.items():
            values = {"display_name": cc.name, "source": "config"}
            if name in have_cc:
                conn.execute(cost_centers.update().where(cost_centers.c.name == name), values)
            else:
                conn.execute(cost_centers.insert(), {"name": name, "created_at": now, **values})
        have_teams = {r.name for r in conn.execute(select(teams.c.name))}
        for name, t in settings.teams.items():
            values = {"cost_center": t.cost_center, "models": t.models, "source": "config"}
            if name in have_teams:
                conn.execute(teams.update().where(teams.c.name == name), values)
            else:
                conn.execute(teams.insert(), {"name": name, "created_at": now, **values})


def open_store(settings: Settings, write: bool = True) -> Engine:
    """The configured database (migrated if `database.auto_migrate`, else checked to be at the
    newest schema), with the config's teams and cost centers written in unless `write` is False
    (read-only commands, which may run with an account that can only read)."""
    engine = open_database(settings.database.url, migrate=settings.database.migrates)
    if write:
        sync_config(engine, settings)
    return engine


def load_teams(engine: Engine) -> dict[str, Team]:
    with engine.connect() as conn:
        rows = conn.execute(select(teams)).all()
    return {
        r.name: Team(
            r.name, r.cost_center, frozenset(r.models) if r.models is not None else None, r.source
        )
        for r in rows
    }


def list_cost_centers(engine: Engine) -> list[dict[str, str]]:
    with engine.connect() as conn:
        rows = conn.execute(select(cost_centers).order_by(cost_centers.c.name)).all()
    return [{"name": r.name, "display_name": r.display_name, "source": r.source} for r in rows]


def create_cost_center(engine: Engine, name: str, display_name: str = "") -> None:
    with engine.begin() as conn:
        if conn.execute(select(cost_centers.c.name).where(cost_centers.c.name == name)).first():
            raise NameTaken(f"cost center {name!r} already exists")
        conn.execute(
            cost_centers.insert(),
            {
                "name": name,
                "display_name": display_name,
                "source": "api",
                "created_at": datetime.now(UTC),
            },
        )


def create_team(
    engine: Engine, settings: Settings, name: str, cost_center: str, models: list[str] | None = None
) -> Team:
    unknown = [m for m in models or [] if m not in settings.models]
    if unknown:
        raise UnknownName(f"unknown model(s): {', '.join(unknown)}")
    with engine.begin() as conn:
        if not conn.execute(
            select(cost_centers.c.name).where(cost_centers.c.name == cost_center)
        ).first():
            raise UnknownName(f"unknown cost center {cost_center!r}")
        if conn.execute(select(teams.c.name).where(teams.c.name == name)).first():
            raise NameTaken(f"team {name!r} already exists")
        conn.execute(
            teams.insert(),
            {
                "name": name,
                "cost_center": cost_center,
                "models": models,
                "source": "api",
                "created_at": datetime.now(UTC),
            },
        )
    return Team(name, cost_center, frozenset(models) if models is not None else None, "api")
