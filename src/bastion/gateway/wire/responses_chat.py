"""The Responses API for engines that serve only chat completions: translated both ways.

Request: `instructions` → a system message; `input` items → chat messages (`message` items with
text or image parts; `function_call` → an assistant `tool_calls` entry; `function_call_output`
→ a `tool` message; `reasoning` items are dropped, as chat completions has no place for them);
function tools → chat tools; `tool_choice`, `parallel_tool_calls`, `max_output_tokens`,
`temperature`, `top_p`, `user` and `text.format` (→ `response_format`) map directly. Not
translatable, answered with a 400 naming them: non-function tools (local shell, custom/freeform
grammar tools, web search, …) and other item kinds. `reasoning`, `include`, `metadata` and
`prompt_cache_key` are not sent to the engine (the last still routes the session).

Answer: the message becomes an `output_text` message item, tool calls `function_call` items,
`reasoning_content` a `reasoning` item; a stream becomes the Responses event sequence.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import orjson

from bastion.core.errors import BastionError, InvalidRequest, UpstreamError
from bastion.core.request import ParsedRequest
from bastion.engines.client import read_usage
from bastion.gateway.wire.base import Answer, StreamTranslator
from bastion.gateway.wire.responses import Responses, echo, error_event, input_items, sse

#: Request fields copied to chat completions as they are.
_SAME = ("parallel_tool_calls", "temperature", "top_p", "user", "top_logprobs")


def _untranslatable(what: str, param: str) -> InvalidRequest:
    return InvalidRequest(
        f"{what} cannot be translated to chat completions, the only API this model's engine "
        "serves; use function tools and message, function_call and function_call_output items, "
        "or a deployment that serves /v1/responses natively.",
        param=param,
        code="unsupported_on_this_model",
    )


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and "text" in p
        )
    return "" if content is None else str(content)


def _parts(content: Any, param: str) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(
            f"'{param}' must be a string or an array of content parts", param=param
        )
    parts: list[dict[str, Any]] = []
    for i, p in enumerate(content):
        kind = p.get("type") if isinstance(p, dict) else None
        if kind in ("input_text", "output_text", "text", "refusal"):
            parts.append({"type": "text", "text": str(p.get("text", p.get("refusal", "")))})
        elif kind == "input_image" and isinstance(p.get("image_url"), str):
            parts.append({"type": "image_url", "image_url": {"url": p["image_url"]}})
        else:
            raise _untranslatable(f"A content part of type {kind!r}", f"{param}[{i}]")
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def chat_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if isinstance(body.get("instructions"), str) and body["instructions"]:
        messages.append({"role": "system", "content": body["instructions"]})
    for i, item in enumerate(input_items(body)):
        param = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise InvalidRequest(f"'{param}.role' {role!r} is not a role", param=param)
            messages.append(
                {
                    "role": "system" if role == "developer" else role,
                    "content": _parts(item.get("content"), f"{param}.content"),
                }
            )
        elif kind == "function_call":
            call = {
                "id": item.get("call_id") or item.get("id"),
                "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments", "")},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            elif last is not None and last["role"] == "assistant":
                last["tool_calls"] = [call]
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": item.get("call_id"),
                    "content": _text(item.get("output")),
                }
            )
        elif kind == "reasoning":
            continue  # chat completions takes no reasoning back; the model reasons anew
        else:
            raise _untranslatable(f"An input item of type {kind!r}", param)
    if not messages:
        raise InvalidRequest("'input' has no messages", param="input", code="missing")
    return messages


def chat_tools(body: dict[str, Any]) -> list[dict[str, Any]]:
    tools = []
    for i, tool in enumerate(body.get("tools") or ()):
        if tool.get("type") != "function":
            raise _untranslatable(f"A tool of type {tool.get('type')!r}", f"tools[{i}]")
        fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
        tools.append({"type": "function", "function": fn})
    return tools


def chat_body(req: ParsedRequest, served_name: str) -> dict[str, Any]:
    body = req.body
    out: dict[str, Any] = {"model": served_name, "messages": chat_messages(body)}
    if tools := chat_tools(body):
        out["tools"] = tools
    choice = body.get("tool_choice")
    if isinstance(choice, str):
        out["tool_choice"] = choice
    elif isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise _untranslatable(f"A tool_choice of type {choice.get('type')!r}", "tool_choice")
        out["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    for name in _SAME:
        if body.get(name) is not None:
            out[name] = body[name]
    if req.max_output is not None:
        out["max_tokens"] = req.max_output
    fmt = (body.get("text") or {}).get("format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        out["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif isinstance(fmt, dict) and fmt.get("type") == "json_object":
        out["response_format"] = {"type": "json_object"}
    if req.stream:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return out


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


def response_usage(usage: Any) -> dict[str, Any] | None:
    u = read_usage(usage)
    if u is None:
        return None
    details = usage.get("completion_tokens_details") if isinstance(usage, dict) else None
    reasoning = (details or {}).get("reasoning_tokens") or 0
    return {
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": u.cached_tokens},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    }


def message_item(text: str, status: str = "completed", item_id: str | None = None) -> dict:
    return {
        "id": item_id or new_id("msg"),
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }


def call_item(call: dict[str, Any], status: str = "completed") -> dict[str, Any]:
    fn = call.get("function") or {}
    return {
        "id": new_id("fc"),
        "type": "function_call",
        "call_id": call.get("id") or new_id("call"),
        "name": fn.get("name"),
        "arguments": fn.get("arguments") or "",
        "status": status,
    }


def reasoning_item(text: str) -> dict[str, Any]:
    return {
        "id": new_id("rs"),
        "type": "reasoning",
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
    }


def response_object(
    body: dict[str, Any],
    alias: str,
    rid: str,
    created: Any,
    output: list[dict[str, Any]],
    status: str,
    usage: dict[str, Any] | None,
) -> dict[str, Any]:
    resp: dict[str, Any] = {
        "id": rid,
        "object": "response",
        "created_at": created if isinstance(created, int) else int(time.time()),
        "status": status,
        "error": None,
        "incomplete_details": ({"reason": "max_output_tokens"} if status == "incomplete" else None),
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": alias,
        "output": output,
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "temperature": body.get("temperature"),
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [],
        "top_p": body.get("top_p"),
        "text": body.get("text") or {"format": {"type": "text"}},
        "truncation": "disabled",
        "usage": usage,
        "user": body.get("user"),
        "metadata": body.get("metadata") or {},
    }
    return echo(resp, body)


class ResponsesViaChat(Responses):
    """The Responses API spoken to an engine that serves only chat completions."""

    engine_path = "/v1/chat/completions"

    def engine_body(self, req: ParsedRequest, served_name: str) -> bytes:
        return orjson.dumps(chat_body(req, served_name))

    def answer(self, raw: bytes, alias: str) -> Answer:
        """The chat answer as a response object; the fields a response repeats from its
        request are filled in by `Responses.complete`."""
        try:
            obj = orjson.loads(raw)
            choice = obj["choices"][0]
            msg = choice["message"]
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
            raise UpstreamError("the engine returned no chat completion choice") from None
        output: list[dict[str, Any]] = []
        if isinstance(r := msg.get("reasoning_content") or msg.get("reasoning"), str) and r:
            output.append(reasoning_item(r))
        if msg.get("content"):
            output.append(message_item(str(msg["content"])))
        for call in msg.get("tool_calls") or ():
            output.append(call_item(call))
        status = "incomplete" if choice.get("finish_reason") == "length" else "completed"
        usage = obj.get("usage")
        resp = response_object(
            {}, alias, new_id("resp"), obj.get("created"), output, status, response_usage(usage)
        )
        return Answer(orjson.dumps(resp), read_usage(usage), obj.get("model"), resp)

    def stream(self, req: ParsedRequest, alias: str, collect: bool) -> StreamTranslator:
        return ChatToResponsesStream(alias, req.body, collect)


RESPONSES_VIA_CHAT = ResponsesViaChat()


class ChatToResponsesStream(StreamTranslator):
    """Chat completion chunks → the Responses event sequence: `response.created`,
    `response.in_progress`, per item `response.output_item.added` … `done` (text through
    `response.content_part.added`, `response.output_text.delta`/`done`; tool calls through
    `response.function_call_arguments.delta`/`done`), then `response.completed` with usage,
    held back until the answer is recorded."""

    def __init__(self, alias: str, body: dict[str, Any], collect: bool):
        super().__init__(alias, True, collect)
        self.body = body
        self.rid = new_id("resp")
        self.seq = 0
        self.started = False
        self.created = int(time.time())
        #: Output items in order; the open text item and tool calls by chat index.
        self.items: list[dict[str, Any]] = []
        self.text_item: dict[str, Any] | None = None
        self.calls: dict[int, dict[str, Any]] = {}
        self.finish: str | None = None
        self.final: dict[str, Any] | None = None

    def _ev(self, kind: str, **fields: Any) -> bytes:
        event = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return sse(event)

    def _response(self, status: str, usage: dict[str, Any] | None = None) -> dict[str, Any]:
        out = [dict(i) for i in self.items]
        return response_object(self.body, self.alias, self.rid, self.created, out, status, usage)

    def event(self, event: bytes) -> bytes | None:
        if not event.startswith(b"data:"):
            return None  # chat comments have no place in the Responses event sequence
        payload = event[5:].strip()
        state, out = self.state, []
        if not self.started:
            self.started = True
            out.append(self._ev("response.created", response=self._response("in_progress")))
            out.append(self._ev("response.in_progress", response=self._response("in_progress")))
        if payload == b"[DONE]":
            out.append(self._close_items())
            status = "incomplete" if self.finish == "length" else "completed"
            raw_usage = self._usage
            resp = self._response(status, response_usage(raw_usage))
            kind = "response.incomplete" if status == "incomplete" else "response.completed"
            self.final = {"type": kind, "sequence_number": -1, "response": resp}
            state.done = True
            return b"".join(out)
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return b"".join(out)
        if not isinstance(obj, dict):
            return b"".join(out)
        if "error" in obj:
            err = obj["error"]
            msg = err.get("message") if isinstance(err, dict) else str(err)
            state.error = UpstreamError(f"engine error mid-stream: {msg}")
        if obj.get("model"):
            state.engine_model = obj["model"]
        if obj.get("usage"):
            state.usage = read_usage(obj["usage"])
            self._usage = obj["usage"]
        for ch in obj.get("choices") or ():
            if isinstance(ch, dict):
                out.extend(self._choice(ch))
        return b"".join(out)

    _usage: Any = None

    def _choice(self, ch: dict[str, Any]) -> list[bytes]:
        out: list[bytes] = []
        delta = ch.get("delta") or {}
        text = delta.get("content")
        if isinstance(text, str) and text:
            self.state.output_chunk()
            if self.text_item is None:
                item = message_item("", "in_progress")
                self.text_item = item
                self.items.append(item)
                idx = len(self.items) - 1
                out.append(self._ev("response.output_item.added", output_index=idx, item=item))
                out.append(
                    self._ev(
                        "response.content_part.added",
                        item_id=item["id"],
                        output_index=idx,
                        content_index=0,
                        part={"type": "output_text", "text": "", "annotations": []},
                    )
                )
            item = self.text_item
            item["content"][0]["text"] += text
            out.append(
                self._ev(
                    "response.output_text.delta",
                    item_id=item["id"],
                    output_index=self.items.index(item),
                    content_index=0,
                    delta=text,
                    logprobs=[],
                )
            )
        for tc in delta.get("tool_calls") or ():
            if not isinstance(tc, dict):
                continue
            self.state.output_chunk()
            index = tc.get("index", 0)
            fn = tc.get("function") or {}
            item = self.calls.get(index)
            if item is None:
                item = call_item({"id": tc.get("id"), "function": {"name": fn.get("name")}})
                item["status"] = "in_progress"
                self.calls[index] = item
                self.items.append(item)
                out.append(
                    self._ev(
                        "response.output_item.added",
                        output_index=len(self.items) - 1,
                        item=dict(item),
                    )
                )
            if isinstance(args := fn.get("arguments"), str) and args:
                item["arguments"] += args
                out.append(
                    self._ev(
                        "response.function_call_arguments.delta",
                        item_id=item["id"],
                        output_index=self.items.index(item),
                        delta=args,
                    )
                )
        if ch.get("finish_reason") is not None:
            self.finish = ch["finish_reason"]
        return out

    def _close_items(self) -> bytes:
        out = []
        for idx, item in enumerate(self.items):
            if item["status"] != "in_progress":
                continue
            item["status"] = "completed"
            if item["type"] == "message":
                part = item["content"][0]
                common = {"item_id": item["id"], "output_index": idx, "content_index": 0}
                out.append(
                    self._ev("response.output_text.done", text=part["text"], logprobs=[], **common)
                )
                out.append(self._ev("response.content_part.done", part=part, **common))
            else:
                out.append(
                    self._ev(
                        "response.function_call_arguments.done",
                        item_id=item["id"],
                        output_index=idx,
                        name=item["name"],
                        arguments=item["arguments"],
                    )
                )
            out.append(self._ev("response.output_item.done", output_index=idx, item=item))
        return b"".join(out)

    def end(self) -> bytes:
        assert self.final is not None
        self.final["sequence_number"] = self.seq
        return sse(self.final)

    def error(self, exc: BastionError) -> bytes:
        return error_event(exc, self.seq)

    def assembled(self) -> Any:
        if self.final is not None:
            return self.final["response"]
        return self._response("incomplete")
