"""What fuzzing the HTTP surfaces found (issue 10, item 18), each pinned by a plain example so
it stays fixed even where the fuzzer's budget would not reach it again. In-process app on
SQLite in front of the stub engine: fast, and on PostgreSQL (test_fuzz_*.py) the same inputs
were 500s, or a usage writer stalled for every client."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from starlette.testclient import TestClient

from bastion.app import build_app
from bastion.config import parse_settings
from bastion.core.timeutil import parse_duration, parse_time
from tests.conftest import audit_config
from tests.stub_engine import StubEngine

ADMIN = "fuzz-findings-admin-key-0123456789"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def stub() -> Iterator[StubEngine]:
    engine = StubEngine().start()
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def client(stub: StubEngine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    tmp = tmp_path_factory.mktemp("findings")
    settings = parse_settings(
        {
            "database": {"url": f"sqlite:///{tmp}/f.db", "usage_flush_seconds": 0.05},
            "admin": {"key": ADMIN},
            "audit": audit_config(tmp),
            "cost_centers": {"cc": {}},
            "teams": {"t": {"cost_center": "cc"}},
            "models": {"m": {"deployments": [{"url": stub.url, "served_name": "s"}]}},
        }
    )
    with TestClient(build_app(settings)) as c:
        c.headers["Authorization"] = f"Bearer {ADMIN}"
        yield c


@pytest.fixture(scope="module")
def key(client: TestClient) -> str:
    return str(client.post("/admin/keys", json={"team": "t"}).json()["key"])


def _refused(r, status: int = 400) -> None:  # type: ignore[no-untyped-def]
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_durations_and_times_beyond_a_timestamp_are_refused() -> None:
    """`expires_in: 99999999d` and `since=99999999w` overflowed a datetime: 500s."""
    for text in ("99999999d", "999999999999999999999w"):
        with pytest.raises(ValueError, match="too long"):
            parse_duration(text)
    assert parse_time("99999999w") == datetime.min.replace(tzinfo=UTC)
    assert parse_time("0001-01-01T00:00:00+05:00") == datetime.min.replace(tzinfo=UTC)


def test_overflowing_times_are_400(client: TestClient) -> None:
    _refused(client.post("/admin/keys", json={"team": "t", "expires_in": "99999999d"}))
    _refused(client.get("/admin/usage", params={"since": "99999999w"}))
    assert client.get("/admin/usage", params={"since": "0001-01-01T00:00:00+05:00"}).json() == []


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/admin/cost-centers", {"name": "cc-long", "display_name": "x" * 257}),
        ("/admin/cost-centers", {"name": "cc-nul", "display_name": "a\x00b"}),
        ("/admin/keys", {"team": "t", "name": "x" * 257}),
        ("/admin/keys", {"team": "t", "user": "u" * 257}),
        ("/admin/keys", {"team": "t", "user": "line\nbreak"}),
        ("/admin/teams", {"name": "x", "cost_center": "cc", "models": ["m"] * 257}),
        ("/admin/audit/holds", {"team": "t" * 129, "reason": "matter 1"}),
        ("/admin/audit/holds", {"team": "t", "reason": "a\x00b"}),
    ],
)
def test_text_the_store_cannot_hold_is_400(client: TestClient, path: str, body: dict) -> None:
    """Longer than the column, NUL, control characters, lone surrogates: once stored or tried,
    PostgreSQL answered with an error (a 500, after the change was already recorded)."""
    _refused(client.post(path, json=body))


def test_lone_surrogates_are_400(client: TestClient) -> None:
    """JSON may spell one (`"\\ud800"`); UTF-8, and so PostgreSQL, cannot store it."""
    body = b'{"team": "t", "name": "\\ud800"}'
    _refused(client.post("/admin/keys", content=body, headers={"content-type": "application/json"}))


def test_a_nul_in_the_url_is_400(client: TestClient) -> None:
    _refused(client.get("/admin/keys/key%00x"))
    _refused(client.get("/admin/keys", params={"team": "t\x00"}))


def test_json_types_are_taken_as_declared(client: TestClient) -> None:
    """`"5"` was taken as an rpm of 5 and `true` as 1; 5.0 is an integer to JSON Schema. An
    amount is an integer or a decimal string, never a binary float."""
    key_id = client.post("/admin/keys", json={"team": "t"}).json()["id"]
    for body in (
        {"rpm": "5"},
        {"rpm": True},
        {"rpm": 5.5},
        {"budget_month": False},
        {"budget_day": 1.25},
        {"budget_day": "1e3"},
    ):
        _refused(client.put(f"/admin/keys/{key_id}/limits", json=body))
    r = client.put(f"/admin/keys/{key_id}/limits", json={"rpm": 5.0, "budget_day": "1.25"})
    assert r.status_code == 200 and r.json()["limits"] == {"rpm": 5, "budget_day": "1.25"}, r.text


def test_unknown_names_are_404_and_taken_ones_409(client: TestClient) -> None:
    """Schema-valid requests naming what is not stored were 400s ("fix your request")."""
    _refused(client.post("/admin/keys", json={"team": "nope"}), 404)
    _refused(client.post("/admin/keys", json={"team": "t", "models": ["zzz"]}), 404)
    _refused(client.post("/admin/teams", json={"name": "x", "cost_center": "nope"}), 404)
    _refused(client.post("/admin/cost-centers", json={"name": "cc"}), 409)


def test_405_names_every_method_the_url_answers(client: TestClient) -> None:
    """FastAPI keeps one route per method: its 405 named only the first (`Allow: GET` where
    POST works too); the gateway's /v1 routes answered 404 to other methods."""
    r = client.request("OPTIONS", "/admin/keys")
    _refused(r, 405)
    assert r.headers["allow"] == "GET, POST"
    r = client.request("TRACE", "/v1/chat/completions")
    _refused(r, 405)
    assert r.headers["allow"] == "POST"


def test_urls_no_route_can_match_answer_in_openai_format(client: TestClient) -> None:
    """A newline in the path matched no mount: Starlette's plain-text 404."""
    r = client.get("/nowhere/a%0Ab")
    _refused(r, 404)


def test_the_openapi_document_declares_every_error(client: TestClient) -> None:
    doc = client.get("/admin/openapi.json").json()
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            responses = op["responses"]
            assert "422" not in responses, (method, path)
            for status in ("400", "401", "403", "404", "413", "503"):
                ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
                assert ref == "#/components/schemas/Error", (method, path, status)
            if method in ("post", "put", "delete"):
                assert "409" in responses, (method, path)
            assert not any(p["name"].lower() == "authorization" for p in op.get("parameters", []))
            assert (op.get("security") is None) == (path == "/auth/login"), (method, path)
    links = doc["paths"]["/admin/keys"]["post"]["responses"]["201"]["links"]
    assert links["RevokeKey"]["parameters"] == {"key_id": "$response.body#/id"}


def test_v1_user_must_fit_the_usage_records(client: TestClient, key: str, stub: StubEngine) -> None:
    """A `user` longer than the usage column (or with a NUL) was answered 200; on PostgreSQL its
    usage record then failed to insert, and the writer retried that batch for ever: no usage
    of any client was recorded again."""
    auth = {"Authorization": f"Bearer {key}"}
    for user in ("u" * 257, "a\x00b"):
        r = client.post("/v1/chat/completions", json={**CHAT, "user": user}, headers=auth)
        _refused(r)
        assert r.json()["error"]["param"] == "user"
    r = client.post("/v1/chat/completions", json={**CHAT, "user": "u" * 256}, headers=auth)
    assert r.status_code == 200, r.text


def test_v1_counts_fit_the_counters(client: TestClient, key: str, stub: StubEngine) -> None:
    """Output ceilings are reserved in 64-bit counters: bounded; 5.0 is forwarded as 5."""
    auth = {"Authorization": f"Bearer {key}"}
    for body in ({"max_tokens": 10**12 + 1}, {"max_completion_tokens": 2**64 - 1}, {"seed": 2**63}):
        _refused(client.post("/v1/chat/completions", json={**CHAT, **body}, headers=auth))
    r = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 5.0}, headers=auth)
    assert r.status_code == 200, r.text
    assert stub.requests[-1]["max_tokens"] == 5 and type(stub.requests[-1]["max_tokens"]) is int


def test_bounded_types() -> None:
    """The types every body and query of the control plane is declared with."""
    from pydantic import TypeAdapter

    from bastion.core.bounds import Duration, Label, Name

    assert TypeAdapter(Name).validate_python("team-1") == "team-1"
    with pytest.raises(ValueError):
        TypeAdapter(Duration).validate_python("100000d")
    with pytest.raises(ValueError):
        TypeAdapter(Label).validate_python("x" * 257)
