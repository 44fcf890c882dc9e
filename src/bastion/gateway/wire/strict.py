"""Engine answers put into the shape OpenAI's published schema gives them, for strict clients.

vLLM fills optional fields with `null` where the schema has an array or leaves the field out:
a client that validates answers against the schema (generated Go, Rust or TypeScript types,
zod schemas in editor plugins) then fails on a successful answer. Only such deviations are
changed; fields the schema does not know (vLLM's `stop_reason`, `reasoning`, …) pass as sent.
"""

from __future__ import annotations

from typing import Any

#: Message fields the schema types as arrays, sent as null by vLLM: an empty array instead.
_NULL_ARRAYS = ("annotations",)
#: Deprecated message fields the schema types as objects (never null): left out when null.
_NULL_OBJECTS = ("function_call",)
#: Optional, non-nullable fields of the answer and of its usage: left out when null.
_TOP_OPTIONAL = ("system_fingerprint",)
_USAGE_OPTIONAL = ("prompt_tokens_details", "completion_tokens_details")


def _drop_nulls(obj: dict[str, Any], keys: tuple[str, ...]) -> None:
    for key in keys:
        if key in obj and obj[key] is None:
            del obj[key]


def _message(msg: dict[str, Any]) -> None:
    for key in _NULL_ARRAYS:
        if key in msg and msg[key] is None:
            msg[key] = []
    for key in _NULL_OBJECTS:
        if key in msg and msg[key] is None:
            del msg[key]


def _delta(delta: dict[str, Any]) -> None:
    # A chunk carries only what changed: a null array or object is "nothing", so it goes.
    for key in (*_NULL_ARRAYS, *_NULL_OBJECTS):
        if key in delta and delta[key] is None:
            del delta[key]


def normalise(obj: dict[str, Any]) -> None:
    """Fixes, in place, one chat or completions answer or stream chunk."""
    _drop_nulls(obj, _TOP_OPTIONAL)
    if isinstance(usage := obj.get("usage"), dict):
        _drop_nulls(usage, _USAGE_OPTIONAL)
    choices = obj.get("choices")
    if not isinstance(choices, list):
        return
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        if isinstance(msg := choice.get("message"), dict):
            _message(msg)
        if isinstance(delta := choice.get("delta"), dict):
            _delta(delta)
