"""Anthropic's Messages API (`POST /v1/messages`), as Claude Code and the `anthropic` SDKs speak it.

Engines that serve Messages natively (vLLM ≥ 0.11.1) get the body passed through, normalised
(`normalise`); the others get it translated to chat completions (`anthropic_chat`). Either way
the request goes through the same pipeline as chat completions: `max_tokens` (required by this
API) is the output ceiling the limits reserve, usage is read from Anthropic's fields, and errors
come back in Anthropic's envelope with the statuses its SDK maps to its exception classes.

Normalisation, and why: Claude Code adds a system text block starting with
`x-anthropic-billing-header:` (its version, entry point and a per-request hash). It changes on
every request, so an engine's prefix cache misses from the first token; it carries nothing the
model needs, so it is dropped from what the engine receives (the audit trail keeps the request
as sent). Recent Claude Code versions also put system prompts inside `messages` (role
`system`), which Anthropic's schema does not have and some engine versions reject: the leading
ones are moved into the top-level `system` (they are a stable prefix), later ones stay in place
(moving them would change the prefix on every turn).
"""

from __future__ import annotations

import secrets
from typing import Any

import orjson
from starlette.datastructures import Headers
from starlette.responses import Response

from bastion.core.errors import BastionError, InvalidRequest, UpstreamError
from bastion.core.request import ParsedRequest
from bastion.engines.client import Usage
from bastion.engines.settings import DeploymentSettings
from bastion.gateway.wire.base import Answer, StreamTranslator, WireAdapter, engine_json_object
from bastion.gateway.wire.openai import (
    PER_CHAT_OVERHEAD,
    PER_MESSAGE_OVERHEAD,
    UNSIZED_PART,
    _is_int,
    _is_number,
    _model,
    _read_body,
    _type_error,
)

BILLING_PREFIX = "x-anthropic-billing-header"
ROLES = ("user", "assistant", "system")
#: Output ceilings are reserved in 64-bit counters: bounded so a reservation always fits.
MAX_OUTPUT = 10**12
#: The usage records' `client_user` column holds this many characters.
MAX_USER = 256
#: Headers of Anthropic's clients an engine that serves Messages natively receives too.
FORWARDED_HEADERS = ("anthropic-version", "anthropic-beta")

#: Anthropic's error types by HTTP status (its SDK picks the exception class by status).
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def error_body(exc: BastionError, request_id: str = "") -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": "error",
        "error": {"type": _ERROR_TYPES.get(exc.status, "api_error"), "message": exc.message},
    }
    if request_id:
        body["request_id"] = request_id
    return body


def anthropic_error(exc: BastionError, request_id: str = "") -> Response:
    return Response(
        orjson.dumps(error_body(exc, request_id)),
        status_code=exc.status,
        media_type="application/json",
        headers={**({"x-request-id": request_id} if request_id else {}), **exc.headers},
    )


def sse(event: str, data: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def message_id() -> str:
    return "msg_" + secrets.token_hex(12)


def read_anthropic_usage(usage: Any) -> Usage | None:
    """Anthropic's `input_tokens` excludes cache reads and writes; the prompt is all three."""
    if not isinstance(usage, dict):
        return None

    def n(key: str) -> int:
        v = usage.get(key)
        return v if _is_int(v) and v > 0 else 0

    cached = n("cache_read_input_tokens")
    return Usage(
        prompt_tokens=n("input_tokens") + cached + n("cache_creation_input_tokens"),
        cached_tokens=cached,
        completion_tokens=n("output_tokens"),
    )


# -- validation -----------------------------------------------------------------------------------
def _check_blocks(param: str, content: object) -> None:
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise _type_error(param, "a string or an array of content blocks")
    for i, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise _type_error(f"{param}[{i}]", "a content block with a 'type'")
        if block["type"] == "text" and not isinstance(block.get("text"), str):
            raise _type_error(f"{param}[{i}].text", "a string")
        if block["type"] == "tool_use" and not isinstance(block.get("input", {}), dict):
            raise _type_error(f"{param}[{i}].input", "an object")


def _check(body: dict[str, Any], needs_max_tokens: bool) -> None:
    max_tokens = body.get("max_tokens")
    if max_tokens is None and needs_max_tokens:
        raise InvalidRequest("max_tokens: Field required", param="max_tokens", code="missing")
    if max_tokens is not None and (not _is_int(max_tokens) or not 1 <= max_tokens <= MAX_OUTPUT):
        raise _type_error("max_tokens", f"an integer from 1 to {MAX_OUTPUT}")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _type_error("messages", "a non-empty array of messages")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ROLES:
            raise _type_error(f"messages[{i}].role", "'user' or 'assistant'")
        _check_blocks(f"messages[{i}].content", msg.get("content"))
    if (system := body.get("system")) is not None:
        _check_blocks("system", system)
    for name in ("temperature", "top_p"):
        if (v := body.get(name)) is not None and not _is_number(v):
            raise _type_error(name, "a number")
    if (v := body.get("top_k")) is not None and not _is_int(v):
        raise _type_error("top_k", "an integer")
    stops = body.get("stop_sequences")
    if stops is not None and not (
        isinstance(stops, list) and all(isinstance(s, str) for s in stops)
    ):
        raise _type_error("stop_sequences", "an array of strings")
    if not isinstance(body.get("stream", False) or False, bool):
        raise _type_error("stream", "a boolean")
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _type_error("tools", "an array of tools")
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
                raise _type_error(f"tools[{i}].name", "a string")
    choice = body.get("tool_choice")
    if choice is not None:
        kind = choice.get("type") if isinstance(choice, dict) else None
        if kind not in ("auto", "any", "tool", "none"):
            raise _type_error("tool_choice.type", "one of 'auto', 'any', 'tool', 'none'")
        if kind == "tool" and not isinstance(choice.get("name"), str):
            raise _type_error("tool_choice.name", "a string")
    for name in ("metadata", "thinking"):
        if (v := body.get(name)) is not None and not isinstance(v, dict):
            raise _type_error(name, "an object")


def _session(headers: Headers, body: dict[str, Any]) -> str | None:
    meta = body.get("metadata") or {}
    hint = (
        headers.get("x-claude-code-session-id")
        or headers.get("x-session-affinity")
        or meta.get("user_id")
    )
    return hint if isinstance(hint, str) and hint else None


def _texts(content: Any, texts: list[str]) -> int:
    """The strings of a content field; returns the tokens counted without a tokenizer."""
    if isinstance(content, str):
        texts.append(content)
        return 0
    extra = 0
    for block in content if isinstance(content, list) else ():
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind in ("text", "thinking"):
            text = block.get(kind)
            texts.append(text if isinstance(text, str) else orjson.dumps(text).decode())
        elif kind == "tool_use":
            texts.append(str(block.get("name")) + orjson.dumps(block.get("input")).decode())
        elif kind == "tool_result":
            extra += _texts(block.get("content") or "", texts)
        else:  # images, documents: not sizeable without the engine
            extra += UNSIZED_PART
    return extra


# -- normalisation --------------------------------------------------------------------------------
def is_billing_block(block: Any) -> bool:
    text = block.get("text") if isinstance(block, dict) else block
    return isinstance(text, str) and text.startswith(BILLING_PREFIX)


def _system_blocks(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [b for b in content if isinstance(b, dict)] if isinstance(content, list) else []


def normalise(body: dict[str, Any]) -> dict[str, Any]:
    """A copy of the body without Claude Code's billing block, with leading `system` messages
    moved to the top-level `system` (see the module's docstring)."""
    out = dict(body)
    system = _system_blocks(body.get("system"))
    messages = list(body["messages"])
    while messages and messages[0].get("role") == "system":
        system.extend(_system_blocks(messages.pop(0).get("content")))
    kept: list[dict[str, Any]] = []
    for msg in messages:
        if msg.get("role") == "system":
            blocks = [b for b in _system_blocks(msg.get("content")) if not is_billing_block(b)]
            if not blocks:
                continue
            msg = {**msg, "content": blocks}
        kept.append(msg)
    system = [b for b in system if not is_billing_block(b)]
    out["messages"] = kept
    if system:
        out["system"] = system
    else:
        out.pop("system", None)
    return out


# -- the adapter ----------------------------------------------------------------------------------
class Messages(WireAdapter):
    """`POST /v1/messages`, passed through to engines that serve it natively."""

    name = "messages"
    path = engine_path = "/v1/messages"
    serves = ("chat",)
    #: Claude Code asks for `max_tokens: 32000` whatever the model: clamped to the model's
    #: ceiling (a response header says so) rather than refused.
    clamps_output = True

    def parse(self, raw: bytes, headers: Headers) -> ParsedRequest:
        body = _read_body(raw)
        model = _model(body)
        _check(body, needs_max_tokens=True)
        meta = body.get("metadata") or {}
        user = meta.get("user_id")
        # A label for reference only (the audit trail keeps the whole body): clipped to fit.
        user = user.replace("\x00", "")[:MAX_USER] if isinstance(user, str) else None
        body["max_tokens"] = int(body["max_tokens"])
        req = ParsedRequest(
            self,
            body,
            model,
            bool(body.get("stream")),
            client_user=user or None,
            client_wants_usage=True,
            session=_session(headers, body),
            fields=frozenset(body),
            messages=len(body["messages"]),
            max_output=body["max_tokens"],
            max_output_param="max_tokens",
            output_fields=[("max_tokens", body["max_tokens"])],
        )
        req.forward_headers = {h: v for h in FORWARDED_HEADERS if (v := headers.get(h))}
        return req

    def prompt(self, req: ParsedRequest) -> tuple[list[str], int]:
        texts: list[str] = []
        body = req.body
        extra = PER_CHAT_OVERHEAD + _texts(body.get("system") or "", texts)
        for msg in body["messages"]:
            extra += PER_MESSAGE_OVERHEAD + _texts(msg.get("content"), texts)
        if tools := body.get("tools"):
            texts.append(orjson.dumps(tools).decode())
        return texts, extra

    def set_output_ceiling(self, req: ParsedRequest, tokens: int) -> None:
        req.max_output = tokens
        req.max_output_param = "max_tokens"

    def engine_body(self, req: ParsedRequest, served_name: str) -> bytes:
        body = normalise(req.body)
        body["model"] = served_name
        if req.max_output is not None:
            body["max_tokens"] = req.max_output
        return orjson.dumps(body)

    def engine_headers(self, req: ParsedRequest) -> dict[str, str]:
        return dict(req.forward_headers)

    def answer(self, raw: bytes, alias: str) -> Answer:
        obj = engine_json_object(raw)
        engine_model = obj.get("model")
        obj["model"] = alias
        obj.setdefault("stop_sequence", None)  # always present in Anthropic's schema
        return Answer(orjson.dumps(obj), read_anthropic_usage(obj.get("usage")), engine_model, obj)

    def stream(self, req: ParsedRequest, alias: str, collect: bool) -> StreamTranslator:
        return MessagesStream(alias, True, collect)

    def credential(self, headers: Headers) -> str | None:
        key = headers.get("x-api-key")
        return f"Bearer {key}" if key else headers.get("authorization")

    def via(self, deployment: DeploymentSettings) -> WireAdapter:
        if deployment.serves_natively("messages"):
            return self
        from bastion.gateway.wire.anthropic_chat import MESSAGES_VIA_CHAT

        return MESSAGES_VIA_CHAT

    def error_response(self, exc: BastionError, request_id: str) -> Response:
        return anthropic_error(exc, request_id)


class Assembler:
    """Puts a Messages event sequence back together as the message it describes (the audit
    trail's record of a stream): text, tool_use with its input, thinking, stop reason."""

    def __init__(self) -> None:
        self.message: dict[str, Any] = {}
        self.blocks: dict[int, dict[str, Any]] = {}
        self.json: dict[int, list[str]] = {}

    def add(self, kind: str, obj: dict[str, Any]) -> None:
        if kind == "message_start" and isinstance(obj.get("message"), dict):
            self.message = {k: v for k, v in obj["message"].items() if k != "content"}
        elif kind == "content_block_start" and isinstance(obj.get("content_block"), dict):
            self.blocks[_index(obj)] = dict(obj["content_block"])
        elif kind == "content_block_delta" and isinstance(delta := obj.get("delta"), dict):
            index = _index(obj)
            # Some engines send deltas without a start (CLIENTS.md): the delta opens the block.
            block = self.blocks.setdefault(index, {"type": _DELTA_BLOCK.get(delta.get("type"))})
            dtype = delta.get("type")
            if dtype == "input_json_delta":
                self.json.setdefault(index, []).append(delta.get("partial_json") or "")
            elif dtype in _DELTA_FIELD:
                field = _DELTA_FIELD[dtype]
                block[field] = (block.get(field) or "") + (delta.get(field) or "")
        elif kind == "message_delta":
            if isinstance(delta := obj.get("delta"), dict):
                self.message.update(delta)
            if isinstance(usage := obj.get("usage"), dict):
                self.message["usage"] = {**(self.message.get("usage") or {}), **usage}

    def result(self) -> dict[str, Any]:
        content = []
        for index in sorted(self.blocks):
            block = dict(self.blocks[index])
            if index in self.json:
                raw = "".join(self.json[index])
                try:
                    block["input"] = orjson.loads(raw) if raw else {}
                except orjson.JSONDecodeError:
                    block["input"] = raw  # what the engine sent, even if not JSON
            content.append(block)
        return {**self.message, "content": content}


def _index(obj: dict[str, Any]) -> int:
    """A block's index; an engine's malformed one must not break the relay."""
    index = obj.get("index")
    return index if _is_int(index) else 0


_DELTA_FIELD = {"text_delta": "text", "thinking_delta": "thinking", "signature_delta": "signature"}
_DELTA_BLOCK = {
    "text_delta": "text",
    "thinking_delta": "thinking",
    "signature_delta": "thinking",
    "input_json_delta": "tool_use",
}


def parse_event(event: bytes) -> tuple[str | None, Any]:
    """An SSE event's `event:` name and its `data:` JSON (None where absent or not JSON)."""
    name, data = None, []
    for line in event.split(b"\n"):
        if line.startswith(b"event:"):
            name = line[6:].strip().decode("utf-8", "replace")
        elif line.startswith(b"data:"):
            data.append(line[5:].lstrip())
    if not data:
        return name, None
    try:
        return name, orjson.loads(b"\n".join(data))
    except orjson.JSONDecodeError:
        return name, None


class MessagesStream(StreamTranslator):
    """Relays a native Messages stream: the alias for the served name, usage learnt from
    `message_start`/`message_delta`, `message_stop` held back until the answer is recorded,
    and an engine `error` event turned into Bastion's (sent once, in Anthropic's shape)."""

    def __init__(self, alias: str, wants_usage: bool, collect: bool):
        super().__init__(alias, wants_usage, collect)
        self.assembler = Assembler()
        self.usage: dict[str, Any] = {}

    def event(self, event: bytes) -> bytes | None:
        name, obj = parse_event(event)
        if not isinstance(obj, dict):
            return event + b"\n\n"  # comments and unknown events pass as they are
        kind = obj.get("type") or name or ""
        state = self.state
        if kind == "error":
            err = obj.get("error")
            msg = err.get("message") if isinstance(err, dict) else str(err)
            state.error = UpstreamError(f"engine error mid-stream: {msg}")
            return None
        if kind == "message_stop":
            state.done = True
            return None
        if kind == "message_start" and isinstance(message := obj.get("message"), dict):
            state.engine_model = message.get("model")
            message["model"] = self.alias
            message.setdefault("stop_reason", None)
            message.setdefault("stop_sequence", None)
            self._usage(message.get("usage"))
        elif kind == "message_delta":
            if isinstance(delta := obj.get("delta"), dict):
                delta.setdefault("stop_sequence", None)
            self._usage(obj.get("usage"))
        elif kind == "content_block_delta":
            state.output_chunk()
        if self.collecting:
            self.assembler.add(kind, obj)
        return sse(kind, obj)

    def _usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self.usage.update({k: v for k, v in usage.items() if v is not None})
            self.state.usage = read_anthropic_usage(self.usage)

    def end(self) -> bytes:
        return sse("message_stop", {"type": "message_stop"})

    def error(self, exc: BastionError) -> bytes:
        return sse("error", error_body(exc))

    def assembled(self) -> Any:
        return self.assembler.result()


MESSAGES = Messages()


def anthropic_model_list(aliases: list[str], one: bool = False) -> bytes:
    """Models in Anthropic's shape (`models.list` / `models.retrieve` of its SDKs)."""
    cards = [
        {"type": "model", "id": a, "display_name": a, "created_at": "1970-01-01T00:00:00Z"}
        for a in aliases
    ]
    if one:
        return orjson.dumps(cards[0])
    page = {
        "data": cards,
        "has_more": False,
        "first_id": cards[0]["id"] if cards else None,
        "last_id": cards[-1]["id"] if cards else None,
    }
    return orjson.dumps(page)
