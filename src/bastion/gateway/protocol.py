"""Parsing of OpenAI request bodies: just enough to route, attribute and meter a call.

Everything not checked here passes through to the engine untouched (tools, response_format,
logprobs, seed, …); the engine validates the rest and its 4xx comes back as a 400.
"""

from __future__ import annotations

import orjson

from bastion.core.errors import InvalidRequest
from bastion.core.request import Endpoint, ParsedRequest

PATHS: dict[Endpoint, str] = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "embeddings": "/v1/embeddings",
}


def _type_error(param: str, expected: str) -> InvalidRequest:
    return InvalidRequest(f"'{param}' must be {expected}", param=param, code="invalid_type")


def _is_int(v: object) -> bool:
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


_INT_FIELDS = {"max_tokens": 0, "max_completion_tokens": 0, "n": 1, "best_of": 1, "seed": None}
_NUMBER_FIELDS = ("temperature", "top_p", "presence_penalty", "frequency_penalty")


def parse_request(endpoint: Endpoint, raw: bytes) -> ParsedRequest:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest(
            "We could not parse the JSON body of your request: it is not valid JSON.",
            code="invalid_json",
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")

    model = body.get("model")
    if model is None:
        raise InvalidRequest("you must provide a model parameter", param="model", code="missing")
    if not isinstance(model, str) or not model:
        raise _type_error("model", "a non-empty string")

    if endpoint == "chat":
        if "messages" not in body:
            raise InvalidRequest(
                "'messages' is a required property", param="messages", code="missing"
            )
        _check_messages(body["messages"])
    elif endpoint == "completions":
        if "prompt" not in body:
            raise InvalidRequest("'prompt' is a required property", param="prompt", code="missing")
        _check_text_input("prompt", body["prompt"])
    else:
        if "input" not in body:
            raise InvalidRequest("'input' is a required property", param="input", code="missing")
        _check_text_input("input", body["input"])

    for name, minimum in _INT_FIELDS.items():
        v = body.get(name)
        if v is None:
            continue
        if not _is_int(v):
            raise _type_error(name, "an integer")
        if minimum is not None and v < minimum:
            raise InvalidRequest(
                f"'{name}' must be at least {minimum}", param=name, code="invalid_value"
            )
    for name in _NUMBER_FIELDS:
        v = body.get(name)
        if v is not None and not _is_number(v):
            raise _type_error(name, "a number")

    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _type_error("stream", "a boolean")
    if stream and endpoint == "embeddings":
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

    return ParsedRequest(endpoint, body, model, stream, wants_usage, user)
