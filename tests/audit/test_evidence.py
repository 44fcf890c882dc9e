"""What an insider with write access to the database (or to an export) cannot do unnoticed:
re-attribute entries, cut a chain's tail with its checkpoints, delete or add a whole chain,
remove sealed contents without a purge, doctor an export's plaintext, or undo a shred by
restoring a backup. Each case tampers with a real stored trail and runs the real verifier."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from bastion.app import build_app
from bastion.audit import reader, store
from bastion.audit.chain import Chain, Verdict
from bastion.audit.keys import load_master_key
from bastion.audit.verify import trusted_keys, verify_file, verify_store
from bastion.config import Settings, parse_settings
from bastion.identity.keys import create_key
from bastion.store.schema import audit_checkpoints, audit_entries, audit_keys
from tests.conftest import audit_config
from tests.stub_engine import StubEngine

ADMIN = "evidence-admin-key-0123456789"
CHAT = {"model": "stub", "messages": [{"role": "user", "content": "the quarterly numbers"}]}


@pytest.fixture(scope="module")
def stub() -> Iterator[StubEngine]:
    s = StubEngine().start()
    yield s
    s.stop()


def _settings(stub: StubEngine, tmp: Path) -> Settings:
    return parse_settings(
        {
            "database": {"url": f"sqlite:///{tmp}/a.db", "usage_flush_seconds": 0.05},
            "admin": {"key": ADMIN},
            "identity": {"key_refresh_seconds": 0.2},
            "audit": audit_config(tmp, replica="gw", checkpoint_entries=4),
            "cost_centers": {"cc": {}},
            "teams": {"t": {"cost_center": "cc"}, "u": {"cost_center": "cc"}},
            "models": {"stub": {"deployments": [{"url": stub.url, "served_name": "served"}]}},
        }
    )


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def trail(stub: StubEngine, tmp_path: Path) -> tuple[Settings, sa.Engine]:
    """A stored trail of 10 requests by two teams; the gateway has stopped (final checkpoint
    signed and anchored)."""
    settings = _settings(stub, tmp_path)
    c = TestClient(build_app(settings, port=1))
    with c:
        db = c.app.state.db  # type: ignore[attr-defined]
        keys = [create_key(db, team=t, user=f"{t}-user", known_models={"stub"})[1] for t in "tu"]
        for i in range(10):
            r = c.post("/v1/chat/completions", json=CHAT, headers=_auth(keys[i % 2]))
            assert r.status_code == 200
    return settings, sa.create_engine(f"sqlite:///{tmp_path}/a.db")


def _verify(settings: Settings, db: sa.Engine) -> Verdict:
    a = settings.audit
    return verify_store(
        db,
        trusted_keys(a),
        anchor_dir=Path(a.anchor_dir),  # type: ignore[arg-type]
        max_unsigned_seconds=a.max_unsigned_seconds,
    )


def _rows(db: sa.Engine, replica: str = "gw") -> list[Any]:
    t = audit_entries
    with db.connect() as conn:
        return conn.execute(sa.select(t).where(t.c.replica == replica).order_by(t.c.seq)).all()


def test_intact_trail_verifies_against_the_anchor(trail: tuple[Settings, sa.Engine]) -> None:
    settings, db = trail
    verdict = _verify(settings, db)
    assert verdict.ok, verdict
    assert verdict.anchored_heads >= 1 and verdict.unsigned == 0


def test_reattributed_columns_are_found(trail: tuple[Settings, sa.Engine]) -> None:
    """Every request entry of team t moved to team u and user mallory, in the columns only
    (searches by team and user read the columns)."""
    settings, db = trail
    t = audit_entries
    with db.begin() as conn:
        conn.execute(t.update().where(t.c.team == "t").values(team="u", user="mallory"))
    verdict = _verify(settings, db)
    assert not verdict.ok and "re-attributed" in str(verdict.reason), verdict
    first_t = next(r for r in _rows(db) if orjson.loads(r.doc).get("team") == "t")
    assert verdict.seq == first_t.seq


def test_a_cut_tail_is_found_even_with_its_checkpoints_gone(
    trail: tuple[Settings, sa.Engine],
) -> None:
    settings, db = trail
    rows = _rows(db)
    cut = rows[-6].seq
    with db.begin() as conn:
        conn.execute(audit_entries.delete().where(audit_entries.c.seq >= cut))
        conn.execute(audit_checkpoints.delete().where(audit_checkpoints.c.seq >= cut))
    verdict = _verify(settings, db)
    assert not verdict.ok and "truncated" in str(verdict.reason), verdict
    assert (verdict.replica, verdict.seq) == ("gw", cut)


def test_a_deleted_chain_is_found(trail: tuple[Settings, sa.Engine]) -> None:
    settings, db = trail
    with db.begin() as conn:
        conn.execute(audit_entries.delete().where(audit_entries.c.replica == "gw"))
        conn.execute(audit_checkpoints.delete().where(audit_checkpoints.c.replica == "gw"))
    verdict = _verify(settings, db)
    assert not verdict.ok and "whole chain is missing" in str(verdict.reason), verdict
    assert verdict.replica == "gw"


def test_an_added_chain_is_found(trail: tuple[Settings, sa.Engine]) -> None:
    """A forged replica's chain, hashed and linked correctly, back-dated an hour."""
    settings, db = trail
    chain, ts = Chain("gw-2"), datetime.now(UTC) - timedelta(hours=1)
    rows = []
    for i in range(3):
        e = chain.append(
            {
                "kind": "request",
                "request_id": f"req_forged_{i}",
                "team": "t",
                "user": "mallory",
                "ts": (ts + timedelta(seconds=i)).isoformat(),
            }
        )
        rows.append(store.entry_row(e))
    with db.begin() as conn:
        conn.execute(audit_entries.insert(), rows)
    verdict = _verify(settings, db)
    assert not verdict.ok and verdict.replica == "gw-2", verdict
    assert "not in the newest signed manifest" in str(verdict.reason)


def test_the_key_file_next_to_the_data_is_not_trusted(trail: tuple[Settings, sa.Engine]) -> None:
    settings, _db = trail
    assert Path(settings.audit.signing_key).exists()
    alone = settings.audit.model_copy(update={"trusted_public_keys": []})
    assert trusted_keys(alone) == []  # only configured keys, or --public-key
    assert trusted_keys(alone, "ab" * 32) == ["ab" * 32]


def test_nulled_content_is_not_a_purge(trail: tuple[Settings, sa.Engine]) -> None:
    settings, db = trail
    victim = next(r for r in _rows(db) if r.content is not None)
    t = audit_entries
    with db.begin() as conn:
        conn.execute(
            t.update()
            .where((t.c.replica == "gw") & (t.c.seq == victim.seq))
            .values(content=None, purged_at=datetime.now(UTC))
        )
    verdict = _verify(settings, db)
    assert not verdict.ok and "without a recorded purge" in str(verdict.reason), verdict
    assert verdict.seq == victim.seq


def _export(settings: Settings, db: sa.Engine, path: Path, team: str | None = None) -> list[Any]:
    wrapper = load_master_key(settings.audit, create=False)
    lines = reader.export(db, wrapper, trusted_keys(settings.audit), team=team)
    path.write_bytes(b"".join(lines))
    return [orjson.loads(x) for x in path.read_bytes().splitlines()]


def test_an_exports_plaintext_is_bound_to_its_entry(
    trail: tuple[Settings, sa.Engine], tmp_path: Path
) -> None:
    settings, db = trail
    path = tmp_path / "export.jsonl"
    lines = _export(settings, db, path, team="t")
    header = lines[0]["export"]
    assert (header["format"], header["version"]) == ("bastion-audit-export", 1)
    assert verify_file(path, trusted_keys(settings.audit)).ok
    mine = next(x for x in lines if x.get("plaintext") and x["entry"]["kind"] == "request")
    assert any(x.get("withheld") for x in lines)  # team u's contents left out, on purpose
    mine["plaintext"]["messages"][0]["content"] = "transfer everything to mallory"
    path.write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in lines))
    verdict = verify_file(path, trusted_keys(settings.audit))
    assert not verdict.ok and "plaintext does not match" in str(verdict.reason), verdict
    assert verdict.seq == mine["entry"]["seq"]


def test_the_signing_key_is_stored_wrapped(trail: tuple[Settings, sa.Engine]) -> None:
    settings, _db = trail
    data = Path(settings.audit.signing_key).read_bytes()
    assert b"PRIVATE KEY" not in data
    assert orjson.loads(data)["format"] == "bastion-audit-signing-key"


def test_shredding_survives_a_database_backup(stub: StubEngine, tmp_path: Path) -> None:
    """A backup taken before the shred, restored afterwards with the (current) master key,
    does not bring team t's contents back; team u's stay readable."""
    settings = _settings(stub, tmp_path)
    c = TestClient(build_app(settings, port=1))
    with c:
        db = c.app.state.db  # type: ignore[attr-defined]
        for team in "tu":
            key = create_key(db, team=team, known_models={"stub"})[1]
            assert c.post("/v1/chat/completions", json=CHAT, headers=_auth(key)).status_code == 200
        with db.connect() as conn:
            backup = conn.execute(sa.select(audit_keys)).all()
        old_master = Path(settings.audit.master_key_file).read_bytes()
        asker = create_key(db, team="u", known_models=set(), role="admin")[1]
        asked = c.post("/admin/audit/shred", json={"team": "t"}, headers=_auth(asker))
        assert asked.status_code == 202, asked.text
        r = c.post(f"/admin/approvals/{asked.json()['id']}/approve", headers=_auth(ADMIN))
        assert r.status_code == 200 and r.json()["result"]["master_key_rotated"] is True, r.text
    assert Path(settings.audit.master_key_file).read_bytes() != old_master
    db = sa.create_engine(f"sqlite:///{tmp_path}/a.db")
    assert _opened(settings, db) == {"t": False, "u": True}  # u's key was re-wrapped
    with db.begin() as conn:  # the restore brings t's wrapped key back...
        conn.execute(audit_keys.delete().where(audit_keys.c.team == "t"))
        conn.execute(audit_keys.insert(), [r._asdict() for r in backup if r.team == "t"])
    assert _opened(settings, db) == {"t": False, "u": True}  # ...but nothing unwraps it
    assert _verify(settings, db).ok


def _opened(settings: Settings, db: sa.Engine) -> dict[str, bool]:
    """Per team, whether its request content opens with the master key now in force."""
    dec = reader.Decryptor(db, load_master_key(settings.audit, create=False))
    out = {}
    for row in _rows(db):
        entry = store.row_entry(row)
        if entry.get("kind") == "request" and entry.get("team"):
            out[entry["team"]] = dec.content(entry, row.content)["content"] is not None
    return out


def _conforms(value: Any, schema: dict[str, Any], defs: dict[str, Any]) -> bool:
    """The subset of JSON Schema the evidence schema uses (no validator is a dependency)."""
    import re

    if "$ref" in schema:
        return _conforms(value, defs[schema["$ref"].rsplit("/", 1)[1]], defs)
    if "const" in schema and value != schema["const"]:
        return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    if "pattern" in schema and not re.fullmatch(schema["pattern"], str(value)):
        return False
    if schema.get("type") == "object":
        if not isinstance(value, dict) or not set(schema.get("required", ())) <= set(value):
            return False
        props = schema.get("properties", {})
        if schema.get("additionalProperties") is False and set(value) - set(props):
            return False
        extra = schema.get("additionalProperties")
        return all(
            _conforms(v, props.get(k, extra), defs)
            for k, v in value.items()
            if k in props or isinstance(extra, dict)
        )
    return True


def test_exports_and_anchors_follow_the_published_schema(
    trail: tuple[Settings, sa.Engine], tmp_path: Path
) -> None:
    from importlib.resources import files

    schema = orjson.loads(files("bastion.audit").joinpath("evidence.schema.json").read_bytes())
    settings, db = trail
    lines = _export(settings, db, tmp_path / "export.jsonl")
    anchor_dir = Path(settings.audit.anchor_dir)  # type: ignore[arg-type]
    lines += [orjson.loads(x) for p in anchor_dir.glob("*.jsonl") for x in p.read_bytes().split()]
    assert {next(iter(x)) for x in lines} == {"export", "entry", "checkpoint", "manifest"}
    for line in lines:
        matches = [b for b in schema["oneOf"] if _conforms(line, b, schema["$defs"])]
        assert len(matches) == 1, line


def test_master_key_rotation_is_recorded_and_survives_a_crash(
    trail: tuple[Settings, sa.Engine], tmp_path: Path
) -> None:
    import subprocess
    import sys

    from bastion.audit.keys import _rewrap, rotate_master_key

    settings, db = trail
    a = settings.audit
    before = _opened(settings, db)
    assert before == {"t": True, "u": True}
    # A rotation cut short after re-wrapping the data keys, before replacing the key file:
    # both keys unwrap meanwhile, and running it again finishes it.
    pending = Path(a.master_key_file + ".next")
    pending.write_text(base64.b64encode(os.urandom(32)).decode())
    _rewrap(db, load_master_key(a, create=False), None)
    assert _opened(settings, db) == before
    rotate_master_key(a, db)
    assert not pending.exists() and _opened(settings, db) == before
    old = Path(a.master_key_file).read_bytes()
    cfg = tmp_path / "bastion.yaml"
    cfg.write_text(orjson.dumps(settings.model_dump(mode="json")).decode())
    done = subprocess.run(
        [sys.executable, "-m", "bastion.cli", "audit", "rotate-master-key", "-c", str(cfg)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert Path(a.master_key_file).read_bytes() != old and _opened(settings, db) == before
    actions = [orjson.loads(r.doc).get("action") for r in _rows(db, _cli_replica(db))]
    assert actions[-1] == "audit.rotate_master_key"
    assert _verify(settings, db).ok


def _cli_replica(db: sa.Engine) -> str:
    with db.connect() as conn:
        q = sa.select(audit_entries.c.replica).where(audit_entries.c.replica.like("cli-%"))
        return str(conn.execute(q).scalar())


def test_a_clear_signing_key_is_wrapped_in_place(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
    )

    from bastion.audit.chain import public_key_hex
    from bastion.audit.keys import load_signing_key
    from bastion.audit.settings import AuditSettings

    a = AuditSettings(signing_key=str(tmp_path / "s.pem"), master_key_file=str(tmp_path / "m.key"))
    legacy = Ed25519PrivateKey.generate()
    pem = legacy.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    Path(a.signing_key).write_bytes(pem)
    key, created = load_signing_key(a, load_master_key(a))
    assert not created and public_key_hex(key) == public_key_hex(legacy)
    assert b"PRIVATE KEY" not in Path(a.signing_key).read_bytes()
    again, _ = load_signing_key(a, load_master_key(a))
    assert public_key_hex(again) == public_key_hex(legacy)
    Path(a.master_key_file).write_text(base64.b64encode(os.urandom(32)).decode())
    with pytest.raises(Exception, match="does not unwrap"):
        load_signing_key(a, load_master_key(a))  # useless without the master key


def test_a_recorded_purge_verifies_in_the_store_and_in_exports(
    trail: tuple[Settings, sa.Engine], tmp_path: Path
) -> None:
    from bastion.audit.offline import cli_recorder
    from bastion.core.changes import recorded_change_sync

    settings, db = trail
    cutoffs = store.purge_cutoffs(db, {"u": 1}, now=datetime.now(UTC) + timedelta(days=2))
    assert set(cutoffs) == {"u"}  # only u has a retention here
    with recorded_change_sync(
        cli_recorder(settings, db), "test", "audit.purge", after={"cutoffs": cutoffs}
    ):
        assert store.purge(db, cutoffs)["u"] >= 5
    assert _verify(settings, db).ok
    lines = _export(settings, db, tmp_path / "export.jsonl")
    assert sum(bool(x.get("purged")) for x in lines) >= 5
    assert verify_file(tmp_path / "export.jsonl", trusted_keys(settings.audit)).ok
    # Contents of t, newer than any recorded cutoff of t, removed the same way: not a purge.
    with db.begin() as conn:
        conn.execute(audit_entries.update().where(audit_entries.c.team == "t").values(content=None))
    assert "without a recorded purge" in str(_verify(settings, db).reason)


def test_a_team_data_key_rotates_and_old_contents_stay_readable(
    stub: StubEngine, tmp_path: Path
) -> None:
    import subprocess
    import sys
    import time

    settings = _settings(stub, tmp_path)
    cfg = tmp_path / "bastion.yaml"
    cfg.write_text(orjson.dumps(settings.model_dump(mode="json")).decode())
    c = TestClient(build_app(settings, port=1))
    with c:
        db = c.app.state.db  # type: ignore[attr-defined]
        key = create_key(db, team="t", known_models={"stub"})[1]
        assert c.post("/v1/chat/completions", json=CHAT, headers=_auth(key)).status_code == 200
        rotate = ["audit", "rotate-team-key", "--team", "t", "-c", str(cfg)]
        done = subprocess.run(
            [sys.executable, "-m", "bastion.cli", *rotate],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        new_id = orjson.loads(done.stdout)["key"]
        time.sleep(0.6)  # the gateway's key refresh
        assert c.post("/v1/chat/completions", json=CHAT, headers=_auth(key)).status_code == 200
    db = sa.create_engine(f"sqlite:///{tmp_path}/a.db")
    sealed = [orjson.loads(r.doc) for r in _rows(db) if r.content is not None]
    ids = [e["content_key"] for e in sealed if e["kind"] == "request"]
    assert len(ids) == 2 and ids[0] != ids[1] == new_id
    dec = reader.Decryptor(db, load_master_key(settings.audit, create=False))
    assert all(
        dec.content(store.row_entry(r), r.content)["content"] for r in _rows(db) if r.content
    )
    actions = [orjson.loads(r.doc).get("action") for r in _rows(db, _cli_replica(db))]
    assert "audit.rotate_team_key" in actions and _verify(settings, db).ok


def test_a_doctored_anchor_is_refused(trail: tuple[Settings, sa.Engine]) -> None:
    from bastion.audit.anchor import AnchorError

    settings, db = trail
    path = next(Path(settings.audit.anchor_dir).glob("*.jsonl"))  # type: ignore[arg-type]
    lines = [orjson.loads(x) for x in path.read_bytes().split()]
    for replica in lines[-1]["manifest"]["replicas"].values():
        replica["seq"] -= 1  # pretend the chain ended earlier (to hide a cut tail)
    path.write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in lines))
    with pytest.raises(AnchorError, match="signature is invalid"):
        _verify(settings, db)
