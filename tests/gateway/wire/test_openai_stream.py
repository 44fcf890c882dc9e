"""Streams put back together for the audit trail: text, several choices, tool calls whose
arguments arrive in pieces, and malformed chunks that must not break the relay."""

from __future__ import annotations

from bastion.gateway.wire.openai import OpenAIStream


def test_chat_stream_is_assembled_per_choice() -> None:
    state = OpenAIStream("m", wants_usage=False, collect=True)
    chunks = [
        [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
        [{"index": 0, "delta": {"content": "Hel"}}, {"index": 1, "delta": {"content": "Bon"}}],
        [{"index": 0, "delta": {"content": "lo"}}, {"index": 1, "delta": {"content": "jour"}}],
        [
            {"index": 0, "delta": {}, "finish_reason": "stop"},
            {"index": 1, "delta": {}, "finish_reason": "length"},
        ],
    ]
    for choices in chunks:
        state.collect(choices)
    assert state.assembled() == [
        {"index": 0, "role": "assistant", "text": "Hello", "finish_reason": "stop"},
        {"index": 1, "text": "Bonjour", "finish_reason": "length"},
    ]


def test_tool_call_arguments_are_joined() -> None:
    state = OpenAIStream("m", wants_usage=False, collect=True)
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "lookup"}}
    state.collect(
        [
            {
                "index": 0,
                "delta": {
                    "tool_calls": [{**call, "function": {**call["function"], "arguments": '{"ib'}}]
                },
            }
        ]
    )
    state.collect(
        [
            {
                "index": 0,
                "delta": {"tool_calls": [{"index": 0, "function": {"arguments": 'an": "DE89"}'}}]},
            }
        ]
    )
    state.collect([{"index": 0, "delta": {}, "finish_reason": "tool_calls"}])
    (choice,) = state.assembled()
    assert choice["finish_reason"] == "tool_calls" and choice["text"] == ""
    assert choice["tool_calls"] == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "lookup", "arguments": '{"iban": "DE89"}'},
        }
    ]


def test_completions_text_and_odd_chunks() -> None:
    state = OpenAIStream("m", wants_usage=False, collect=True)
    state.collect([{"index": 0, "text": "one "}, "not a dict", {"index": "x", "text": "?"}])
    state.collect([{"index": 0, "text": "two", "finish_reason": "stop"}])
    assert [c["text"] for c in state.assembled()] == ["one two", "?"]


def test_events_are_relayed_with_the_alias_and_usage_hidden() -> None:
    tr = OpenAIStream("alias", wants_usage=False, collect=False)
    chunk = b'data: {"model": "served", "choices": [{"index": 0, "delta": {"content": "x"}}]}'
    assert b'"model":"alias"' in (tr.event(chunk) or b"")
    usage = b'data: {"model": "served", "choices": [], "usage": {"prompt_tokens": 3}}'
    assert tr.event(usage) is None and tr.state.usage is not None
    assert tr.state.usage.prompt_tokens == 3 and tr.state.chunks == 1
    assert tr.event(b"data: [DONE]") is None and tr.state.done
    assert tr.state.engine_model == "served"
    assert tr.assembled() == []  # nothing is collected unless the trail needs it


def test_every_field_the_client_received_is_kept() -> None:
    """Reasoning, logprobs and fields no adapter knows are recorded, not only the text."""
    state = OpenAIStream("m", wants_usage=False, collect=True)

    def lp(tok: str) -> dict:
        return {"content": [{"token": tok, "logprob": -0.1, "top_logprobs": []}]}

    state.collect([{"index": 0, "delta": {"role": "assistant", "reasoning_content": "Let"}}])
    state.collect([{"index": 0, "delta": {"reasoning_content": " me think"}}])
    state.collect([{"index": 0, "delta": {"content": "4"}, "logprobs": lp("4")}])
    chunk = {"index": 0, "delta": {"content": "2", "x_vendor": {"n": 1}}, "logprobs": lp("2")}
    state.collect([chunk])
    state.collect([{"index": 0, "delta": {}, "finish_reason": "stop", "stop_reason": None}])
    (choice,) = state.assembled()
    assert choice["text"] == "42" and choice["reasoning_content"] == "Let me think"
    assert [t["token"] for t in choice["logprobs"]["content"]] == ["4", "2"]
    assert choice["x_vendor"] == {"n": 1} and choice["role"] == "assistant"
    assert "stop_reason" in choice and choice["finish_reason"] == "stop"
