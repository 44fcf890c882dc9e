"""OpenTelemetry traces of API requests, exported over OTLP/HTTP (the `otel` extra).

One server span per request, named `{operation} {model}` with the GenAI semantic conventions'
attributes (`gen_ai.*`: operation, models, token usage, output ceiling) and Bastion's own
(`bastion.team`, `bastion.cost_center`, `bastion.key_id`, `bastion.deployment`); child spans
for admission (limits), the engine call (to its first byte) and the audit write. A client's W3C
`traceparent` is continued, and the engine call carries one, so an engine that traces (vLLM
with `--otlp-traces-endpoint`) joins the same trace.

Message text never goes into a span unless `tracing.capture_content` is on. OpenTelemetry is
imported only when tracing is enabled: without the extra, the product runs untraced. The
module-level helpers take `None` for "not traced", so the pipeline's hooks stay one line each.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any
from urllib.parse import urlsplit

from bastion.config import ConfigError
from bastion.observability.settings import TracingSettings

log = logging.getLogger("bastion.tracing")

#: The headers carrying the current engine call's trace context (set by `upstream_span`, read
#: where the engine request is built, in the same task).
_engine_headers: ContextVar[dict[str, str] | None] = ContextVar("bastion_trace", default=None)

#: The GenAI conventions' operation names, by wire API; others keep the endpoint's name.
OPERATIONS = {
    "chat": "chat",
    "messages": "chat",
    "responses": "chat",
    "completions": "text_completion",
    "embeddings": "embeddings",
}


class Tracing:
    """The tracer provider of one app (not the global one: several apps may share a test
    process), its exporter and sampler. A lifecycle component: stop() flushes."""

    def __init__(self, settings: TracingSettings, version: str = ""):
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )
        except ImportError:
            raise ConfigError(
                "tracing.enabled needs OpenTelemetry (pip install 'bastion[otel]')"
            ) from None
        self.settings = settings
        resource = Resource.create(
            {"service.name": settings.service_name, "service.version": version}
        )
        sampler = ParentBased(TraceIdRatioBased(settings.sample_ratio))
        self.provider = TracerProvider(resource=resource, sampler=sampler)
        exporter = OTLPSpanExporter(
            endpoint=settings.endpoint,
            headers=dict(settings.headers),
            timeout=settings.timeout_seconds,
        )
        self.provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
        self.tracer = self.provider.get_tracer("bastion", version)
        self.propagator = TraceContextTextMapPropagator()

    async def start(self) -> None:
        log.info("tracing to %s (sample ratio %g)", self.settings.endpoint,
                 self.settings.sample_ratio)  # fmt: skip

    async def stop(self) -> None:
        import asyncio

        await asyncio.to_thread(self.provider.shutdown)  # flushes what is queued

    def request(self, headers: Mapping[str, str], endpoint: str) -> RequestSpan:
        from opentelemetry.trace import SpanKind

        parent = self.propagator.extract(headers)
        operation = OPERATIONS.get(endpoint, endpoint)
        span = self.tracer.start_span(
            operation,
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"gen_ai.operation.name": operation, "bastion.endpoint": endpoint},
        )
        return RequestSpan(self, span, operation)


class RequestSpan:
    """The span of one request, and its children."""

    def __init__(self, tracing: Tracing, span: Any, operation: str):
        self.tracing = tracing
        self.span = span
        self.operation = operation
        self.output: Any = None

    @contextlib.contextmanager
    def child(
        self, name: str, attributes: dict[str, Any] | None = None, client: bool = False
    ) -> Iterator[Any]:
        from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context

        ctx = set_span_in_context(self.span)
        kind = SpanKind.CLIENT if client else SpanKind.INTERNAL
        span = self.tracing.tracer.start_span(name, context=ctx, kind=kind, attributes=attributes)
        try:
            yield span
        except BaseException as exc:
            span.set_attribute("error.type", type(exc).__name__)
            span.set_status(Status(StatusCode.ERROR, str(exc)[:200]))
            raise
        finally:
            span.end()

    @contextlib.contextmanager
    def upstream(self, dep: Any) -> Iterator[dict[str, str]]:
        """The engine call's span; yields the headers that carry its context to the engine."""
        from opentelemetry.trace import set_span_in_context

        url = urlsplit(dep.url)
        attrs = {
            "server.address": url.hostname or "",
            "server.port": url.port or (443 if url.scheme == "https" else 80),
            "gen_ai.provider.name": dep.kind,
            "gen_ai.operation.name": self.operation,
        }
        self.span.set_attributes({"server.address": attrs["server.address"],
                                  "server.port": attrs["server.port"]})  # fmt: skip
        with self.child("bastion.upstream", attrs, client=True) as span:
            headers: dict[str, str] = {}
            self.tracing.propagator.inject(headers, context=set_span_in_context(span))
            token = _engine_headers.set(headers)
            try:
                yield headers
            finally:
                _engine_headers.reset(token)

    def end(self, rec: Any, req: Any, status: int) -> None:
        from opentelemetry.trace import Status, StatusCode

        span = self.span
        model = rec.model or "(unknown)"
        span.update_name(f"{self.operation} {model}")
        attrs: dict[str, Any] = {
            "gen_ai.request.model": model,
            "gen_ai.response.model": rec.served_model or model,
            "gen_ai.usage.input_tokens": rec.prompt_tokens,
            "gen_ai.usage.output_tokens": rec.completion_tokens,
            "http.response.status_code": status,
            "bastion.request_id": rec.request_id,
            "bastion.outcome": rec.outcome,
            "bastion.stream": rec.stream,
        }
        if rec.cached_tokens:
            attrs["gen_ai.usage.cache_read.input_tokens"] = rec.cached_tokens
        for key, value in (
            ("bastion.team", rec.team),
            ("bastion.cost_center", rec.cost_center),
            ("bastion.key_id", rec.key_id),
            ("bastion.deployment", rec.deployment),
            ("bastion.adapter", rec.adapter),
            ("error.type", rec.error_code),
        ):
            if value is not None:
                attrs[key] = value
        if req is not None and req.max_output is not None:
            attrs["gen_ai.request.max_tokens"] = req.max_output
        if self.tracing.settings.capture_content:
            attrs.update(_content(req, self.output))
        span.set_attributes(attrs)
        if status >= 500 or (status == 200 and rec.outcome != "ok" and status != 499):
            span.set_status(Status(StatusCode.ERROR, rec.error_code or rec.outcome))
        span.end()


def _content(req: Any, output: Any) -> dict[str, str]:
    """The messages in and out, as JSON strings (the conventions' `gen_ai.*.messages`)."""
    out: dict[str, str] = {}
    if req is not None:
        body = req.body
        given = next((body[k] for k in ("messages", "input", "prompt") if k in body), None)
        if given is not None:
            out["gen_ai.input.messages"] = json.dumps(given, ensure_ascii=False, default=str)
        if isinstance(body.get("system"), str | list):
            out["gen_ai.system_instructions"] = json.dumps(body["system"], ensure_ascii=False)
    if output is not None:
        out["gen_ai.output.messages"] = json.dumps(output, ensure_ascii=False, default=str)
    return out


# -- hooks: `None` is "not traced" --------------------------------------------------------------
def child(trace: RequestSpan | None, name: str) -> contextlib.AbstractContextManager[Any]:
    return contextlib.nullcontext() if trace is None else trace.child(name)


def upstream_span(trace: RequestSpan | None, dep: Any) -> contextlib.AbstractContextManager[Any]:
    return contextlib.nullcontext({}) if trace is None else trace.upstream(dep)


def trace_headers() -> dict[str, str]:
    """The `traceparent` for the engine call being made (none when not traced)."""
    return _engine_headers.get() or {}


def answered(trace: RequestSpan | None, content: Callable[[], Any]) -> None:
    """The answer's content (made only if needed), kept where content is captured."""
    if trace is not None and trace.tracing.settings.capture_content:
        trace.output = content()


def ended(trace: RequestSpan | None, rec: Any, req: Any, status: int) -> None:
    """Ends the request's span (once: the caller keeps the None this returns)."""
    if trace is not None:
        trace.end(rec, req, status)
