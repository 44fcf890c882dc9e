"""`/v1` fuzzed by schemathesis from the description of what Bastion accepts
(`bastion.gateway.openapi`), against a real gateway on PostgreSQL with Redis counters, every
limit level reserving, in front of an engine that answers anything (the stub: what is fuzzed is
Bastion's own handling; the real engine's refusals are relayed as 400s, see test_sdk.py).

The invariants: never a 5xx for client input, every error in OpenAI's format with a documented
status, what the description allows accepted and what it refuses refused; afterwards the usage
writer still writes (a `user` the store could not hold once stalled it for every client).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import schemathesis
import sqlalchemy as sa
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from bastion.config import parse_settings
from bastion.gateway.openapi import v1_document
from bastion.store.schema import usage
from tests.conftest import REDIS_URL, Gateway, base_config, pg_database
from tests.stub_engine import StubEngine

pytestmark = pytest.mark.postgres

#: Examples per endpoint: small, as CI runs it on every change (a few seconds).
EXAMPLES = 40


@pytest.fixture(scope="module")
def stub() -> Iterator[StubEngine]:
    engine = StubEngine().start()
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def v1(stub: StubEngine, make_gateway: Callable[..., Gateway]) -> Iterator[tuple[Gateway, Any]]:
    with pg_database() as url:
        models = {
            "chat": {"deployments": [{"url": stub.url, "served_name": "c"}]},
            "text": {"kind": "completion", "deployments": [{"url": stub.url, "served_name": "t"}]},
            "vectors": {
                "kind": "embedding",
                "deployments": [{"url": stub.url, "served_name": "e"}],
            },
        }
        huge = {"rpm": 10**9, "tpm": 10**12, "concurrent": 10**6, "budget_day": 10**9}
        cfg = base_config(
            url,
            models,
            prices={m: {"prompt": 1.0, "completion": 2.0} for m in models},
            limits={
                "backend": "redis",
                "redis_url": REDIS_URL,
                "defaults": {level: huge for level in ("key", "user", "team", "cost_center")},
            },
        )
        gw = make_gateway(cfg)
        gw.wait_ready()
        yield gw, parse_settings(cfg)
        gw.stop()


@pytest.fixture(scope="module")
def v1_schema(v1: tuple[Gateway, Any]) -> Any:
    gw, gateway_settings = v1
    key = gw.create_key("alpha", "--user", "fuzz")
    schema = schemathesis.openapi.from_dict(v1_document(gateway_settings))
    schema.config.update(base_url=gw.url)

    @schema.auth()
    class Key:
        def get(self, case: Any, ctx: Any) -> str:
            return key

        def set(self, case: Any, data: str, ctx: Any) -> None:
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}

    return schema


schema = schemathesis.pytest.from_fixture("v1_schema")


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_v1_accepts_what_it_describes_and_refuses_the_rest(case: Any) -> None:
    case.call_and_validate()


def test_the_usage_writer_still_writes(v1: tuple[Gateway, Any]) -> None:
    """Every answer of the fuzzing was metered and the writer is not stuck on any of them."""
    gw, _ = v1
    key = gw.create_key("alpha")
    marker = "after-fuzz-" + uuid.uuid4().hex
    r = httpx.post(
        f"{gw.url}/v1/chat/completions",
        json={"model": "chat", "messages": [{"role": "user", "content": "hi"}], "user": marker},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert r.status_code == 200, r.text
    engine = sa.create_engine(gw.config["database"]["url"])
    try:
        deadline = time.monotonic() + 10
        while True:
            with engine.connect() as conn:
                row = conn.execute(sa.select(usage).where(usage.c.client_user == marker)).first()
            if row is not None or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        engine.dispose()
    assert row is not None, "the usage writer is stuck: " + gw.log_path.read_text()[-2000:]


# -- the same description against the real vLLM engines ------------------------------------------
@pytest.fixture(scope="module")
def real_v1_schema(gateway: Gateway, api_key: str) -> Any:
    """The session's gateway in front of the real tiny chat and embedding engines."""
    schema = schemathesis.openapi.from_dict(v1_document(parse_settings(gateway.config)))
    schema.config.update(base_url=gateway.url)

    @schema.auth()
    class Key:
        def get(self, case: Any, ctx: Any) -> str:
            return api_key

        def set(self, case: Any, data: str, ctx: Any) -> None:
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}

    return schema


#: What holds whatever the engine makes of a body: no 5xx, every status documented, every
#: error in OpenAI's format. (Acceptance is the engine's call: it refuses, as a 400, what
#: Bastion's description allows but the model cannot do, e.g. more tokens than its context.)
ENGINE_CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
real = schemathesis.pytest.from_fixture("real_v1_schema")


@pytest.mark.engine
@real.parametrize()
@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_v1_against_the_real_engines(case: Any) -> None:
    # A body without max_tokens generates the model's default (1,024 tokens): longer than
    # schemathesis's 10-second default on a busy CPU engine.
    case.call_and_validate(checks=ENGINE_CHECKS, timeout=120)
