"""The OpenAI adapters: the parser never fails with anything but a clear 4xx, whatever the
bytes, and fills in the canonical fields the stages read."""

import json

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.datastructures import Headers

from bastion.core.errors import BastionError, InvalidRequest
from bastion.core.request import ParsedRequest
from bastion.gateway.wire import ADAPTERS
from bastion.gateway.wire.openai import CHAT, COMPLETIONS, EMBEDDINGS

BY_NAME = {w.name: w for w in ADAPTERS}


def parse_request(
    endpoint: str, raw: bytes, headers: dict[str, str] | None = None
) -> ParsedRequest:
    return BY_NAME[endpoint].parse(raw, Headers(headers or {}))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=8,
)
ENDPOINTS = st.sampled_from(["chat", "completions", "embeddings"])


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(ENDPOINTS, st.binary(max_size=200))
def test_arbitrary_bytes(endpoint: str, raw: bytes) -> None:
    try:
        parse_request(endpoint, raw)  # type: ignore[arg-type]
    except BastionError as exc:
        assert 400 <= exc.status < 500


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(
    ENDPOINTS,
    st.dictionaries(
        st.sampled_from(
            [
                "model",
                "messages",
                "prompt",
                "input",
                "stream",
                "stream_options",
                "max_tokens",
                "n",
                "temperature",
                "user",
                "tools",
                "seed",
            ]
        ),
        json_values,
        max_size=8,
    ),
)
def test_arbitrary_json_objects(endpoint: str, body: dict) -> None:
    try:
        req = parse_request(endpoint, json.dumps(body).encode())  # type: ignore[arg-type]
    except InvalidRequest as exc:
        assert exc.status == 400 and exc.message
    else:
        assert isinstance(req.model, str) and req.model
        assert isinstance(req.stream, bool)


def test_valid_chat_keeps_unknown_fields() -> None:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "tools": [{"type": "function"}],
        "logprobs": True,
        "user": "u1",
        "stream_options": {"include_usage": True},
    }
    req = parse_request("chat", orjson.dumps(body))
    assert req.body["tools"] == [{"type": "function"}] and req.body["logprobs"] is True
    assert req.stream and req.client_wants_usage and req.client_user == "u1"


@pytest.mark.parametrize(
    ("endpoint", "body", "param"),
    [
        ("chat", {"messages": []}, "model"),
        ("chat", {"model": "m"}, "messages"),
        ("chat", {"model": 5, "messages": [{"role": "user"}]}, "model"),
        ("chat", {"model": "m", "messages": "hi"}, "messages"),
        ("chat", {"model": "m", "messages": [{"content": "x"}]}, "messages[0].role"),
        ("chat", {"model": "m", "messages": [{"role": "user"}], "max_tokens": "10"}, "max_tokens"),
        ("chat", {"model": "m", "messages": [{"role": "user"}], "max_tokens": True}, "max_tokens"),
        ("chat", {"model": "m", "messages": [{"role": "user"}], "n": 0}, "n"),
        ("chat", {"model": "m", "messages": [{"role": "user"}], "stream": "yes"}, "stream"),
        ("completions", {"model": "m"}, "prompt"),
        ("completions", {"model": "m", "prompt": {"a": 1}}, "prompt"),
        ("embeddings", {"model": "m", "input": []}, "input"),
        ("embeddings", {"model": "m", "input": "x", "stream": True}, "stream"),
    ],
)
def test_bad_requests_name_the_param(endpoint: str, body: dict, param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_request(endpoint, orjson.dumps(body))  # type: ignore[arg-type]
    assert info.value.param == param


def test_malformed_json() -> None:
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        parse_request("chat", b'{"model": ')
    with pytest.raises(InvalidRequest, match="JSON object"):
        parse_request("chat", b"[1, 2]")


def test_canonical_fields() -> None:
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}] * 3, "n": 2}
    req = parse_request("chat", orjson.dumps({**chat, "max_tokens": 50, "user": "u"}))
    assert (req.messages, req.choices, req.max_output, req.max_output_param) == (
        3,
        2,
        50,
        "max_tokens",
    )
    assert req.generates and req.session == "u" and req.endpoint == "chat"
    both = parse_request(
        "chat", orjson.dumps({**chat, "max_tokens": 50, "max_completion_tokens": 9})
    )
    assert (both.max_output, both.max_output_param) == (9, "max_completion_tokens")
    assert both.output_fields == [("max_tokens", 50), ("max_completion_tokens", 9)]
    bare = parse_request("completions", b'{"model": "m", "prompt": "x"}')
    assert bare.max_output is None and bare.messages is None and bare.session is None
    COMPLETIONS.set_output_ceiling(bare, 64)
    assert bare.body["max_tokens"] == bare.max_output == 64
    emb = parse_request("embeddings", b'{"model": "m", "input": ["a", "b"]}')
    assert not emb.generates and emb.prompt() == (["a", "b"], 0)


def test_session_hint_header_wins() -> None:
    body = {"model": "m", "messages": [{"role": "user"}], "prompt_cache_key": "k", "user": "u"}
    raw = orjson.dumps(body)
    assert parse_request("chat", raw, {"x-session-affinity": "s1"}).session == "s1"
    assert parse_request("chat", raw).session == "k"


def test_engine_body_names_the_served_model_and_asks_for_usage() -> None:
    req = parse_request(
        "chat", b'{"model": "alias", "messages": [{"role": "user"}], "stream": true}'
    )
    sent = orjson.loads(CHAT.engine_body(req, "org/served-7b"))
    assert sent["model"] == "org/served-7b" and sent["stream_options"] == {"include_usage": True}
    assert not req.client_wants_usage  # so the usage chunk is hidden from this client again
    emb = parse_request("embeddings", b'{"model": "alias", "input": "x"}')
    assert "stream_options" not in orjson.loads(EMBEDDINGS.engine_body(emb, "e5"))


def test_prompt_parts_for_counting() -> None:
    req = parse_request(
        "chat",
        orjson.dumps(
            {
                "model": "m",
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": "hi"}, {"type": "image_url"}],
                    },
                ],
            }
        ),
    )
    texts, extra = req.prompt()
    assert texts == ["be brief", "hi"] and extra == 8 + 2 * 8 + 1024


def test_nesting_the_trail_could_not_store_is_refused() -> None:
    """orjson reads 1,024 levels but writes 255: deeper bodies could not be recorded."""
    deep = b"[" * 300 + b"1" + b"]" * 300
    with pytest.raises(InvalidRequest) as info:
        parse_request("chat", b'{"model": "m", "messages": [{"role": "user"}], "x": ' + deep + b"}")
    assert info.value.code == "too_deep"
    ok = b"[" * 200 + b"1" + b"]" * 200
    parse_request("chat", b'{"model": "m", "messages": [{"role": "user"}], "x": ' + ok + b"}")
