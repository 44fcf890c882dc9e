"""Roles and object-level authorisation on every admin, usage and audit endpoint: a team-admin
asking for another team's objects gets 404, exactly as for objects that do not exist."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from bastion.app import build_app
from bastion.config import parse_settings
from bastion.identity.keys import create_key
from tests.conftest import audit_config, usage_rows
from tests.stub_engine import StubEngine

ADMIN = "roles-admin-key-0123456789"
CHAT = {"model": "stub", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def stub() -> Iterator[StubEngine]:
    s = StubEngine().start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def env(stub: StubEngine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    tmp = tmp_path_factory.mktemp("roles")
    settings = parse_settings(
        {
            "database": {"url": f"sqlite:///{tmp}/r.db", "usage_flush_seconds": 0.05},
            "admin": {"key": ADMIN},
            "audit": audit_config(Path(tmp)),
            "cost_centers": {"cc": {}},
            "teams": {"alpha": {"cost_center": "cc"}, "beta": {"cost_center": "cc"}},
            "models": {"stub": {"deployments": [{"url": stub.url, "served_name": "s"}]}},
        }
    )
    with TestClient(build_app(settings)) as c:
        db = c.app.state.db  # type: ignore[attr-defined]
        known = {"stub"}
        made = {
            "alpha": create_key(db, team="alpha", user="ann", known_models=known),
            "beta": create_key(db, team="beta", user="ben", known_models=known),
            "lead": create_key(db, team="alpha", user="lee", known_models=known, role="team-admin"),
            "auditor": create_key(db, team="beta", user="aud", known_models=known, role="auditor"),
        }
        keys = {k: token for k, (_rec, token) in made.items()}
        ids = {k: rec.id for k, (rec, _token) in made.items()}
        for who in ("alpha", "beta"):
            r = c.post("/v1/chat/completions", json=CHAT, headers=_auth(keys[who]))
            assert r.status_code == 200
        yield c, keys, ids, f"sqlite:///{tmp}/r.db"


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _not_found(r: Any) -> None:
    assert r.status_code == 404, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_a_team_admin_sees_and_manages_only_their_team(env: Any) -> None:
    c, keys, ids, _db = env
    lead = _auth(keys["lead"])
    listed = c.get("/admin/keys", headers=lead).json()
    assert {k["team"] for k in listed} == {"alpha"} and len(listed) == 2
    assert [t["name"] for t in c.get("/admin/teams", headers=lead).json()] == ["alpha"]
    # Another team's objects: 404, the same answer as for objects that do not exist.
    _not_found(c.get("/admin/keys", params={"team": "beta"}, headers=lead))
    for key_id in (ids["beta"], "key_does_not_exist"):
        _not_found(c.get(f"/admin/keys/{key_id}", headers=lead))
        _not_found(c.post(f"/admin/keys/{key_id}/revoke", headers=lead))
        _not_found(c.put(f"/admin/keys/{key_id}/limits", json={"rpm": 1}, headers=lead))
    _not_found(c.post("/admin/keys", json={"team": "beta"}, headers=lead))
    _not_found(c.get("/admin/usage", params={"team": "beta"}, headers=lead))
    _not_found(c.get("/admin/limits", params={"team": "beta"}, headers=lead))
    assert c.post("/v1/chat/completions", json=CHAT, headers=_auth(keys["beta"])).status_code == 200
    # Their own team: allowed, within the role.
    usage = c.get("/admin/usage", params={"by": "team"}, headers=lead).json()
    assert [row["team"] for row in usage] == ["alpha"]
    assert c.get(f"/admin/keys/{ids['alpha']}", headers=lead).status_code == 200
    made = c.post("/admin/keys", json={"team": "alpha"}, headers=lead)
    assert made.status_code == 201 and made.json()["team"] == "alpha"
    assert made.json()["created_by"] == ids["lead"]  # the key that made it, as authenticated
    escalate = c.post("/admin/keys", json={"team": "alpha", "role": "admin"}, headers=lead)
    assert escalate.status_code == 403
    for method, path in (
        ("post", "/admin/teams"),
        ("post", "/admin/cost-centers"),
        ("get", "/admin/cost-centers"),
        ("get", "/admin/audit/holds"),
        ("post", "/admin/audit/shred"),
        ("get", "/audit/entries"),
    ):
        r = getattr(c, method)(path, headers=lead, **({"json": {}} if method == "post" else {}))
        assert r.status_code == 403, (path, r.text)


def test_a_team_admin_acts_only_on_member_keys_for_users_they_speak_for(env: Any) -> None:
    """Red team: a team-admin created keys attributed to another team's user, and changed
    limits on and revoked the team's own admin-role key."""
    c, keys, ids, _db = env
    lead, admin = _auth(keys["lead"]), _auth(ADMIN)
    for user in ("ben", "lee"):  # another team's user; even their own key's `user` label
        r = c.post("/admin/keys", json={"team": "alpha", "user": user}, headers=lead)
        assert r.status_code == 403 and r.json()["error"]["code"] == "user_not_allowed", r.text
    senior = {"team": "alpha", "role": "team-admin", "user": "sam"}
    boss = c.post("/admin/keys", json=senior, headers=admin).json()
    for key_id in (boss["id"], ids["lead"]):  # keys with a role: an admin's business
        _not_found(c.post(f"/admin/keys/{key_id}/revoke", headers=lead))
        _not_found(c.put(f"/admin/keys/{key_id}/limits", json={"rpm": 100}, headers=lead))
        _not_found(c.get(f"/admin/keys/{key_id}", headers=lead))
    assert c.get(f"/admin/keys/{boss['id']}", headers=admin).json()["status"] == "active"
    member = c.post("/admin/keys", json={"team": "alpha"}, headers=lead).json()
    assert c.post(f"/admin/keys/{member['id']}/revoke", headers=lead).status_code == 200


def test_per_key_limits_only_tighten_the_defaults(stub: StubEngine, tmp_path: Path) -> None:
    """Red team: with an organisation default of `rpm: 2`, a team-admin set `tpm` on a key and
    the key lost its rpm limit (its own limits replaced the default instead of adding to it)."""
    settings = parse_settings(
        {
            "database": {"url": f"sqlite:///{tmp_path}/l.db"},
            "admin": {"key": ADMIN},
            "limits": {"defaults": {"key": {"rpm": 2, "tpm": 100_000}}},
            "cost_centers": {"cc": {}},
            "teams": {"alpha": {"cost_center": "cc"}},
            "models": {"stub": {"deployments": [{"url": stub.url, "served_name": "s"}]}},
            "audit": {"enabled": False},
        }
    )
    with TestClient(build_app(settings)) as c:
        db = c.app.state.db  # type: ignore[attr-defined]
        lead = create_key(db, team="alpha", known_models={"stub"}, role="team-admin")[1]
        rec, token = create_key(db, team="alpha", known_models={"stub"})
        loosen = {"tpm": 1_000_000, "rpm": 50, "concurrent": 4}
        r = c.put(f"/admin/keys/{rec.id}/limits", json=loosen, headers=_auth(lead))
        assert r.status_code == 200, r.text
        codes = [
            c.post("/v1/chat/completions", json=CHAT, headers=_auth(token)).status_code
            for _ in range(3)
        ]
        assert codes == [200, 200, 429]  # still the default's rpm: 2, not the key's 50
        status = c.get("/admin/limits", params={"team": "alpha"}, headers=_auth(ADMIN)).json()
        mine = {row["limit_kind"]: row["limit"] for row in status if rec.id in row["level"]}
        assert mine == {"rpm": 2, "tpm": 100_000, "concurrent": 4}, status


def test_members_and_auditors_get_only_what_their_role_allows(env: Any) -> None:
    c, keys, _ids, _db = env
    member = _auth(keys["alpha"])
    for path in ("/admin/keys", "/admin/usage", "/admin/teams", "/audit/entries"):
        assert c.get(path, headers=member).status_code == 403, path
    auditor = _auth(keys["auditor"])
    usage = c.get("/admin/usage", params={"by": "team"}, headers=auditor).json()
    assert {row["team"] for row in usage} == {"alpha", "beta"}  # reads all usage
    assert c.post("/admin/keys", json={"team": "beta"}, headers=auditor).status_code == 403
    assert c.get("/admin/keys", headers=auditor).status_code == 403
    admin = _auth(ADMIN)
    assert {k["team"] for k in c.get("/admin/keys", headers=admin).json()} == {"alpha", "beta"}
    assert c.get("/audit/entries", headers=admin).status_code == 401  # admins read no prompts


def test_client_supplied_fields_never_change_attribution(env: Any) -> None:
    c, keys, _ids, db = env
    r = c.post(
        "/v1/chat/completions",
        json={**CHAT, "user": "mallory", "metadata": {"team": "beta"}},
        headers={
            **_auth(keys["alpha"]),
            "X-Bastion-Team": "beta",
            "OpenAI-Organization": "beta",
            "X-Forwarded-User": "mallory",
        },
    )
    assert r.status_code == 200
    time.sleep(0.2)
    (row,) = usage_rows(db, request_id=r.headers["x-request-id"])
    assert (row.team, row.user, row.key_id) != ("beta", "mallory", None)
    assert (row.team, row.user, row.client_user) == ("alpha", "ann", "mallory")
