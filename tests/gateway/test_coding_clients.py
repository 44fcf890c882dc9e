"""Editor autocompletion and retrieval clients through Bastion, against real vLLM engines: the
request shapes of Tabby and Continue replayed from fixtures (tests/gateway/clients/, each citing
the client source it was taken from), fill-in-the-middle rendered for the engine, rerank/score
on a real cross-encoder, and answers in the shape strict clients validate against."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from bastion.gateway.wire.fim import PRESETS, render
from bastion.local.launcher import VllmProcess
from tests.audit_api import entries_of
from tests.conftest import EMBED, RERANK, TINY, Gateway, base_config, usage_rows

pytestmark = pytest.mark.engine

CLIENTS = Path(__file__).parent / "clients"


@pytest.fixture(scope="module")
def gw(
    make_gateway: Callable[..., Gateway],
    chat_engine: VllmProcess,
    rerank_engine: VllmProcess,
    embed_engine: VllmProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> Gateway:
    chat = [{"url": chat_engine.url, "served_name": TINY}]
    db = tmp_path_factory.mktemp("coding") / "bastion.db"
    cfg = base_config(
        f"sqlite:///{db}",
        {
            # The tiny tokenizer has no FIM tokens: they are plain text to it, which is enough
            # to see what the engine was given.
            "coder": {"kind": "completion", "fim": "qwen-coder", "deployments": chat},
            "tiny": {"deployments": chat},
            "reranker": {
                "kind": "rerank",
                "deployments": [{"url": rerank_engine.url, "served_name": RERANK}],
            },
            "minilm": {
                "kind": "embedding",
                "deployments": [{"url": embed_engine.url, "served_name": EMBED}],
            },
        },
    )
    cfg["teams"]["beta"]["model_limits"] = {"reranker": {"tpm": 40}, "coder": {"tpm": 50}}
    g = make_gateway(cfg)
    g.wait_ready()
    return g


@pytest.fixture(scope="module")
def keys(gw: Gateway) -> dict[str, str]:
    return {
        "dev": gw.create_key("alpha", "--user", "dev"),
        "auditor": gw.create_auditor_key("alpha", "carol"),
        "chat_only": gw.create_key("alpha", "--models", "tiny"),
        "limited": gw.create_key("beta"),
    }


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tiny_model / "tokenizer.json"))


def _fill(value: Any, key: str, model: str) -> Any:
    if isinstance(value, str):
        return value.replace("{key}", key).replace("{model}", model)
    if isinstance(value, dict):
        return {k: _fill(v, key, model) for k, v in value.items()}
    return value


def replay(gw: Gateway, name: str, key: str, model: str) -> tuple[httpx.Response, list[Any]]:
    """Sends a fixture's request as the client does; returns the response and, for a stream,
    its events (JSON objects, then "[DONE]")."""
    fixture = orjson.loads((CLIENTS / name).read_bytes())
    assert fixture["source"]["repo"] and fixture["source"]["commit"]
    req = _fill(fixture["request"], key, model)
    r = httpx.request(
        req["method"],
        gw.url + req["path"],
        content=orjson.dumps(req["body"]),
        headers=req["headers"],
        timeout=60,
    )
    events: list[Any] = []
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        for line in r.text.splitlines():
            if line.startswith("data: "):
                data = line[6:]
                events.append(data if data == "[DONE]" else orjson.loads(data))
    return r, events


def show(gw: Gateway, auditor: str, rid: str) -> list[dict[str, Any]]:
    return entries_of(gw.url, auditor, rid)


def usage_of(gw: Gateway, rid: str) -> Any:
    (row,) = usage_rows(gw.config["database"]["url"], request_id=rid)
    return row


# -- fill-in-the-middle --------------------------------------------------------------------------
def test_tabby_fim_is_rendered_for_the_engine_and_streams_back(
    gw: Gateway, keys: dict[str, str], tokenizer: Any
) -> None:
    r, events = replay(gw, "tabby_fim.json", keys["dev"], "coder")
    assert r.status_code == 200, r.text
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    # What Tabby parses: choices[0].text on every chunk, and a finish_reason to stop at.
    assert chunks and all(isinstance(c["choices"][0]["text"], str) for c in chunks)
    assert all(c["model"] == "coder" and "usage" not in c for c in chunks)
    assert any(c["choices"][0]["finish_reason"] for c in chunks)
    text = "".join(c["choices"][0]["text"] for c in chunks)

    body = orjson.loads((CLIENTS / "tabby_fim.json").read_bytes())["request"]["body"]
    rendered = render(PRESETS["qwen-coder"], body["prompt"], body["suffix"])
    rid = r.headers["x-request-id"]
    row = usage_of(gw, rid)
    # The engine counted the rendered prompt (prefix, suffix and the FIM tokens as text),
    # not the prefix alone: it received what Bastion rendered.
    assert row.prompt_tokens == len(tokenizer.encode(rendered).ids)
    assert row.prompt_tokens > len(tokenizer.encode(body["prompt"]).ids)
    assert row.endpoint == "completions" and row.status == 200 and row.completion_tokens > 0

    req, done = show(gw, keys["auditor"], rid)
    # The audit trail keeps the client's request as sent: prefix and suffix apart.
    assert req["content"]["prompt"] == body["prompt"]
    assert req["content"]["suffix"] == body["suffix"]
    assert done["content"]["response"][0]["text"] == text


def test_tabby_without_suffix_and_continue_templated_prompt_pass_as_plain_completions(
    gw: Gateway, keys: dict[str, str], tokenizer: Any
) -> None:
    for name in ("tabby_no_suffix.json", "continue_templated.json"):
        r, events = replay(gw, name, keys["dev"], "coder")
        assert r.status_code == 200, (name, r.text)
        assert events[-1] == "[DONE]" and all(
            isinstance(c["choices"][0]["text"], str) for c in events[:-1]
        )
        prompt = orjson.loads((CLIENTS / name).read_bytes())["request"]["body"]["prompt"]
        # Sent as it came: not rendered a second time.
        row = usage_of(gw, r.headers["x-request-id"])
        assert row.prompt_tokens == len(tokenizer.encode(prompt).ids)


def test_continue_fim_endpoint_answers_chat_chunks(
    gw: Gateway, keys: dict[str, str], tokenizer: Any
) -> None:
    r, events = replay(gw, "continue_fim.json", keys["dev"], "coder")
    assert r.status_code == 200, r.text
    chunks = [e for e in events[:-1] if e["choices"]]
    assert chunks and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all(isinstance(c["choices"][0]["delta"]["content"], str) for c in chunks)
    body = orjson.loads((CLIENTS / "continue_fim.json").read_bytes())["request"]["body"]
    row = usage_of(gw, r.headers["x-request-id"])
    rendered = render(PRESETS["qwen-coder"], body["prompt"], body["suffix"])
    assert row.prompt_tokens == len(tokenizer.encode(rendered).ids)
    # The same endpoint on a model without a FIM template: a clear 400, in OpenAI's envelope.
    r, _ = replay(gw, "continue_fim.json", keys["dev"], "tiny")
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "fim_not_supported"


def test_suffix_on_a_model_without_fim_is_a_clear_400(gw: Gateway, keys: dict[str, str]) -> None:
    r, _ = replay(gw, "tabby_fim.json", keys["dev"], "tiny")
    assert r.status_code == 400
    err = r.json()["error"]
    assert (err["code"], err["param"], err["type"]) == (
        "fim_not_supported",
        "suffix",
        "invalid_request_error",
    )
    assert "models.tiny.fim" in err["message"]


def test_limits_count_the_rendered_prompt(gw: Gateway, keys: dict[str, str]) -> None:
    """Team beta may reserve 50 tokens a minute on `coder` (no tokenizer configured: one
    token per byte). Prefix and suffix with the output ceiling are 28; rendered with the
    Qwen-Coder tokens they are 70, which is what the engine would read: refused."""
    headers = {"Authorization": f"Bearer {keys['limited']}"}
    body = {"model": "coder", "prompt": "a" * 10, "suffix": "b" * 10, "max_tokens": 8}
    r = httpx.post(gw.url + "/v1/completions", json=body, headers=headers, timeout=60)
    assert r.status_code == 429, r.text
    del body["suffix"]
    body["prompt"] = "a" * 20
    r = httpx.post(gw.url + "/v1/completions", json=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text


def test_non_streamed_fim_with_the_openai_sdk(gw: Gateway, keys: dict[str, str]) -> None:
    import openai

    with openai.OpenAI(base_url=gw.url + "/v1", api_key=keys["dev"], max_retries=0) as client:
        c = client.completions.create(model="coder", prompt="x = ", suffix="\n", max_tokens=8)
    assert c.model == "coder" and c.usage is not None and c.usage.completion_tokens > 0
    assert isinstance(c.choices[0].text, str)


# -- strict clients ------------------------------------------------------------------------------
def test_chat_answers_have_the_published_shape(gw: Gateway, keys: dict[str, str]) -> None:
    headers = {"Authorization": f"Bearer {keys['dev']}"}
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    r = httpx.post(gw.url + "/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert r.status_code == 200
    answer = orjson.loads(r.content)
    msg = answer["choices"][0]["message"]
    # Optional fields the schema types as objects or strings are absent rather than null.
    assert answer.get("system_fingerprint", "") is not None
    assert all(v is not None for k, v in answer["usage"].items() if k.endswith("_details"))
    # vLLM sends annotations: null and function_call: null; the schema has an array and an
    # optional object.
    assert msg["annotations"] == [] and "function_call" not in msg
    assert isinstance(msg["content"], str) and msg["role"] == "assistant"
    r = httpx.post(
        gw.url + "/v1/chat/completions",
        json={**body, "stream": True},
        headers=headers,
        timeout=60,
    )
    assert r.status_code == 200
    for line in r.text.splitlines():
        if line.startswith("data: {"):
            for choice in orjson.loads(line[6:])["choices"]:
                delta = choice["delta"]
                assert delta.get("annotations", []) is not None
                assert delta.get("function_call", {}) is not None


# -- rerank and score ----------------------------------------------------------------------------
def test_continue_rerank_through_bastion(gw: Gateway, keys: dict[str, str]) -> None:
    r, _ = replay(gw, "continue_rerank.json", keys["dev"], "reranker")
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["model"] == "reranker"
    sent = orjson.loads((CLIENTS / "continue_rerank.json").read_bytes())["request"]["body"]
    results = answer["results"]
    # What Continue reads: every document's index and relevance score.
    assert sorted(x["index"] for x in results) == [0, 1, 2]
    assert all(isinstance(x["relevance_score"], float) for x in results)
    rid = r.headers["x-request-id"]
    row = usage_of(gw, rid)
    assert row.endpoint == "rerank" and row.prompt_tokens == answer["usage"]["prompt_tokens"] > 0
    assert row.completion_tokens == 0 and row.team == "alpha"
    req, done = show(gw, keys["auditor"], rid)
    assert req["content"]["query"] == sent["query"]
    assert req["content"]["documents"] == sent["documents"]
    assert done["content"]["response"]["results"] == results


def test_score_and_vllm_rerank_aliases(gw: Gateway, keys: dict[str, str]) -> None:
    headers = {"Authorization": f"Bearer {keys['dev']}"}
    body = {"model": "reranker", "text_1": "what is a bank", "text_2": ["money", "cats"]}
    r = httpx.post(gw.url + "/v1/score", json=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    assert [d["index"] for d in r.json()["data"]] == [0, 1] and r.json()["model"] == "reranker"
    assert usage_of(gw, r.headers["x-request-id"]).endpoint == "score"
    for path in ("/rerank", "/v2/rerank"):
        r = httpx.post(
            gw.url + path,
            json={"model": "reranker", "query": "q", "documents": ["a", "b"], "top_n": 1},
            headers=headers,
            timeout=60,
        )
        assert r.status_code == 200, (path, r.text)
        assert len(r.json()["results"]) == 1


def test_score_and_rerank_on_an_embedding_model(gw: Gateway, keys: dict[str, str]) -> None:
    """vLLM scores with an embedding model by cosine similarity: a question is closer to its
    answer than to an unrelated sentence (all-MiniLM-L6-v2 is a real model)."""
    headers = {"Authorization": f"Bearer {keys['dev']}"}
    q, docs = "Where is the capital of France?", ["Paris is the capital of France.", "I like jazz."]
    r = httpx.post(
        gw.url + "/v1/score",
        json={"model": "minilm", "text_1": q, "text_2": docs},
        headers=headers,
        timeout=60,
    )
    assert r.status_code == 200, r.text
    near, far = (d["score"] for d in r.json()["data"])
    assert near > far
    r = httpx.post(
        gw.url + "/v1/rerank",
        json={"model": "minilm", "query": q, "documents": docs},
        headers=headers,
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["index"] == 0


def test_rerank_has_the_same_controls(gw: Gateway, keys: dict[str, str]) -> None:
    def rerank(key: str | None, model: str = "reranker", docs: int = 1) -> httpx.Response:
        body = {"model": model, "query": "where is the audit key", "documents": ["d"] * docs}
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.post(gw.url + "/v1/rerank", json=body, headers=headers, timeout=60)

    assert rerank(None).status_code == 401
    r = rerank(keys["chat_only"])  # a key restricted to other models
    assert r.status_code == 403 and r.json()["error"]["param"] == "model"
    r = rerank(keys["dev"], model="tiny")  # a chat model does not rerank
    assert r.status_code == 400 and r.json()["error"]["code"] == "wrong_endpoint"
    # The team's token limit counts the query once per document (22 bytes each, +4 a pair).
    assert rerank(keys["limited"], docs=1).status_code == 200
    r = rerank(keys["limited"], docs=3)
    assert r.status_code == 429, r.text
