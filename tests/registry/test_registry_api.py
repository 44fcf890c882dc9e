"""The registry over the admin API, in-process, on SQLite and PostgreSQL: registration pins every
file's digest, each transition of the state machine is legal only from its state and is an admin
entry in the audit trail, and four-eyes approval takes two people, neither of them the
registrant."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from bastion.app import build_app
from bastion.config import parse_settings
from bastion.core.errors import Conflict
from bastion.identity.keys import create_key
from bastion.registry import records
from bastion.registry.digests import DigestError, digest_dir, manifest_digest, sha256_file
from tests.conftest import audit_config
from tests.identity.oidc_provider import DEFAULT_RESOURCE
from tests.registry.helpers import DOCUMENTED, admin_trail, copy_model, flip_byte

ADMIN = "registry-admin-key-0123456789"
H = {"Authorization": f"Bearer {ADMIN}"}


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _app(
    db_url: str, tmp: Path, approval: str = "single", oidc: Any = None, ttl_hours: float = 24
) -> Any:
    cfg: dict[str, Any] = {
        "database": {"url": db_url},
        "admin": {"key": ADMIN, "approval_ttl_hours": ttl_hours},
        "audit": audit_config(tmp),
        "registry": {"approval": approval},
        "models": {},
        "cost_centers": {"cc": {}},
        "teams": {"ops": {"cost_center": "cc"}},
    }
    if oidc is not None:
        cfg["identity"] = {
            "oidc": [
                {
                    "issuer": oidc.issuer,
                    "audience": DEFAULT_RESOURCE,
                    "user_claim": "preferred_username",
                }
            ],
            "group_mappings": [{"group": "bastion-admins", "team": "ops", "role": "admin"}],
        }
        # The admin key's holder is a custodian who has no named account here: a third person.
        cfg["admin"] = {**cfg.get("admin", {}), "key_may_approve": True}
    return build_app(parse_settings(cfg))


def _register(c: TestClient, path: Path, version: str, headers: dict[str, str] = H,
              **extra: Any) -> Any:  # fmt: skip
    body = {"path": str(path), "name": "tiny-chat", "version": version, "kind": "base",
            **DOCUMENTED, **extra}  # fmt: skip
    return c.post("/admin/models", json=body, headers=headers)


def test_register_and_walk_the_state_machine(db_url: str, tiny_model: Path, tmp_path: Path) -> None:
    with TestClient(_app(db_url, tmp_path)) as c:
        r = _register(c, tiny_model, "1")
        assert r.status_code == 201, r.text
        rec = r.json()
        assert rec["state"] == "draft" and rec["kind"] == "base"
        # Every file, with its role, and a manifest digest anyone can recompute.
        files = {f["path"]: f for f in rec["files"]}
        assert set(files) == {p.name for p in tiny_model.iterdir() if p.is_file()}
        weights = files["model.safetensors"]
        assert weights["role"] == "weights"
        assert weights["sha256"] == sha256_file(tiny_model / "model.safetensors")
        assert files["tokenizer.json"]["role"] == "tokenizer"
        assert files["config.json"]["role"] == "config"
        assert rec["manifest_sha256"] == manifest_digest(rec["files"])
        assert rec["config"]["architectures"] == ["LlamaForCausalLM"]
        assert rec["created_by"] == "admin-key"
        # The same version twice is a conflict: a changed model is a new version.
        assert _register(c, tiny_model, "1").status_code == 409
        # Illegal moves from draft: straight to approved.
        base = "/admin/models/tiny-chat/1"
        bad = c.post(f"{base}/approve", json={"evidence": "x"}, headers=H)
        assert bad.status_code == 409 and bad.json()["error"]["code"] == "illegal_transition"
        assert "draft" in bad.json()["error"]["message"]
        for verb, field, to in (("validate", "evidence", "validated"),
                                ("approve", "evidence", "approved"),
                                ("retire", "reason", "retired")):  # fmt: skip
            done = c.post(f"{base}/{verb}", json={field: f"{verb} evidence"}, headers=H)
            assert done.status_code == 200, done.text
            assert done.json()["state"] == to
        # Retired is final.
        for verb, field in (
            ("validate", "evidence"),
            ("approve", "evidence"),
            ("retire", "reason"),
        ):
            again = c.post(f"{base}/{verb}", json={field: "again"}, headers=H)
            assert again.status_code == 409, again.text
            assert again.json()["error"]["code"] == "illegal_transition"
        shown = c.get(base, headers=H).json()
        assert [(h["from"], h["to"]) for h in shown["history"]] == [
            (None, "draft"), ("draft", "validated"), ("validated", "approved"),
            ("approved", "retired"),
        ]  # fmt: skip
        assert shown["history"][2]["evidence"] == "approve evidence"
        listed = c.get("/admin/models?state=retired", headers=H).json()
        assert [m["ref"] for m in listed] == ["tiny-chat@1"]
        assert c.get("/admin/models/tiny-chat/9", headers=H).status_code == 404
        # Evidence is required; a bad name is a 400.
        assert c.post(f"{base}/retire", json={}, headers=H).status_code == 400
        assert _register(c, tiny_model, "bad version").status_code == 400
    trail = [(e["action"], e.get("model"), e.get("before"), e.get("after"))
             for e in admin_trail(db_url) if e["action"].startswith("model.")]  # fmt: skip
    assert [t[0] for t in trail if not t[0].endswith(".failed")] == [
        "model.register", "model.register", "model.validate", "model.approve", "model.retire",
    ]  # fmt: skip
    assert ("model.register.failed", "tiny-chat@1") in [(t[0], t[1]) for t in trail]
    moves = [t for t in trail if t[0] in ("model.validate", "model.approve", "model.retire")]
    assert [(t[2]["state"], t[3]["state"]) for t in moves] == [
        ("draft", "validated"), ("validated", "approved"), ("approved", "retired"),
    ]  # fmt: skip
    entry = next(e for e in admin_trail(db_url) if e["action"] == "model.approve")
    assert entry["actor"] == "admin-key" and entry["evidence"] == "approve evidence"


def test_validation_needs_complete_records_and_unchanged_files(
    tiny_model: Path, tmp_path: Path
) -> None:
    db_url = f"sqlite:///{tmp_path}/r.db"
    model = copy_model(tiny_model, tmp_path / "model")
    with TestClient(_app(db_url, tmp_path)) as c:
        body = {"path": str(model), "name": "bare", "version": "1", "kind": "base"}
        assert c.post("/admin/models", json=body, headers=H).status_code == 201
        r = c.post("/admin/models/bare/1/validate", json={"evidence": "e"}, headers=H)
        assert r.status_code == 409 and r.json()["error"]["code"] == "incomplete_record"
        assert "owner, license, intended_use, risk_tier" in r.json()["error"]["message"]
        assert _register(c, model, "2").status_code == 201
        flip_byte(model / "model.safetensors")
        r = c.post("/admin/models/tiny-chat/2/validate", json={"evidence": "e"}, headers=H)
        assert r.status_code == 409 and r.json()["error"]["code"] == "hash_mismatch"
        assert "hash mismatch: model.safetensors" in r.json()["error"]["message"]
        # An adapter needs a registered base, approved before the adapter can be.
        adapter = {"path": str(model), "name": "tiny-legal", "version": "1", "kind": "adapter",
                   **DOCUMENTED}  # fmt: skip
        assert c.post("/admin/models", json=adapter, headers=H).status_code == 400
        for path, status in (("relative/dir", 400), ("/", 404), (str(tmp_path / "none"), 404)):
            r = c.post("/admin/models", json={**body, "version": "9", "path": path}, headers=H)
            assert r.status_code == status, (path, r.text)
        assert "not a model directory" in r.json()["error"]["message"]
        missing = c.post("/admin/models", json={**adapter, "base": "nope@1"}, headers=H)
        assert missing.status_code == 404
        flip_byte(model / "model.safetensors")  # back as registered
        made = c.post("/admin/models", json={**adapter, "base": "tiny-chat@2",
                                              "lineage": {"training_data_sha256": "ab" * 32,
                                                          "hyperparameters": {"r": 8}}},
                      headers=H)  # fmt: skip
        assert made.status_code == 201, made.text
        assert made.json()["lineage"]["hyperparameters"] == {"r": 8}
        ok = c.post("/admin/models/tiny-legal/1/validate", json={"evidence": "e"}, headers=H)
        assert ok.status_code == 200, ok.text
        early = c.post("/admin/models/tiny-legal/1/approve", json={"evidence": "e"}, headers=H)
        assert early.status_code == 409 and early.json()["error"]["code"] == "base_not_approved"
        # What a loader (training from a base) gets: a local path, only in the states it
        # accepts, and only while the files match.
        db = c.app.state.db  # type: ignore[attr-defined]
        with pytest.raises(Conflict, match="is draft; this needs it approved"):
            records.model_dir(db, "tiny-chat@2")
        assert records.model_dir(db, "tiny-chat@2", ("draft",)) == model.resolve()
        flip_byte(model / "tokenizer.json")
        with pytest.raises(Conflict, match=r"hash mismatch: tokenizer\.json"):
            records.model_dir(db, "tiny-chat@2", ("draft",))


def test_four_eyes_approval_takes_two_people_neither_the_registrant(
    oidc_provider: Any, tiny_model: Path, tmp_path: Path
) -> None:
    db_url = f"sqlite:///{tmp_path}/r.db"
    with TestClient(_app(db_url, tmp_path, "four-eyes", oidc_provider)) as c:
        frank, gina = oidc_provider.token("frank-cli"), oidc_provider.token("gina-cli")
        assert _register(c, tiny_model, "1", _auth(frank)).json()["created_by"] == "frank"
        base = "/admin/models/tiny-chat/1"
        ok = c.post(f"{base}/validate", json={"evidence": "eval"}, headers=_auth(frank))
        assert ok.status_code == 200, ok.text
        # The registrant cannot ask for the approval of their own model.
        own = c.post(f"{base}/approve", json={"evidence": "mine"}, headers=_auth(frank))
        assert own.status_code == 403 and own.json()["error"]["code"] == "four_eyes"
        # Gina asks: a request, the model still validated.
        asked = c.post(f"{base}/approve", json={"evidence": "MRC minute 42"}, headers=_auth(gina))
        assert asked.status_code == 202, asked.text
        assert asked.json()["state"] == "validated"
        approval = asked.json()["approval"]["id"]
        twice = c.post(f"{base}/approve", json={"evidence": "again"}, headers=H)
        assert twice.status_code == 409 and twice.json()["error"]["code"] == "approval_pending"
        # Neither the requester nor the registrant decides; nor does an admin API key.
        for who in (gina, frank):
            r = c.post(f"/admin/approvals/{approval}/approve", headers=_auth(who))
            assert r.status_code == 403 and r.json()["error"]["code"] == "four_eyes", r.text
        robot = create_key(c.app.state.db, team="ops", known_models=set(), role="admin")[1]  # type: ignore[attr-defined]
        r = c.post(f"/admin/approvals/{approval}/approve", headers=_auth(robot))
        assert r.status_code == 403
        assert c.get(base, headers=H).json()["state"] == "validated"
        # A third person (the admin key's holder) approves: the model is approved by them.
        done = c.post(f"/admin/approvals/{approval}/approve", headers=H)
        assert done.status_code == 200, done.text
        rec = c.get(base, headers=H).json()
        assert rec["state"] == "approved" and rec["approval"] is None
        step = rec["history"][-1]
        assert step["by"] == "admin-key" and step["requested_by"] == "gina"
        assert step["approval"] == approval and step["evidence"] == "MRC minute 42"
        # A rejected request leaves the version validated, free for a new request.
        assert _register(c, tiny_model, "2", _auth(frank)).status_code == 201
        c.post("/admin/models/tiny-chat/2/validate", json={"evidence": "e"}, headers=_auth(frank))
        asked = c.post("/admin/models/tiny-chat/2/approve", json={"evidence": "e"}, headers=H)
        no = c.post(f"/admin/approvals/{asked.json()['approval']['id']}/reject",
                    headers=_auth(gina))  # fmt: skip
        assert no.status_code == 200 and no.json()["status"] == "rejected"
        rec = c.get("/admin/models/tiny-chat/2", headers=H).json()
        assert rec["state"] == "validated" and rec["approval"] is None
        # Retired while a request waits: approving the request afterwards changes nothing.
        asked = c.post("/admin/models/tiny-chat/2/approve", json={"evidence": "e"}, headers=H)
        assert asked.status_code == 202
        gone = c.post("/admin/models/tiny-chat/2/retire", json={"reason": "withdrawn"}, headers=H)
        assert gone.status_code == 200 and gone.json()["approval"] is None
        late = c.post(f"/admin/approvals/{asked.json()['approval']['id']}/approve",
                      headers=_auth(gina))  # fmt: skip
        assert late.status_code == 409, late.text
        assert c.get("/admin/models/tiny-chat/2", headers=H).json()["state"] == "retired"
    actions = [(e["actor"], e["action"]) for e in admin_trail(db_url)]
    assert ("frank", "model.register") in actions and ("frank", "model.validate") in actions
    assert ("gina", "approval.request") in actions
    assert ("admin-key", "approval.approve") in actions
    assert ("admin-key", "model.approve.approved") in actions
    assert ("gina", "model.approve.rejected") in actions


def test_the_registry_is_in_the_openapi_document(tmp_path: Path) -> None:
    with TestClient(_app(f"sqlite:///{tmp_path}/r.db", tmp_path)) as c:
        paths = c.get("/admin/openapi.json").json()["paths"]
    assert {"get", "post"} <= set(paths["/admin/models"])
    for verb in ("validate", "approve", "retire"):
        op = paths[f"/admin/models/{{name}}/{{version}}/{verb}"]["post"]
        assert "409" in op["responses"]
    assert "get" in paths["/admin/models/{name}/{version}"]


def test_what_is_hashed(tiny_model: Path, tmp_path: Path) -> None:
    """Every file but hidden ones, through symbolic links, without walking a loop twice."""
    model = copy_model(tiny_model, tmp_path / "m")
    (model / ".git").mkdir()
    (model / ".git" / "HEAD").write_text("ref")
    (model / "extra").mkdir()
    (model / "extra" / "chat_template.jinja").write_text("{{ x }}")
    (model / "extra" / "loop").symlink_to(model, target_is_directory=True)
    files = {f.path: f.role for f in digest_dir(model)}
    assert files["extra/chat_template.jinja"] == "chat-template"
    assert not any(p.startswith(".git") for p in files)
    assert not any("loop" in p for p in files)
    with pytest.raises(DigestError, match="not a model directory"):
        digest_dir(Path("/"))


def test_an_expired_request_does_not_hold_the_version(tiny_model: Path, tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path}/r.db"
    with TestClient(_app(db_url, tmp_path, "four-eyes", ttl_hours=1 / 3600)) as c:
        # Registered with an admin-role API key: the admin key's holder is someone else.
        robot = create_key(c.app.state.db, team="ops", known_models=set(), role="admin")[1]  # type: ignore[attr-defined]
        assert _register(c, tiny_model, "1", _auth(robot)).status_code == 201
        base = "/admin/models/tiny-chat/1"
        assert c.post(f"{base}/validate", json={"evidence": "e"}, headers=H).status_code == 200
        first = c.post(f"{base}/approve", json={"evidence": "e"}, headers=H)
        assert first.status_code == 202
        assert c.post(f"{base}/approve", json={"evidence": "e"}, headers=H).status_code == 409
        time.sleep(1.2)
        again = c.post(f"{base}/approve", json={"evidence": "e"}, headers=H)
        assert again.status_code == 202, again.text
        assert again.json()["approval"]["id"] != first.json()["approval"]["id"]
