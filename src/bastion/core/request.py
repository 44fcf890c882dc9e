"""The request as every stage of the pipeline sees it, whatever wire API it came in on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Endpoint = Literal["chat", "completions", "embeddings"]


@dataclass(slots=True)
class ParsedRequest:
    endpoint: Endpoint
    body: dict[str, Any]
    model: str
    stream: bool
    #: Whether the client itself asked for the usage chunk at the end of a stream.
    client_wants_usage: bool
    #: The body's `user` field: kept for reference, never used for attribution.
    client_user: str | None
