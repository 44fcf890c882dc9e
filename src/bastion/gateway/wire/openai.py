"""OpenAI's wire APIs: chat completions, completions and embeddings.

The engines speak these too, so the body goes through as the client sent it (unknown fields
included: tools, response_format, logprobs, seed, …), with only the model name, the output
ceiling Bastion reserved and, on streams, the usage chunk Bastion meters by, filled in. Parsing
checks just enough to route, attribute and meter a call; the engine validates the rest and its
4xx comes back as a 400.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.datastructures import Headers

from bastion.core.errors import BastionError, InvalidRequest, UpstreamError
from bastion.core.request import ParsedRequest
from bastion.core.settings import MAX_COUNT
from bastion.engines.client import read_usage
from bastion.gateway.wire.base import Answer, StreamTranslator, WireAdapter, engine_json_object
from bastion.gateway.wire.strict import normalise

PER_MESSAGE_OVERHEAD = 8  # chat-template tokens around each message, generously
PER_CHAT_OVERHEAD = 8  # the template's start and the assistant's generation prompt
UNSIZED_PART = 1024  # an image or audio part: we cannot size it without the engine
DONE = b"data: [DONE]\n\n"


def _type_error(param: str, expected: str) -> InvalidRequest:
    return InvalidRequest(f"'{param}' must be {expected}", param=param, code="invalid_type")


def _is_int(v: object) -> bool:
    """JSON's integers: 5, and 5.0 too (JSON Schema and the engines take it as 5), but not a
    float too large to be exact (orjson reads integers beyond 64 bits as floats)."""
    if isinstance(v, float):
        return v.is_integer() and abs(v) <= 2**53
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _check_messages(messages: object) -> None:
    if not isinstance(messages, list) or not messages:
        raise _type_error("messages", "a non-empty array of message objects")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise _type_error(f"messages[{i}]", "an object")
        if not isinstance(msg.get("role"), str):
            raise _type_error(f"messages[{i}].role", "a string")
        content = msg.get("content")
        if content is not None and not isinstance(content, str | list):
            raise _type_error(f"messages[{i}].content", "a string, an array of parts or null")


def _is_token_list(v: object) -> bool:
    return isinstance(v, list) and all(_is_int(t) for t in v)


def _check_text_input(param: str, value: object) -> None:
    """prompt / input: a string, an array of strings, an array of tokens, or arrays of tokens."""
    if isinstance(value, str):
        return
    if (
        isinstance(value, list)
        and value
        and (
            all(isinstance(v, str) for v in value)
            or _is_token_list(value)
            or all(_is_token_list(v) and v for v in value)
        )
    ):
        return
    raise _type_error(param, "a string, an array of strings or an array of token arrays")


#: Integer fields and their range. An output ceiling of 0 reads as "no limit" on some engines:
#: Bastion never forwards one (every request reaches the engine with a positive ceiling). Token
#: counts are reserved in 64-bit counters (Redis): bounded so a reservation always fits. `seed`
#: is a signed 64-bit integer, as OpenAI documents it.
SEED_RANGE = (-(2**63), 2**63 - 1)
_INT_FIELDS = {
    "max_tokens": (1, MAX_COUNT),
    "max_completion_tokens": (1, MAX_COUNT),
    "n": (1, None),  # capped by limits.max_n
    "best_of": (1, None),
    "seed": SEED_RANGE,
}
#: The usage records' `client_user` column holds this many characters (and no NUL): a `user`
#: that could not be stored would stall the usage writer for everyone.
MAX_USER = 256
_NUMBER_FIELDS = ("temperature", "top_p", "presence_penalty", "frequency_penalty")


def _read_body(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest(
            "We could not parse the JSON body of your request: it is not valid JSON.",
            code="invalid_json",
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    try:  # nesting the audit trail and the engine body could not serialise: refused here
        orjson.dumps(body)
    except orjson.JSONEncodeError:
        raise InvalidRequest(
            "The request body is nested too deeply (at most 255 levels).", code="too_deep"
        ) from None
    return body


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if model is None:
        raise InvalidRequest("you must provide a model parameter", param="model", code="missing")
    if not isinstance(model, str) or not model:
        raise _type_error("model", "a non-empty string")
    return model


def _options(body: dict[str, Any], streamable: bool) -> tuple[bool, bool, str | None]:
    """stream, include_usage, user, and the sampling fields every OpenAI endpoint shares."""
    for name, (minimum, maximum) in _INT_FIELDS.items():
        v = body.get(name)
        if v is None:
            continue
        if not _is_int(v):
            raise _type_error(name, "an integer")
        if v < minimum:
            raise InvalidRequest(
                f"'{name}' must be at least {minimum}", param=name, code="invalid_value"
            )
        if maximum is not None and v > maximum:
            raise InvalidRequest(
                f"'{name}' must be at most {maximum}", param=name, code="invalid_value"
            )
        body[name] = int(v)  # counted and reserved as an integer, forwarded as one
    for name in _NUMBER_FIELDS:
        v = body.get(name)
        if v is not None and not _is_number(v):
            raise _type_error(name, "a number")

    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _type_error("stream", "a boolean")
    if stream and not streamable:
        raise InvalidRequest("embeddings cannot be streamed", param="stream", code="invalid_value")

    options = body.get("stream_options")
    wants_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise _type_error("stream_options", "an object")
        include = options.get("include_usage", False)
        if include is not None and not isinstance(include, bool):
            raise _type_error("stream_options.include_usage", "a boolean")
        wants_usage = bool(include)

    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _type_error("user", "a string")
    if user is not None and (len(user) > MAX_USER or "\x00" in user):
        raise InvalidRequest(
            f"'user' must be at most {MAX_USER} characters, without NUL",
            param="user",
            code="invalid_value",
        )
    return stream, wants_usage, user


def _walk(value: Any, texts: list[str]) -> int:
    """Collects the strings of a prompt; returns the tokens counted without a tokenizer."""
    if isinstance(value, str):
        texts.append(value)
        return 0
    if isinstance(value, int | float):
        return 1  # already a token id (5.0 is one too)
    if isinstance(value, list):
        return sum(_walk(v, texts) for v in value)
    if isinstance(value, dict):
        return _walk(value["text"], texts) if "text" in value else UNSIZED_PART
    return 0


def _session(headers: Headers, body: dict[str, Any], user: str | None) -> str | None:
    hint = headers.get("x-session-affinity") or body.get("prompt_cache_key") or user
    return hint if isinstance(hint, str) and hint else None


class _OpenAI(WireAdapter):
    """What the three endpoints share: the input field, and whether they generate."""

    input_field: str
    generates = True

    def parse(self, raw: bytes, headers: Headers) -> ParsedRequest:
        body = _read_body(raw)
        model = _model(body)
        self.check_input(body)
        stream, wants_usage, user = _options(body, streamable=self.generates)
        req = ParsedRequest(
            self,
            body,
            model,
            stream,
            client_user=user,
            client_wants_usage=wants_usage,
            generates=self.generates,
            choices=body.get("n") or 1,
            session=_session(headers, body, user),
            fields=frozenset(body),
        )
        if (best_of := body.get("best_of") or 1) > req.choices:  # generated, then discarded
            req.choices, req.choices_param = best_of, "best_of"
        if self.generates:
            req.output_fields = [
                (name, body[name])
                for name in ("max_tokens", "max_completion_tokens")
                if body.get(name) is not None
            ]
            if req.output_fields:  # engines prefer max_completion_tokens where both are set
                req.max_output_param, req.max_output = req.output_fields[-1]
        return req

    def check_input(self, body: dict[str, Any]) -> None:
        if self.input_field not in body:
            raise InvalidRequest(
                f"'{self.input_field}' is a required property",
                param=self.input_field,
                code="missing",
            )
        _check_text_input(self.input_field, body[self.input_field])

    def prompt(self, req: ParsedRequest) -> tuple[list[str], int]:
        texts: list[str] = []
        extra = _walk(req.body.get(self.input_field), texts)
        return texts, extra

    def set_output_ceiling(self, req: ParsedRequest, tokens: int) -> None:
        req.body["max_tokens"] = req.max_output = tokens
        req.max_output_param = "max_tokens"

    def engine_body(self, req: ParsedRequest, served_name: str) -> bytes:
        body = req.body
        body["model"] = served_name
        if req.max_output is not None:
            # The ceiling Bastion reserved, in every field an engine may read it from.
            body["max_tokens"] = req.max_output
            if "max_completion_tokens" in body:
                body["max_completion_tokens"] = req.max_output
        if req.stream:
            # Always ask for usage, so every stream is metered; hidden again if not requested.
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        return orjson.dumps(body)

    def answer(self, raw: bytes, alias: str) -> Answer:
        obj = engine_json_object(raw)
        normalise(obj)
        engine_model = obj.get("model")
        if "model" in obj:
            obj["model"] = alias
        return Answer(orjson.dumps(obj), read_usage(obj.get("usage")), engine_model, obj)

    def stream(self, req: ParsedRequest, alias: str, collect: bool) -> StreamTranslator:
        return OpenAIStream(alias, req.client_wants_usage, collect)


class ChatCompletions(_OpenAI):
    name = "chat"
    path = engine_path = "/v1/chat/completions"
    serves = ("chat",)
    input_field = "messages"

    def parse(self, raw: bytes, headers: Headers) -> ParsedRequest:
        req = super().parse(raw, headers)
        req.messages = len(req.body["messages"])
        return req

    def check_input(self, body: dict[str, Any]) -> None:
        if "messages" not in body:
            raise InvalidRequest(
                "'messages' is a required property", param="messages", code="missing"
            )
        _check_messages(body["messages"])

    def prompt(self, req: ParsedRequest) -> tuple[list[str], int]:
        texts: list[str] = []
        extra = PER_CHAT_OVERHEAD
        for msg in req.body["messages"]:
            extra += PER_MESSAGE_OVERHEAD + _walk(msg.get("content"), texts)
            if "tool_calls" in msg:
                texts.append(str(msg["tool_calls"]))
        if tools := req.body.get("tools"):
            texts.append(str(tools))
        return texts, extra


class Completions(_OpenAI):
    name = "completions"
    path = engine_path = "/v1/completions"
    serves = ("chat", "completion")
    input_field = "prompt"


class Embeddings(_OpenAI):
    name = "embeddings"
    path = engine_path = "/v1/embeddings"
    serves = ("embedding",)
    input_field = "input"
    generates = False


CHAT, COMPLETIONS, EMBEDDINGS = ChatCompletions(), Completions(), Embeddings()


class OpenAIStream(StreamTranslator):
    """Chunks pass as the engine sent them, with the alias for the served name and the usage
    chunk Bastion asked for hidden from clients that did not ask."""

    def __init__(self, alias: str, wants_usage: bool, collect: bool):
        super().__init__(alias, wants_usage, collect)
        #: The answer so far, per choice (only when collecting for the audit trail).
        self.output: dict[Any, dict[str, Any]] = {}

    def event(self, event: bytes) -> bytes | None:
        if not event.startswith(b"data:"):
            return event + b"\n\n"  # comments and other fields pass as they are
        payload = event[5:].lstrip()
        state = self.state
        if payload == b"[DONE]":
            state.done = True
            return None  # sent once the answer is recorded (see `end`)
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return event + b"\n\n"
        if not isinstance(obj, dict):
            return event + b"\n\n"
        normalise(obj)
        if "error" in obj:
            err = obj["error"]
            msg = err.get("message") if isinstance(err, dict) else str(err)
            state.error = UpstreamError(f"engine error mid-stream: {msg}")
        choices = obj.get("choices")
        if choices:
            state.output_chunk()
            if self.collecting and isinstance(choices, list):
                self.collect(choices)
        if "usage" in obj:
            usage = obj["usage"]
            if usage is not None:
                state.usage = read_usage(usage)
            if not self.wants_usage:
                if usage is not None and not choices:
                    return None  # the usage-only chunk Bastion asked for on the client's behalf
                del obj["usage"]
        if "model" in obj:
            state.engine_model = obj["model"]
            obj["model"] = self.alias
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    def end(self) -> bytes:
        return DONE

    def error(self, exc: BastionError) -> bytes:
        return exc.sse()

    def collect(self, choices: list[Any]) -> None:
        """Adds one chunk's choices to the answer. Every field the client received is kept:
        the text and tool calls, and any other field of the delta or the choice (reasoning,
        logprobs, an engine's own), strings joined, lists extended, the rest last-wins."""
        out = self.output
        for ch in choices:
            if not isinstance(ch, dict):
                continue
            acc = out.setdefault(ch.get("index", 0), {"parts": [], "tools": {}, "fields": {}})
            delta = ch.get("delta")
            if isinstance(delta, dict):
                for key, value in delta.items():
                    if key == "content" and isinstance(value, str):
                        acc["parts"].append(value)
                    elif key == "tool_calls":
                        for tc in value or ():
                            _merge_tool_call(acc["tools"], tc)
                    elif key != "content":
                        _merge_field(acc["fields"], key, value)
            elif isinstance(t := ch.get("text"), str):
                acc["parts"].append(t)
            for key, value in ch.items():
                if key not in ("index", "delta", "text", "finish_reason"):
                    _merge_field(acc["fields"], key, value)
            if ch.get("finish_reason") is not None:
                acc["finish_reason"] = ch["finish_reason"]

    def assembled(self) -> list[dict[str, Any]]:
        """The streamed answer put back together, per choice: text, tool calls, finish reason
        and every other field the client received."""
        result = []
        for index, acc in sorted(self.output.items(), key=_by_index):
            choice: dict[str, Any] = {
                **acc["fields"],
                "index": index,
                "text": "".join(acc["parts"]),
                "finish_reason": acc.get("finish_reason"),
            }
            if acc["tools"]:
                choice["tool_calls"] = [
                    {**tc, "function": {**tc["function"], "arguments": "".join(tc["args"])}}
                    for _i, tc in sorted(acc["tools"].items(), key=_by_index)
                ]
                for tc in choice["tool_calls"]:
                    del tc["args"]
            result.append(choice)
        return result


def _merge_field(fields: dict[str, Any], key: str, value: Any) -> None:
    """Streams send pieces: text to join, lists (logprobs.content) to extend, dicts by key."""
    if value is None:
        fields.setdefault(key, None)
        return
    have = fields.get(key)
    if isinstance(value, str) and isinstance(have, str):
        fields[key] = have + value
    elif isinstance(value, list) and isinstance(have, list):
        have.extend(value)
    elif isinstance(value, dict) and isinstance(have, dict):
        for k, v in value.items():
            _merge_field(have, k, v)
    elif isinstance(value, dict):  # a copy: later pieces extend it, never the sent chunk
        fields[key] = {}
        for k, v in value.items():
            _merge_field(fields[key], k, v)
    else:
        fields[key] = list(value) if isinstance(value, list) else value


def _by_index(item: tuple[Any, Any]) -> tuple[int, Any]:
    """Engines send integer indexes; anything else sorts after them instead of failing."""
    index = item[0]
    return (0, index) if isinstance(index, int) else (1, str(index))


def _merge_tool_call(tools: dict[int, dict[str, Any]], tc: Any) -> None:
    if not isinstance(tc, dict):
        return
    acc = tools.setdefault(tc.get("index", 0), {"function": {}, "args": []})
    for k in ("id", "type"):
        if tc.get(k):
            acc[k] = tc[k]
    fn = tc.get("function")
    if isinstance(fn, dict):
        if fn.get("name"):
            acc["function"]["name"] = fn["name"]
        if isinstance(a := fn.get("arguments"), str):
            acc["args"].append(a)
