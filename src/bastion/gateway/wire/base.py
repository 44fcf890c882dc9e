"""What every wire adapter provides, and the state a relayed stream leaves for the pipeline."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.datastructures import Headers
from starlette.responses import Response

from bastion.core.errors import BastionError, UpstreamError, error_response
from bastion.core.request import ParsedRequest
from bastion.engines.client import Usage
from bastion.engines.settings import DeploymentSettings
from bastion.routing.settings import ModelSettings


def engine_json_object(raw: bytes) -> dict[str, Any]:
    """An engine's whole answer as a JSON object (UpstreamError when it is not one)."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise UpstreamError("the engine returned a body that is not JSON") from None
    if not isinstance(obj, dict):
        raise UpstreamError("the engine returned JSON that is not an object")
    return obj


@dataclass(slots=True)
class Answer:
    """A whole (non-streamed) engine answer, as the client gets it."""

    #: The body for the client.
    body: bytes
    usage: Usage | None
    #: The model name the engine reported.
    engine_model: str | None
    #: What the audit trail records as the response.
    content: Any


class StreamState:
    """What a relayed stream taught the pipeline: usage, timing, how it ended."""

    __slots__ = ("chunks", "done", "engine_model", "error", "first_token_at", "usage")

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self.first_token_at: float | None = None
        #: Chunks that carried output (about one token each).
        self.chunks = 0
        #: The engine ended the stream properly.
        self.done = False
        self.error: BastionError | None = None
        self.engine_model: str | None = None

    def output_chunk(self) -> None:
        self.chunks += 1
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()


class StreamTranslator(ABC):
    """One stream's engine events → the client's wire format, learning usage on the way."""

    def __init__(self, alias: str, wants_usage: bool, collect: bool):
        self.alias = alias
        self.wants_usage = wants_usage
        #: Assemble the answer for the audit trail.
        self.collecting = collect
        self.state = StreamState()

    @abstractmethod
    def event(self, event: bytes) -> bytes | None:
        """One engine SSE event (no terminator) → bytes for the client, or None to hold back.
        Sets `state.done` on the engine's end-of-stream."""

    @abstractmethod
    def end(self) -> bytes:
        """The client's end-of-stream, sent once the answer is recorded."""

    @abstractmethod
    def error(self, exc: BastionError) -> bytes:
        """A mid-stream error, in the client's format, ending the stream."""

    @abstractmethod
    def assembled(self) -> Any:
        """The streamed answer put back together (what the audit trail records)."""


class WireAdapter(ABC):
    """One wire API: how its bodies are read, forwarded, answered and streamed."""

    #: The endpoint label of usage records, metrics and the audit trail.
    name: str
    #: The path clients call, and the path on the engine it is forwarded to.
    path: str
    engine_path: str
    #: Model kinds (`models.<alias>.kind`) this API may call.
    serves: tuple[str, ...]
    #: An output ceiling above the model's `max_tokens` is lowered to it (and said so in a
    #: response header) instead of refused: for APIs whose clients ask more than any model has.
    clamps_output: bool = False

    @abstractmethod
    def parse(self, raw: bytes, headers: Headers) -> ParsedRequest:
        """Validates the body (InvalidRequest naming the param) into the canonical request."""

    def bind(self, req: ParsedRequest, model: ModelSettings) -> None:
        """Adapts the request to the model it calls, once authorized and before caps and
        limits see it (e.g. a fill-in-the-middle template: the prompt they count is the one
        the engine gets). InvalidRequest where the model cannot serve it."""
        return None

    @abstractmethod
    def prompt(self, req: ParsedRequest) -> tuple[list[str], int]:
        """The prompt's texts to count, and the tokens counted without a tokenizer."""

    @abstractmethod
    def set_output_ceiling(self, req: ParsedRequest, tokens: int) -> None:
        """Writes an output-token ceiling for the engine into a request that set none."""

    @abstractmethod
    def engine_body(self, req: ParsedRequest, served_name: str) -> bytes:
        """The body the engine receives (its `model` is the deployment's served name)."""

    def engine_headers(self, req: ParsedRequest) -> dict[str, str]:
        """Headers the engine receives besides its key (an API's version header, …)."""
        return {}

    @abstractmethod
    def answer(self, raw: bytes, alias: str) -> Answer:
        """The engine's whole answer in this API's format (UpstreamError if unreadable)."""

    @abstractmethod
    def stream(self, req: ParsedRequest, alias: str, collect: bool) -> StreamTranslator:
        """A translator for one streamed answer."""

    def credential(self, headers: Headers) -> str | None:
        """The caller's credential as an `Authorization` value (APIs that send it elsewhere,
        e.g. Anthropic's `x-api-key`, say so here)."""
        return headers.get("authorization")

    def via(self, deployment: DeploymentSettings) -> WireAdapter:
        """The adapter that speaks to `deployment`: this one where its engine serves this API
        natively (`deployments[].apis`), else one that translates to an API it does serve."""
        return self

    def error_response(self, exc: BastionError, request_id: str) -> Response:
        """An error in this API's envelope (OpenAI's unless an adapter says otherwise)."""
        return error_response(exc, request_id)
