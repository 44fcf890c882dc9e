"""OpenTelemetry traces from a real `bastion serve`, received by a real OTLP/HTTP receiver
(protobuf decoded with opentelemetry-proto): GenAI attributes, the trace continued from the
client's `traceparent` and passed on to the engine, and no message text unless configured."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from aiohttp import web

from bastion.local.launcher import VllmProcess
from tests.conftest import TINY, Gateway, base_config, pg_database, usage_rows
from tests.observability.otlp_receiver import OtlpReceiver, Span
from tests.stub_engine import StubEngine

#: Text that must never reach a trace unless `capture_content` is on.
SECRET_PROMPT = "account 4242-secret-" + secrets.token_hex(4)
#: What the gateway that captures content is sent (the receiver is shared by the module).
CAPTURED_PROMPT = "captured-" + secrets.token_hex(4)
TOKEN = "otel-token-" + secrets.token_hex(8)
SERVER, CLIENT = 2, 3  # the protobuf's SpanKind values


class HeaderStub(StubEngine):
    """The stub engine, also keeping each request's headers (the traceparent it got)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen_headers: list[dict[str, str]] = []

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.seen_headers.append({k.lower(): v for k, v in request.headers.items()})
        return await super()._chat(request)


@pytest.fixture(scope="module")
def stub() -> Iterator[HeaderStub]:
    s = HeaderStub()
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver().start()
    yield r
    r.stop()


def _gateway(make_gateway: Any, db: str, stub: StubEngine, tracing: dict[str, Any]) -> Gateway:
    models = {"stub": {"deployments": [{"url": stub.url, "served_name": "stub-served"}]}}
    return make_gateway(base_config(db, models, tracing={"enabled": True, **tracing}))


@pytest.fixture(scope="module", autouse=True)
def token_env() -> Iterator[None]:
    """The gateway's and its CLI's environment: the exporter's token comes from it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TEST_OTEL_TOKEN", TOKEN)
        yield


@pytest.fixture(scope="module")
def traced(make_gateway: Any, stub: StubEngine, receiver: OtlpReceiver) -> Iterator[Gateway]:
    with pg_database() as db:
        yield _gateway(
            make_gateway,
            db,
            stub,
            {
                "endpoint": receiver.endpoint,
                "service_name": "bastion-test",
                "headers": {"authorization": "Bearer ${TEST_OTEL_TOKEN}"},
            },
        )


@pytest.fixture(scope="module")
def capturing(make_gateway: Any, stub: StubEngine, receiver: OtlpReceiver) -> Iterator[Gateway]:
    with pg_database() as db:
        yield _gateway(
            make_gateway,
            db,
            stub,
            {"endpoint": receiver.endpoint, "service_name": "capturing", "capture_content": True},
        )


def _chat(gw: Gateway, key: str, prompt: str = SECRET_PROMPT, **extra: Any) -> httpx.Response:
    headers = extra.pop("headers", {})
    body = {"model": "stub", "messages": [{"role": "user", "content": prompt}], **extra}
    r = httpx.post(
        gw.url + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}", **headers},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return r


def _request_span(receiver: OtlpReceiver, rid: str) -> Span:
    (span,) = receiver.wait_for(lambda s: s.attributes.get("bastion.request_id") == rid)
    return span


def test_a_request_span_continues_the_clients_trace_with_genai_attributes(
    traced: Gateway, receiver: OtlpReceiver, stub: HeaderStub
) -> None:
    key = traced.create_key("alpha")
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    r = _chat(traced, key, max_tokens=7, headers={"traceparent": f"00-{trace_id}-{parent_id}-01"})
    span = _request_span(receiver, r.headers["x-request-id"])
    assert (span.name, span.kind) == ("chat stub", SERVER)
    assert (span.trace_id, span.parent_span_id) == (trace_id, parent_id)
    assert span.resource["service.name"] == "bastion-test"
    a = span.attributes
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.request.model"] == "stub"
    assert a["gen_ai.response.model"] == "stub"
    assert a["gen_ai.usage.input_tokens"] == 5
    assert a["gen_ai.usage.output_tokens"] == 1
    assert a["gen_ai.request.max_tokens"] == 7
    assert a["server.address"] == "127.0.0.1"
    assert a["server.port"] == stub.port
    assert a["http.response.status_code"] == 200
    assert a["bastion.team"] == "alpha"
    assert a["bastion.cost_center"] == "cc-1"
    # Attribution as the usage record has it.
    (row,) = usage_rows(traced.config["database"]["url"], request_id=a["bastion.request_id"])
    assert (a["bastion.key_id"], a["bastion.deployment"]) == (row.key_id, row.deployment)
    assert a["bastion.deployment"] == "stub[0]"
    # The children: admission, the engine call, the audit write; all in the client's trace.
    children = receiver.wait_for(lambda s: s.parent_span_id == span.span_id)
    names = {c.name for c in receiver.trace(trace_id) if c.parent_span_id == span.span_id}
    assert {"bastion.admission", "bastion.upstream", "bastion.audit"} <= names, names
    assert all(c.trace_id == trace_id for c in children)
    (upstream,) = [s for s in receiver.trace(trace_id) if s.name == "bastion.upstream"]
    assert upstream.kind == CLIENT
    assert upstream.attributes["gen_ai.provider.name"] == "vllm"
    # The engine was handed the trace, with the engine call's span as parent.
    sent = stub.seen_headers[-1]["traceparent"]
    assert sent.split("-")[1:3] == [trace_id, upstream.span_id]
    # The export carried the configured token; no prompt anywhere in it.
    assert any(h.get("authorization") == f"Bearer {TOKEN}" for h in receiver.headers)
    assert not any(SECRET_PROMPT.encode() in b for b in receiver.bodies)
    assert not any(k.startswith("gen_ai.input") for k in a)


def test_a_new_trace_without_traceparent_and_failures_marked(
    traced: Gateway, receiver: OtlpReceiver
) -> None:
    r = httpx.post(
        traced.url + "/v1/chat/completions",
        json={"model": "stub", "messages": [{"role": "user", "content": SECRET_PROMPT}]},
        headers={"Authorization": "Bearer bst-not-a-key"},
    )
    assert r.status_code == 401
    span = _request_span(receiver, r.headers["x-request-id"])
    assert span.parent_span_id == ""
    assert span.attributes["http.response.status_code"] == 401
    assert span.attributes["error.type"]
    assert "bastion.team" not in span.attributes
    # A stream: the span ends with the stream, its tokens counted.
    key = traced.create_key("beta")
    streamed = _chat(traced, key, stream=True, stream_options={"include_usage": True})
    span = _request_span(receiver, streamed.headers["x-request-id"])
    assert span.attributes["bastion.stream"] is True
    assert span.attributes["gen_ai.usage.output_tokens"] == 1
    assert span.attributes["bastion.team"] == "beta"
    assert not any(SECRET_PROMPT.encode() in b for b in receiver.bodies)


def test_capture_content_puts_messages_on_the_span(
    capturing: Gateway, receiver: OtlpReceiver
) -> None:
    key = capturing.create_key("alpha")
    for stream in (False, True):
        r = _chat(capturing, key, CAPTURED_PROMPT, stream=stream)
        a = _request_span(receiver, r.headers["x-request-id"]).attributes
        assert CAPTURED_PROMPT in a["gen_ai.input.messages"]
        assert "hi" in a["gen_ai.output.messages"], (stream, a)


def test_without_the_extra_nothing_imports_opentelemetry_and_enabling_says_why() -> None:
    # opentelemetry-api comes with FastAPI; the SDK and the exporter are the `otel` extra.
    code = (
        "import sys\n"
        "EXTRA = ('opentelemetry.sdk', 'opentelemetry.exporter', 'opentelemetry.proto')\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.startswith(EXTRA): raise ImportError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import bastion.app, bastion.cli\n"
        "from bastion.config import parse_settings, ConfigError\n"
        "from bastion.observability.tracing import Tracing\n"
        "s = parse_settings({'tracing': {'enabled': True}})\n"
        "try:\n"
        "    Tracing(s.tracing)\n"
        "except ConfigError as e:\n"
        "    print(e)\n"
        "assert not [m for m in sys.modules if m.startswith(EXTRA)]\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert "pip install 'bastion[otel]'" in out.stdout, out.stderr


def test_bad_tracing_settings_are_refused() -> None:
    from bastion.config import ConfigError, parse_settings

    for bad in ({"endpoint": "collector:4318"}, {"sample_ratio": 2}, {"capture": True}):
        with pytest.raises(ConfigError, match="tracing"):
            parse_settings({"tracing": bad})


def test_through_real_vllm_the_span_has_the_engines_usage(
    make_gateway: Any, chat_engine: VllmProcess, receiver: OtlpReceiver
) -> None:
    """vLLM takes the traceparent Bastion sends, and the span counts what it reported."""
    models = {"tiny": {"deployments": [{"url": chat_engine.url, "served_name": TINY}]}}
    with pg_database() as db:
        gw = make_gateway(
            base_config(db, models, tracing={"enabled": True, "endpoint": receiver.endpoint})
        )
        trace_id = secrets.token_hex(16)
        r = httpx.post(
            gw.url + "/v1/chat/completions",
            json={
                "model": "tiny",
                "messages": [{"role": "user", "content": SECRET_PROMPT}],
                "max_tokens": 4,
            },
            headers={
                "Authorization": f"Bearer {gw.create_key('alpha')}",
                "traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01",
            },
            timeout=120,
        )
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        span = _request_span(receiver, r.headers["x-request-id"])
        gw.stop()
    assert span.trace_id == trace_id and span.name == "chat tiny"
    assert span.attributes["gen_ai.usage.input_tokens"] == usage["prompt_tokens"] > 0
    assert span.attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"] > 0
    assert span.attributes["server.port"] == chat_engine.spec.port
    assert not any(SECRET_PROMPT.encode() in b for b in receiver.bodies)
