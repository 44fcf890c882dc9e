"""The OpenAI Responses API through Bastion, with the official `openai` SDK, in front of the
real vLLM engine: natively (vLLM serves /v1/responses) and translated to chat completions (a
second alias of the same engine declared with `apis: [chat, completions, embeddings]`).
Two gateway replicas share one PostgreSQL: a stored response is read and continued on the
other replica, and is another team's 404."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
import sqlalchemy as sa

from bastion.local.launcher import VllmProcess
from bastion.store.schema import responses
from tests.audit_api import entries_of
from tests.conftest import TINY, Gateway, base_config, pg_database, usage_rows

pytestmark = pytest.mark.engine
NATIVE, TRANSLATED = "tiny", "tiny-tr"
BOTH = pytest.mark.parametrize("model", [NATIVE, TRANSLATED])
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


class Pair:
    def __init__(self, a: Gateway, b: Gateway, db_url: str, alpha: str, beta: str):
        self.a, self.b, self.db_url, self.alpha, self.beta = a, b, db_url, alpha, beta
        self.auditor = a.create_auditor_key("alpha", "carol")

    def client(self, gw: Gateway, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=gw.url + "/v1", api_key=key or self.alpha, max_retries=0, timeout=120
        )


@pytest.fixture(scope="module")
def pair(make_gateway: Callable[..., Gateway], chat_engine: VllmProcess) -> Iterator[Pair]:
    models = {
        NATIVE: {
            "max_tokens": 512,
            "deployments": [{"url": chat_engine.url, "served_name": TINY}],
        },
        TRANSLATED: {
            "max_tokens": 512,
            "deployments": [
                {
                    "url": chat_engine.url,
                    "served_name": TINY,
                    "apis": ["chat", "completions", "embeddings"],
                }
            ],
        },
    }
    with pg_database() as url:
        a = make_gateway(base_config(url, models))
        b = make_gateway(base_config(url, models))
        a.wait_ready()
        b.wait_ready()
        yield Pair(a, b, url, a.create_key("alpha", "--user", "alice"), a.create_key("beta"))


def _audit(pair: Pair, request_id: str) -> list[dict[str, Any]]:
    """The request's audit entries, contents opened, as an auditor of the team reads them."""
    return entries_of(pair.a.url, pair.auditor, request_id, timeout=15)


def _metered(pair: Pair, request_id: str, model: str, text: str | None = None) -> None:
    """One usage record and both audit entries, the answer in the trail as the client got it."""
    (row,) = usage_rows(pair.db_url, request_id=request_id)
    assert row.endpoint == "responses" and row.model == model and row.team == "alpha"
    assert row.prompt_tokens > 0 and row.completion_tokens > 0 and row.status == 200
    request, done = _audit(pair, request_id)
    assert request["kind"] == "request" and request["endpoint"] == "responses"
    assert isinstance(request["content"]["input"], str | list)
    assert done["kind"] == "completion" and done["outcome"] == "ok"
    assert done["completion_tokens"] == row.completion_tokens and done["engine_model"] == TINY
    response = done["content"]["response"]
    assert response["object"] == "response" and response["model"] == model
    if text is not None:
        parts = [
            p["text"]
            for item in response["output"]
            if item["type"] == "message"
            for p in item["content"]
        ]
        assert "".join(parts) == text


@BOTH
def test_create_plain(pair: Pair, model: str) -> None:
    with pair.client(pair.a) as client:
        raw = client.responses.with_raw_response.create(
            model=model, input="Say hello", instructions="Be brief.", max_output_tokens=16
        )
    resp = raw.parse()
    assert resp.object == "response" and resp.model == model
    assert resp.status in ("completed", "incomplete") and resp.output_text
    assert resp.usage is not None and resp.usage.output_tokens <= 16
    body = raw.http_response.json()
    # Strict clients: text parts carry an annotations array, never null.
    parts = [p for item in body["output"] if item["type"] == "message" for p in item["content"]]
    assert parts and all(p["annotations"] == [] for p in parts)
    assert body["store"] is True and body["instructions"] == "Be brief."
    _metered(pair, raw.headers["x-request-id"], model, resp.output_text)


@BOTH
def test_stream_events(pair: Pair, model: str) -> None:
    with pair.client(pair.a) as client:
        raw = client.responses.with_raw_response.create(
            model=model, input="Tell me a story", max_output_tokens=24, stream=True
        )
        events = list(raw.parse())
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] in (
        "response.completed",
        "response.incomplete",
    )
    assert "response.output_text.delta" in kinds and "response.output_item.done" in kinds
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert final.output_text == text and final.model == model
    assert final.usage is not None and 0 < final.usage.output_tokens <= 24
    numbers = [e.sequence_number for e in events]
    assert numbers == sorted(numbers)
    # Stored (store defaults to true) once the stream completed, readable on the other replica.
    with pair.client(pair.b) as other:
        assert other.responses.retrieve(final.id).output_text == text
    _metered(pair, raw.headers["x-request-id"], model, text)


def _arguments(arguments: str) -> Any:
    """A function call's arguments parse as JSON. (The tiny model under vLLM 0.32 does not keep
    to the tool's parameter schema with a named tool_choice: its JSON is often a number, not an
    object. Bastion passes on what the engine generated.)"""
    assert arguments
    return json.loads(arguments)


@BOTH
def test_named_tool_choice_gives_json_arguments(pair: Pair, model: str) -> None:
    with pair.client(pair.a) as client:
        resp = client.responses.create(
            model=model,
            input="What is the weather in Zurich?",
            tools=[WEATHER],  # type: ignore[list-item]
            tool_choice={"type": "function", "name": "get_weather"},
            temperature=0,
            max_output_tokens=400,
        )
        calls = [o for o in resp.output if o.type == "function_call"]
        assert calls and calls[0].name == "get_weather", resp.output
        _arguments(calls[0].arguments)
        assert calls[0].call_id
        # The tool's result goes back as a function_call_output item.
        follow = client.responses.create(
            model=model,
            previous_response_id=resp.id,
            input=[
                {"type": "function_call_output", "call_id": calls[0].call_id, "output": "Sunny"}
            ],
            max_output_tokens=8,
        )
        assert follow.status in ("completed", "incomplete")
        assert follow.usage is not None and resp.usage is not None
        assert follow.usage.input_tokens > resp.usage.input_tokens


@BOTH
def test_streamed_tool_call_events(pair: Pair, model: str) -> None:
    with pair.client(pair.a) as client:
        events = list(
            client.responses.create(
                model=model,
                input="Weather in Bern?",
                tools=[WEATHER],  # type: ignore[list-item]
                tool_choice={"type": "function", "name": "get_weather"},
                temperature=0,
                max_output_tokens=400,
                stream=True,
            )
        )
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds, kinds
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert done.arguments == deltas
    _arguments(deltas)
    (call,) = [o for o in events[-1].response.output if o.type == "function_call"]
    assert call.arguments == deltas and call.name == "get_weather"


@BOTH
def test_store_and_previous_response_across_replicas(pair: Pair, model: str) -> None:
    with pair.client(pair.a) as on_a, pair.client(pair.b) as on_b:
        first = on_a.responses.create(model=model, input="My name is Ada.", max_output_tokens=8)
        assert on_b.responses.retrieve(first.id).output_text == first.output_text
        raw = on_b.responses.with_raw_response.create(
            model=model, previous_response_id=first.id, input="What is my name?",
            max_output_tokens=8,
        )  # fmt: skip
        second = raw.parse()
        assert second.previous_response_id == first.id
        # The engine was sent the whole conversation: the first turn, its answer, the question.
        assert second.usage is not None and first.usage is not None
        assert second.usage.input_tokens > first.usage.input_tokens
        items = httpx.get(
            f"{pair.b.url}/v1/responses/{second.id}/input_items",
            headers={"Authorization": f"Bearer {pair.alpha}"},
        ).json()["data"]
        assert items[0]["content"] == "My name is Ada." and len(items) >= 3
    # Kept sealed: the stored row holds no plaintext.
    engine = sa.create_engine(pair.db_url)
    with engine.connect() as conn:
        row = conn.execute(sa.select(responses).where(responses.c.id == first.id)).one()
    engine.dispose()
    assert row.team == "alpha" and b"My name is Ada" not in row.content
    _metered(pair, raw.headers["x-request-id"], model)


def test_another_team_gets_404_and_delete(pair: Pair) -> None:
    with pair.client(pair.a) as alpha, pair.client(pair.b, pair.beta) as beta:
        mine = alpha.responses.create(model=NATIVE, input="secret plans", max_output_tokens=4)
        with pytest.raises(openai.NotFoundError):
            beta.responses.retrieve(mine.id)
        with pytest.raises(openai.NotFoundError):
            beta.responses.create(
                model=NATIVE, previous_response_id=mine.id, input="and?", max_output_tokens=4
            )
        with pytest.raises(openai.NotFoundError):
            beta.responses.delete(mine.id)
        alpha.responses.delete(mine.id)
        with pytest.raises(openai.NotFoundError):
            alpha.responses.retrieve(mine.id)
        unstored = alpha.responses.create(
            model=NATIVE, input="forget me", store=False, max_output_tokens=4
        )
        assert unstored.store is False
        with pytest.raises(openai.NotFoundError):
            alpha.responses.retrieve(unstored.id)
        # Nothing runs in the background, so nothing can be cancelled.
        kept = alpha.responses.create(model=NATIVE, input="keep me", max_output_tokens=4)
        with pytest.raises(openai.BadRequestError):
            alpha.responses.cancel(kept.id)
        with pytest.raises(openai.NotFoundError):
            beta.responses.cancel(kept.id)


def test_error_classes(pair: Pair) -> None:
    with pair.client(pair.a) as client:
        with pytest.raises(openai.NotFoundError):
            client.responses.create(model="no-such-model", input="hi")
        with pytest.raises(openai.BadRequestError) as bad:
            client.responses.create(model=NATIVE, input="hi", max_output_tokens=0)
        assert bad.value.body["param"] == "max_output_tokens"  # type: ignore[index]
        # The output ceiling is max_output_tokens: capped by the model's max_tokens.
        with pytest.raises(openai.BadRequestError) as cap:
            client.responses.create(model=TRANSLATED, input="hi", max_output_tokens=513)
        assert cap.value.body["param"] == "max_output_tokens"  # type: ignore[index]
        with pytest.raises(openai.BadRequestError) as bg:
            client.responses.create(model=NATIVE, input="hi", background=True)
        assert bg.value.body["param"] == "background"  # type: ignore[index]
        with pytest.raises(openai.BadRequestError) as shell:
            client.responses.create(model=TRANSLATED, input="ls", tools=[{"type": "local_shell"}])
        assert "local_shell" in shell.value.message
    with pair.client(pair.a, "bst-not-a-key") as stranger:
        with pytest.raises(openai.AuthenticationError):
            stranger.responses.create(model=NATIVE, input="hi")
