"""Every client mistake and engine failure gets the right status in OpenAI's error format.

In-process app (Starlette's TestClient) in front of a stub engine for failure injection; the
same classes of error are checked through the real SDK and real vLLM in test_sdk.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from bastion.app import build_app
from bastion.audit.wal import read_entries
from bastion.config import parse_settings
from bastion.identity.keys import create_key, revoke_key
from bastion.local.launcher import free_port
from tests.conftest import audit_config
from tests.stub_engine import StubEngine

CHAT = {"model": "stub", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def stub() -> Iterator[StubEngine]:
    s = StubEngine().start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def app_env(stub: StubEngine, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    db = tmp_path_factory.mktemp("errs") / "b.db"
    settings = parse_settings(
        {
            "server": {"max_body_bytes": 2048},
            "audit": audit_config(db.parent),
            "database": {"url": f"sqlite:///{db}", "usage_flush_seconds": 0.05},
            "cost_centers": {"cc": {}},
            "teams": {"t": {"cost_center": "cc"}},
            "models": {
                "stub": {
                    "deployments": [
                        {
                            "url": stub.url,
                            "served_name": "stub-served",
                            "first_byte_timeout": 1.0,
                            "read_timeout": 1.0,
                        }
                    ],
                    "engine_fields": {"allow": ["priority"]},
                },
                "down": {  # credentials in the URL must never be shown to anyone
                    "deployments": [
                        {"url": f"http://ops:s3cret@127.0.0.1:{free_port()}", "served_name": "x"}
                    ]
                },
                "vectors": {
                    "kind": "embedding",
                    "deployments": [{"url": stub.url, "served_name": "e"}],
                },
            },
        }
    )
    app = build_app(settings, health_interval=0.5)
    with TestClient(app) as c:
        db_engine = app.state.db
        known = set(settings.models)
        keys = {
            "all": create_key(db_engine, team="t", known_models=known)[1],
            "only_down": create_key(db_engine, team="t", models=["down"], known_models=known)[1],
            "short": create_key(
                db_engine, team="t", expires_in=timedelta(seconds=1), known_models=known
            )[1],
        }
        rec, keys["revoked"] = create_key(db_engine, team="t", known_models=known)
        revoke_key(db_engine, rec.id)
        yield c, keys


def _post(
    c: TestClient,
    key: str | None,
    body: object,
    path: str = "/v1/chat/completions",
    raw: bytes | None = None,
):  # type: ignore[no-untyped-def]
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = raw if raw is not None else orjson.dumps(body)
    return c.post(path, content=content, headers={**headers, "Content-Type": "application/json"})


def _error(resp, status: int, code: str | None = None) -> dict:  # type: ignore[no-untyped-def]
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code:
        assert err["code"] == code
    return err


def test_authentication_errors(app_env, stub: StubEngine) -> None:  # type: ignore[no-untyped-def]
    c, keys = app_env
    _error(_post(c, None, CHAT), 401)
    _error(_post(c, "bst-not-a-real-key", CHAT), 401, "invalid_api_key")
    _error(_post(c, "sk-something", CHAT), 401)
    _error(_post(c, keys["revoked"], CHAT), 401, "key_revoked")
    time.sleep(1.1)
    _error(_post(c, keys["short"], CHAT), 401, "key_expired")
    resp = c.post("/v1/chat/completions", content=b"{}", headers={"Authorization": "Basic abc"})
    _error(resp, 401)


def test_authorization_and_models(app_env) -> None:  # type: ignore[no-untyped-def]
    c, keys = app_env
    _error(_post(c, keys["only_down"], CHAT), 403, "model_not_allowed")
    _error(_post(c, keys["all"], {**CHAT, "model": "gpt-99"}), 404, "model_not_found")
    err = _error(_post(c, keys["all"], {**CHAT, "model": "vectors"}), 400, "wrong_endpoint")
    assert "embedding" in err["message"]
    listed = c.get("/v1/models", headers={"Authorization": f"Bearer {keys['only_down']}"})
    assert [m["id"] for m in listed.json()["data"]] == ["down"]


def test_bad_bodies(app_env) -> None:  # type: ignore[no-untyped-def]
    c, keys = app_env
    _error(_post(c, keys["all"], None, raw=b'{"model": "stub", '), 400, "invalid_json")
    _error(_post(c, keys["all"], {"model": "stub"}), 400, "missing")
    _error(_post(c, keys["all"], {**CHAT, "temperature": "hot"}), 400, "invalid_type")
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
    _error(_post(c, keys["all"], big), 413, "request_too_large")


def test_engine_failures(app_env, stub: StubEngine) -> None:  # type: ignore[no-untyped-def]
    c, keys = app_env
    ok = _post(c, keys["all"], CHAT)
    assert ok.status_code == 200 and ok.json()["model"] == "stub"
    assert stub.requests[-1]["model"] == "stub-served"  # alias rewritten on the way in
    _error(_post(c, keys["all"], {**CHAT, "model": "down"}), 503, "engine_unavailable")
    try:
        stub.mode = "500"
        _error(_post(c, keys["all"], CHAT), 502, "upstream_error")
        stub.mode = "400"
        err = _error(_post(c, keys["all"], CHAT), 400, "engine_rejected")
        assert "context too long" in err["message"]
        stub.mode = "garbage"
        _error(_post(c, keys["all"], CHAT), 502)
        stub.mode, stub.delay = "ok", 3.0
        started = time.monotonic()
        _error(_post(c, keys["all"], CHAT), 504, "engine_timeout")
        assert time.monotonic() - started < 2.5  # no hang past the configured timeout
        stub.mode, stub.delay = "stall-stream", 0.0
        resp = _post(c, keys["all"], {**CHAT, "stream": True})
        assert resp.status_code == 200
        assert b'"engine_timeout"' in resp.content and resp.content.endswith(b"data: [DONE]\n\n")
    finally:
        stub.mode, stub.delay = "ok", 0.0


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    st.dictionaries(
        st.sampled_from(["model", "messages", "stream", "max_tokens", "n", "user", "tools"]),
        st.none()
        | st.booleans()
        | st.integers(-5, 5)
        | st.text(max_size=5)
        | st.lists(
            st.dictionaries(st.sampled_from(["role", "content"]), st.text(max_size=5)), max_size=2
        ),
        max_size=6,
    )
)
def test_never_a_5xx_for_client_mistakes(app_env, body: dict) -> None:  # type: ignore[no-untyped-def]
    c, keys = app_env
    body.pop("model", None) if body.get("model") == "down" else None
    resp = _post(c, keys["only_down"], body)  # this key may use no model the body can name
    assert resp.status_code in (400, 403, 404), resp.text
    assert "error" in resp.json()


def test_every_request_is_recorded(app_env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    c, keys = app_env
    gw = c.app.state.gateway
    before = gw.usage.written
    _post(c, None, CHAT)
    _post(c, keys["all"], CHAT)
    _post(c, keys["all"], {**CHAT, "model": "nope"})
    deadline = time.monotonic() + 5
    while gw.usage.written < before + 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gw.usage.written >= before + 3


def test_no_engine_slot_outlives_its_request(app_env) -> None:  # type: ignore[no-untyped-def]
    """Errors, timeouts, broken streams and refused connections above all gave their slots back."""
    c, _keys = app_env
    for route in c.app.state.gateway.routes.values():
        assert [d.in_flight for d in route.deployments] == [0] * len(route.deployments)


def test_engine_control_fields_and_output_ceilings(app_env, stub: StubEngine) -> None:  # type: ignore[no-untyped-def]
    """The engine never gets a ceiling other than the one reserved, nor engine-control fields
    the model does not allow; best_of counts like n."""
    c, keys = app_env
    for field, value in [("kv_transfer_params", {"remote_host": "10.0.0.9"}), ("vllm_xargs", {})]:
        err = _error(_post(c, keys["all"], {**CHAT, field: value}), 400, "field_not_allowed")
        assert err["param"] == field
    sent = len(stub.requests)
    assert _post(c, keys["all"], {**CHAT, "priority": -10}).status_code == 200  # allowed here
    assert stub.requests[-1]["priority"] == -10
    for field in ("max_tokens", "max_completion_tokens"):
        for bad in (0, -1):
            assert _error(_post(c, keys["all"], {**CHAT, field: bad}), 400)["param"] == field
    both = {**CHAT, "max_tokens": 50, "max_completion_tokens": 7}
    assert _post(c, keys["all"], both).status_code == 200
    got = stub.requests[-1]
    assert got["max_tokens"] == got["max_completion_tokens"] == 7  # what was reserved
    bare = _post(c, keys["all"], CHAT)
    assert bare.status_code == 200 and stub.requests[-1]["max_tokens"] >= 1
    err = _error(_post(c, keys["all"], {**CHAT, "best_of": 9}), 400, "n_too_large")
    assert err["param"] == "best_of"
    assert len(stub.requests) == sent + 3  # nothing refused reached the engine


def test_engine_credentials_are_never_shown(app_env, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    c, keys = app_env
    with caplog.at_level("INFO"):
        err = _error(_post(c, keys["all"], {**CHAT, "model": "down"}), 503, "engine_unavailable")
        time.sleep(0.6)  # the health checker logs deployments going down
    assert "127.0.0.1" in err["message"] and "s3cret" not in err["message"]
    assert "ops:" not in err["message"]
    assert all("s3cret" not in r.getMessage() for r in caplog.records)


def test_a_body_too_deep_to_record_is_refused_and_still_recorded(app_env) -> None:  # type: ignore[no-untyped-def]
    c, keys = app_env
    deep = b"[" * 300 + b'"x"' + b"]" * 300
    raw = orjson.dumps(CHAT)[:-1] + b', "metadata": ' + deep + b"}"
    resp = _post(c, keys["all"], None, raw=raw)
    _error(resp, 400, "too_deep")
    rid = resp.headers["x-request-id"]
    trail = c.app.state.audit
    deadline = time.monotonic() + 5
    found: list[dict] = []
    while not found and time.monotonic() < deadline:
        time.sleep(0.1)
        found = [e for e in read_entries(trail.wal.directory) if e.get("request_id") == rid]
    assert found and found[0]["kind"] == "rejected" and found[0]["error_code"] == "too_deep"
