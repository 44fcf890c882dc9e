"""The official `openai` SDK against Bastion in front of real vLLM engines."""

from __future__ import annotations

import time
import urllib.request

import httpx
import openai
import pytest

from tests.conftest import Gateway, usage_rows

pytestmark = pytest.mark.engine
HELLO = [{"role": "user", "content": "Hello, who are you?"}]


def _db(gateway: Gateway) -> str:
    return gateway.config["database"]["url"]


def test_chat(client: openai.OpenAI, gateway: Gateway) -> None:
    r = client.chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=8, temperature=0, user="end-user-42"
    )
    assert r.model == "tiny"  # the alias, not the engine's served name
    assert r.choices[0].message.role == "assistant"
    assert r.usage and r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 8
    rows = usage_rows(_db(gateway), client_user="end-user-42")
    assert len(rows) == 1
    row = rows[0]
    assert (row.team, row.cost_center, row.user, row.model) == ("alpha", "cc-1", "alice", "tiny")
    assert row.prompt_tokens == r.usage.prompt_tokens
    assert row.completion_tokens == r.usage.completion_tokens
    assert row.status == 200 and row.outcome == "ok" and row.deployment == "tiny[0]"
    # Micro-units, exactly: tokens x price per 1M tokens.
    assert row.cost_micros == r.usage.prompt_tokens * 1 + r.usage.completion_tokens * 2
    assert row.currency == "USD"


def test_unknown_fields_pass_through(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="tiny",
        messages=HELLO,
        max_tokens=4,
        logprobs=True,
        top_logprobs=2,
        seed=7,
        temperature=0,
    )
    lp = r.choices[0].logprobs
    assert lp is not None and lp.content and len(lp.content[0].top_logprobs) == 2


def test_stream_without_usage(client: openai.OpenAI, gateway: Gateway) -> None:
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=HELLO, max_tokens=12, stream=True, user="streamer-1"
        )
    )
    assert len(chunks) > 2 and all(c.model == "tiny" for c in chunks)
    # Bastion asked the engine for usage; the client did not, so it must not see it.
    assert all(c.usage is None and c.choices for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text
    row = usage_rows(_db(gateway), client_user="streamer-1")[0]
    assert row.stream and row.outcome == "ok" and row.completion_tokens > 0
    assert row.prompt_tokens > 0 and row.ttft_ms is not None and row.ttft_ms <= row.latency_ms


def test_stream_with_usage(client: openai.OpenAI, gateway: Gateway) -> None:
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=HELLO,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
            user="streamer-2",
        )
    )
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    row = usage_rows(_db(gateway), client_user="streamer-2")[0]
    assert row.completion_tokens == last.usage.completion_tokens
    assert row.prompt_tokens == last.usage.prompt_tokens


def test_cached_tokens_recorded(client: openai.OpenAI, gateway: Gateway) -> None:
    prefix = "You are a careful assistant for the bank. " * 40
    msgs = [{"role": "system", "content": prefix}, {"role": "user", "content": "hi"}]
    for i in range(2):
        client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, user=f"cache-{i}")
    second = usage_rows(_db(gateway), client_user="cache-1")[0]
    assert second.cached_tokens > 0 and second.cached_tokens <= second.prompt_tokens


def test_completions(client: openai.OpenAI) -> None:
    r = client.completions.create(model="tiny", prompt="The bank said", max_tokens=6)
    assert r.model == "tiny" and r.choices[0].text is not None
    chunks = list(client.completions.create(model="tiny", prompt="Once", max_tokens=6, stream=True))
    assert chunks and all(c.model == "tiny" for c in chunks)


def test_models_list(client: openai.OpenAI, gateway: Gateway) -> None:
    assert sorted(m.id for m in client.models.list()) == ["minilm", "tiny"]
    restricted = gateway.create_key("alpha", "--models", "minilm")
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key=restricted, max_retries=0) as c:
        assert [m.id for m in c.models.list()] == ["minilm"]
        assert c.models.retrieve("minilm").id == "minilm"
        with pytest.raises(openai.NotFoundError):
            c.models.retrieve("tiny")
        with pytest.raises(openai.PermissionDeniedError):
            c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)


def test_embeddings(client: openai.OpenAI) -> None:
    r = client.embeddings.create(
        model="minilm",
        input=[
            "How do I reset my online banking password?",
            "To reset your password, open the app and choose 'Forgot password'.",
            "The quarterly dividend was raised by two cents.",
        ],
    )
    assert r.model == "minilm" and len(r.data) == 3 and len(r.data[0].embedding) == 384
    q, a, other = (d.embedding for d in r.data)

    def cos(x: list[float], y: list[float]) -> float:
        dot = sum(i * j for i, j in zip(x, y, strict=True))
        return dot / (sum(i * i for i in x) ** 0.5 * sum(j * j for j in y) ** 0.5)

    assert cos(q, a) > cos(q, other) + 0.2  # real embeddings: meaning, not noise
    assert r.usage.prompt_tokens > 0


def test_error_classes(client: openai.OpenAI, gateway: Gateway) -> None:
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="bst-wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model="tiny", messages=HELLO)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=HELLO)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages="not a list")  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError) as info:
        # Longer than the engine's context window: the engine's own message comes back as 400.
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "word " * 70_000}], max_tokens=4
        )
    assert "context" in str(info.value).lower() or "length" in str(info.value).lower()
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="tiny", input="x")  # a chat model has no embeddings
    huge = [{"role": "user", "content": "x" * (5 * 1024 * 1024)}]
    with pytest.raises(openai.APIStatusError) as too_big:
        client.chat.completions.create(model="tiny", messages=huge)
    assert too_big.value.status_code == 413
    expiring = gateway.create_key("alpha", "--expires", "1s")
    time.sleep(1.2)
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key=expiring, max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError, match="expired"):
            c.models.list()


def _running(engine_url: str) -> float:
    with urllib.request.urlopen(engine_url + "/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("vllm:num_requests_running"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no vllm:num_requests_running metric")


def test_client_disconnect_cancels_upstream(gateway: Gateway, api_key: str, chat_engine) -> None:  # type: ignore[no-untyped-def]
    body = {
        "model": "tiny",
        "messages": HELLO,
        "max_tokens": 1900,
        "stream": True,
        "ignore_eos": True,
        "user": "quitter",
    }
    with (
        httpx.Client(timeout=30) as h,
        h.stream(
            "POST",
            gateway.url + "/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {api_key}"},
        ) as resp,
    ):
        assert resp.status_code == 200
        lines = resp.iter_lines()
        for _ in range(5):
            next(lines)
        assert _running(chat_engine.url) >= 1
    # Client gone: the engine must drop the request promptly, not generate 1900 tokens.
    deadline = time.monotonic() + 5
    while _running(chat_engine.url) > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _running(chat_engine.url) == 0
    row = usage_rows(_db(gateway), client_user="quitter")[0]
    assert row.outcome == "cancelled" and row.status == 499
    assert 0 < row.completion_tokens < 1900
    # No usage chunk came: the prompt is still charged, from Bastion's own count, and said so.
    assert row.prompt_tokens >= 8 and row.tokens_estimated


def test_client_disconnect_cancels_a_whole_answer_too(
    gateway: Gateway, api_key: str, chat_engine
) -> None:  # type: ignore[no-untyped-def]
    """Not streamed: a client that gives up must not leave the engine generating for nobody."""
    import json
    import socket

    body = json.dumps(
        {"model": "tiny", "messages": HELLO, "max_tokens": 1900, "ignore_eos": True,
         "user": "impatient"}
    ).encode()  # fmt: skip
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {api_key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", gateway.port)) as conn:
        conn.sendall(head + body)
        deadline = time.monotonic() + 10
        while _running(chat_engine.url) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _running(chat_engine.url) >= 1  # the engine is generating; the client leaves
    deadline = time.monotonic() + 5
    while _running(chat_engine.url) > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _running(chat_engine.url) == 0
    deadline = time.monotonic() + 5
    rows = usage_rows(_db(gateway), client_user="impatient")
    while not rows and time.monotonic() < deadline:
        time.sleep(0.1)
        rows = usage_rows(_db(gateway), client_user="impatient")
    assert rows and rows[0].outcome == "cancelled" and rows[0].status == 499, rows
    assert rows[0].prompt_tokens >= 8 and rows[0].tokens_estimated


def test_metrics(client: openai.OpenAI, gateway: Gateway) -> None:
    client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
    list(client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2, stream=True))
    with pytest.raises(openai.AuthenticationError):
        client.with_options(api_key="bst-nope").chat.completions.create(
            model="tiny", messages=HELLO
        )
    with urllib.request.urlopen(gateway.url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    for series in (
        'bastion_requests_total{endpoint="chat",model="tiny",status="200"}',
        'bastion_request_duration_seconds_bucket{endpoint="chat"',
        'bastion_time_to_first_token_seconds_count{model="tiny"}',
        'bastion_tokens_total{kind="prompt",model="tiny"}',
        'bastion_in_flight_requests{model="tiny"} 0.0',
        'bastion_deployment_up{deployment="tiny[0]"} 1.0',
    ):
        assert series in text, series
    assert 'status="401"' in text  # failures are counted too


@pytest.mark.postgres
def test_postgres_store(make_gateway, chat_engine, embed_engine, pg_url: str) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import base_config, engine_models

    gw = make_gateway(base_config(pg_url, engine_models(chat_engine, embed_engine)))
    key = gw.create_key("beta", "--user", "pg-user")
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0) as c:
        c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=3, user="pg-1")
        list(
            c.chat.completions.create(
                model="tiny", messages=HELLO, max_tokens=3, stream=True, user="pg-2"
            )
        )
    # Each waits for its own record: a stream's is written just after its last byte.
    rows = usage_rows(pg_url, client_user="pg-1") + usage_rows(pg_url, client_user="pg-2")
    assert len(rows) == 2
    assert all(
        r.team == "beta"
        and r.user == "pg-user"
        and r.cost_center == "cc-2"
        and r.completion_tokens > 0
        for r in rows
    )
    out = gw.cli("usage", "--by", "team", "--format", "json").stdout
    assert '"beta"' in out


def test_the_readme_example_runs_as_printed(gateway: Gateway) -> None:
    import ast
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "hello.py"
    env = {
        "PATH": "/usr/bin:/bin",
        "OPENAI_BASE_URL": f"{gateway.url}/v1",
        "OPENAI_API_KEY": gateway.create_key("alpha"),
    }
    out = subprocess.run(
        [sys.executable, str(example)], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    text, vector = out.stdout.rstrip("\n").rsplit("\n", 1)
    assert text.strip() and len(ast.literal_eval(vector)) == 4  # the reply, then 4 floats


def test_bastion_owns_the_output_ceiling_and_engine_fields(client: openai.OpenAI) -> None:
    """A zero ceiling is Bastion's 400, not the engine's; engine-control fields never reach it."""
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=HELLO, max_completion_tokens=0)
    assert err.value.code == "invalid_value" and err.value.param == "max_completion_tokens"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="tiny", messages=HELLO, max_tokens=4, extra_body={"priority": -100}
        )
    assert err.value.code == "field_not_allowed" and err.value.param == "priority"
    r = client.chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=100, max_completion_tokens=3, temperature=0
    )
    assert r.usage is not None and r.usage.completion_tokens <= 3
