"""What `/v1` accepts, as an OpenAPI document: the request bodies of chat completions,
completions and embeddings, and the statuses Bastion answers them with.

It describes Bastion's own checks (`gateway/wire/openai.py`, the request caps) for the models
of the settings it is built from: the engine validates the rest of a body, and its 4xx comes
back as a 400. Every error is in OpenAI's format. Used to fuzz `/v1` (tests/fuzz) and to tell
client authors exactly what is refused before a request reaches an engine.
"""

from __future__ import annotations

from typing import Any

from bastion import __version__
from bastion.config import Settings
from bastion.core.errors import ERROR_SCHEMA
from bastion.core.settings import MAX_COUNT
from bastion.gateway.wire.openai import MAX_USER, SEED_RANGE

#: What JSON parsing keeps an integer (orjson: signed and unsigned 64-bit).
_INT = {"type": "integer", "minimum": -(2**63), "maximum": 2**64 - 1}
_TOKENS = {"type": "array", "minItems": 1, "items": _INT}
#: prompt / input: a string, strings, token ids, or arrays of token ids.
_TEXT_INPUT = {
    "anyOf": [
        {"type": "string"},
        {"type": "array", "minItems": 1, "items": {"type": "string"}},
        _TOKENS,
        {"type": "array", "minItems": 1, "items": _TOKENS},
    ]
}
_NUMBER = {"type": ["number", "null"]}
_STATUSES = {
    400: "The body is invalid, or the engine refused it as invalid.",
    401: "No valid API key.",
    403: "The key may not use this model, or the model refuses a field.",
    404: "No such model.",
    413: "The body is larger than `server.max_body_bytes`.",
    429: "A rate limit, concurrency limit or budget: retry after `retry-after`.",
    503: "No engine, the limits backend or the audit trail cannot serve it now (not the "
    "client's doing).",
}


def _common(settings: Settings, aliases: list[str], streamable: bool) -> dict[str, Any]:
    """The fields every endpoint shares. A field each of these models refuses (the engine-control
    fields, `models.<alias>.engine_fields`) is declared as never valid; one only some refuse is
    left open (the description is per endpoint, not per model)."""
    limits = settings.limits
    count = {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_COUNT}
    choices = {"type": ["integer", "null"], "minimum": 1, "maximum": limits.max_n}
    low, high = SEED_RANGE
    props: dict[str, Any] = {
        "model": {"type": "string", "enum": aliases},
        "max_tokens": count,
        "max_completion_tokens": count,
        "n": choices,
        "best_of": choices,
        "seed": {"type": ["integer", "null"], "minimum": low, "maximum": high},
        "temperature": _NUMBER,
        "top_p": _NUMBER,
        "presence_penalty": _NUMBER,
        "frequency_penalty": _NUMBER,
        "user": {"type": ["string", "null"], "maxLength": MAX_USER, "pattern": r"^[^\x00]*$"},
        "stream": {"type": ["boolean", "null"]} if streamable else {"enum": [False, None]},
        "stream_options": {
            "type": ["object", "null"],
            "properties": {"include_usage": {"type": ["boolean", "null"]}},
        },
    }
    refused = (
        frozenset.intersection(*(settings.models[a].engine_fields.refused for a in aliases))
        if aliases
        else frozenset()
    )
    props.update({field: False for field in sorted(refused)})
    return props


def _body(required: list[str], props: dict[str, Any]) -> dict[str, Any]:
    return {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"type": "object", "required": required, "properties": props}
            }
        },
    }


def _operation(name: str, body: dict[str, Any], streams: bool) -> dict[str, Any]:
    ok: dict[str, Any] = {"application/json": {"schema": {"type": "object"}}}
    if streams:
        # Each event: `data:` a chunk as JSON, an error, or `[DONE]`.
        event = {"type": "object", "properties": {"data": {"type": "string"}}}
        ok["text/event-stream"] = {"schema": event}
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    return {
        "operationId": name,
        "security": [{"bearer": []}],
        "requestBody": body,
        "responses": {
            "200": {"description": "The engine's answer (an SSE stream if asked).", "content": ok},
            **{str(s): {"description": d, "content": error} for s, d in _STATUSES.items()},
        },
    }


def v1_document(settings: Settings) -> dict[str, Any]:
    """The `/v1` request bodies Bastion accepts for these settings' models and caps."""
    by_kind: dict[str, list[str]] = {"chat": [], "completion": [], "embedding": []}
    for alias, model in settings.models.items():
        by_kind[model.kind].append(alias)
    generators = by_kind["chat"] + by_kind["completion"]
    message = {
        "type": "object",
        "required": ["role"],
        "properties": {
            "role": {"type": "string"},
            "content": {"anyOf": [{"type": "string"}, {"type": "array"}, {"type": "null"}]},
        },
    }
    chat = {
        **_common(settings, by_kind["chat"], True),
        "messages": {
            "type": "array",
            "minItems": 1,
            "maxItems": settings.limits.max_messages,
            "items": message,
        },
    }
    completions = {**_common(settings, generators, True), "prompt": _TEXT_INPUT}
    embeddings = {**_common(settings, by_kind["embedding"], False), "input": _TEXT_INPUT}
    paths: dict[str, Any] = {}
    for path, name, kind, required, props, streams in (
        ("/v1/chat/completions", "chat", "chat", ["model", "messages"], chat, True),
        ("/v1/completions", "completions", "any", ["model", "prompt"], completions, True),
        ("/v1/embeddings", "embeddings", "embedding", ["model", "input"], embeddings, False),
    ):
        aliases = generators if kind == "any" else by_kind[kind]
        if aliases:  # an endpoint no configured model serves is left out
            paths[path] = {"post": _operation(name, _body(required, props), streams)}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Bastion /v1 (what the gateway itself checks)", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": {"Error": ERROR_SCHEMA},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
