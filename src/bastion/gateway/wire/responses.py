"""OpenAI's Responses API (`POST /v1/responses`), as Codex CLI and the openai SDK speak it.

Where the engine serves the API natively (vLLM does) the body goes through with the model
name, the output ceiling Bastion reserved and two changes: `store` is always false (an engine
keeps responses in its own memory, lost on restart and invisible to the other replicas; Bastion
keeps them itself, see `gateway/responses_store.py`) and `previous_response_id` is replaced by
the conversation it names. Elsewhere `via` translates to chat completions
(`responses_chat.py`). Strict clients get OpenAI's documented shapes: `annotations: null` from
the engine becomes `[]`, and the echo of `store` / `previous_response_id` is what the client
sent, not what the engine was told.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.datastructures import Headers

from bastion.core.errors import BastionError, InvalidRequest, UpstreamError
from bastion.core.request import ParsedRequest
from bastion.engines.client import Usage
from bastion.engines.settings import DeploymentSettings
from bastion.gateway.wire.base import Answer, StreamTranslator, WireAdapter, engine_json_object
from bastion.gateway.wire.openai import (
    PER_CHAT_OVERHEAD,
    PER_MESSAGE_OVERHEAD,
    _is_int,
    _is_number,
    _model,
    _read_body,
    _session,
    _type_error,
    _walk,
)

#: Fields whose type Bastion checks (the engine validates the rest).
_TYPES: dict[str, tuple[type | tuple[type, ...], str]] = {
    "instructions": (str, "a string"),
    "tools": (list, "an array of tool objects"),
    "tool_choice": ((str, dict), "a string or an object"),
    "parallel_tool_calls": (bool, "a boolean"),
    "reasoning": (dict, "an object"),
    "store": (bool, "a boolean"),
    "include": (list, "an array of strings"),
    "prompt_cache_key": (str, "a string"),
    "text": (dict, "an object"),
    "previous_response_id": (str, "a string"),
    "metadata": (dict, "an object"),
    "user": (str, "a string"),
    "background": (bool, "a boolean"),
}


def usage_of(usage: Any) -> Usage | None:
    """The Responses API's usage object (input/output tokens) in Bastion's terms."""
    if not isinstance(usage, dict):
        return None
    details = usage.get("input_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None

    def count(v: Any) -> int:
        return v if _is_int(v) and v > 0 else 0

    return Usage(count(usage.get("input_tokens")), count(cached), count(usage.get("output_tokens")))


def input_items(body: dict[str, Any]) -> list[Any]:
    """`input` as a list of items (a string is one user message)."""
    value = body.get("input")
    if value is None:
        return []
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    return list(value)


def normalise(value: Any) -> Any:
    """OpenAI's schema, where the engine deviates: `annotations` of a text part is an array."""
    if isinstance(value, dict):
        if value.get("type") == "output_text" and value.get("annotations") is None:
            value["annotations"] = []
        for v in value.values():
            if isinstance(v, dict | list):
                normalise(v)
    elif isinstance(value, list):
        for v in value:
            if isinstance(v, dict | list):
                normalise(v)
    return value


#: Fields a response repeats from its request.
ECHOED = (
    "instructions",
    "max_output_tokens",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "temperature",
    "top_p",
    "text",
    "reasoning",
    "user",
    "metadata",
)


def echo(resp: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    """The fields a response repeats from its request, as the client sent them (where the
    engine, or a translation, left them out)."""
    for name in ECHOED:
        if resp.get(name) in (None, [], {}) and body.get(name) is not None:
            resp[name] = body[name]
    resp["store"] = body.get("store", True) is not False
    resp["previous_response_id"] = body.get("previous_response_id")
    if "metadata" in body:
        resp["metadata"] = body["metadata"]
    return normalise(resp)


class Responses(WireAdapter):
    name = "responses"
    path = engine_path = "/v1/responses"
    serves = ("chat",)

    def parse(self, raw: bytes, headers: Headers) -> ParsedRequest:
        body = _read_body(raw)
        model = _model(body)
        for name, (kind, expected) in _TYPES.items():
            v = body.get(name)
            if v is not None and not isinstance(v, kind):
                raise _type_error(name, expected)
        if body.get("background"):
            raise InvalidRequest(
                "Bastion does not run responses in the background ('background': true); "
                "call without it (streaming if the answer is long).",
                param="background",
                code="unsupported_parameter",
            )
        value = body.get("input")
        if value is None and body.get("previous_response_id") is None:
            raise InvalidRequest("'input' is a required property", param="input", code="missing")
        if value is not None and not isinstance(value, str | list):
            raise _type_error("input", "a string or an array of input items")
        for i, item in enumerate(value if isinstance(value, list) else ()):
            if not isinstance(item, dict):
                raise _type_error(f"input[{i}]", "an object")
        for i, tool in enumerate(body.get("tools") or ()):
            if not isinstance(tool, dict) or not isinstance(tool.get("type"), str):
                raise _type_error(f"tools[{i}]", "an object with a 'type'")
        ceiling = body.get("max_output_tokens")
        if ceiling is not None:
            if not _is_int(ceiling):
                raise _type_error("max_output_tokens", "an integer")
            if ceiling < 1:
                raise InvalidRequest(
                    "'max_output_tokens' must be at least 1",
                    param="max_output_tokens",
                    code="invalid_value",
                )
        for name in ("temperature", "top_p"):
            if body.get(name) is not None and not _is_number(body[name]):
                raise _type_error(name, "a number")
        stream = body.get("stream") or False
        if not isinstance(stream, bool):
            raise _type_error("stream", "a boolean")
        user = body.get("user")
        req = ParsedRequest(
            self,
            body,
            model,
            stream,
            client_user=user,
            client_wants_usage=True,  # a Responses stream always ends with its usage
            session=_session(headers, body, user),
            fields=frozenset(body),
            messages=len(input_items(body)) + (1 if body.get("instructions") else 0),
        )
        if ceiling is not None:
            req.output_fields = [("max_output_tokens", ceiling)]
            req.max_output_param, req.max_output = "max_output_tokens", ceiling
        return req

    def prompt(self, req: ParsedRequest) -> tuple[list[str], int]:
        body, texts = req.body, []
        extra = PER_CHAT_OVERHEAD
        if isinstance(body.get("instructions"), str):
            texts.append(body["instructions"])
            extra += PER_MESSAGE_OVERHEAD
        for item in input_items(body):
            extra += PER_MESSAGE_OVERHEAD
            if not isinstance(item, dict):
                continue
            for key in ("content", "output"):
                if key in item:
                    extra += _walk(item[key], texts)
            for key in ("arguments", "name", "input", "action"):
                if key in item:
                    texts.append(str(item[key]))
        if tools := body.get("tools"):
            texts.append(str(tools))
        return texts, extra

    def set_output_ceiling(self, req: ParsedRequest, tokens: int) -> None:
        req.body["max_output_tokens"] = req.max_output = tokens
        req.max_output_param = "max_output_tokens"

    def via(self, deployment: DeploymentSettings) -> WireAdapter:
        if deployment.serves_natively(self.name):
            return self
        from bastion.gateway.wire.responses_chat import RESPONSES_VIA_CHAT

        return RESPONSES_VIA_CHAT

    def engine_body(self, req: ParsedRequest, served_name: str) -> bytes:
        body = dict(req.body)
        body["model"] = served_name
        # Bastion keeps responses (and resolves previous ids) itself: the engine keeps nothing.
        body["store"] = False
        body.pop("previous_response_id", None)
        if req.max_output is not None:
            body["max_output_tokens"] = req.max_output
        return orjson.dumps(body)

    def answer(self, raw: bytes, alias: str) -> Answer:
        obj = engine_json_object(raw)
        engine_model = obj.get("model")
        obj["model"] = alias
        normalise(obj)
        return Answer(orjson.dumps(obj), usage_of(obj.get("usage")), engine_model, obj)

    def stream(self, req: ParsedRequest, alias: str, collect: bool) -> StreamTranslator:
        return ResponsesStream(alias, req.body, collect)

    def complete(self, req: ParsedRequest, answer: Answer) -> Answer:
        """A whole answer with the fields repeated from the request as the client sent them."""
        if isinstance(answer.content, dict):
            echo(answer.content, req.body)
            answer.body = orjson.dumps(answer.content)
        return answer


RESPONSES = Responses()

#: Events that end a Responses stream, the answer complete (or cut at the output ceiling).
FINAL_EVENTS = ("response.completed", "response.incomplete")
#: Events that carry generated output (about one token each).
OUTPUT_DELTAS = (
    "response.output_text.delta",
    "response.function_call_arguments.delta",
    "response.reasoning_text.delta",
    "response.reasoning_summary_text.delta",
    "response.custom_tool_call_input.delta",
    "response.refusal.delta",
)


def sse(event: dict[str, Any]) -> bytes:
    return b"event: " + str(event["type"]).encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


def error_event(exc: BastionError, sequence: int) -> bytes:
    return sse(
        {
            "type": "error",
            "code": exc.code,
            "message": exc.message,
            "param": exc.param,
            "sequence_number": sequence,
        }
    )


class ResponsesStream(StreamTranslator):
    """The engine's Responses events, passed on with the alias for the served name and the
    client's own `store` / `previous_response_id` echoed. The final `response.completed` is
    held back until the answer is recorded (`end`); it carries the whole output, which is what
    the audit trail and the response store keep."""

    def __init__(self, alias: str, body: dict[str, Any], collect: bool):
        super().__init__(alias, True, collect)
        self.body = body
        self.final: dict[str, Any] | None = None
        self.sequence = 0
        #: Text streamed so far, for the audit trail of a stream that never completes.
        self.partial: list[str] = []

    def event(self, event: bytes) -> bytes | None:
        data = None
        for line in event.split(b"\n"):
            if line.startswith(b"data:"):
                data = line[5:].strip()
        if data is None:
            return event + b"\n\n"  # comments, keep-alives
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return event + b"\n\n"
        if not isinstance(obj, dict):
            return event + b"\n\n"
        kind = obj.get("type")
        if isinstance(seq := obj.get("sequence_number"), int):
            self.sequence = seq
        state = self.state
        if kind in OUTPUT_DELTAS:
            state.output_chunk()
        resp = obj.get("response")
        if isinstance(resp, dict):
            state.engine_model = resp.get("model", state.engine_model)
            resp["model"] = self.alias
            echo(resp, self.body)
        normalise(obj)
        if kind in FINAL_EVENTS and isinstance(resp, dict):
            state.usage = usage_of(resp.get("usage"))
            state.done = True
            self.final = obj
            return None  # sent once the answer is recorded (see `end`)
        if kind in ("error", "response.failed"):
            err = resp.get("error") if isinstance(resp, dict) else obj
            msg = err.get("message") if isinstance(err, dict) else None
            state.error = UpstreamError(f"engine error mid-stream: {msg or kind}")
            return None  # the relay sends Bastion's own error event, ending the stream
        if self.collecting and kind == "response.output_text.delta":
            self.partial.append(str(obj.get("delta", "")))
        return sse(obj)

    def end(self) -> bytes:
        assert self.final is not None
        return sse(self.final)

    def error(self, exc: BastionError) -> bytes:
        return error_event(exc, self.sequence + 1)

    def assembled(self) -> Any:
        """The final response object (its output items are the whole answer), or the text
        streamed before the stream broke off."""
        if self.final is not None:
            return self.final["response"]
        return {"status": "incomplete", "output_text": "".join(self.partial)}
