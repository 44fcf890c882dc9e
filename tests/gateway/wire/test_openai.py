"""The request parser never fails with anything but a clear 4xx, whatever the bytes."""

import json

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bastion.core.errors import BastionError, InvalidRequest
from bastion.gateway.protocol import parse_request

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
