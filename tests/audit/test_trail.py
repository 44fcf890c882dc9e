"""The audit trail on the request path, in-process in front of a stub engine (fast paths and
failure injection); the real-engine and crash tests are in test_audit_e2e.py."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from bastion.app import build_app
from bastion.audit import store
from bastion.audit.chain import entry_hash
from bastion.audit.verify import trusted_keys, verify_store
from bastion.config import Settings, parse_settings
from bastion.core.settings import LimitSettings
from bastion.identity.keys import create_key
from bastion.store.schema import audit_entries
from tests.conftest import audit_config
from tests.stub_engine import StubEngine

ADMIN = "audit-admin-key-0123456789"
CHAT = {"model": "stub", "messages": [{"role": "user", "content": "card 4111 1111 1111 1111"}]}


@pytest.fixture(scope="module")
def stub() -> Iterator[StubEngine]:
    s = StubEngine().start()
    yield s
    s.stop()


def make(stub: StubEngine, tmp: Path, **audit: Any) -> tuple[TestClient, Settings]:
    settings = parse_settings(
        {
            "database": {"url": f"sqlite:///{tmp}/a.db", "usage_flush_seconds": 0.05},
            "admin": {"key": ADMIN},
            "identity": {"key_refresh_seconds": 0.2},
            "audit": audit_config(tmp, checkpoint_entries=4, **audit),
            "cost_centers": {"cc": {}},
            "teams": {"t": {"cost_center": "cc"}, "u": {"cost_center": "cc"}},
            "models": {"stub": {"deployments": [{"url": stub.url, "served_name": "served"}]}},
        }
    )
    return TestClient(build_app(settings, port=1)), settings


@pytest.fixture
def env(stub: StubEngine, tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str], Settings]]:
    c, settings = make(stub, tmp_path, redact=["card"])
    with c:
        db = c.app.state.db  # type: ignore[attr-defined]
        keys = {
            "member": create_key(db, team="t", user="alice", known_models={"stub"})[1],
            "other": create_key(db, team="u", user="bob", known_models={"stub"})[1],
            "auditor": create_key(db, team="t", user="carol", known_models=set(), role="auditor")[
                1
            ],
        }
        yield c, keys, settings


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def entries(c: TestClient, timeout: float = 5.0, **where: Any) -> list[Any]:
    """Stored entries matching `where`, waiting for the shipper."""
    db = c.app.state.db  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout
    while True:
        q = sa.select(audit_entries).order_by(audit_entries.c.seq)
        for k, v in where.items():
            q = q.where(audit_entries.c[k] == v)
        with db.connect() as conn:
            rows = conn.execute(q).all()
        if rows or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def _until(fn: Any, timeout: float = 5.0) -> Any:
    """fn() once it is truthy (the store trails the log by the shipper's pace)."""
    deadline = time.monotonic() + timeout
    while not (value := fn()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return value


def _show(c: TestClient, auditor: str, rid: str) -> list[dict[str, Any]]:
    """The request's entries once both are in the store."""

    def get() -> list[dict[str, Any]]:
        r = c.get(f"/audit/requests/{rid}", headers=_auth(auditor))
        return r.json()["entries"] if r.status_code == 200 and len(r.json()["entries"]) > 1 else []

    return _until(get)  # type: ignore[no-any-return]


def test_request_and_answer_are_recorded_sealed_and_readable_by_auditors(env, stub) -> None:  # type: ignore[no-untyped-def]
    c, keys, _ = env
    r = c.post("/v1/chat/completions", json=CHAT, headers=_auth(keys["member"]))
    assert r.status_code == 200
    rid = r.headers["x-request-id"]
    rows = entries(c, request_id=rid)
    while len(rows) < 2:
        rows = entries(c, request_id=rid)
    req, done = (orjson.loads(row.doc) for row in rows)
    assert req["kind"] == "request" and done["kind"] == "completion"
    assert (req["team"], req["user"], req["model"], req["source"]) == (
        "t",
        "alice",
        "stub",
        "testclient",
    )
    assert done["status"] == 200 and done["engine_model"] == "served"
    assert (done["prompt_tokens"], done["completion_tokens"]) == (5, 1)
    assert req["seq"] < done["seq"] and req["ts"] <= done["ts"]
    # Sealed at rest: neither the prompt nor the answer is in the stored bytes. (Markers long
    # enough that random ciphertext or hex digests never hold them by chance: `b"hi"` in a few
    # hundred random bytes, or "4111" among the hashes, made this test fail about one run in 60.)
    for row in rows:
        assert b"4111 1111" not in row.content and b"[CARD]" not in row.content
        assert b'"messages"' not in row.content and b'"response"' not in row.content
        assert "4111 1111" not in row.doc and "[CARD]" not in row.doc
    # The engine got the original; the stored copy is redacted.
    assert "4111 1111 1111 1111" in stub.requests[-1]["messages"][0]["content"]
    shown = {"entries": _show(c, keys["auditor"], rid)}
    contents = [e["content"] for e in shown["entries"]]
    assert contents[0]["messages"][0]["content"] == "card [CARD]"
    assert shown["entries"][0]["redactions"] == {"card": 1}
    assert contents[1]["response"]["choices"][0]["message"]["content"] == "hi"


def test_rejected_requests_are_recorded(env) -> None:  # type: ignore[no-untyped-def]
    c, keys, _ = env
    r = c.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 401
    (row,) = entries(c, request_id=r.headers.get("x-request-id"))
    doc = orjson.loads(row.doc)
    assert (doc["kind"], doc["status"], doc["error_code"]) == ("rejected", 401, "invalid_api_key")
    assert row.content is None  # nobody to attribute it to: metadata only
    r = c.post(
        "/v1/chat/completions", json={**CHAT, "model": "nope"}, headers=_auth(keys["member"])
    )
    assert r.status_code == 404
    (row,) = entries(c, request_id=r.headers["x-request-id"])
    assert orjson.loads(row.doc)["kind"] == "rejected" and row.content is not None


def test_a_request_refused_by_its_limits_is_recorded_and_not_forwarded(env, stub) -> None:  # type: ignore[no-untyped-def]
    """Its request entry is made durable while the limits are asked (two waits at once), so a
    refusal closes it with a completion entry: 429, nothing forwarded."""
    c, _keys, _ = env
    db = c.app.state.db  # type: ignore[attr-defined]
    key = create_key(db, team="t", user="dave", known_models={"stub"}, limits=LimitSettings(rpm=1))[
        1
    ]
    assert c.post("/v1/chat/completions", json=CHAT, headers=_auth(key)).status_code == 200
    served = len(stub.requests)
    r = c.post("/v1/chat/completions", json=CHAT, headers=_auth(key))
    assert r.status_code == 429 and len(stub.requests) == served  # the engine never saw it
    rid = r.headers["x-request-id"]
    rows = _until(lambda: entries(c, request_id=rid) if len(entries(c, request_id=rid)) > 1 else [])
    docs = [orjson.loads(row.doc) for row in rows]
    assert [d["kind"] for d in docs] == ["request", "completion"]
    done = docs[1]
    assert (done["status"], done["error_code"], done["aborted"]) == (
        429,
        "rate_limit_exceeded",
        False,
    )
    assert done["deployment"] is None and rows[1].content is not None  # the refusal, sealed


def test_only_auditors_read_and_every_read_is_recorded(env) -> None:  # type: ignore[no-untyped-def]
    c, keys, _ = env
    c.post("/v1/chat/completions", json=CHAT, headers=_auth(keys["member"]))
    for headers, status in (
        (_auth(keys["member"]), 403),
        (_auth(ADMIN), 401),  # the admin key administers; it does not read prompts
        ({}, 401),
    ):
        assert c.get("/audit/entries", headers=headers).status_code == status
    r = c.post("/v1/chat/completions", json=CHAT, headers=_auth(keys["auditor"]))
    assert r.status_code == 403 and r.json()["error"]["code"] == "role_not_allowed"
    found = _until(
        lambda: c.get(
            "/audit/entries", params={"q": "[CARD]"}, headers=_auth(keys["auditor"])
        ).json()["data"]
    )
    assert found and all(e["team"] == "t" for e in found)
    reads = _until(lambda: [orjson.loads(r.doc) for r in entries(c, kind="read")])
    from bastion.identity.keys import list_keys

    carol = next(k.id for k in list_keys(c.app.state.db) if k.user == "carol")  # type: ignore[attr-defined]
    # The reader as authenticated: the key's id, not the `user` label its creator typed.
    assert reads[0]["actor"] == carol and reads[0]["query"]["text"] == "[CARD]"
    bad = c.get("/audit/entries", params={"since": "yesterday"}, headers=_auth(keys["auditor"]))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "since"


def test_fails_closed_when_the_log_cannot_be_written(env, stub) -> None:  # type: ignore[no-untyped-def]
    c, keys, _ = env
    trail = c.app.state.audit  # type: ignore[attr-defined]
    before = len(stub.requests)
    trail.wal.broken = __import__("bastion.audit.wal").audit.wal.AuditLogError("disk gone")
    r = c.post("/v1/chat/completions", json=CHAT, headers=_auth(keys["member"]))
    assert r.status_code == 503 and r.json()["error"]["code"] == "audit_unavailable"
    assert len(stub.requests) == before  # nothing forwarded
    assert 'bastion_audit_failures_total{action="refused"} 1.0' in c.get("/metrics").text
    trail.wal.broken = None


def test_fail_open_forwards_and_reports_it(stub: StubEngine, tmp_path: Path) -> None:
    c, _ = make(stub, tmp_path, on_failure="open")
    with c:
        key = create_key(c.app.state.db, team="t", known_models={"stub"})[1]  # type: ignore[attr-defined]
        from bastion.audit.wal import AuditLogError

        c.app.state.audit.wal.broken = AuditLogError("disk gone")  # type: ignore[attr-defined]
        r = c.post("/v1/chat/completions", json=CHAT, headers=_auth(key))
        assert r.status_code == 200
        assert 'bastion_audit_failures_total{action="forwarded"}' in c.get("/metrics").text
        c.app.state.audit.wal.broken = None  # type: ignore[attr-defined]


def test_hold_shred_and_purge(env) -> None:  # type: ignore[no-untyped-def]
    c, keys, settings = env
    rid = c.post("/v1/chat/completions", json=CHAT, headers=_auth(keys["member"])).headers[
        "x-request-id"
    ]
    other = c.post("/v1/chat/completions", json=CHAT, headers=_auth(keys["other"])).headers[
        "x-request-id"
    ]
    admin = _auth(ADMIN)
    db = c.app.state.db  # type: ignore[attr-defined]
    # Releasing and shredding: one administrator asks, a second person approves.
    asker = _auth(create_key(db, team="u", known_models=set(), role="admin")[1])
    assert (
        c.post(
            "/admin/audit/holds", json={"team": "t", "reason": "case 42"}, headers=admin
        ).status_code
        == 201
    )
    r = c.post("/admin/audit/shred", json={"team": "t"}, headers=asker)
    assert r.status_code == 409 and r.json()["error"]["code"] == "legal_hold"
    released = c.delete("/admin/audit/holds/t", headers=asker)
    assert released.status_code == 202 and released.json()["action"] == "audit.release"
    assert c.post(f"/admin/approvals/{released.json()['id']}/approve", headers=admin).json()[
        "result"
    ] == {"team": "t", "released": True}
    asked = c.post("/admin/audit/shred", json={"team": "t"}, headers=asker)
    assert asked.status_code == 202 and store.holds(db) == []
    own = c.post(f"/admin/approvals/{asked.json()['id']}/approve", headers=asker)
    assert own.status_code == 403  # not by the one who asked (nor by any API key)
    shred = c.post(f"/admin/approvals/{asked.json()['id']}/approve", headers=admin)
    assert shred.status_code == 200 and shred.json()["result"]["destroyed_keys"] == 1
    show = _show(c, keys["auditor"], rid)
    assert all(e["content"] is None and "shredded" in e["content_unavailable"] for e in show)
    show = _show(c, keys["auditor"], other)
    assert show[0]["content"]["messages"]  # team u untouched
    # Team t goes on working under a fresh key, readable again.
    new = c.post("/v1/chat/completions", json=CHAT, headers=_auth(keys["member"])).headers[
        "x-request-id"
    ]
    assert _show(c, keys["auditor"], new)[0]["content"]
    # Retention: contents past it are dropped; metadata stays.
    purged = _purge(settings, db, now=datetime.now(UTC) + timedelta(days=2))
    assert purged.get("u", 0) >= 2
    show = _show(c, keys["auditor"], other)
    assert show[0]["content"] is None and "purged" in show[0]["content_unavailable"]
    admin_actions = [orjson.loads(r.doc)["action"] for r in entries(c, kind="admin")]
    assert {"audit.hold", "audit.release.approved", "audit.shred.approved"} <= set(admin_actions)
    verdict = verify_store(db, trusted_keys(settings.audit))
    assert verdict.ok, verdict  # shredding and purging leave every hash verifiable


def _purge(settings: Settings, db: sa.Engine, now: datetime) -> dict[str, int]:
    """A purge as the CLI makes it: its cutoffs recorded first, then the contents dropped."""
    from bastion.audit.offline import cli_recorder
    from bastion.core.changes import recorded_change_sync

    cutoffs = store.purge_cutoffs(db, {None: 1}, now=now)
    with recorded_change_sync(
        cli_recorder(settings, db), "test", "audit.purge", after={"cutoffs": cutoffs}
    ):
        return store.purge(db, cutoffs)


def _tamper(db: sa.Engine, how: str) -> int:
    """Alters the stored trail as an insider with database access would; returns the seq hit."""
    t = audit_entries
    with db.begin() as conn:
        rows = conn.execute(sa.select(t).where(t.c.replica == "gw").order_by(t.c.seq)).all()
        victim = rows[5]
        doc = orjson.loads(victim.doc)
        where = (t.c.replica == "gw") & (t.c.seq == victim.seq)
        if how == "edited":
            doc["user"] = "mallory"
            conn.execute(t.update().where(where).values(doc=orjson.dumps(doc).decode()))
        elif how == "content":
            conn.execute(t.update().where(where).values(content=rows[6].content))
        elif how == "deleted":
            conn.execute(t.delete().where(where))
        elif how == "inserted":
            # A forged entry, correctly hashed and linked, slipped in at seq 6; the later ones
            # renumbered and re-hashed to make room. The next entry's link gives it away.
            for r in reversed(rows[5:]):
                conn.execute(
                    t.update()
                    .where((t.c.replica == "gw") & (t.c.seq == r.seq))
                    .values(seq=r.seq + 1, doc=_reseq(r.doc, r.seq + 1))
                )
            forged = {**doc, "user": "mallory", "request_id": "req_forged"}
            forged["hash"] = entry_hash(forged)
            row = {**victim._asdict(), "doc": orjson.dumps(forged).decode()}
            conn.execute(t.insert().values(**row))
            return int(victim.seq) + 1
        elif how == "reordered":
            other = rows[6]
            conn.execute(t.update().where(where).values(doc=other.doc, content=other.content))
            conn.execute(
                t.update()
                .where((t.c.replica == "gw") & (t.c.seq == other.seq))
                .values(doc=victim.doc, content=victim.content)
            )
        elif how == "signature":
            cp = store.checkpoints(db)[0]
            conn.execute(
                sa.text("UPDATE audit_checkpoints SET head = :h WHERE seq = :s"),
                {"h": "0" * 64, "s": cp["seq"]},
            )
            return int(cp["seq"])
    return int(victim.seq)


def _reseq(doc: str, seq: int) -> str:
    d = orjson.loads(doc)
    d["seq"] = seq
    d["hash"] = entry_hash(d)
    return orjson.dumps(d).decode()


@pytest.mark.parametrize(
    "how", ["edited", "content", "deleted", "inserted", "reordered", "signature"]
)
def test_tampering_in_the_database_is_found(stub: StubEngine, tmp_path: Path, how: str) -> None:
    import shutil
    import subprocess
    import sys

    c, settings = make(stub, tmp_path, replica="gw")
    with c:
        key = create_key(c.app.state.db, team="t", known_models={"stub"})[1]  # type: ignore[attr-defined]
        for _ in range(8):
            assert c.post("/v1/chat/completions", json=CHAT, headers=_auth(key)).status_code == 200
    # The app has stopped: final checkpoint signed, everything shipped.
    cfg = tmp_path / "bastion.yaml"
    cfg.write_text(orjson.dumps(settings.model_dump(mode="json")).decode())

    def verify() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "bastion.cli", "audit", "verify", "-c", str(cfg)],
            capture_output=True,
            text=True,
        )

    ok = verify()
    assert ok.returncode == 0 and ok.stdout.startswith("OK: 1"), ok.stdout + ok.stderr
    shutil.copy(tmp_path / "a.db", tmp_path / "pristine.db")
    db = sa.create_engine(f"sqlite:///{tmp_path}/a.db")
    seq = _tamper(db, how)
    db.dispose()
    broken = verify()
    assert broken.returncode == 1, broken.stdout + broken.stderr
    expect = {
        "edited": "(edited)",
        "content": "sealed content does not match",
        "deleted": "(deleted)",
        "inserted": "inserted",
        "reordered": "reordered",
        "signature": "signature is invalid",
    }[how]
    assert f"at seq {seq}:" in broken.stdout and expect in broken.stdout, broken.stdout


def test_redact_upstream_sends_the_redacted_prompt(stub: StubEngine, tmp_path: Path) -> None:
    c, _ = make(stub, tmp_path, redact=["card"], redact_upstream=True)
    with c:
        key = create_key(c.app.state.db, team="t", known_models={"stub"})[1]  # type: ignore[attr-defined]
        assert c.post("/v1/chat/completions", json=CHAT, headers=_auth(key)).status_code == 200
        assert stub.requests[-1]["messages"][0]["content"] == "card [CARD]"


def test_admin_changes_are_recorded_before_they_are_made(env) -> None:  # type: ignore[no-untyped-def]
    """One rule (core/changes.py): no record, no change (503) — except a revocation."""
    from bastion.audit.wal import AuditLogError
    from bastion.identity.keys import list_keys
    from bastion.identity.teams import load_teams

    c, _keys, _settings = env
    db = c.app.state.db  # type: ignore[attr-defined]
    erin = create_key(db, team="t", user="erin", known_models=set(), role="admin")[1]
    made = c.post("/admin/keys", json={"team": "t", "user": "dave"}, headers=_auth(erin))
    assert made.status_code == 201
    trail = c.app.state.audit  # type: ignore[attr-defined]
    trail.wal.broken = AuditLogError("disk gone")
    try:
        before = {k.id for k in list_keys(db)}
        for path, body in [
            ("/admin/keys", {"team": "t"}),
            ("/admin/teams", {"name": "newteam", "cost_center": "cc"}),
            ("/admin/cost-centers", {"name": "newcc"}),
            ("/admin/audit/holds", {"team": "t", "reason": "case 7"}),
        ]:
            r = c.post(path, json=body, headers=_auth(erin))
            assert r.status_code == 503, (path, r.text)
            assert r.json()["error"]["code"] == "audit_unavailable"
        assert {k.id for k in list_keys(db)} == before and "newteam" not in load_teams(db)
        assert store.holds(db) == []
        # A revocation is never held back by the trail.
        r = c.post(f"/admin/keys/{made.json()['id']}/revoke", headers=_auth(erin))
        assert r.status_code == 200 and r.json()["status"] == "revoked"
    finally:
        trail.wal.broken = None
    # Who acted is the authenticated principal (this key's id, not its `user` label, nor
    # "admin-key"); a failed change is recorded too.
    erin_id = next(k.id for k in list_keys(db) if k.user == "erin")
    assert c.post("/admin/audit/holds", json={"team": "t", "reason": "case 8"}, headers=_auth(erin))
    assert store.holds(db)[0]["placed_by"] == erin_id
    bad = c.post("/admin/teams", json={"name": "x", "cost_center": "nope"}, headers=_auth(erin))
    assert bad.status_code == 404  # the cost center named does not exist
    docs = [orjson.loads(r.doc) for r in entries(c, kind="admin")]
    acts = [(d["action"], d["actor"]) for d in docs]
    assert ("key.create", erin_id) in acts and ("audit.hold", erin_id) in acts
    deadline = time.monotonic() + 5
    while ("team.create.failed", erin_id) not in acts and time.monotonic() < deadline:
        time.sleep(0.1)
        acts = [
            (orjson.loads(r.doc)["action"], orjson.loads(r.doc)["actor"])
            for r in entries(c, kind="admin")
        ]
    assert ("team.create", erin_id) in acts and ("team.create.failed", erin_id) in acts


def test_a_read_that_cannot_be_recorded_returns_nothing(env) -> None:  # type: ignore[no-untyped-def]
    from bastion.audit.wal import AuditLogError

    c, keys, _settings = env
    trail = c.app.state.audit  # type: ignore[attr-defined]
    trail.wal.broken = AuditLogError("disk gone")
    try:
        r = c.get("/audit/entries", headers=_auth(keys["auditor"]))
        assert r.status_code == 503 and r.json()["error"]["code"] == "audit_unavailable"
    finally:
        trail.wal.broken = None


def test_each_start_entry_records_the_audit_policy_in_force(env) -> None:  # type: ignore[no-untyped-def]
    c, _keys, _settings = env
    trail = c.app.state.audit  # type: ignore[attr-defined]
    from bastion.audit.wal import read_entries

    (start,) = [e for e in read_entries(trail.wal.directory) if e["kind"] == "start"]
    assert start["audit"]["on_failure"] == "closed" and start["audit"]["redact"] == ["card"]
    assert "retention_days" in start["audit"] and "teams" in start
