"""Anthropic Messages ↔ chat completions without an engine: what the tiny model cannot show
(thinking from `reasoning_content`, several tool calls, an engine error mid-stream), and the
normalisation of Claude Code's requests. The engine-backed tests are in test_anthropic.py."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.datastructures import Headers

from bastion.core.errors import RateLimited
from bastion.gateway.wire.anthropic import MESSAGES, MessagesStream, normalise, parse_event
from bastion.gateway.wire.anthropic_chat import MESSAGES_VIA_CHAT, ChatToMessagesStream, chat_body
from bastion.limits.tokens import prompt_upper_bound

HEADERS = Headers({"x-claude-code-session-id": "sess-1"})


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return b"data: " + orjson.dumps({"model": "served", "choices": [choice]})


def _events(raw: bytes) -> list[tuple[str | None, Any]]:
    return [parse_event(e) for e in raw.split(b"\n\n") if e.strip()]


def test_chat_stream_becomes_the_full_event_sequence() -> None:
    tr = ChatToMessagesStream("alias", True, collect=True)
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f"}}
    engine = [
        _chunk({"role": "assistant", "content": ""}),
        _chunk({"reasoning_content": "Let me "}),
        _chunk({"reasoning_content": "think."}),
        _chunk({"content": "Calling."}),
        _chunk({"tool_calls": [{**call, "function": {"name": "f", "arguments": '{"a"'}}]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}),
        _chunk({"tool_calls": [{"index": 1, "id": "call_2", "function": {"name": "g"}}]}),
        _chunk({}, finish="tool_calls"),
        b'data: {"choices":[],"usage":{"prompt_tokens":30,"completion_tokens":9,'
        b'"prompt_tokens_details":{"cached_tokens":16}}}',
        b"data: [DONE]",
    ]
    out = b"".join(x for e in engine if (x := tr.event(e)) is not None)
    assert tr.state.done and tr.state.usage is not None
    assert (tr.state.usage.prompt_tokens, tr.state.usage.cached_tokens) == (30, 16)
    recorded = tr.assembled()  # the audit trail records before the end is sent
    events = _events(out + tr.end())
    names = [n for n, _ in events]
    assert names == [
        "message_start",
        "ping",
        "content_block_start",  # thinking
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",  # text
        "content_block_delta",
        "content_block_stop",
        "content_block_start",  # tool_use f
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",  # tool_use g
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(data["type"] == name for name, data in events)
    assert events[0][1]["message"]["model"] == "alias"
    assert [d["index"] for n, d in events if n == "content_block_start"] == [0, 1, 2, 3]
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] == "tool_use"
    assert delta["usage"] == {
        "input_tokens": 14,
        "output_tokens": 9,
        "cache_read_input_tokens": 16,
        "cache_creation_input_tokens": 0,
    }
    assert [b["type"] for b in recorded["content"]] == ["thinking", "text", "tool_use", "tool_use"]
    assert recorded["content"][0]["thinking"] == "Let me think."
    assert recorded["content"][2]["input"] == {"a": 1} and recorded["content"][3]["input"] == {}
    assert recorded["stop_reason"] == "tool_use" and recorded["usage"]["output_tokens"] == 9


def test_mid_stream_engine_error_is_one_anthropic_error_event() -> None:
    tr = ChatToMessagesStream("alias", True, collect=True)
    assert tr.event(_chunk({"content": "Hi"})) is not None
    assert tr.event(b'data: {"error": {"message": "boom"}}') is None
    assert tr.state.error is not None
    ((name, data),) = _events(tr.error(tr.state.error))
    assert name == "error" and data["type"] == "error"
    assert data["error"]["type"] == "api_error" and "boom" in data["error"]["message"]


def test_native_stream_relays_and_assembles() -> None:
    tr = MessagesStream("alias", True, collect=True)
    engine = [
        b'event: message_start\ndata: {"type":"message_start","message":{"id":"m","type":'
        b'"message","role":"assistant","model":"served","content":[],"usage":'
        b'{"input_tokens":10,"cache_read_input_tokens":32,"output_tokens":0}}}',
        b'event: ping\ndata: {"type":"ping"}',
        b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
        b'"content_block":{"type":"thinking","thinking":""}}',
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"thinking_delta","thinking":"Hm."}}',
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"signature_delta","signature":"sig"}}',
        b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}',
        # A tool_use delta without its start (seen from some engines): still assembled.
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":1,'
        b'"delta":{"type":"input_json_delta","partial_json":"{\\"q\\": 2}"}}',
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":'
        b'"tool_use"},"usage":{"output_tokens":7}}',
        b'event: message_stop\ndata: {"type":"message_stop"}',
    ]
    out = [tr.event(e) for e in engine]
    assert out[-1] is None and tr.state.done  # message_stop waits for the audit trail
    first = parse_event(out[0].rstrip(b"\n"))  # type: ignore[union-attr]
    assert first[0] == "message_start" and first[1]["message"]["model"] == "alias"
    assert tr.state.engine_model == "served"
    u = tr.state.usage
    assert u is not None and (u.prompt_tokens, u.cached_tokens, u.completion_tokens) == (42, 32, 7)
    msg = tr.assembled()
    assert msg["content"][0] == {"type": "thinking", "thinking": "Hm.", "signature": "sig"}
    assert msg["content"][1] == {"type": "tool_use", "input": {"q": 2}}
    assert msg["stop_reason"] == "tool_use"
    assert parse_event(tr.end().rstrip(b"\n"))[0] == "message_stop"


def test_claude_code_requests_are_normalised() -> None:
    billing = "x-anthropic-billing-header: cc_version=2.1.332.abc; cc_entrypoint=cli; cch=1a2b;"
    body = {
        "model": "m",
        "max_tokens": 32000,
        "system": [{"type": "text", "text": billing}, {"type": "text", "text": "Top."}],
        "messages": [
            {"role": "system", "content": "Inline leading."},
            {"role": "user", "content": "Hi"},
            {"role": "system", "content": [{"type": "text", "text": billing}]},
            {"role": "system", "content": "Reminder."},
            {"role": "user", "content": "Again"},
        ],
    }
    out = normalise(body)
    assert out["system"] == [
        {"type": "text", "text": "Top."},
        {"type": "text", "text": "Inline leading."},
    ]
    assert [m["role"] for m in out["messages"]] == ["user", "system", "user"]
    assert body["messages"][0]["role"] == "system"  # the client's body (audited) is untouched
    req = MESSAGES.parse(orjson.dumps(body), HEADERS)
    assert (req.max_output, req.session, req.messages) == (32000, "sess-1", 5)
    chat = orjson.loads(MESSAGES_VIA_CHAT.engine_body(req, "served"))
    assert chat["messages"][0] == {"role": "system", "content": "Top.Inline leading."}
    assert billing not in orjson.dumps(chat).decode()


def test_tool_conversation_translates_to_chat() -> None:
    body = {
        "model": "m",
        "max_tokens": 50,
        "stream": True,
        "stop_sequences": ["END"],
        "metadata": {"user_id": "u-7"},
        "tools": [{"name": "f", "input_schema": {"type": "object"}, "strict": True}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Do it"}]},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "…", "signature": "s"},
                    {"type": "text", "text": "Sure."},
                    {"type": "tool_use", "id": "t1", "name": "f", "input": {"x": 1}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": "ok", "is_error": True},
                    {"type": "text", "text": "Next"},
                ],
            },
        ],
    }
    req = MESSAGES.parse(orjson.dumps(body), Headers({}))
    chat = chat_body(req, "served")
    assert chat["messages"] == [
        {"role": "user", "content": "Do it"},
        {
            "role": "assistant",
            "content": "Sure.",
            "tool_calls": [
                {"id": "t1", "type": "function", "function": {"name": "f", "arguments": '{"x":1}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "t1", "content": "Error: ok"},
        {"role": "user", "content": "Next"},
    ]
    assert chat["tool_choice"] == "required" and chat["parallel_tool_calls"] is False
    assert chat["tools"][0]["function"]["strict"] is True
    assert chat["stop"] == ["END"] and chat["user"] == "u-7" and chat["max_tokens"] == 50
    assert chat["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
        ({"model": "m", "max_tokens": 5, "messages": []}, "messages"),
        ({"model": "m", "max_tokens": 5, "messages": [{"role": "bot", "content": "x"}]}, "role"),
        (
            {
                "model": "m",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": "x"}],
                "tool_choice": {"type": "tool"},
            },
            "tool_choice.name",
        ),
    ],
)
def test_invalid_requests_name_the_field(body: dict[str, Any], param: str) -> None:
    from bastion.core.errors import InvalidRequest

    with pytest.raises(InvalidRequest) as exc:
        MESSAGES.parse(orjson.dumps(body), Headers({}))
    assert param in (exc.value.param or "")


def test_errors_use_anthropic_envelope() -> None:
    r = MESSAGES.error_response(RateLimited("slow down", headers={"retry-after": "3"}), "req_1")
    assert r.status_code == 429 and r.headers["retry-after"] == "3"
    assert orjson.loads(r.body) == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "slow down"},
        "request_id": "req_1",
    }


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.text(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=8,
)
_TEXT = st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=4)})
#: Blocks whose checked fields are right and whose other fields are anything: what the
#: translation must survive (Claude Code and other clients add fields the schema lacks).
_BLOCK = (
    _TEXT
    | st.fixed_dictionaries(
        {"type": st.just("tool_use"), "input": st.dictionaries(st.text(max_size=3), _JSON)},
        optional={"id": _JSON, "name": _JSON},
    )
    | st.fixed_dictionaries(
        {"type": st.just("tool_result")},
        optional={
            "tool_use_id": _JSON,
            "content": st.text(max_size=4)
            | st.lists(_TEXT | _JSON | st.fixed_dictionaries({"type": st.just("text")}), max_size=2)
            | _JSON,
            "is_error": _JSON,
        },
    )
    | st.fixed_dictionaries({"type": st.sampled_from(["image", "document"]), "source": _JSON})
    | st.fixed_dictionaries(
        {"type": st.sampled_from(["thinking", "x"])}, optional={"thinking": _JSON, "x": _JSON}
    )
)
_MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "assistant", "system"]),
        "content": st.text(max_size=4) | st.lists(_BLOCK, max_size=3),
    },
    optional={"cache_control": _JSON},
)
_TOOL = st.fixed_dictionaries(
    {"name": st.text(max_size=3)},
    optional={"input_schema": _JSON, "description": _JSON, "strict": _JSON, "type": _JSON},
)
_BODY = st.fixed_dictionaries(
    {
        "model": st.just("m"),
        "max_tokens": st.integers(1, 64),
        "messages": st.lists(_MESSAGE, min_size=1, max_size=3),
    },
    optional={
        "system": st.text(max_size=4) | st.lists(_BLOCK, max_size=2),
        "tools": st.lists(_TOOL, max_size=2),
        "tool_choice": st.fixed_dictionaries(
            {"type": st.sampled_from(["auto", "any", "none"])},
            optional={"disable_parallel_tool_use": _JSON},
        ),
        "metadata": st.dictionaries(st.sampled_from(["user_id", "x"]), _JSON),
        "stop_sequences": st.lists(st.text(max_size=3), max_size=2),
        "stream": st.booleans(),
        "thinking": st.dictionaries(st.text(max_size=3), _JSON),
        "temperature": _JSON,
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_BODY)
def test_any_body_is_a_400_or_translates(body: dict[str, Any]) -> None:
    """Whatever a client sends, the adapter answers 400 or builds both engine bodies."""
    from bastion.core.errors import InvalidRequest

    try:
        req = MESSAGES.parse(orjson.dumps(body), HEADERS)
    except InvalidRequest:
        return
    assert prompt_upper_bound(req) > 0  # what the limits reserve for the prompt
    orjson.loads(MESSAGES.engine_body(req, "served"))
    orjson.loads(MESSAGES_VIA_CHAT.engine_body(req, "served"))
