"""The request path, one stage after another:

    authenticate → read body → parse → authorize → cap → admit → audit → route → relay → record

The path is the same for every wire API: the endpoint's adapter (`gateway/wire/`) parses the
body into the canonical request the stages read (`core/request.py`), builds what the engine
receives and translates its answer back. Every request, whatever happens to it, leaves exactly
one usage record, one metrics sample and its audit entries: the request entry durable before
anything is forwarded, and a completion (or, for a request refused before that, a rejection)
entry when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from bastion.audit.trail import AuditTrail
from bastion.config import Settings
from bastion.core.errors import (
    BastionError,
    BodyTooLarge,
    EngineConnectError,
    FirstByteTimeout,
    InternalError,
    UpstreamError,
    UpstreamUnavailable,
)
from bastion.core.randomness import token_hex
from bastion.core.request import ParsedRequest
from bastion.engines.client import EngineClient, EngineResponse, Usage
from bastion.gateway.access import adapter_gone, authorize, may_call, may_call_adapter
from bastion.gateway.call import AnswerHook, Call
from bastion.gateway.relay import Receive, SSERelay, wait_disconnect
from bastion.gateway.tiers import pick, serve
from bastion.gateway.wire import StreamTranslator, WireAdapter
from bastion.identity.keystore import KeyStore
from bastion.identity.principal import Principal
from bastion.limits.admission import Admission
from bastion.limits.caps import check_caps
from bastion.limits.fairshare import FairQueue
from bastion.limits.tokens import prompt_upper_bound
from bastion.metering.settings import PriceSettings, resolved_prices
from bastion.metering.usage import UsageRecord, UsageWriter
from bastion.observability import tracing as traces
from bastion.observability.logs import bind_request
from bastion.observability.metrics import Metrics
from bastion.registry.serving import AdapterServing
from bastion.routing.balancer import Deployment, Lease, ModelRoute
from bastion.routing.tiers import NotServed, not_served

log = logging.getLogger("bastion.gateway")


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
        hooks: dict[str, AnswerHook] | None = None,
        adapters: AdapterServing | None = None,
        tracing: traces.Tracing | None = None,
    ):
        self.settings = settings
        self.keys = keys
        self.usage = usage
        self.client = client
        self.metrics = metrics
        self.routes = routes
        self.max_body = settings.server.max_body_bytes
        self.prices: dict[str, PriceSettings] = resolved_prices(settings)
        self.admission = admission
        self.audit = audit
        #: Per wire API name (`WireAdapter.name`).
        self.hooks = hooks or {}
        #: Registry adapters served under their own aliases (`bastion models deploy`).
        self.adapters = adapters
        self.tracing = tracing
        self.queues = {
            alias: FairQueue(cap, settings.limits.queue_timeout_seconds)
            for alias, route in routes.items()
            if (cap := route.capacity) is not None
        }
        #: Requests this process is serving, answers and streams included (`GatewayApp`).
        self.active = 0

    # -- stages -----------------------------------------------------------------------------
    async def handle(self, wire: WireAdapter, request: Request) -> Response | SSERelay:
        call = Call(
            UsageRecord(request_id="req_" + token_hex(12), endpoint=wire.name),
            time.perf_counter(),
            request.client.host if request.client else None,
        )
        bind_request(call.rec)  # every log line from here on names the request
        call.trace = self.tracing.request(request.headers, wire.name) if self.tracing else None
        try:
            principal = await self.keys.authenticate(wire.credential(request.headers))
            self._attribute(call.rec, principal)
            req = wire.parse(await self._read_body(request), request.headers)
            call.req = req
            call.rec.model, call.rec.stream = req.model, req.stream
            call.rec.client_user = req.client_user
            if (router := self.settings.routers.get(req.model)) is not None:
                may_call(principal, req.model)
                decision = await pick(self, router, principal, req, request.headers)
                req.model = decision.target  # every stage below reads the alias it goes to
                call.rec.served_model = decision.target
                call.routing_headers["x-bastion-router"] = (
                    f"{call.rec.model}; rule={decision.rule}; target={decision.target}"
                )
            elif self.adapters and (adapter := self.adapters.resolve(req.model)) is not None:
                may_call_adapter(principal, adapter)
                # Every stage below reads the base alias (its limits, caps, price, replicas);
                # the engine is asked for the adapter, the client sees the alias it called.
                req.model, req.adapter = adapter.base_alias, adapter.adapter
                call.rec.adapter = adapter.adapter
            route = authorize(self.routes, principal, req, wire)
            wire.bind(req, route.settings)
            if (hook := self.hooks.get(wire.name)) is not None:
                await hook.prepare(principal, req)
            check_caps(self.settings, req)
            if self.audit is not None:  # two waits at once: the disk flush and the counters
                call.recording = asyncio.ensure_future(
                    self.audit.request(
                        call.rec, principal, req.body, call.source, alone=self.active == 1
                    )
                )
            with traces.child(call.trace, "bastion.admission"):
                call.ticket = await self.admission.admit(principal, req, call.rec.request_id)
            return await serve(self, call, principal, route, req, wire, request.receive)
        except BastionError as exc:
            await self._entry_settled(call)
            self._finish(call, exc.status, exc.outcome, exc.code, error=exc.message)
            exc.headers = {**call.headers, **exc.headers}
            return wire.error_response(exc, call.rec.request_id)
        except ClientDisconnect:
            await self._entry_settled(call)
            if call.rec.deployment is not None:  # the engine had the prompt: it is charged
                self._estimate_prompt(call)
            self._finish(call, 499, "cancelled", "client_disconnected")
            return Response(status_code=499)
        except asyncio.CancelledError:  # e.g. shutdown: still recorded, slots still freed
            self._finish(call, 499, "cancelled", "cancelled")
            raise
        except Exception:
            log.exception("unexpected error on %s", call.rec.request_id)
            await self._entry_settled(call)
            exc = InternalError("Bastion failed to handle this request; it has been logged.")
            self._finish(call, exc.status, exc.outcome, exc.code)
            return wire.error_response(exc, call.rec.request_id)

    async def request_entry(self, call: Call, req: ParsedRequest) -> None:
        """Waits for the request entry begun in `handle` to be durable (raises what refuses
        the request); `req.body` becomes what the engine is sent (`audit.redact_upstream`)."""
        if call.recording is not None and not call.audited:
            req.body = await call.recording
            call.audited = True

    @staticmethod
    async def _entry_settled(call: Call) -> None:
        """A call that ends before forwarding: whether its request entry was written decides
        how it closes (a completion entry, or a rejection)."""
        if call.recording is not None and not call.audited:
            with contextlib.suppress(Exception):
                await call.recording
                call.audited = True

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

    async def _relay(
        self,
        call: Call,
        route: ModelRoute,
        req: ParsedRequest,
        wire: WireAdapter,
        receive: Receive,
    ) -> Response | SSERelay:
        hook = self.hooks.get(wire.name)
        if req.stream:
            lease, upstream, spoken = await self._connect(call, route, req, wire)

            def on_end(tr: StreamTranslator, cancelled: bool) -> None:
                self._end_stream(call, tr, cancelled)

            async def before_done(tr: StreamTranslator) -> BastionError | None:
                self._count_stream(call, tr)
                traces.answered(call.trace, tr.assembled)
                failure = None
                if self.audit is not None:
                    failure = await self._record_answer(call, tr.assembled(), tr.state.engine_model)
                if failure is None and hook is not None:
                    failure = await self._keep(call, hook, req, tr.assembled())
                return failure

            collect = self.audit is not None or hook is not None
            translator = spoken.stream(req, call.rec.model or route.alias, collect=collect)
            return SSERelay(
                upstream,
                lease,
                translator,
                call.headers,
                on_end,
                before_done if collect else None,
            )
        raw, spoken = await self._whole_answer(call, route, req, wire, receive)
        answer = spoken.answer(raw, call.rec.model or route.alias)
        traces.answered(call.trace, lambda: answer.content)
        if hook is not None:
            answer = hook.complete(req, answer)
        self._count(call.rec, answer.usage)
        if self.audit is not None:
            failure = await self._record_answer(call, answer.content, answer.engine_model)
            if failure is not None:
                raise failure
        if hook is not None and (failure := await self._keep(call, hook, req, answer.content)):
            raise failure
        self._finish(call, 200, "ok", None)
        return Response(answer.body, media_type="application/json", headers=call.headers)

    async def _whole_answer(
        self,
        call: Call,
        route: ModelRoute,
        req: ParsedRequest,
        wire: WireAdapter,
        receive: Receive,
    ) -> tuple[bytes, WireAdapter]:
        """The engine's whole answer, and the adapter that spoke to the engine. A client that
        leaves meanwhile (an engine sends the headers of a whole answer only once it is
        generated) cancels the engine call, which drops the connection: the engine aborts
        instead of generating for nobody."""
        task = asyncio.current_task()
        assert task is not None
        waiting = True
        gone = asyncio.ensure_future(wait_disconnect(receive))
        gone.add_done_callback(lambda t: waiting and not t.cancelled() and task.cancel())
        try:
            lease, upstream, spoken = await self._connect(call, route, req, wire)
            with lease:
                return await upstream.read(), spoken
        except asyncio.CancelledError:
            if gone.done() and not gone.cancelled() and task.uncancel() == 0:
                raise ClientDisconnect() from None
            raise
        finally:
            waiting = False
            gone.cancel()

    async def _connect(
        self,
        call: Call,
        route: ModelRoute,
        req: ParsedRequest,
        wire: WireAdapter,
        again: bool = True,
    ) -> tuple[Lease, EngineResponse, WireAdapter]:
        """Tries deployments in the balancer's order; moves on only if nothing was sent. Each
        deployment is spoken to in the API it serves (`wire.via`): natively, or translated."""
        last: BastionError | None = None
        gauge = self.metrics.of(self.metrics.in_flight, route.alias)
        plan = route.plan(req)
        call.rec.served_model = route.alias
        if req.adapter is not None and self.adapters is not None:
            adapter = self.adapters.resolve(call.rec.model or "")
            if adapter is not None:  # (gone since parsed: the engines tell)
                plan.choices = await self.adapters.prefer(adapter, plan.choices, not again)
        for attempt, (dep, reason) in enumerate(plan.choices):
            if attempt and not route.retries.try_retry():
                # The alias's own fleet is spared; another alias of its chain may still serve.
                self.metrics.of(self.metrics.retries, route.alias, "budget-spent").inc()
                spent = UpstreamUnavailable(
                    f"No engine for model '{route.alias}' is reachable right now"
                    + (f" ({last.message})" if last else "")
                    + "; the retry budget is spent, so no other replica is tried."
                )
                raise NotServed(spent, "unavailable")
            if attempt:
                self.metrics.of(self.metrics.retries, route.alias, "retried").inc()
            call.rec.deployment = dep.name
            lease = dep.lease(gauge)
            try:
                spoken = wire.via(dep.settings)
                with traces.upstream_span(call.trace, dep.settings):
                    upstream = await self._send(route, dep, spoken, req)
                route.served(plan, dep, reason)
                call.deployment = dep
                call.routing_headers["x-bastion-routed-to"] = dep.name
                self.metrics.of(self.metrics.routing, dep.name, reason).inc()
                return lease, upstream, spoken
            except EngineConnectError as exc:
                lease.release()
                dep.eject()
                self.metrics.of(self.metrics.upstream_errors, dep.name, "connect").inc()
                log.warning("%s: %s; trying the next deployment", dep.name, exc.message)
                last = exc
            except UpstreamError as exc:
                lease.release()
                if again and req.adapter and adapter_gone(exc, req.adapter):
                    # Nothing was generated: find (or reload) it elsewhere, once.
                    dep.adapters.discard(req.adapter)
                    return await self._connect(call, route, req, wire, again=False)
                self.metrics.of(
                    self.metrics.upstream_errors, dep.name, exc.default_code or "error"
                ).inc()
                if (moving := not_served(exc)) is exc:
                    raise
                raise moving from exc  # nothing reached the client: the next alias may serve
            except BaseException:
                lease.release()
                raise
        down = UpstreamUnavailable(
            f"No engine for model '{route.alias}' is reachable right now"
            + (f" ({last.message})" if last else "")
            + "."
        )
        raise NotServed(down, "unavailable")

    async def _send(
        self, route: ModelRoute, dep: Deployment, spoken: WireAdapter, req: ParsedRequest
    ) -> EngineResponse:
        """The engine's answer, begun: its headers in (and, with the model's
        `first_byte_timeout_s`, a stream's first events read ahead, not yet relayed)."""
        body = spoken.engine_body(req, req.adapter or dep.settings.served_name)
        headers = {**spoken.engine_headers(req), **traces.trace_headers()}  # (W3C traceparent)
        path = spoken.engine_path
        limit = route.settings.routing.first_byte_timeout_s
        if limit is None:
            return await self.client.post(dep.settings, path, body, headers)
        try:
            async with asyncio.timeout(limit):
                upstream = await self.client.post(dep.settings, path, body, headers)
                if req.stream:
                    await upstream.prime()
        except TimeoutError:
            raise FirstByteTimeout(f"{dep.name} sent no first byte within {limit:g}s") from None
        return upstream

    # -- recording --------------------------------------------------------------------------
    def _count(self, rec: UsageRecord, usage: Usage | None) -> None:
        if usage is not None:
            rec.prompt_tokens = usage.prompt_tokens
            rec.cached_tokens = usage.cached_tokens
            rec.completion_tokens = usage.completion_tokens

    def _count_stream(self, call: Call, tr: StreamTranslator) -> None:
        self._count(call.rec, tr.state.usage)
        if tr.state.usage is None:
            # No usage chunk (cancelled, or the engine broke off): each chunk is about one token.
            call.rec.completion_tokens = tr.state.chunks
            self._estimate_prompt(call)

    @staticmethod
    def _estimate_prompt(call: Call) -> None:
        """The engine read the prompt but reported no usage: charge Bastion's own count."""
        rec = call.rec
        if call.ticket is not None and call.ticket.prompt_tokens:
            rec.prompt_tokens = call.ticket.prompt_tokens
        elif call.req is not None:
            rec.prompt_tokens = prompt_upper_bound(call.req)
        rec.tokens_estimated = True

    async def _record_answer(
        self, call: Call, content: Any, engine_model: str | None
    ) -> BastionError | None:
        """The completion entry of a successful answer, durable before the client has it all."""
        assert self.audit is not None
        rec = call.rec
        rec.status, rec.outcome, rec.error_code = 200, "ok", None
        rec.latency_ms = (time.perf_counter() - call.started) * 1000
        call.audit_closed = True
        try:
            with traces.child(call.trace, "bastion.audit"):
                await self.audit.completion(rec, content=content, engine_model=engine_model)
        except Exception as exc:
            return self.audit.failed(rec, exc, "the answer, so it is withheld")
        return None

    async def _keep(
        self, call: Call, hook: AnswerHook, req: ParsedRequest, content: Any
    ) -> BastionError | None:
        try:
            await hook.keep(call.rec, req, content)
        except Exception:
            log.exception("could not store the answer of %s", call.rec.request_id)
            return InternalError("Bastion could not store this response; try again.")
        return None

    def _end_stream(self, call: Call, tr: StreamTranslator, cancelled: bool) -> None:
        rec, state = call.rec, tr.state
        self._count_stream(call, tr)
        if state.first_token_at is not None:
            rec.ttft_ms = (state.first_token_at - call.started) * 1000
            self.metrics.of(self.metrics.ttft, rec.model).observe(
                state.first_token_at - call.started
            )
        partial = tr.assembled() if tr.collecting else None
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
        if rec.model is not None:  # the alias that served is what is charged
            rec.price(self.prices.get(rec.served_model or rec.model))
        known = rec.model in self.routes or rec.model in self.settings.routers
        model = rec.model if known else "(unknown)"
        m = self.metrics
        m.of(m.requests, model, rec.endpoint, str(status)).inc()
        m.of(m.latency, model, rec.endpoint).observe(elapsed)
        if rec.prompt_tokens:
            m.of(m.tokens, model, "prompt").inc(rec.prompt_tokens)
        if rec.cached_tokens:
            m.of(m.tokens, model, "cached").inc(rec.cached_tokens)
        if rec.completion_tokens:
            m.of(m.tokens, model, "completion").inc(rec.completion_tokens)
        if call.deployment is not None and rec.prompt_tokens and not rec.tokens_estimated:
            dep = call.deployment
            dep.prompt_tokens += rec.prompt_tokens
            dep.cached_tokens += rec.cached_tokens or 0
            m.of(m.deployment_tokens, dep.name, "prompt").inc(rec.prompt_tokens)
            m.of(m.deployment_tokens, dep.name, "cached").inc(rec.cached_tokens or 0)
        if call.queue is not None:
            call.queue.release()
            call.queue = None
        if call.ticket is not None:
            self.admission.settle(call.ticket, rec)
        for ticket in call.serving_tickets:
            self.admission.settle(ticket, rec)
        self.usage.add(rec)
        call.trace = traces.ended(call.trace, rec, call.req, status)
        if self.audit is not None and not call.audit_closed:
            call.audit_closed = True
            if call.audited:  # recorded, and did not end well: what was sent so far, if any
                forwarded = rec.deployment is not None
                self.audit.completion_later(rec, content=content, aborted=forwarded, error=error)
            else:
                self.audit.completion_later(
                    rec,
                    kind="rejected",
                    content={"request": call.req.body if call.req else None},
                    error=error,
                )
