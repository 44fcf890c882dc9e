"""Key lifecycle through the CLI and the store, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import os
import pwd
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from bastion.config import parse_settings
from bastion.core.errors import AuthenticationFailed
from bastion.identity.keys import create_key, list_keys, revoke_key
from bastion.identity.keystore import KeyStore
from bastion.identity.teams import IdentityError, sync_config
from bastion.store.db import make_engine, upgrade
from bastion.store.schema import api_keys

CFG = {
    "cost_centers": {"cc": {}},
    "teams": {"t": {"cost_center": "cc"}, "limited": {"cost_center": "cc", "models": ["a"]}},
    "models": {
        m: {"deployments": [{"url": "http://127.0.0.1:1", "served_name": m}]} for m in ("a", "b")
    },
}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    url = (
        f"sqlite:///{tmp_path}/k.db"
        if request.param == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    engine = make_engine(url)
    upgrade(engine)
    with engine.begin() as conn:  # the PostgreSQL database is shared by the session
        conn.execute(api_keys.delete())
    sync_config(engine, parse_settings(CFG))
    yield engine
    engine.dispose()


def test_key_is_stored_only_as_hash(db: sa.Engine) -> None:
    rec, token = create_key(db, team="t", known_models={"a", "b"})
    assert token.startswith("bst-") and len(token) > 40
    with db.connect() as conn:
        row = conn.execute(sa.select(api_keys)).one()
    assert token not in str(tuple(row))
    assert row.key_hash == hashlib.sha256(token.encode()).hexdigest()
    assert rec.public()["status"] == "active" and "key_hash" not in rec.public()


def test_validation(db: sa.Engine) -> None:
    with pytest.raises(IdentityError, match="unknown team"):
        create_key(db, team="nope", known_models={"a"})
    with pytest.raises(IdentityError, match="unknown model"):
        create_key(db, team="t", models=["zzz"], known_models={"a"})


def test_store_authenticates_and_sees_revocations(db: sa.Engine) -> None:
    async def scenario() -> None:
        store = KeyStore(db, refresh_seconds=0.1)
        await store.start()
        _rec, token = create_key(
            db, team="limited", models=["a", "b"], user="bob", known_models={"a", "b"}
        )
        p = await store.authenticate(f"Bearer {token}")  # made after start: found on a miss
        assert (p.team, p.cost_center, p.user) == ("limited", "cc", "bob")
        assert p.models == frozenset({"a"})  # the team's allowance narrows the key's
        rec2, token2 = create_key(db, team="t", known_models={"a", "b"})
        await store.authenticate(f"Bearer {token2}")
        revoke_key(db, rec2.id)  # as another replica or the CLI would
        await asyncio.sleep(0.5)
        with pytest.raises(AuthenticationFailed, match="revoked"):
            await store.authenticate(f"Bearer {token2}")
        for bad in (None, "", "Bearer", "Token abc", "Bearer bst-" + "x" * 300):
            with pytest.raises(AuthenticationFailed):
                await store.authenticate(bad)
        await store.stop()

    asyncio.run(scenario())


def test_cli_lifecycle(tmp_path: Path) -> None:
    cfg = tmp_path / "b.yaml"
    cfg.write_text(yaml.safe_dump({**CFG, "database": {"url": f"sqlite:///{tmp_path}/c.db"}}))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "bastion.cli", *args, "-c", str(cfg)],
            capture_output=True,
            text=True,
        )

    made = cli(
        "keys",
        "create",
        "--team",
        "t",
        "--user",
        "u1",
        "--expires",
        "30d",
        "--name",
        "ci-bot",
        "--models",
        "a",
    )
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token.startswith("bst-") and "only once" in made.stderr
    listed = cli("keys", "list", "--format", "json")
    assert token not in listed.stdout and '"ci-bot"' in listed.stdout
    key_id = yaml.safe_load(listed.stdout)[0]["id"]
    assert cli("keys", "revoke", key_id).returncode == 0
    assert '"revoked"' in cli("keys", "list", "--format", "json").stdout
    assert cli("keys", "revoke", "key_nope").returncode == 2
    bad = cli("keys", "create", "--team", "nope")
    assert bad.returncode == 2 and "unknown team" in bad.stderr
    assert cli("keys", "create", "--team", "t", "--expires", "soon").returncode == 2
    engine = make_engine(f"sqlite:///{tmp_path}/c.db")
    assert len(list_keys(engine)) == 1
    engine.dispose()


def test_the_command_line_makes_no_auditor_and_records_the_os_account(tmp_path: Path) -> None:
    """Holding the config and the database proves nobody: the CLI makes no auditor key, and
    what it does make is recorded under the OS account it runs as, not a name from $USER."""
    cfg = tmp_path / "b.yaml"
    cfg.write_text(yaml.safe_dump({**CFG, "database": {"url": f"sqlite:///{tmp_path}/c.db"}}))
    posing = {**os.environ, **dict.fromkeys(("LOGNAME", "USER", "LNAME", "USERNAME"), "mallory")}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "bastion.cli", *args, "-c", str(cfg)],
            capture_output=True,
            text=True,
            env=posing,
        )

    auditor = cli("keys", "create", "--team", "t", "--user", "carol", "--role", "auditor")
    assert auditor.returncode == 2 and not auditor.stdout
    assert "auditor keys are not made from the command line" in auditor.stderr
    made = cli("keys", "create", "--team", "t", "--user", "carol")
    assert made.returncode == 0, made.stderr
    engine = make_engine(f"sqlite:///{tmp_path}/c.db")
    (key,) = list_keys(engine)
    engine.dispose()
    assert key.role != "auditor"
    account = pwd.getpwuid(os.getuid()).pw_name
    assert key.created_by == f"{account}@{socket.gethostname()} (cli)"
    assert account == "mallory" or "mallory" not in key.created_by


def test_expired_key(db: sa.Engine) -> None:
    async def scenario() -> None:
        store = KeyStore(db, refresh_seconds=10)
        await store.start()
        with pytest.raises(IdentityError):
            create_key(db, team="t", expires_in=timedelta(seconds=-1), known_models=set())
        _rec, token = create_key(
            db, team="t", expires_in=timedelta(milliseconds=300), known_models=set()
        )
        await store.authenticate(f"Bearer {token}")
        await asyncio.sleep(0.4)
        with pytest.raises(AuthenticationFailed, match="expired"):
            await store.authenticate(f"Bearer {token}")
        await store.stop()

    asyncio.run(scenario())


def test_a_revocation_from_a_host_whose_clock_is_behind_reaches_the_cache(
    db: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Red team: the cache polled `updated_at >= newest seen - 1 s`, so a revocation written by
    a host whose clock ran 3 s behind was skipped for good. Now the database numbers changes."""
    from datetime import datetime

    import bastion.identity.keys as keys_module

    class Behind(datetime):
        @classmethod
        def now(cls, tz=None):  # type: ignore[no-untyped-def,override]
            return datetime.now(tz) - timedelta(seconds=3)

    async def scenario() -> None:
        store = KeyStore(db, refresh_seconds=3600)  # polled by hand below
        await store.start()
        victim, token = create_key(db, team="t", known_models=set())
        create_key(db, team="t", known_models=set())  # a later change, with a right clock
        store.refresh_now()
        await store.authenticate(f"Bearer {token}")
        with monkeypatch.context() as m:
            m.setattr(keys_module, "datetime", Behind)
            revoke_key(db, victim.id)  # on the host whose clock is behind
        store.refresh_now()
        with pytest.raises(AuthenticationFailed, match="revoked"):
            await store.authenticate(f"Bearer {token}")
        await store.stop()

    asyncio.run(scenario())


@pytest.mark.postgres
def test_change_numbers_follow_commit_order(pg_url: str) -> None:
    """A writer that took number N blocks the next writer until it commits, so no reader can see
    N+1 before N (which would let a poll skip N for good)."""
    import threading
    import time

    from bastion.store.changes import next_change

    engine = make_engine(pg_url)
    upgrade(engine)
    got: dict[str, tuple[int, float]] = {}
    first_has_number = threading.Event()

    def first() -> None:
        with engine.begin() as conn:
            number = next_change(conn, "api_keys")
            first_has_number.set()
            time.sleep(0.5)  # still uncommitted
            got["first"] = (number, time.monotonic())

    def second() -> None:
        first_has_number.wait()
        with engine.begin() as conn:
            got["second"] = (next_change(conn, "api_keys"), time.monotonic())

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.dispose()
    assert got["second"][0] == got["first"][0] + 1
    assert got["second"][1] >= got["first"][1]  # numbered only once the first had committed


def test_self_service_keys_never_outlive_the_maximum(db: sa.Engine) -> None:
    """Keys users mint for themselves stop at `identity.self_service_key_max_days`, even ones
    stored with no expiry before that limit existed; keys an admin made are not affected."""

    from datetime import UTC, datetime

    async def scenario() -> None:
        old_self, self_token = create_key(db, team="t", user="u", known_models=set(),
                                          source="self-service")  # fmt: skip
        old_sso, sso_token = create_key(db, team="t", user="u", known_models=set(), source="sso")
        old_admin, admin_token = create_key(db, team="t", known_models=set())
        with db.begin() as conn:
            conn.execute(
                api_keys.update()
                .where(api_keys.c.id.in_([old_self.id, old_sso.id, old_admin.id]))
                .values(created_at=datetime.now(UTC) - timedelta(days=91))
            )
        store = KeyStore(db, refresh_seconds=3600, self_service_max=timedelta(days=90))
        await store.start()
        for token in (self_token, sso_token):
            with pytest.raises(AuthenticationFailed, match="expired"):
                await store.authenticate(f"Bearer {token}")
        await store.authenticate(f"Bearer {admin_token}")
        await store.stop()

    asyncio.run(scenario())
