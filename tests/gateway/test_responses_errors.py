"""Engine failures on `/v1/responses` (translated deployment in front of a stub engine that
misbehaves on demand): the client gets OpenAI's envelope, a broken stream ends with a Responses
`error` event and never with `response.completed`, and nothing is stored. (The working paths
against real vLLM: wire/test_responses.py.)"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from starlette.testclient import TestClient

from bastion.app import build_app
from bastion.config import parse_settings
from bastion.identity.keys import create_key
from tests.conftest import audit_config
from tests.stub_engine import StubEngine

BODY = {"model": "stub", "input": "hi", "max_output_tokens": 8}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, str, StubEngine]]:
    stub = StubEngine().start()
    db = tmp_path_factory.mktemp("rsp-errs") / "b.db"
    settings = parse_settings(
        {
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
                            "apis": ["chat"],
                            "first_byte_timeout": 1.0,
                            "read_timeout": 1.0,
                        }
                    ]
                },
                "other": {"deployments": [{"url": stub.url, "served_name": "o"}]},
            },
        }
    )
    app = build_app(settings, health_interval=0.5)
    try:
        with TestClient(app) as c:
            key = create_key(app.state.db, team="t", known_models={"stub", "other"})[1]
            yield c, key, stub
    finally:
        stub.stop()


def _post(env: tuple[TestClient, str, StubEngine], body: dict[str, Any]) -> Any:
    c, key, _ = env
    return c.post("/v1/responses", json=body, headers={"Authorization": f"Bearer {key}"})


def test_translated_whole_answer_and_what_the_engine_got(env: Any) -> None:
    stub = env[2]
    resp = _post(env, {**BODY, "instructions": "be kind"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "response" and body["model"] == "stub"
    assert body["output"][0]["content"][0]["text"] == "hi" and body["instructions"] == "be kind"
    sent = stub.requests[-1]
    assert sent["model"] == "stub-served" and sent["max_tokens"] == 8
    assert sent["messages"][0] == {"role": "system", "content": "be kind"}
    c, key, _ = env
    got = c.get(f"/v1/responses/{body['id']}", headers={"Authorization": f"Bearer {key}"})
    assert got.status_code == 200 and got.json()["id"] == body["id"]
    auth = {"Authorization": f"Bearer {key}"}
    gone = c.delete(f"/v1/responses/{body['id']}", headers=auth)
    assert gone.json() == {"id": body["id"], "object": "response", "deleted": True}
    assert c.get(f"/v1/responses/{body['id']}", headers=auth).status_code == 404
    assert c.delete(f"/v1/responses/{body['id']}", headers=auth).status_code == 404


@pytest.mark.parametrize(("mode", "status"), [("500", 502), ("400", 400), ("garbage", 502)])
def test_engine_errors_in_openai_envelope(env: Any, mode: str, status: int) -> None:
    env[2].mode = mode
    try:
        resp = _post(env, BODY)
    finally:
        env[2].mode = "ok"
    assert resp.status_code == status
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]


def test_broken_stream_ends_with_an_error_event(env: Any) -> None:
    env[2].mode = "stall-stream"
    try:
        resp = _post(env, {**BODY, "stream": True})
    finally:
        env[2].mode = "ok"
    assert resp.status_code == 200
    events = [
        orjson.loads(line[6:])
        for line in resp.content.split(b"\n")
        if line.startswith(b"data: ")
    ]  # fmt: skip
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert "response.output_text.delta" in kinds and "response.completed" not in kinds
    assert kinds[-1] == "error" and events[-1]["code"] == "engine_timeout"
    # The stream never completed: nothing is kept under its id.
    c, key, _ = env
    rid = events[0]["response"]["id"]
    got = c.get(f"/v1/responses/{rid}", headers={"Authorization": f"Bearer {key}"})
    assert got.status_code == 404 and got.json()["error"]["code"] == "not_found"


def test_a_model_restriction_holds_for_responses(env: Any) -> None:
    c = env[0]
    app_db = c.app.state.db  # type: ignore[attr-defined]
    only_other = create_key(app_db, team="t", models=["other"], known_models={"stub", "other"})[1]
    resp = c.post("/v1/responses", json=BODY, headers={"Authorization": f"Bearer {only_other}"})
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "model_not_allowed"


def test_cancel_answers_in_openais_shape_and_metrics_name_the_api(env: Any) -> None:
    """Bastion runs no response in the background, so a stored one cannot be cancelled (400,
    as OpenAI answers for a response that was not created with `background: true`); one that is
    not there (or is another team's) is a 404. Metrics carry the wire API's name."""
    c, key, _ = env
    auth = {"Authorization": f"Bearer {key}"}
    made = _post(env, {**BODY, "store": True}).json()
    r = c.post(f"/v1/responses/{made['id']}/cancel", headers=auth)
    assert r.status_code == 400 and r.json()["error"]["code"] == "not_cancellable", r.text
    missing = c.post("/v1/responses/resp_nope/cancel", headers=auth)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert c.get(f"/v1/responses/{made['id']}", headers=auth).status_code == 200  # untouched
    metrics = c.get("/metrics").text
    assert 'endpoint="responses",model="stub",status="200"' in metrics
