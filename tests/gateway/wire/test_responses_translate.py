"""The Responses adapter's parsing and its chat-completions translation, without an engine:
Codex CLI's request shape, what is translated, what is refused, and the event sequence built
from chat chunks. (The same paths against real vLLM: test_responses.py.)"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from starlette.datastructures import Headers

from bastion.core.errors import InvalidRequest
from bastion.gateway.wire.responses import RESPONSES, ResponsesStream
from bastion.gateway.wire.responses_chat import RESPONSES_VIA_CHAT

#: The shape Codex CLI 0.171 sends (its `ResponsesApiRequest`, codex-rs/core/src/client.rs):
#: instructions, input items, function tools plus non-function ones, store false, stream.
CODEX = {
    "model": "tiny",
    "instructions": "You are Codex.",
    "input": [
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "d"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
        {"type": "reasoning", "summary": [], "encrypted_content": None},
        {"type": "function_call", "call_id": "c1", "name": "shell", "arguments": '{"cmd":"ls"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "a.txt"},
    ],
    "tools": [
        {"type": "function", "name": "shell", "parameters": {"type": "object"}, "strict": False},
        {"type": "custom", "name": "apply_patch", "format": {"type": "grammar"}},
    ],
    "tool_choice": "auto",
    "parallel_tool_calls": False,
    "reasoning": {"effort": "medium", "summary": "auto"},
    "store": False,
    "stream": True,
    "include": ["reasoning.encrypted_content"],
    "prompt_cache_key": "session-1",
    "text": {"verbosity": "medium"},
}


def parse(body: dict[str, Any]) -> Any:
    return RESPONSES.parse(orjson.dumps(body), Headers())


def test_codex_shape_parses_and_passes_through_natively() -> None:
    req = parse(CODEX)
    assert req.stream and req.session == "session-1" and req.messages == 6
    assert req.max_output is None  # admission writes the model's default
    RESPONSES.set_output_ceiling(req, 300)
    sent = orjson.loads(RESPONSES.engine_body(req, "served"))
    assert sent["model"] == "served" and sent["max_output_tokens"] == 300
    assert sent["store"] is False and sent["tools"] == CODEX["tools"]
    assert sent["input"] == CODEX["input"] and sent["include"] == CODEX["include"]


def test_store_is_never_sent_to_the_engine_nor_previous_ids() -> None:
    req = parse({"model": "m", "input": "x", "store": True, "previous_response_id": "resp_1"})
    sent = orjson.loads(RESPONSES.engine_body(req, "s"))
    assert sent["store"] is False and "previous_response_id" not in sent


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m"}, "input"),
        ({"model": "m", "input": 3}, "input"),
        ({"model": "m", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"model": "m", "input": "x", "background": True}, "background"),
        ({"model": "m", "input": "x", "tools": [{"name": "f"}]}, "tools[0]"),
        ({"model": "m", "input": "x", "store": "yes"}, "store"),
    ],
)
def test_invalid_requests_name_the_param(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        parse(body)
    assert err.value.param == param


def test_translation_to_chat() -> None:
    body = {**CODEX, "tools": CODEX["tools"][:1], "max_output_tokens": 50}
    body["tool_choice"] = {"type": "function", "name": "shell"}
    body["text"] = {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}}
    chat = orjson.loads(RESPONSES_VIA_CHAT.engine_body(parse(body), "served"))
    assert chat["messages"] == [
        {"role": "system", "content": "You are Codex."},
        {"role": "system", "content": "d"},
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "shell", "arguments": '{"cmd":"ls"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "a.txt"},
    ]
    assert chat["tools"] == [
        {
            "type": "function",
            "function": {"name": "shell", "parameters": {"type": "object"}, "strict": False},
        }
    ]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "shell"}}
    assert chat["max_tokens"] == 50 and chat["parallel_tool_calls"] is False
    assert chat["stream_options"] == {"include_usage": True}
    assert chat["response_format"]["json_schema"]["name"] == "x"


def test_untranslatable_tools_are_refused_by_name() -> None:
    with pytest.raises(InvalidRequest) as err:
        RESPONSES_VIA_CHAT.engine_body(parse(CODEX), "served")
    assert err.value.param == "tools[1]" and "'custom'" in err.value.message


def test_chat_answer_becomes_a_response() -> None:
    raw = orjson.dumps(
        {
            "model": "served",
            "created": 5,
            "choices": [
                {
                    "finish_reason": "tool_calls",
                    "message": {
                        "content": "Let me look.",
                        "tool_calls": [
                            {"id": "c9", "function": {"name": "shell", "arguments": "{}"}}
                        ],
                    },
                }
            ],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3},
        }
    )
    req = parse({"model": "tiny", "input": "x", "metadata": {"k": "v"}})
    answer = RESPONSES.complete(req, RESPONSES_VIA_CHAT.answer(raw, "tiny"))
    resp = orjson.loads(answer.body)
    assert resp["status"] == "completed" and resp["model"] == "tiny" and resp["store"] is True
    msg, call = resp["output"]
    assert msg["content"][0] == {
        "type": "output_text",
        "text": "Let me look.",
        "annotations": [],
        "logprobs": [],
    }
    assert call["type"] == "function_call" and call["call_id"] == "c9"
    assert resp["usage"]["input_tokens"] == 7 and resp["usage"]["output_tokens"] == 3
    assert resp["metadata"] == {"k": "v"} and answer.usage is not None


def _events(data: bytes) -> list[dict[str, Any]]:
    return [
        orjson.loads(line[6:])
        for line in data.split(b"\n")
        if line.startswith(b"data: ")
    ]  # fmt: skip


def test_chat_chunks_become_the_event_sequence() -> None:
    req = parse({"model": "tiny", "input": "x", "stream": True})
    tr = RESPONSES_VIA_CHAT.stream(req, "tiny", collect=True)
    chunks = [
        {"model": "served", "choices": [{"index": 0, "delta": {"content": "Hel"}}]},
        {"choices": [{"index": 0, "delta": {"content": "lo"}}]},
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {
                        "tool_calls": [
                            {"index": 0, "id": "c1", "function": {"name": "f", "arguments": '{"a"'}}
                        ]
                    },
                }
            ]
        },
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]},
                    "finish_reason": "tool_calls",
                }
            ]
        },
        {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 5}},
    ]
    out = b"".join(tr.event(b"data: " + orjson.dumps(c)) or b"" for c in chunks)
    out += tr.event(b"data: [DONE]") or b""
    assert tr.state.done and tr.state.usage is not None and tr.state.usage.completion_tokens == 5
    out += tr.end()
    events = _events(out)
    kinds = [e["type"] for e in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = events[-1]["response"]
    assert final["output"][0]["content"][0]["text"] == "Hello"
    assert final["output"][1]["arguments"] == '{"a": 1}'
    assert final["usage"]["output_tokens"] == 5 and tr.assembled() == final


def test_native_stream_normalises_and_holds_back_completion() -> None:
    req = parse({"model": "tiny", "input": "x", "stream": True, "store": True})
    tr = RESPONSES.stream(req, "tiny", collect=True)
    assert isinstance(tr, ResponsesStream)
    part = {"type": "output_text", "text": "", "annotations": None}
    sent = tr.event(
        b"event: response.content_part.added\ndata: "
        + orjson.dumps({"type": "response.content_part.added", "part": part, "sequence_number": 3})
    )
    assert sent is not None and _events(sent)[0]["part"]["annotations"] == []
    completed = {
        "type": "response.completed",
        "sequence_number": 4,
        "response": {
            "model": "served",
            "store": False,
            "output": [],
            "usage": {"input_tokens": 2, "output_tokens": 1},
        },
    }
    assert tr.event(b"event: response.completed\ndata: " + orjson.dumps(completed)) is None
    assert tr.state.done and tr.state.usage is not None and tr.state.usage.prompt_tokens == 2
    final = _events(tr.end())[0]["response"]
    assert final["model"] == "tiny" and final["store"] is True
