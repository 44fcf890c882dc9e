"""The state of one call on its way through the pipeline, and what a stateful wire API adds."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Protocol

from bastion.core.request import ParsedRequest
from bastion.gateway.wire import Answer
from bastion.identity.principal import Principal
from bastion.limits.admission import Ticket
from bastion.limits.fairshare import FairQueue
from bastion.metering.usage import UsageRecord
from bastion.observability import tracing as traces
from bastion.routing.balancer import Deployment


class AnswerHook(Protocol):
    """What a stateful wire API adds to the path (the Responses API's stored conversations):
    `prepare` after authorization, before anything is counted; `complete` rewrites a whole
    answer; `keep` runs once the answer is recorded, before the client has all of it."""

    async def prepare(self, principal: Principal, req: ParsedRequest) -> None: ...

    def complete(self, req: ParsedRequest, answer: Answer) -> Answer: ...

    async def keep(self, rec: UsageRecord, req: ParsedRequest, content: Any) -> None: ...


@dataclass(slots=True)
class Call:
    rec: UsageRecord
    started: float
    source: str | None = None
    ticket: Ticket | None = None
    queue: FairQueue | None = None
    req: ParsedRequest | None = None
    #: The request entry, being made durable while admission asks the counters.
    recording: asyncio.Future[Any] | None = None
    #: The request entry is durable: the call ends with a completion entry, not a rejection.
    audited: bool = False
    #: The closing audit entry is written (or on its way).
    audit_closed: bool = False
    #: The deployment the request was sent to (its cache-hit tally).
    deployment: Deployment | None = None
    #: Reservations of the model limits of an alias serving a request called for another.
    serving_tickets: list[Ticket] = field(default_factory=list)
    #: How the request got where it went (response headers): a router's rule, a fallback.
    routing_headers: dict[str, str] = field(default_factory=dict)
    trace: traces.RequestSpan | None = None  # the request's span (None: not traced)

    @property
    def headers(self) -> dict[str, str]:
        headers = {"x-request-id": self.rec.request_id, **self.routing_headers}
        if self.ticket is not None:
            headers.update(self.ticket.headers)
        if self.req is not None:
            headers.update(self.req.response_headers)
        return headers
