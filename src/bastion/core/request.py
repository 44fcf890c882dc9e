"""The request as every stage of the pipeline sees it, whatever wire API it came in on.

A wire adapter (`bastion.gateway.wire`) parses a client's body into a `ParsedRequest`: the
canonical fields the stages need (model alias, stream flag, output-token ceiling, choices,
message count, client `user`, session hint) beside the body itself. Stages read those fields,
never the body, so a new wire API is a new adapter, not an edit of every stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


class Wire(Protocol):
    """What the stages may ask of the adapter that parsed a request."""

    #: The endpoint label of usage records, metrics and the audit trail ("chat", …).
    name: str
    #: The path clients call, e.g. "/v1/chat/completions".
    path: str

    def prompt(self, req: ParsedRequest) -> tuple[list[str], int]:
        """The prompt's texts to count, and the tokens counted without a tokenizer (token ids,
        images, the chat template's own tokens)."""
        ...

    def set_output_ceiling(self, req: ParsedRequest, tokens: int) -> None:
        """Sets the output-token ceiling the engine will receive (for requests that set none)."""
        ...


@dataclass(slots=True)
class ParsedRequest:
    wire: Wire
    #: The body as the client sent it (validated, unknown fields kept).
    body: dict[str, Any]
    model: str
    stream: bool
    #: The body's `user` field: kept for reference, never used for attribution.
    client_user: str | None = None
    #: Whether the client itself asked for usage at the end of a stream.
    client_wants_usage: bool = False
    #: Whether the request generates tokens at all (embeddings do not).
    generates: bool = True
    #: The output-token ceiling per choice, and the field that set it; None: the model's default.
    max_output: int | None = None
    max_output_param: str | None = None
    #: Every output ceiling the client wrote, as (field, value): each is checked against the
    #: model's `max_tokens`.
    output_fields: list[tuple[str, int]] = field(default_factory=list)
    #: Sequences generated per request (`n`, or `best_of` where larger), and the field.
    choices: int = 1
    choices_param: str = "n"
    #: The body's top-level field names (for the per-model engine-field policy).
    fields: frozenset[str] = frozenset()
    #: Messages in a chat-like request (for `limits.max_messages`); None where there are none.
    messages: int | None = None
    #: A hint that requests belong to one session (`x-session-affinity`, `prompt_cache_key`,
    #: `user`), for routing that keeps a session on one replica.
    session: str | None = None
    #: Headers the answer carries about what Bastion changed (e.g. a clamped output ceiling).
    response_headers: dict[str, str] = field(default_factory=dict)
    #: Client headers an engine serving this API natively receives too (`anthropic-version`).
    forward_headers: dict[str, str] = field(default_factory=dict)
    #: The registry adapter (NAME@VERSION) the engine applies, when the model called is an
    #: adapter alias (`bastion models deploy`); `model` is then its base alias.
    adapter: str | None = None

    @property
    def endpoint(self) -> str:
        return self.wire.name

    def prompt(self) -> tuple[list[str], int]:
        return self.wire.prompt(self)
