"""The request path, one stage after another:

    authenticate → read body → parse → authorize → cap → admit → audit → route → relay → record

Every request, whatever happens to it, leaves exactly one usage record, one metrics sample and
its audit entries: the request entry durable before anything is forwarded, and a completion
(or, for a request refused before that, a rejection) entry when it ends.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from bastion.audit.trail import AuditTrail
from bastion.config import Settings
from bastion.core.errors import (
    BastionError,
    BodyTooLarge,
    EngineConnectError,
    InternalError,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    UpstreamError,
    UpstreamUnavailable,
    error_response,
)
from bastion.engines.client import EngineClient, Usage, raise_for_engine_status
from bastion.gateway.protocol import PATHS, Endpoint, ParsedRequest, parse_request
from bastion.gateway.relay import Answer, SSERelay, StreamState
from bastion.identity.keys import KeyStore
from bastion.identity.principal import Principal
from bastion.identity.roles import CALLERS
from bastion.limits.admission import Admission, Ticket
from bastion.limits.caps import check_caps
from bastion.limits.fairshare import FairQueue
from bastion.metering.settings import PriceSettings
from bastion.metering.usage import UsageRecord, UsageWriter
from bastion.observability.metrics import Metrics
from bastion.routing.balancer import Deployment, ModelRoute

log = logging.getLogger("bastion.gateway")
ENDPOINT_KINDS: dict[Endpoint, tuple[str, ...]] = {
    "chat": ("chat",),
    "completions": ("chat", "completion"),
    "embeddings": ("embedding",),
}


@dataclass(slots=True)
class Call:
    rec: UsageRecord
    started: float
    source: str | None = None
    ticket: Ticket | None = None
    queue: FairQueue | None = None
    body: dict[str, Any] | None = None
    #: The request entry is durable: the call ends with a completion entry, not a rejection.
    audited: bool = False
    #: The closing audit entry is written (or on its way).
    audit_closed: bool = False

    @property
    def headers(self) -> dict[str, str]:
        headers = {"x-request-id": self.rec.request_id}
        if self.ticket is not None:
            headers.update(self.ticket.headers)
        return headers


class Gateway:
    def __init__(
        self,
        settings: Settings,
        keys: KeyStore,
        usage: UsageWriter,
        client: EngineClient,
        metrics: Metrics,
        routes: dict[str, ModelRoute],
        admission: Admission,
        audit: AuditTrail | None = None,
    ):
        self.settings = settings
        self.keys = keys
        self.usage = usage
        self.client = client
        self.metrics = metrics
        self.routes = routes
        self.max_body = settings.server.max_body_bytes
        self.prices: dict[str, PriceSettings] = dict(settings.prices)
        self.admission = admission
        self.audit = audit
        self.queues = {
            alias: FairQueue(cap, settings.limits.queue_timeout_seconds)
            for alias, route in routes.items()
            if (cap := route.capacity) is not None
        }

    # -- stages -----------------------------------------------------------------------------
    async def handle(self, endpoint: Endpoint, request: Request) -> Response | SSERelay:
        call = Call(
            UsageRecord(request_id="req_" + secrets.token_hex(12), endpoint=endpoint),
            time.perf_counter(),
            request.client.host if request.client else None,
        )
        try:
            principal = await self.keys.authenticate(request.headers.get("authorization"))
            self._attribute(call.rec, principal)
            req = parse_request(endpoint, await self._read_body(request))
            call.body = req.body
            call.rec.model, call.rec.stream = req.model, req.stream
            call.rec.client_user = req.client_user
            route = self._authorize(principal, req)
            check_caps(self.settings, req)
            call.ticket = await self.admission.admit(principal, req, call.rec.request_id)
            if (queue := self.queues.get(route.alias)) is not None:
                await queue.acquire(principal.team, self._weight(principal.team))
                call.queue = queue
            if self.audit is not None:
                req.body = await self.audit.request(call.rec, principal, req.body, call.source)
                call.audited = True
            return await self._relay(call, route, req)
        except BastionError as exc:
            self._finish(call, exc.status, exc.outcome, exc.code, error=exc.message)
            exc.headers = {**call.headers, **exc.headers}
            return error_response(exc, call.rec.request_id)
        except ClientDisconnect:
            self._finish(call, 499, "cancelled", "client_disconnected")
            return Response(status_code=499)
        except asyncio.CancelledError:  # e.g. shutdown: still recorded, slots still freed
            self._finish(call, 499, "cancelled", "cancelled")
            raise
        except Exception:
            log.exception("unexpected error on %s", call.rec.request_id)
            exc = InternalError("Bastion failed to handle this request; it has been logged.")
            self._finish(call, exc.status, exc.outcome, exc.code)
            return error_response(exc, call.rec.request_id)

    def _weight(self, team: str) -> float:
        t = self.settings.teams.get(team)
        return t.weight if t is not None else 1.0

    @staticmethod
    def _attribute(rec: UsageRecord, p: Principal) -> None:
        rec.key_id, rec.team, rec.cost_center, rec.user = p.key_id, p.team, p.cost_center, p.user

    async def _read_body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            raise BodyTooLarge(
                f"Request body is {int(declared)} bytes; the limit is {self.max_body} bytes."
            )
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise BodyTooLarge(f"Request body exceeds the limit of {self.max_body} bytes.")
            chunks.append(chunk)
        return b"".join(chunks)

    def _authorize(self, principal: Principal, req: ParsedRequest) -> ModelRoute:
        if principal.role not in CALLERS:
            raise PermissionDenied(
                f"The {principal.role} role cannot call models.", code="role_not_allowed"
            )
        route = self.routes.get(req.model)
        if route is None or not principal.may_use(req.model):
            if route is None:
                raise NotFound(f"The model '{req.model}' does not exist.", param="model")
            raise PermissionDenied(f"This key may not use the model '{req.model}'.", param="model")
        if route.settings.kind not in ENDPOINT_KINDS[req.endpoint]:
            raise InvalidRequest(
                f"The model '{req.model}' is a {route.settings.kind} model and "
                f"does not serve {PATHS[req.endpoint]}.",
                param="model",
                code="wrong_endpoint",
            )
        return route

    async def _relay(
        self, call: Call, route: ModelRoute, req: ParsedRequest
    ) -> Response | SSERelay:
        body = req.body
        if req.stream:
            # Always ask for usage, so every stream is metered; hidden again if not requested.
            opts = body.get("stream_options")
            body["stream_options"] = {**(opts or {}), "include_usage": True}
        dep, upstream = await self._connect(call, route, req)
        gauge = self.metrics.in_flight.labels(route.alias)
        gauge.inc()
        if req.stream:

            def on_end(state: StreamState, cancelled: bool) -> None:
                dep.in_flight -= 1
                gauge.dec()
                self._end_stream(call, state, cancelled)

            async def before_done(state: StreamState) -> BastionError | None:
                return await self._record_answer(call, state.assembled(), state.engine_model, state)

            return SSERelay(
                upstream,
                route.alias,
                req.client_wants_usage,
                call.headers,
                on_end,
                before_done if self.audit is not None else None,
            )
        try:
            raw = await upstream.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            upstream.close()
            raise UpstreamError(
                f"reading the engine's answer failed: {type(exc).__name__}"
            ) from exc
        finally:
            dep.in_flight -= 1
            gauge.dec()
            upstream.release()
        answer = Answer(raw, route.alias)
        self._count(call.rec, answer.usage)
        if self.audit is not None:
            failure = await self._record_answer(call, answer.obj, answer.engine_model)
            if failure is not None:
                raise failure
        self._finish(call, 200, "ok", None)
        return Response(answer.body, media_type="application/json", headers=call.headers)

    async def _connect(
        self, call: Call, route: ModelRoute, req: ParsedRequest
    ) -> tuple[Deployment, aiohttp.ClientResponse]:
        """Tries deployments in the balancer's order; moves on only if nothing was sent."""
        path = PATHS[req.endpoint]
        last: BastionError | None = None
        for dep in route.candidates():
            req.body["model"] = dep.settings.served_name
            call.rec.deployment = dep.name
            dep.in_flight += 1
            try:
                upstream = await self.client.post(dep.settings, path, orjson.dumps(req.body))
                await raise_for_engine_status(upstream)
                return dep, upstream
            except EngineConnectError as exc:
                dep.in_flight -= 1
                dep.eject()
                self.metrics.upstream_errors.labels(dep.name, "connect").inc()
                log.warning("%s: %s; trying the next deployment", dep.name, exc.message)
                last = exc
            except UpstreamError as exc:
                dep.in_flight -= 1
                self.metrics.upstream_errors.labels(dep.name, exc.default_code or "error").inc()
                raise
            except BaseException:
                dep.in_flight -= 1
                raise
        raise UpstreamUnavailable(
            f"No engine for model '{route.alias}' is reachable right now"
            + (f" ({last.message})" if last else "")
            + "."
        )

    # -- recording --------------------------------------------------------------------------
    def _count(self, rec: UsageRecord, usage: Usage | None) -> None:
        if usage is not None:
            rec.prompt_tokens = usage.prompt_tokens
            rec.cached_tokens = usage.cached_tokens
            rec.completion_tokens = usage.completion_tokens

    def _count_stream(self, rec: UsageRecord, state: StreamState) -> None:
        self._count(rec, state.usage)
        if state.usage is None:
            # No usage chunk (cancelled, or the engine broke off): each chunk is about one token.
            rec.completion_tokens = state.chunks

    async def _record_answer(
        self,
        call: Call,
        content: Any,
        engine_model: str | None,
        state: StreamState | None = None,
    ) -> BastionError | None:
        """The completion entry of a successful answer, durable before the client has it all."""
        assert self.audit is not None
        rec = call.rec
        if state is not None:
            self._count_stream(rec, state)
        rec.status, rec.outcome, rec.error_code = 200, "ok", None
        rec.latency_ms = (time.perf_counter() - call.started) * 1000
        call.audit_closed = True
        try:
            await self.audit.completion(rec, content=content, engine_model=engine_model)
        except Exception as exc:
            return self.audit.failed(rec, exc, "the answer, so it is withheld")
        return None

    def _end_stream(self, call: Call, state: StreamState, cancelled: bool) -> None:
        rec = call.rec
        self._count_stream(rec, state)
        if state.first_token_at is not None:
            rec.ttft_ms = (state.first_token_at - call.started) * 1000
            self.metrics.ttft.labels(rec.model).observe(state.first_token_at - call.started)
        partial = state.assembled() if state.output is not None else None
        if cancelled:
            self._finish(call, 499, "cancelled", "client_disconnected", content=partial)
        elif state.error is not None:
            err = state.error
            self._finish(call, 200, err.outcome, err.code, error=err.message, content=partial)
        else:
            self._finish(call, 200, "ok", None)

    def _finish(
        self,
        call: Call,
        status: int,
        outcome: str,
        code: str | None,
        *,
        error: str | None = None,
        content: Any = None,
    ) -> None:
        rec = call.rec
        elapsed = time.perf_counter() - call.started
        rec.latency_ms = elapsed * 1000
        rec.status, rec.outcome, rec.error_code = status, outcome, code
        if rec.model is not None:
            rec.price(self.prices.get(rec.model))
        model = rec.model if rec.model in self.routes else "(unknown)"
        m = self.metrics
        m.requests.labels(model, rec.endpoint, str(status)).inc()
        m.latency.labels(model, rec.endpoint).observe(elapsed)
        if rec.prompt_tokens:
            m.tokens.labels(model, "prompt").inc(rec.prompt_tokens)
        if rec.cached_tokens:
            m.tokens.labels(model, "cached").inc(rec.cached_tokens)
        if rec.completion_tokens:
            m.tokens.labels(model, "completion").inc(rec.completion_tokens)
        if call.queue is not None:
            call.queue.release()
            call.queue = None
        if call.ticket is not None:
            self.admission.settle(call.ticket, rec)
        self.usage.add(rec)
        if self.audit is not None and not call.audit_closed:
            call.audit_closed = True
            if call.audited:  # forwarded, and did not end well: what was sent so far
                self.audit.completion_later(rec, content=content, aborted=True, error=error)
            else:
                self.audit.completion_later(
                    rec, kind="rejected", content={"request": call.body}, error=error
                )
