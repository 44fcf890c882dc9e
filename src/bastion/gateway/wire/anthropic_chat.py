"""Anthropic Messages for engines that serve only chat completions: the request translated to a
chat completions body, the answer (whole or streamed) back into a Messages answer or the full
Messages event sequence. Also `POST /v1/messages/count_tokens`, for both kinds of engine.

What is translated: system (string or blocks; Claude Code's billing block dropped), text and
image blocks, assistant `tool_use` → `tool_calls`, user `tool_result` → `tool` messages,
tools → functions, `tool_choice` auto/any/tool/none (and `disable_parallel_tool_use`),
`stop_sequences`, `temperature`/`top_p`/`top_k`, `metadata.user_id` → `user`, streams with
usage. The engine's `reasoning_content` comes back as `thinking` blocks. Not translated: the
`thinking` request setting (engine-specific), server tools (tools without `input_schema`),
`document` blocks other than plain text, cache_control (no such thing in chat completions).
"""

from __future__ import annotations

from typing import Any

import orjson

from bastion.core.errors import BastionError, UpstreamError
from bastion.core.request import ParsedRequest
from bastion.engines.client import read_usage
from bastion.engines.settings import DeploymentSettings
from bastion.gateway.wire.anthropic import (
    FORWARDED_HEADERS,
    Assembler,
    Messages,
    _check,
    error_body,
    is_billing_block,
    message_id,
    normalise,
    sse,
)
from bastion.gateway.wire.base import Answer, StreamTranslator, WireAdapter, engine_json_object

STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def _obj(value: Any) -> dict[str, Any]:
    """A field that should be an object; anything else reads as empty (the engine, not the
    translation, judges what the client meant)."""
    return value if isinstance(value, dict) else {}


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for b in content if isinstance(content, list) else ():
        if isinstance(b, dict) and b.get("type") == "text" and not is_billing_block(b):
            parts.append(_str(b.get("text")))
        elif isinstance(b, dict) and b.get("type") == "document":
            src = _obj(b.get("source"))
            if src.get("type") == "text":
                parts.append(_str(src.get("data")))
    return "".join(parts)


def _image(block: dict[str, Any]) -> dict[str, Any] | None:
    src = _obj(block.get("source"))
    if src.get("type") == "base64":
        url = f"data:{src.get('media_type')};base64,{src.get('data')}"
    elif src.get("type") == "url":
        url = src.get("url")
    else:
        return None
    return {"type": "image_url", "image_url": {"url": url}}


def _chat_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if system := _text_of(body.get("system") or ""):
        out.append({"role": "system", "content": system})
    for msg in body["messages"]:
        role, content = msg["role"], msg.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        parts: list[dict[str, Any]] = []
        calls: list[dict[str, Any]] = []
        for block in content or ():
            kind = block.get("type")
            if kind == "text":
                parts.append({"type": "text", "text": _str(block.get("text"))})
            elif kind == "image" and (image := _image(block)) is not None:
                parts.append(image)
            elif kind == "document" and (text := _text_of([block])):
                parts.append({"type": "text", "text": text})
            elif kind == "tool_use":
                args = orjson.dumps(_obj(block.get("input"))).decode()
                calls.append(
                    {
                        "id": block.get("id"),
                        "type": "function",
                        "function": {"name": block.get("name"), "arguments": args},
                    }
                )
            elif kind == "tool_result":
                # Chat completions answers each call with its own `tool` message, before the
                # user's next words.
                result = _text_of(block.get("content") or "")
                if block.get("is_error"):
                    result = "Error: " + result
                out.append(
                    {"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": result}
                )
            # thinking / redacted_thinking: the engine's own earlier reasoning, not re-sent.
        if role == "assistant":
            text = "".join(p["text"] for p in parts if p["type"] == "text")
            item: dict[str, Any] = {"role": "assistant", "content": text or None}
            if calls:
                item["tool_calls"] = calls
            if text or calls:
                out.append(item)
        elif role == "system":
            if text := "".join(p["text"] for p in parts if p["type"] == "text"):
                out.append({"role": "system", "content": text})
        elif parts:
            plain = all(p["type"] == "text" for p in parts)
            out.append(
                {"role": "user", "content": "".join(p["text"] for p in parts) if plain else parts}
            )
    return out


def _tool_choice(choice: dict[str, Any]) -> Any:
    kind = choice.get("type")
    if kind == "any":
        return "required"
    if kind == "tool":
        return {"type": "function", "function": {"name": choice["name"]}}
    return kind  # auto, none


def _function(tool: dict[str, Any]) -> dict[str, Any]:
    fn = {
        "name": tool["name"],
        "description": tool.get("description") or "",
        "parameters": tool["input_schema"],
    }
    if isinstance(tool.get("strict"), bool):  # the engine holds the input to its schema
        fn["strict"] = tool["strict"]
    return {"type": "function", "function": fn}


def chat_body(req: ParsedRequest, served_name: str) -> dict[str, Any]:
    body = normalise(req.body)
    chat: dict[str, Any] = {
        "model": served_name,
        "messages": _chat_messages(body),
        "max_tokens": req.max_output,
    }
    for name in ("temperature", "top_p", "top_k"):
        if body.get(name) is not None:
            chat[name] = body[name]
    if body.get("stop_sequences"):
        chat["stop"] = body["stop_sequences"]
    if req.client_user:
        chat["user"] = req.client_user
    tools = [
        _function(t) for t in body.get("tools") or () if isinstance(t.get("input_schema"), dict)
    ]
    if tools:
        chat["tools"] = tools
    if tools and (choice := body.get("tool_choice")):
        chat["tool_choice"] = _tool_choice(choice)
        if choice.get("disable_parallel_tool_use"):
            chat["parallel_tool_calls"] = False
    if req.stream:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return chat


def _anthropic_usage(usage: Any) -> dict[str, int]:
    u = read_usage(usage)
    if u is None:
        return {"input_tokens": 0, "output_tokens": 0}
    return {
        "input_tokens": max(0, u.prompt_tokens - u.cached_tokens),
        "output_tokens": u.completion_tokens,
        "cache_read_input_tokens": u.cached_tokens,
        "cache_creation_input_tokens": 0,
    }


def _tool_input(arguments: Any) -> Any:
    try:
        value = orjson.loads(arguments) if isinstance(arguments, str) and arguments else {}
    except orjson.JSONDecodeError:
        return arguments  # what the engine produced, even if not JSON
    return value


def _stop(choice: dict[str, Any], called: bool) -> tuple[str | None, str | None]:
    reason = STOP_REASONS.get(choice.get("finish_reason") or "", "end_turn")
    if called and reason == "end_turn":
        # A forced (named) call ends with "stop" in chat completions; Messages says tool_use.
        return "tool_use", None
    matched = choice.get("stop_reason")  # vLLM: the stop string that ended the answer
    if reason == "end_turn" and isinstance(matched, str):
        return "stop_sequence", matched
    return reason, None


class MessagesViaChat(Messages):
    """Messages for an engine that serves only chat completions (`deployments[].apis`)."""

    engine_path = "/v1/chat/completions"

    def engine_body(self, req: ParsedRequest, served_name: str) -> bytes:
        return orjson.dumps(chat_body(req, served_name))

    def answer(self, raw: bytes, alias: str) -> Answer:
        obj = engine_json_object(raw)
        choices = obj.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices else {}
        msg = choice.get("message") or {}
        content: list[dict[str, Any]] = []
        reasoning = msg.get("reasoning_content") or msg.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
        if isinstance(msg.get("content"), str) and msg["content"]:
            content.append({"type": "text", "text": msg["content"]})
        for tc in msg.get("tool_calls") or ():
            fn = tc.get("function") or {}
            content.append(
                {
                    "type": "tool_use",
                    "id": tc.get("id"),
                    "name": fn.get("name"),
                    "input": _tool_input(fn.get("arguments")),
                }
            )
        reason, matched = _stop(choice, any(b["type"] == "tool_use" for b in content))
        message = {
            "id": message_id(),
            "type": "message",
            "role": "assistant",
            "model": alias,
            "content": content,
            "stop_reason": reason,
            "stop_sequence": matched,
            "usage": _anthropic_usage(obj.get("usage")),
        }
        return Answer(
            orjson.dumps(message), read_usage(obj.get("usage")), obj.get("model"), message
        )

    def stream(self, req: ParsedRequest, alias: str, collect: bool) -> StreamTranslator:
        return ChatToMessagesStream(alias, True, collect)

    def engine_headers(self, req: ParsedRequest) -> dict[str, str]:
        return {}  # anthropic-version / -beta mean nothing to a chat completions engine

    def via(self, deployment: DeploymentSettings) -> WireAdapter:
        return self


class ChatToMessagesStream(StreamTranslator):
    """Chat completion chunks → the Messages event sequence: `message_start`, then per block
    `content_block_start`/`_delta`/`_stop` (thinking, text, each tool call with
    `input_json_delta`), `message_delta` with the stop reason and usage, `message_stop`."""

    def __init__(self, alias: str, wants_usage: bool, collect: bool):
        super().__init__(alias, wants_usage, collect)
        self.started = False
        #: The open block: its kind ("text", "thinking", or ("tool", call index)) and index.
        self.open: Any = None
        self.index = -1
        self.stop: tuple[str | None, str | None] = ("end_turn", None)
        self.usage: Any = None
        self.called = False
        self.assembler = Assembler()

    def _emit(self, kind: str, obj: dict[str, Any]) -> bytes:
        if self.collecting:
            self.assembler.add(kind, obj)
        return sse(kind, obj)

    def _start(self) -> bytes:
        self.started = True
        message = {
            "id": message_id(),
            "type": "message",
            "role": "assistant",
            "model": self.alias,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            # Chat completions reports usage only at the end: it comes with message_delta.
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        start = self._emit("message_start", {"type": "message_start", "message": message})
        return start + sse("ping", {"type": "ping"})  # as Anthropic sends one after the start

    def _close(self) -> bytes:
        if self.open is None:
            return b""
        self.open = None
        return self._emit("content_block_stop", {"type": "content_block_stop", "index": self.index})

    def _block(self, key: Any, block: dict[str, Any]) -> bytes:
        if self.open == key:
            return b""
        out = self._close()
        self.open, self.index = key, self.index + 1
        start = {"type": "content_block_start", "index": self.index, "content_block": block}
        return out + self._emit("content_block_start", start)

    def _delta(self, delta: dict[str, Any]) -> bytes:
        self.state.output_chunk()
        return self._emit(
            "content_block_delta",
            {"type": "content_block_delta", "index": self.index, "delta": delta},
        )

    def event(self, event: bytes) -> bytes | None:
        if not event.startswith(b"data:"):
            return None  # comments: nothing a Messages client reads
        payload = event[5:].strip()
        state = self.state
        if payload == b"[DONE]":
            state.done = True
            return None
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(obj, dict):
            return None
        if "error" in obj:
            err = obj["error"]
            msg = err.get("message") if isinstance(err, dict) else str(err)
            state.error = UpstreamError(f"engine error mid-stream: {msg}")
            return None
        if state.engine_model is None and isinstance(obj.get("model"), str):
            state.engine_model = obj["model"]
        out = b"" if self.started else self._start()
        if isinstance(obj.get("usage"), dict):
            self.usage = obj["usage"]
            state.usage = read_usage(self.usage)
        for choice in obj.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if isinstance(reasoning, str) and reasoning:
                out += self._block(
                    "thinking", {"type": "thinking", "thinking": "", "signature": ""}
                )
                out += self._delta({"type": "thinking_delta", "thinking": reasoning})
            if isinstance(text := delta.get("content"), str) and text:
                out += self._block("text", {"type": "text", "text": ""})
                out += self._delta({"type": "text_delta", "text": text})
            for tc in delta.get("tool_calls") or ():
                out += self._tool(tc)
            if choice.get("finish_reason") is not None:
                self.stop = _stop(choice, self.called)
        return out or None

    def _tool(self, tc: Any) -> bytes:
        if not isinstance(tc, dict):
            return b""
        fn = tc.get("function") or {}
        block = {"type": "tool_use", "id": tc.get("id"), "name": fn.get("name"), "input": {}}
        self.called = True
        out = self._block(("tool", tc.get("index", 0)), block)
        if isinstance(args := fn.get("arguments"), str) and args:
            out += self._delta({"type": "input_json_delta", "partial_json": args})
        return out

    def end(self) -> bytes:
        out = (b"" if self.started else self._start()) + self._close()
        reason, matched = self.stop
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": reason, "stop_sequence": matched},
            "usage": _anthropic_usage(self.usage),
        }
        return (
            out + self._emit("message_delta", delta) + sse("message_stop", {"type": "message_stop"})
        )

    def error(self, exc: BastionError) -> bytes:
        return sse("error", error_body(exc))

    def assembled(self) -> Any:
        # Recorded before `end` sends message_delta: the stop reason and usage come from here.
        result = self.assembler.result()
        result["stop_reason"], result["stop_sequence"] = self.stop
        result["usage"] = _anthropic_usage(self.usage)
        return result


MESSAGES_VIA_CHAT = MessagesViaChat()


# -- count_tokens ---------------------------------------------------------------------------------
class CountTokens(Messages):
    """`POST /v1/messages/count_tokens`: the engine counts (its chat template included), through
    the same pipeline (key, model restriction, limits, audit, a usage record). Nothing is
    generated, so nothing is billed: the count is the answer, not usage."""

    name = "count_tokens"
    path = engine_path = "/v1/messages/count_tokens"
    clamps_output = False

    def parse(self, raw: bytes, headers: Any) -> ParsedRequest:
        from bastion.gateway.wire.openai import _model, _read_body

        body = _read_body(raw)
        model = _model(body)
        _check(body, needs_max_tokens=False)
        req = ParsedRequest(
            self, body, model, False, generates=False, messages=len(body["messages"]),
            fields=frozenset(body),
        )  # fmt: skip
        req.forward_headers = {h: v for h in FORWARDED_HEADERS if (v := headers.get(h))}
        return req

    def engine_body(self, req: ParsedRequest, served_name: str) -> bytes:
        body = normalise(req.body)
        body.pop("max_tokens", None)
        body.pop("stream", None)
        body["model"] = served_name
        return orjson.dumps(body)

    def answer(self, raw: bytes, alias: str) -> Answer:
        obj = engine_json_object(raw)
        count = obj.get("input_tokens")
        if not isinstance(count, int):
            raise UpstreamError("the engine's token count has no input_tokens")
        return Answer(orjson.dumps({"input_tokens": count}), None, None, {"input_tokens": count})

    def via(self, deployment: DeploymentSettings) -> WireAdapter:
        return self if deployment.serves_natively("messages") else COUNT_VIA_CHAT


class CountTokensViaChat(CountTokens):
    """For engines without Messages: a chat completion of one token, whose usage is the count
    (the engine's own tokenizer and template; the one generated token is not counted)."""

    engine_path = "/v1/chat/completions"

    def engine_headers(self, req: ParsedRequest) -> dict[str, str]:
        return {}

    def engine_body(self, req: ParsedRequest, served_name: str) -> bytes:
        chat = chat_body(req, served_name)
        chat["max_tokens"] = 1
        return orjson.dumps(chat)

    def answer(self, raw: bytes, alias: str) -> Answer:
        usage = read_usage(engine_json_object(raw).get("usage"))
        if usage is None:
            raise UpstreamError("the engine's answer has no usage to count from")
        count = {"input_tokens": usage.prompt_tokens}
        return Answer(orjson.dumps(count), None, None, count)


COUNT_TOKENS, COUNT_VIA_CHAT = CountTokens(), CountTokensViaChat()
