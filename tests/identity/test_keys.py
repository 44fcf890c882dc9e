"""Key lifecycle through the CLI and the store, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from bastion.config import parse_settings
from bastion.core.errors import AuthenticationFailed
from bastion.identity.keys import KeyStore, create_key, list_keys, revoke_key
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
