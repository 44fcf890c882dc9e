"""The official `anthropic` SDK against Bastion in front of the real tiny vLLM engine, on a
deployment that serves Messages natively and on one that Bastion translates to chat completions:
create, stream (the event order), forced tool use, count_tokens, models, error classes; each
call's audit entries and usage record checked."""

from __future__ import annotations

import json
from collections.abc import Iterator

import anthropic
import httpx
import pytest

from tests.conftest import Gateway, usage_rows
from tests.gateway.wire.anthropic_gw import (
    CAP,
    CAPPED,
    NATIVE,
    TRANSLATED,
    audit_of,
    db_url,
    msg_gateway,
)

pytestmark = pytest.mark.engine
__all__ = ["msg_gateway"]
HELLO = [{"role": "user", "content": "Hello, who are you?"}]
#: `strict`: the engine holds the input to the schema (the tiny model would ramble otherwise).
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "strict": True,
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Paris", "London"]}},
        "required": ["city"],
        "additionalProperties": False,
    },
}


@pytest.fixture(scope="module")
def keys(msg_gateway: Gateway) -> dict[str, str]:
    return {
        "alice": msg_gateway.create_key("alpha", "--user", "alice"),
        "auditor": msg_gateway.create_auditor_key("alpha", "carol"),
        "narrow": msg_gateway.create_key("alpha", "--models", TRANSLATED),
        "slow": msg_gateway.create_key("slow"),
    }


@pytest.fixture
def client(msg_gateway: Gateway, keys: dict[str, str]) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(
        base_url=msg_gateway.url, api_key=keys["alice"], max_retries=0, timeout=120
    ) as c:
        yield c


@pytest.mark.parametrize("model", [NATIVE, TRANSLATED])
def test_create(
    client: anthropic.Anthropic, msg_gateway: Gateway, keys: dict[str, str], model: str
) -> None:
    raw = client.messages.with_raw_response.create(
        model=model,
        max_tokens=12,
        system=[
            {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.0.abc; cch=1;"},
            {"type": "text", "text": "You are terse."},
        ],
        messages=HELLO,
        extra_body={"temperature": 0},
        metadata={"user_id": f"create-{model}"},
    )
    rid = raw.headers["x-request-id"]
    msg = raw.parse()
    assert msg.model == model and msg.role == "assistant" and msg.type == "message"
    assert msg.content and msg.content[0].type == "text" and msg.content[0].text
    assert msg.stop_reason in ("max_tokens", "end_turn")
    assert msg.usage.input_tokens > 0 and 0 < msg.usage.output_tokens <= 12
    (row,) = usage_rows(db_url(msg_gateway), request_id=rid)
    assert row.endpoint == "messages" and row.status == 200 and row.outcome == "ok"
    assert row.client_user == f"create-{model}" and row.deployment == f"{model}[0]"
    assert row.prompt_tokens == msg.usage.input_tokens + (msg.usage.cache_read_input_tokens or 0)
    assert row.completion_tokens == msg.usage.output_tokens
    req, done = audit_of(msg_gateway, keys["auditor"], rid)
    assert req["kind"] == "request" and req["content"]["messages"] == HELLO
    assert done["content"]["response"]["content"][0]["text"] == msg.content[0].text
    assert done["engine_model"] == "tiny-chat"


@pytest.mark.parametrize("model", [NATIVE, TRANSLATED])
def test_stream_event_order(
    client: anthropic.Anthropic, msg_gateway: Gateway, keys: dict[str, str], model: str
) -> None:
    with client.messages.with_streaming_response.create(
        model=model, max_tokens=16, messages=HELLO, stream=True
    ) as resp:
        rid = resp.headers["x-request-id"]
        names = [ln[7:].strip() for ln in resp.iter_lines() if ln.startswith("event: ")]
    events = [n for n in names if n != "ping"]
    assert events[0] == "message_start" and events[-2:] == ["message_delta", "message_stop"]
    body = events[1:-2]
    assert body[0] == "content_block_start" and body[-1] == "content_block_stop"
    assert "content_block_delta" in body and "error" not in events
    # Blocks do not interleave: every start is closed before the next one opens.
    depth = 0
    for name in body:
        depth += {"content_block_start": 1, "content_block_stop": -1}.get(name, 0)
        assert depth in (0, 1)
    # The SDK's own accumulator reads the same stream.
    with client.messages.stream(model=model, max_tokens=16, messages=HELLO) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.content[0].text == text and final.model == model
    assert final.usage.output_tokens > 0 and final.usage.input_tokens > 0
    (row,) = usage_rows(db_url(msg_gateway), request_id=rid)
    assert row.stream and row.endpoint == "messages" and row.completion_tokens > 0
    assert not row.tokens_estimated and row.prompt_tokens > 0
    _req, done = audit_of(msg_gateway, keys["auditor"], rid)
    assembled = done["content"]["response"]
    assert assembled["content"][0]["type"] == "text" and assembled["stop_reason"]
    assert done["outcome"] == "ok" and done["aborted"] is False


@pytest.mark.parametrize("model", [NATIVE, TRANSLATED])
@pytest.mark.parametrize("stream", [False, True])
def test_forced_tool_use(
    client: anthropic.Anthropic,
    msg_gateway: Gateway,
    keys: dict[str, str],
    model: str,
    stream: bool,
) -> None:
    kwargs = {
        "model": model,
        "max_tokens": 300,
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [WEATHER],
        "tool_choice": {"type": "tool", "name": "get_weather"},
    }
    if stream:
        with client.messages.stream(**kwargs) as s:  # type: ignore[arg-type]
            msg = s.get_final_message()
            rid = s.response.headers["x-request-id"]
    else:
        raw = client.messages.with_raw_response.create(**kwargs)  # type: ignore[arg-type]
        msg, rid = raw.parse(), raw.headers["x-request-id"]
    uses = [b for b in msg.content if b.type == "tool_use"]
    assert uses and uses[0].name == "get_weather" and isinstance(uses[0].input, dict)
    assert uses[0].input["city"] in ("Paris", "London") and msg.stop_reason == "tool_use"
    _req, done = audit_of(msg_gateway, keys["auditor"], rid)
    recorded = [b for b in done["content"]["response"]["content"] if b["type"] == "tool_use"]
    assert recorded[0]["name"] == "get_weather" and recorded[0]["input"] == uses[0].input
    # The conversation goes on with the tool's result (tool_result → the engine).
    follow = client.messages.create(
        model=model,
        max_tokens=8,
        tools=[WEATHER],
        messages=[
            kwargs["messages"][0],  # type: ignore[index]
            {"role": "assistant", "content": [u.model_dump() for u in uses]},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": uses[0].id, "content": "Sunny, 21C"}
                ],
            },
        ],
    )
    assert follow.content and follow.usage.input_tokens > 0


@pytest.mark.parametrize("model", [NATIVE, TRANSLATED])
def test_count_tokens(client: anthropic.Anthropic, msg_gateway: Gateway, model: str) -> None:
    counted = client.messages.with_raw_response.count_tokens(model=model, messages=HELLO)
    short = counted.parse()
    longer = client.messages.count_tokens(
        model=model, system="You are a careful assistant. " * 20, messages=HELLO
    )
    assert 0 < short.input_tokens < longer.input_tokens
    made = client.messages.create(model=model, max_tokens=1, messages=HELLO)
    # The engine's own count: what a generation of the same prompt is charged.
    assert short.input_tokens == made.usage.input_tokens + (made.usage.cache_read_input_tokens or 0)
    (row,) = usage_rows(db_url(msg_gateway), request_id=counted.headers["x-request-id"])
    assert (row.endpoint, row.model, row.status) == ("count_tokens", model, 200)
    assert not row.cost_micros and not row.completion_tokens  # counting is not billed


def test_models_list_in_anthropic_shape(
    client: anthropic.Anthropic, msg_gateway: Gateway, keys: dict[str, str]
) -> None:
    ids = [m.id for m in client.models.list()]
    assert sorted(ids) == sorted([NATIVE, TRANSLATED, CAPPED])
    assert client.models.retrieve(TRANSLATED).id == TRANSLATED
    narrow = anthropic.Anthropic(base_url=msg_gateway.url, api_key=keys["narrow"], max_retries=0)
    assert [m.id for m in narrow.models.list()] == [TRANSLATED]
    with pytest.raises(anthropic.NotFoundError):
        narrow.models.retrieve(NATIVE)
    # Without anthropic-version: OpenAI's shape, whichever header carries the key.
    plain = httpx.get(msg_gateway.url + "/v1/models", headers={"x-api-key": keys["narrow"]})
    assert plain.json()["object"] == "list" and plain.json()["data"][0]["id"] == TRANSLATED


def test_claude_code_max_tokens_is_clamped(
    client: anthropic.Anthropic, msg_gateway: Gateway
) -> None:
    raw = client.messages.with_raw_response.create(
        model=CAPPED, max_tokens=32000, messages=HELLO, extra_body={"temperature": 0}
    )
    msg = raw.parse()
    assert raw.headers["x-bastion-max-tokens-clamped"] == f"32000->{CAP}"
    assert msg.usage.output_tokens <= CAP
    (row,) = usage_rows(db_url(msg_gateway), request_id=raw.headers["x-request-id"])
    assert row.status == 200 and row.completion_tokens == msg.usage.output_tokens


def test_error_classes(msg_gateway: Gateway, keys: dict[str, str]) -> None:
    def sdk(key: str) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=msg_gateway.url, api_key=key, max_retries=0)

    c = sdk(keys["alice"])
    with pytest.raises(anthropic.AuthenticationError) as e401:
        sdk("bst-not-a-key").messages.create(model=NATIVE, max_tokens=4, messages=HELLO)
    assert e401.value.body["type"] == "error"  # type: ignore[index]
    assert e401.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    # A key's model restriction applies to this API too.
    with pytest.raises(anthropic.PermissionDeniedError):
        sdk(keys["narrow"]).messages.create(model=NATIVE, max_tokens=4, messages=HELLO)
    with pytest.raises(anthropic.PermissionDeniedError):
        sdk(keys["narrow"]).messages.count_tokens(model=NATIVE, messages=HELLO)
    assert sdk(keys["narrow"]).messages.create(model=TRANSLATED, max_tokens=2, messages=HELLO)
    with pytest.raises(anthropic.NotFoundError) as e404:
        c.messages.create(model="no-such-model", max_tokens=4, messages=HELLO)
    assert e404.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError) as e400:
        c.messages.create(model=NATIVE, max_tokens=0, messages=HELLO)
    assert "max_tokens" in e400.value.message
    missing = httpx.post(
        msg_gateway.url + "/v1/messages",
        headers={"x-api-key": keys["alice"]},
        json={"model": NATIVE, "messages": HELLO},
    )
    assert missing.status_code == 400 and "max_tokens" in missing.json()["error"]["message"]
    slow = sdk(keys["slow"])
    slow.messages.create(model=NATIVE, max_tokens=2, messages=HELLO)
    with pytest.raises(anthropic.RateLimitError) as e429:
        slow.messages.create(model=NATIVE, max_tokens=2, messages=HELLO)
    assert e429.value.response.headers["x-request-id"].startswith("req_")
    assert e429.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]


def test_engine_rejection_and_headers(msg_gateway: Gateway, keys: dict[str, str]) -> None:
    """Anthropic clients' headers and query are accepted; the engine's 400 (here: a prompt
    past the context window) comes back in Anthropic's envelope."""
    r = httpx.post(
        msg_gateway.url + "/v1/messages?beta=true",
        headers={
            "x-api-key": keys["alice"],
            "anthropic-version": "2023-06-01",
            "anthropic-beta": "interleaved-thinking-2025-05-14",
        },
        json={"model": NATIVE, "max_tokens": 70000, "messages": HELLO},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert r.headers["x-request-id"] == body["request_id"]
    assert httpx.head(msg_gateway.url + "/").status_code == 200


def test_claude_code_system_messages_normalised(
    client: anthropic.Anthropic, msg_gateway: Gateway, keys: dict[str, str]
) -> None:
    """System prompts inside `messages` and the billing block, as Claude Code sends them."""
    body = {
        "model": NATIVE,
        "max_tokens": 4,
        "messages": [
            {"role": "system", "content": "x-anthropic-billing-header: cc_version=2.1.3; cch=9;"},
            {"role": "system", "content": [{"type": "text", "text": "You are Claude Code."}]},
            *HELLO,
            {"role": "system", "content": "Reminder: be brief."},
            {"role": "assistant", "content": "Hi"},
            {"role": "user", "content": "Again?"},
        ],
    }
    for model in (NATIVE, TRANSLATED):
        r = httpx.post(
            msg_gateway.url + "/v1/messages",
            headers={"x-api-key": keys["alice"], "anthropic-version": "2023-06-01"},
            json={**body, "model": model},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["content"] and answer["model"] == model
        assert "stop_sequence" in answer and answer["type"] == "message"  # the documented shape
    short = client.messages.count_tokens(model=NATIVE, messages=HELLO)
    counted = httpx.post(
        msg_gateway.url + "/v1/messages/count_tokens",
        headers={"x-api-key": keys["alice"], "anthropic-version": "2023-06-01"},
        json={"model": NATIVE, "messages": [body["messages"][0], *HELLO]},
    ).json()
    # The billing block is not part of what the engine sees.
    assert counted["input_tokens"] == short.input_tokens, json.dumps(counted)
