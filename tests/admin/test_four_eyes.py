"""Separation of duties: no single administrator makes an auditor, and the second approver is
a different person (a signed-in administrator or the admin key's holder, never an API key)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from bastion.app import build_app
from bastion.audit import store
from bastion.config import parse_settings
from bastion.identity.keys import create_key
from bastion.store.schema import audit_entries
from tests.conftest import audit_config
from tests.identity.oidc_provider import DEFAULT_RESOURCE
from tests.stub_engine import StubEngine

ADMIN = "four-eyes-admin-key-0123456789"


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def stub() -> Iterator[StubEngine]:
    s = StubEngine().start()
    yield s
    s.stop()


def _app(stub: StubEngine, tmp: Path, oidc: Any, four_eyes: bool, **audit: Any) -> Any:
    return build_app(
        parse_settings(
            {
                "database": {"url": f"sqlite:///{tmp}/f.db"},
                "admin": {"key": ADMIN, "four_eyes": four_eyes},
                "audit": audit_config(tmp, **audit),
                "identity": {
                    "oidc": [
                        {
                            "issuer": oidc.issuer,
                            "audience": DEFAULT_RESOURCE,
                            "user_claim": "preferred_username",
                        }
                    ],
                    "group_mappings": [{"group": "bastion-admins", "team": "ops", "role": "admin"}],
                },
                "cost_centers": {"cc": {}},
                "teams": {"alpha": {"cost_center": "cc"}, "ops": {"cost_center": "cc"}},
                "models": {"stub": {"deployments": [{"url": stub.url, "served_name": "s"}]}},
            }
        )
    )


def _trail(tmp: Path) -> list[dict[str, Any]]:
    import orjson

    engine = sa.create_engine(f"sqlite:///{tmp}/f.db")
    with engine.connect() as conn:
        docs = [orjson.loads(r.doc) for r in conn.execute(sa.select(audit_entries.c.doc))]
    engine.dispose()
    return [d for d in docs if d.get("kind") == "admin"]


def test_one_admin_alone_cannot_make_an_auditor(
    stub: StubEngine, oidc_provider: Any, tmp_path: Path
) -> None:
    with TestClient(_app(stub, tmp_path, oidc_provider, four_eyes=False)) as c:
        asked = {"team": "alpha", "role": "auditor", "user": "dora"}
        for who in (ADMIN, oidc_provider.token("frank-cli")):  # admin key, signed-in admin
            r = c.post("/admin/keys", json=asked, headers=_auth(who))
            assert r.status_code == 403, r.text
            assert r.json()["error"]["code"] == "auditor_needs_second_admin"
        assert c.get("/admin/keys", headers=_auth(ADMIN)).json() == []


def test_an_auditor_key_works_only_after_a_second_person_approves(
    stub: StubEngine, oidc_provider: Any, tmp_path: Path
) -> None:
    with TestClient(_app(stub, tmp_path, oidc_provider, four_eyes=True)) as c:
        db = c.app.state.db  # type: ignore[attr-defined]
        frank, gina = oidc_provider.token("frank-cli"), oidc_provider.token("gina-cli")
        asked = {"team": "alpha", "role": "auditor", "user": "dora"}
        made = c.post("/admin/keys", json=asked, headers=_auth(frank))
        assert made.status_code == 201, made.text
        key = made.json()
        assert key["status"] == "pending" and key["created_by"] == "frank"
        approval = key["approval"]
        # Not usable yet.
        early = c.get("/audit/entries", headers=_auth(key["key"]))
        assert early.status_code == 401 and early.json()["error"]["code"] == "key_pending"
        # The requester cannot approve; nor can an admin-role API key (whoever made it could be
        # the requester).
        own = c.post(f"/admin/approvals/{approval}/approve", headers=_auth(frank))
        assert own.status_code == 403 and own.json()["error"]["code"] == "four_eyes"
        robot = create_key(db, team="ops", known_models={"stub"}, role="admin")[1]
        by_key = c.post(f"/admin/approvals/{approval}/approve", headers=_auth(robot))
        assert by_key.status_code == 403 and by_key.json()["error"]["code"] == "four_eyes"
        assert c.get(f"/admin/approvals/{approval}", headers=_auth(ADMIN)).json()["status"] == (
            "pending"
        )
        # A second person approves: the key works from then on, and only once decided.
        done = c.post(f"/admin/approvals/{approval}/approve", headers=_auth(gina))
        assert done.status_code == 200, done.text
        assert done.json()["decided_by"] == "gina" and done.json()["status"] == "approved"
        again = c.post(f"/admin/approvals/{approval}/approve", headers=_auth(gina))
        assert again.status_code == 409
        # With named administrators (SSO), the admin key decides nothing: its holder may be
        # frank, approving his own request.
        other = c.post("/admin/keys", json=asked, headers=_auth(frank)).json()
        by_admin_key = c.post(f"/admin/approvals/{other['approval']}/approve",
                              headers=_auth(ADMIN))  # fmt: skip
        assert by_admin_key.status_code == 403, by_admin_key.text
        assert "signed-in administrator" in by_admin_key.json()["error"]["message"]
        assert c.get("/audit/entries", headers=_auth(key["key"])).status_code == 200
        # A rejected request leaves a key that never works.
        other = c.post("/admin/keys", json=asked, headers=_auth(ADMIN)).json()
        no = c.post(f"/admin/approvals/{other['approval']}/reject", headers=_auth(frank))
        assert no.status_code == 200 and no.json()["status"] == "rejected"
        refused = c.get("/audit/entries", headers=_auth(other["key"]))
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "key_revoked"
    actions = [(e.get("actor"), e.get("action")) for e in _trail(tmp_path)]
    assert ("frank", "approval.request") in actions
    assert ("gina", "approval.approve") in actions and ("gina", "key.create.approved") in actions
    assert ("frank", "approval.reject") in actions


def test_shredding_honours_the_retention_floor(
    stub: StubEngine, oidc_provider: Any, tmp_path: Path
) -> None:
    from bastion.config import ConfigError

    for bad in ({"retention_days": 30}, {}):
        cfg = {"audit": {**audit_config(tmp_path), "min_retention_days": 365, **bad}}
        if not bad:
            cfg |= {"cost_centers": {"cc": {}},
                    "teams": {"t": {"cost_center": "cc", "audit_retention_days": 7}}}  # fmt: skip
        with pytest.raises(ConfigError, match="min_retention_days"):
            parse_settings(cfg)
    with TestClient(_app(stub, tmp_path, oidc_provider, False, min_retention_days=365)) as c:
        db = c.app.state.db  # type: ignore[attr-defined]
        key = create_key(db, team="alpha", known_models={"stub"})[1]
        chat = {"model": "stub", "messages": [{"role": "user", "content": "hi"}]}
        assert c.post("/v1/chat/completions", json=chat, headers=_auth(key)).status_code == 200
        deadline = time.monotonic() + 5
        while store.newest_content(db, "alpha") is None:  # the entry reaches the store
            assert time.monotonic() < deadline
            time.sleep(0.1)
        r = c.post("/admin/audit/shred", json={"team": "alpha"}, headers=_auth(ADMIN))
        assert r.status_code == 409 and r.json()["error"]["code"] == "retention_floor"
        assert "365-day" in r.json()["error"]["message"]
        empty = c.post("/admin/audit/shred", json={"team": "ops"}, headers=_auth(ADMIN))
        assert empty.status_code == 202 and empty.json()["status"] == "pending"
