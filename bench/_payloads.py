"""Canned vLLM-style responses served by the nginx stub, and the request every target gets."""

from __future__ import annotations

import json
from typing import Any

from _common import MODEL_JSON, MODEL_STREAM, SERVED_NAME

CREATED = 1_700_000_000
COMPLETION_ID = "chatcmpl-bench5f0c1d2e3a4b5c6d7e8f9a0b"
USAGE: dict[str, Any] = {
    "prompt_tokens": 41,
    "completion_tokens": 12,
    "total_tokens": 53,
    "prompt_tokens_details": {"cached_tokens": 16},
}


def _compact(doc: Any) -> str:
    return json.dumps(doc, separators=(",", ":"))


def canned_completion() -> str:
    """A non-streaming chat completion as vLLM's OpenAI server returns it (compact JSON)."""
    return _compact(
        {
            "id": COMPLETION_ID,
            "object": "chat.completion",
            "created": CREATED,
            "model": SERVED_NAME,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": "GPU hours rose 4 percent; storage stayed flat.",
                        "tool_calls": [],
                    },
                    "logprobs": None,
                    "finish_reason": "stop",
                    "stop_reason": None,
                }
            ],
            "usage": USAGE,
            "prompt_logprobs": None,
        }
    )


def _chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "id": COMPLETION_ID,
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": SERVED_NAME,
        "choices": choices,
        "usage": usage,
    }


def _delta(delta: dict[str, str], finish_reason: str | None) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return _chunk([choice], None)


def canned_stream() -> str:
    """An SSE body as vLLM streams it with ``stream_options.include_usage``."""
    events = [
        _delta({"role": "assistant", "content": ""}, None),
        _delta({"content": "GPU hours rose"}, None),
        _delta({"content": " 4 percent;"}, None),
        _delta({"content": " storage stayed flat."}, "stop"),
        _chunk([], USAGE),
    ]
    return "".join(f"data: {_compact(e)}\n\n" for e in events) + "data: [DONE]\n\n"


def canned_models() -> str:
    """``GET /v1/models`` (compact JSON)."""
    model = {"id": SERVED_NAME, "object": "model", "created": CREATED, "owned_by": "vllm"}
    return _compact({"object": "list", "data": [model]})


def request_body(stream: bool) -> str:
    """The ~250-byte chat request every target gets."""
    body: dict[str, Any] = {
        "model": MODEL_STREAM if stream else MODEL_JSON,
        "messages": [
            {"role": "system", "content": "You are a terse assistant for the platform team."},
            {
                "role": "user",
                "content": "Summarise last quarter's GPU cost report in one short sentence.",
            },
        ],
        "max_tokens": 16,
        "temperature": 0,
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body)
