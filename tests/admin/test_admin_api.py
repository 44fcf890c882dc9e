"""The admin API: keys, teams, cost centers and usage, with its OpenAPI document."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from bastion.app import build_app
from bastion.config import parse_settings
from tests.conftest import audit_config

ADMIN = "admin-key-for-tests-0123456789"


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[TestClient]:
    settings = parse_settings(
        {
            "database": {"url": f"sqlite:///{tmp_path}/a.db"},
            "admin": {"key": ADMIN},
            "audit": audit_config(tmp_path),
            "cost_centers": {"cc": {"name": "Retail"}},
            "teams": {"t": {"cost_center": "cc"}},
            "models": {"m": {"deployments": [{"url": "http://127.0.0.1:9", "served_name": "m"}]}},
        }
    )
    with TestClient(build_app(settings)) as c:
        c.headers["Authorization"] = f"Bearer {ADMIN}"
        yield c


def test_requires_the_admin_key(admin: TestClient) -> None:
    for headers in ({"Authorization": "Bearer wrong"}, {"Authorization": ""}):
        r = admin.get("/admin/keys", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_admin_key"


def test_key_lifecycle(admin: TestClient) -> None:
    r = admin.post(
        "/admin/keys", json={"team": "t", "user": "ann", "expires_in": "7d", "name": "app"}
    )
    assert r.status_code == 201, r.text
    made = r.json()
    assert made["key"].startswith("bst-") and made["status"] == "active"
    listed = admin.get("/admin/keys", params={"team": "t"}).json()
    assert [k["id"] for k in listed] == [made["id"]] and "key" not in listed[0]
    auth = {"Authorization": f"Bearer {made['key']}"}
    assert admin.get("/v1/models", headers=auth).status_code == 200
    revoked = admin.post(f"/admin/keys/{made['id']}/revoke").json()
    assert revoked["status"] == "revoked"
    # Immediate on this replica.
    assert admin.get("/v1/models", headers=auth).status_code == 401
    assert admin.get("/admin/keys/key_missing").status_code == 404
    assert admin.post("/admin/keys/key_missing/revoke").status_code == 404


def test_bad_input_is_400_in_openai_format(admin: TestClient) -> None:
    for body in ({"team": "nope"}, {"team": "t", "models": ["zzz"]}):  # names nothing stored
        r = admin.post("/admin/keys", json=body)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", r.text
    for body in (
        {"team": "t", "expires_in": "later"},
        {"user": "x"},
        {"team": 5},
    ):
        r = admin.post("/admin/keys", json=body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["message"]
    r = admin.post(
        "/admin/keys", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400


def test_teams_and_cost_centers(admin: TestClient) -> None:
    assert (
        admin.post("/admin/cost-centers", json={"name": "cc-9", "display_name": "Ops"}).status_code
        == 201
    )
    assert admin.post("/admin/cost-centers", json={"name": "cc-9"}).status_code == 409
    assert (
        admin.post(
            "/admin/teams", json={"name": "ops", "cost_center": "cc-9", "models": ["m"]}
        ).status_code
        == 201
    )
    assert admin.post("/admin/teams", json={"name": "x", "cost_center": "nope"}).status_code == 404
    teams = {t["name"]: t for t in admin.get("/admin/teams").json()}
    assert teams["ops"]["source"] == "api" and teams["t"]["source"] == "config"
    key = admin.post("/admin/keys", json={"team": "ops"}).json()["key"]
    listed = admin.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).json()
    assert [m["id"] for m in listed["data"]] == ["m"]


def test_usage_and_openapi(admin: TestClient) -> None:
    assert admin.get("/admin/usage", params={"by": "model", "since": "7d"}).json() == []
    assert admin.get("/admin/usage", params={"since": "yesterday"}).status_code == 400
    assert admin.get("/admin/usage", params={"by": "planet"}).status_code == 400
    spec = admin.get("/admin/openapi.json").json()
    assert {
        "/admin/keys",
        "/admin/keys/{key_id}/revoke",
        "/admin/teams",
        "/admin/usage",
        "/admin/cost-centers",
    } <= set(spec["paths"])
    assert not any(p.startswith("/v1") for p in spec["paths"])


def test_out_of_range_limits_are_refused_and_the_key_stays_revocable(admin: TestClient) -> None:
    """An integer the counters cannot hold was once stored, after which the key could not be
    revoked (500 on every read). Every numeric input is bounded to what the store can hold."""
    key_id = admin.post("/admin/keys", json={"team": "t"}).json()["id"]
    for body in ({"rpm": 203356707057410277376}, {"tpm": -1}, {"budget_day": 1e300}):
        r = admin.put(f"/admin/keys/{key_id}/limits", json=body)
        assert r.status_code == 400, (body, r.text)
    too_big = admin.post("/admin/keys", json={"team": "t", "limits": {"concurrent": 10**19}})
    assert too_big.status_code == 400
    assert admin.get(f"/admin/keys/{key_id}").json()["limits"] is None
    assert admin.post(f"/admin/keys/{key_id}/revoke").json()["status"] == "revoked"


def test_metrics_and_openapi_can_be_closed(tmp_path: Path) -> None:
    settings = parse_settings(
        {
            "server": {"metrics_key": "metrics-key-0123456789"},
            "database": {"url": f"sqlite:///{tmp_path}/a.db"},
            "admin": {"key": ADMIN, "openapi_public": False},
            "audit": audit_config(tmp_path),
            "cost_centers": {"cc": {}},
            "teams": {"t": {"cost_center": "cc"}},
            "models": {"m": {"deployments": [{"url": "http://127.0.0.1:9", "served_name": "m"}]}},
        }
    )
    with TestClient(build_app(settings)) as c:
        for wrong in ({}, {"Authorization": "Bearer metrics-key-wrong-0000"}):
            r = c.get("/metrics", headers=wrong)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_metrics_key"
        ok = c.get("/metrics", headers={"Authorization": "Bearer metrics-key-0123456789"})
        assert ok.status_code == 200 and "bastion_requests_total" in ok.text
        assert c.get("/admin/openapi.json").status_code == 401
        member = c.post(
            "/admin/keys", json={"team": "t"}, headers={"Authorization": f"Bearer {ADMIN}"}
        ).json()["key"]
        assert (
            c.get("/admin/openapi.json", headers={"Authorization": f"Bearer {member}"}).status_code
            == 403
        )
        spec = c.get("/admin/openapi.json", headers={"Authorization": f"Bearer {ADMIN}"})
        assert spec.status_code == 200 and "/admin/keys" in spec.json()["paths"]


def test_the_control_plane_authenticates_before_reading_a_body(admin: TestClient) -> None:
    """An anonymous caller gets 401 before its body is parsed; every route has a size limit."""
    anonymous = {"Authorization": "", "Content-Type": "application/json"}
    r = admin.post("/admin/keys", content=b"{not json", headers=anonymous)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_admin_key"
    r = admin.post("/audit/entries", content=b"x" * 10, headers=anonymous)
    assert r.status_code == 401
    big = b'{"username": "u", "password": "' + b"p" * (2 * 1024 * 1024) + b'"}'
    r = admin.post("/auth/login", content=big, headers=anonymous)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = admin.put("/admin/keys/key_x/limits", content=b'{"rpm": 1' + b" " * (2 << 20) + b"}")
    assert r.status_code == 413
    assert admin.get("/no-such-url", headers=anonymous).status_code == 404
    assert admin.post("/admin/keys", json={"team": "t"}).status_code == 201  # the body replayed
