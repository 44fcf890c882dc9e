"""Every wire API reserves its own output-token field against token limits (issue 11, item 7):
`max_tokens` on Anthropic Messages, `max_output_tokens` on the Responses API, both translated
to chat completions for an engine (stubbed) that serves only OpenAI's chat APIs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from bastion.app import build_app
from bastion.config import parse_settings
from bastion.identity.keys import create_key
from tests.conftest import audit_config
from tests.stub_engine import StubEngine


@pytest.fixture(scope="module")
def stub() -> Iterator[StubEngine]:
    s = StubEngine().start()
    yield s
    s.stop()


def _app(stub: StubEngine, tmp: Path) -> TestClient:
    settings = parse_settings(
        {
            "database": {"url": f"sqlite:///{tmp}/w.db", "usage_flush_seconds": 0.05},
            "audit": audit_config(tmp),
            "cost_centers": {"cc": {}},
            "teams": {"t": {"cost_center": "cc", "model_limits": {"stub": {"tpm": 40}}}},
            "models": {
                "stub": {
                    "max_tokens": 50,
                    "deployments": [
                        {
                            "url": stub.url,
                            "served_name": "stub-served",
                            "apis": ["chat", "completions", "embeddings"],
                        }
                    ],
                }
            },
        }
    )
    return TestClient(build_app(settings))


#: (path, body with the output ceiling set to `n`, the field's name)
WIRES = {
    "messages": (
        "/v1/messages",
        lambda n: {
            "model": "stub",
            "max_tokens": n,
            "messages": [{"role": "user", "content": "hi"}],
        },
    ),
    "responses": (
        "/v1/responses",
        lambda n: {"model": "stub", "input": "hi", "max_output_tokens": n, "store": False},
    ),
}


@pytest.mark.parametrize("wire", sorted(WIRES))
def test_each_api_reserves_its_own_output_field(
    stub: StubEngine, tmp_path: Path, wire: str
) -> None:
    path, body = WIRES[wire]
    with _app(stub, tmp_path) as c:
        _rec, token = create_key(c.app.state.db, team="t", known_models={"stub"})  # type: ignore[attr-defined]
        h = {"Authorization": f"Bearer {token}"}
        # A ceiling of 45 cannot fit in 40 tokens a minute with any prompt: refused before the
        # engine. Were the field ignored, the model's default (50) would refuse the small one too.
        big = c.post(path, json=body(45), headers=h)
        assert big.status_code == 429, big.text
        assert "tokens per minute" in _message(big.json())
        small = c.post(path, json=body(5), headers=h)
        assert small.status_code == 200, small.text
        left = int(small.headers["x-ratelimit-remaining-tokens"])
        assert 0 < left <= 40 - 5  # the 5 output tokens were reserved, and the prompt too


def _message(payload: dict[str, Any]) -> str:
    """OpenAI's envelope or Anthropic's: both carry error.message."""
    return str(payload["error"]["message"])
