"""Keys shared by replicas: on a shared (PostgreSQL) database no key is invented at start; a
replica without them, or with a master key that does not unwrap the stored team keys, stops
at start with a clear message instead of answering 503 later. `bastion secrets init` makes the
set every replica and CLI host is given."""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from bastion.app import build_app
from bastion.audit import store
from bastion.audit.chain import public_key_hex
from bastion.audit.crypto import MasterKey
from bastion.audit.keys import MASTER_KEY_ENV, SIGNING_KEY_ENV, load_master_key, load_signing_key
from bastion.audit.settings import AuditSettings
from bastion.config import parse_settings
from bastion.core.errors import DeploymentError
from bastion.identity.sessions import SESSION_KEY_ENV, load_session_key
from bastion.identity.settings import IdentitySettings
from bastion.store.db import make_engine
from tests.conftest import pg_database

KEY_ENVS = (MASTER_KEY_ENV, SIGNING_KEY_ENV, SESSION_KEY_ENV)


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in KEY_ENVS}


def _files(d: Path) -> dict[str, Any]:
    return {
        "audit": {
            "master_key_file": str(d / "audit-master.key"),
            "signing_key": str(d / "audit-signing.key"),
            "wal_dir": str(d / "wal"),
            "anchor_dir": str(d / "anchor"),
        },
        "identity": {"session_key_file": str(d / "session.key")},
    }


def test_secrets_init_writes_a_shared_set_once(tmp_path: Path) -> None:
    out_dir = tmp_path / "secret"
    cmd = [sys.executable, "-m", "bastion.cli", "secrets", "init", "--dir", str(out_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_clean_env())
    assert done.returncode == 0, done.stderr
    for name in ("audit-master.key", "audit-signing.key", "session.key"):
        assert stat.S_IMODE((out_dir / name).stat().st_mode) == 0o600
    # The signing key is stored wrapped: no private key in clear on disk.
    assert b"PRIVATE" not in (out_dir / "audit-signing.key").read_bytes()
    a = AuditSettings(**_files(out_dir)["audit"])
    key, created = load_signing_key(a, load_master_key(a, create=False), create=False)
    assert not created and public_key_hex(key) in done.stdout
    ident = IdentitySettings(**_files(out_dir)["identity"])
    assert len(load_session_key(ident, create=False)) == 32
    before = (out_dir / "audit-master.key").read_bytes()
    again = subprocess.run(cmd, capture_output=True, text=True, env=_clean_env())
    assert again.returncode == 2 and "not replaced" in again.stderr
    assert (out_dir / "audit-master.key").read_bytes() == before


@pytest.mark.postgres
def test_a_replica_without_the_keys_stops_at_start_and_creates_none(
    pg_url: str, tmp_path: Path
) -> None:
    cfg = tmp_path / "b.yaml"
    cfg.write_text(yaml.safe_dump({"database": {"url": pg_url}, **_files(tmp_path / "keys")}))
    done = subprocess.run(
        [sys.executable, "-m", "bastion.cli", "serve", "--config", str(cfg), "--port", "1"],
        capture_output=True, text=True, env=_clean_env(), cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "no audit master key" in done.stderr and MASTER_KEY_ENV in done.stderr
    assert "bastion secrets init" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "keys").exists() and not (tmp_path / "var").exists()


@pytest.mark.postgres
def test_keys_given_by_files_or_env_start_and_a_foreign_master_key_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pg_database() as url:  # its own: the shared one holds team keys of the suite's key
        _given_keys_start_and_a_foreign_master_key_is_refused(url, tmp_path, monkeypatch)


def _given_keys_start_and_a_foreign_master_key_is_refused(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k in KEY_ENVS:
        monkeypatch.delenv(k, raising=False)
    keys = tmp_path / "keys"
    cmd = [sys.executable, "-m", "bastion.cli", "secrets", "init", "--dir", str(keys)]
    subprocess.run(cmd, check=True, capture_output=True, env=_clean_env())
    raw = {"database": {"url": pg_url}, **_files(keys)}
    settings = parse_settings(raw)
    build_app(settings)  # the given files: starts, and writes no key of its own
    assert sorted(p.name for p in keys.iterdir() if p.is_file()) == [
        "audit-master.key", "audit-signing.key", "session.key",
    ]  # fmt: skip

    # A team key wrapped by the deployment's master key is in the shared database...
    engine = make_engine(pg_url)
    store.current_key(engine, "alpha", load_master_key(settings.audit, create=False))
    # ...so a replica given another master key (by env) would fail every recorded request.
    monkeypatch.setenv(MASTER_KEY_ENV, base64.b64encode(os.urandom(32)).decode())
    with pytest.raises(DeploymentError, match="does not unwrap the team keys"):
        build_app(settings)
    monkeypatch.setenv(MASTER_KEY_ENV, (keys / "audit-master.key").read_text().strip())
    build_app(settings)  # the same key by env: fine
    assert isinstance(load_master_key(settings.audit, create=False), MasterKey)
    engine.dispose()


def test_a_missing_session_key_is_created_only_when_allowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(SESSION_KEY_ENV, raising=False)
    ident = IdentitySettings(session_key_file=str(tmp_path / "s" / "session.key"))
    with pytest.raises(DeploymentError, match=SESSION_KEY_ENV):
        load_session_key(ident, create=False)
    assert not (tmp_path / "s").exists()
    assert len(load_session_key(ident, create=True)) == 32  # the embedded database's default
    monkeypatch.setenv(SESSION_KEY_ENV, base64.b64encode(b"k" * 32).decode())
    assert load_session_key(ident, create=False) == b"k" * 32


def test_replica_id_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A StatefulSet gives each pod a stable name: BASTION_REPLICA_ID=$(metadata.name)."""
    monkeypatch.setenv("BASTION_REPLICA_ID", "bastion-2")
    assert parse_settings({}).audit.replica == "bastion-2"
    monkeypatch.setenv("BASTION_REPLICA_ID", "bad id/../x")
    with pytest.raises(Exception, match="replica"):
        parse_settings({})


@pytest.mark.postgres
def test_a_cli_host_never_invents_a_signing_key(pg_url: str, tmp_path: Path) -> None:
    """Its recorded changes would be signed by a key `audit verify` elsewhere does not trust."""
    raw = {
        "database": {"url": pg_url},
        "cost_centers": {"cc": {"name": "Retail"}},
        "teams": {"alpha": {"cost_center": "cc"}},
        **_files(tmp_path / "keys"),
    }
    cfg = tmp_path / "b.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "bastion.cli", "keys", "create", "--team", "alpha"]
    done = subprocess.run(
        [*cmd, "--config", str(cfg)], capture_output=True, text=True, env=_clean_env(), cwd=tmp_path
    )
    assert done.returncode == 2 and "no audit master key" in done.stderr, done.stderr
    assert "bst-" not in done.stdout  # nothing was made: the change could not be recorded
    assert not (tmp_path / "keys").exists() and not (tmp_path / "var").exists()
