"""Migrations are an explicit step on a shared database: `bastion db upgrade` runs under a
lock; starts and commands on PostgreSQL only check the schema, and read-only commands work with
an account that can only read."""

from __future__ import annotations

import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from bastion.core.errors import DeploymentError
from bastion.store.db import check_schema, make_engine, open_database
from tests.conftest import AUDIT_PUBLIC_KEY, pg_database


def _cli(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bastion.cli", *args, "--config", str(cfg)],
        capture_output=True, text=True, cwd=cfg.parent,
    )  # fmt: skip


def _config(tmp_path: Path, url: str, name: str = "b.yaml") -> Path:
    cfg = tmp_path / name
    cfg.write_text(yaml.safe_dump({"database": {"url": url}, "teams": {}, "models": {}}))
    return cfg


def _upgrade_together(cfg: Path, n: int = 3) -> list[subprocess.CompletedProcess[str]]:
    """`n` upgrades started at once, as n replicas' init containers would."""
    cmd = [sys.executable, "-m", "bastion.cli", "db", "upgrade", "--config", str(cfg)]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(n)
    ]
    return [subprocess.CompletedProcess(cmd, p.wait(), *p.communicate()) for p in procs]


@pytest.mark.postgres
def test_postgres_is_not_migrated_at_start_and_says_what_to_run(tmp_path: Path) -> None:
    with pg_database(migrate=False) as url:
        cfg = _config(tmp_path, url)
        for command in (["keys", "list"], ["serve"], ["usage"]):
            out = _cli(cfg, *command)
            assert out.returncode == 2, (command, out.stdout, out.stderr)
            assert "bastion db upgrade" in out.stderr and "empty" in out.stderr
            assert "Traceback" not in out.stderr
        engine = make_engine(url)
        with engine.connect() as conn:  # nothing was created by the refused commands
            assert sa.inspect(conn).get_table_names() == []
        engine.dispose()

        results = _upgrade_together(cfg)
        assert [r.returncode for r in results] == [0, 0, 0], [r.stderr for r in results]
        engine = make_engine(url)
        check_schema(engine)  # at head: no error
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM alembic_version")).scalar() == 1
        engine.dispose()
        listed = _cli(cfg, "keys", "list")
        assert listed.returncode == 0 and "alembic" not in listed.stderr  # no chatter


def test_sqlite_upgrades_started_together_serialise(tmp_path: Path) -> None:
    cfg = _config(tmp_path, f"sqlite:///{tmp_path}/b.db")
    results = _upgrade_together(cfg)
    assert [r.returncode for r in results] == [0, 0, 0], [r.stderr for r in results]
    engine = make_engine(f"sqlite:///{tmp_path}/b.db")
    check_schema(engine)
    engine.dispose()


def test_sqlite_migrates_at_start_unless_told_not_to(tmp_path: Path) -> None:
    """The quickstart's embedded database stays convenient; `auto_migrate: false` opts out."""
    url = f"sqlite:///{tmp_path}/q.db"
    cfg = tmp_path / "q.yaml"
    cfg.write_text(yaml.safe_dump({"database": {"url": url, "auto_migrate": False}}))
    out = _cli(cfg, "keys", "list")
    assert out.returncode == 2 and "bastion db upgrade" in out.stderr
    cfg.write_text(yaml.safe_dump({"database": {"url": url}}))
    assert _cli(cfg, "keys", "list").returncode == 0  # default for SQLite: migrated


def test_a_newer_schema_than_the_code_knows_is_accepted(tmp_path: Path) -> None:
    """Rolling upgrade: the new version's migrations ran first, old replicas keep serving."""
    engine = open_database(f"sqlite:///{tmp_path}/n.db")
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
    check_schema(engine)
    with engine.begin() as conn:  # a known but older revision is refused
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '0001'"))
    with pytest.raises(DeploymentError, match="bastion db upgrade"):
        check_schema(engine)
    engine.dispose()


@pytest.mark.postgres
def test_read_only_commands_work_with_an_account_that_can_only_read(tmp_path: Path) -> None:
    with pg_database() as url:
        role = "ro_" + secrets.token_hex(4)
        owner = make_engine(url)
        with owner.begin() as conn:
            conn.execute(sa.text(f"CREATE ROLE {role} LOGIN"))
            conn.execute(sa.text(f"GRANT USAGE ON SCHEMA public TO {role}"))
            conn.execute(sa.text(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}"))
        try:
            ro_url = url.replace("postgres@", f"{role}@", 1)
            cfg = _config(tmp_path, ro_url)
            raw = yaml.safe_load(cfg.read_text())
            raw["teams"] = {"alpha": {"cost_center": "cc"}}  # would be written by a write command
            raw["cost_centers"] = {"cc": {"name": "Retail"}}
            raw["audit"] = {"trusted_public_keys": [AUDIT_PUBLIC_KEY], "anchor_dir": None}
            cfg.write_text(yaml.safe_dump(raw))
            for command in (["audit", "verify"], ["usage"], ["keys", "list"], ["teams", "list"]):
                out = _cli(cfg, *command)
                assert out.returncode == 0, (command, out.stdout, out.stderr)
            assert "OK" in _cli(cfg, "audit", "verify").stdout
            # ...and the account really cannot write: a write command fails on permissions.
            out = _cli(cfg, "db", "upgrade")
            assert out.returncode != 0 and "permission denied" in out.stderr.lower()
        finally:
            with owner.begin() as conn:
                conn.execute(sa.text(f"DROP OWNED BY {role}"))
                conn.execute(sa.text(f"DROP ROLE {role}"))
            owner.dispose()


@pytest.mark.postgres
def test_synchronous_commit_off_is_named(tmp_path: Path) -> None:
    """The shipper deletes its local copy once PostgreSQL acknowledges: `off` must be said."""
    from bastion.store.db import durability_problem

    with pg_database() as url:
        engine = make_engine(url)
        assert durability_problem(engine) is None  # the server's default: on
        name = url.rsplit("/", 1)[1]
        with engine.begin() as conn:
            conn.execute(sa.text(f'ALTER DATABASE "{name}" SET synchronous_commit = off'))
        engine.dispose()  # the setting applies to new sessions
        engine = make_engine(url)
        assert "synchronous_commit is off" in (durability_problem(engine) or "")
        engine.dispose()
    assert durability_problem(make_engine(f"sqlite:///{tmp_path}/x.db")) is None
