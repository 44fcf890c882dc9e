"""Fill-in-the-middle rendering, rerank/score parsing and strict-client normalisation, without
an engine: what the engine would receive, what limits count, and the 400s clients get."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from starlette.datastructures import Headers

from bastion.core.errors import InvalidRequest
from bastion.gateway.wire.fim import FIM_CHAT, FIM_COMPLETIONS, PRESETS, FimRequest, render
from bastion.gateway.wire.rerank import RERANK, SCORE
from bastion.gateway.wire.strict import normalise
from bastion.routing.settings import ModelSettings

DEP = [{"url": "http://127.0.0.1:1", "served_name": "served"}]


def model(**extra: Any) -> ModelSettings:
    return ModelSettings.model_validate({"deployments": DEP, **extra})


def bound(body: dict[str, Any], m: ModelSettings, wire: Any = FIM_COMPLETIONS) -> FimRequest:
    req = wire.parse(orjson.dumps({"model": "coder", **body}), Headers({}))
    wire.bind(req, m)
    assert isinstance(req, FimRequest)
    return req


def engine(req: FimRequest, wire: Any = FIM_COMPLETIONS) -> dict[str, Any]:
    return orjson.loads(wire.engine_body(req, "served"))  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        ("qwen-coder", "<|fim_prefix|>PRE<|fim_suffix|>SUF<|fim_middle|>"),
        (
            "deepseek-coder",
            "<\uff5cfim\u2581begin\uff5c>PRE<\uff5cfim\u2581hole\uff5c>SUF<\uff5cfim\u2581end\uff5c>",
        ),
        ("starcoder", "<fim_prefix>PRE<fim_suffix>SUF<fim_middle>"),
        ("codestral", "[SUFFIX]SUF[PREFIX]PRE"),
    ],
)
def test_presets_render_each_familys_tokens(preset: str, expected: str) -> None:
    assert render(PRESETS[preset], "PRE", "SUF") == expected
    req = bound({"prompt": "PRE", "suffix": "SUF", "stream": True}, model(fim=preset))
    body = engine(req)
    assert body["prompt"] == expected and "suffix" not in body
    assert body["model"] == "served" and body["stream_options"] == {"include_usage": True}
    # The family's stops, as many as the engine takes (vLLM refuses more than four).
    assert body["stop"] == PRESETS[preset].stop[:4]
    # Limits count the rendered prompt, the one the engine reads.
    assert FIM_COMPLETIONS.prompt(req) == ([expected], 0)
    # The request as the client sent it is untouched (it is what the audit trail records).
    assert req.body["prompt"] == "PRE" and req.body["suffix"] == "SUF"


def test_custom_template_and_client_stops_kept() -> None:
    m = model(
        fim={"prefix": "<P>", "suffix": "<S>", "middle": "<M>", "order": "spm", "stop": ["<E>"]}
    )
    req = bound({"prompt": ["a", "b"], "suffix": "z", "stop": "\n\n"}, m)
    body = engine(req)
    assert body["prompt"] == ["<S>z<P>a<M>", "<S>z<P>b<M>"]
    assert body["stop"] == ["\n\n", "<E>"]
    req = bound({"prompt": "a", "suffix": "z", "stop": ["1", "2", "3"]}, model(fim="qwen-coder"))
    assert engine(req)["stop"] == ["1", "2", "3", "<|endoftext|>"]


def test_no_suffix_is_a_plain_completion() -> None:
    for body in ({"prompt": "x"}, {"prompt": "x", "suffix": None}):
        req = bound(body, model(fim="qwen-coder"))
        assert req.fim is None and engine(req) == {"model": "served", "prompt": "x"}


def test_suffix_without_a_template_is_a_clear_400() -> None:
    with pytest.raises(InvalidRequest) as err:
        bound({"prompt": "x", "suffix": "y"}, model())
    assert err.value.param == "suffix" and err.value.code == "fim_not_supported"
    assert "models.coder.fim" in err.value.message
    # An empty suffix means nothing after the cursor: a plain completion.
    req = bound({"prompt": "x", "suffix": ""}, model())
    assert req.fim is None and "suffix" not in engine(req)
    with pytest.raises(InvalidRequest):
        bound({"prompt": [1, 2], "suffix": "y"}, model(fim="starcoder"))
    with pytest.raises(InvalidRequest):
        FIM_COMPLETIONS.parse(b'{"model": "m", "prompt": "x", "suffix": 3}', Headers({}))


def test_engine_rendered_fim_passes_suffix_and_echo_is_refused() -> None:
    req = bound({"prompt": "x", "suffix": "y"}, model(fim="engine"))
    assert req.fim is None and engine(req)["suffix"] == "y" and engine(req)["prompt"] == "x"
    with pytest.raises(InvalidRequest) as err:
        bound({"prompt": "x", "suffix": "y", "echo": True}, model(fim="starcoder"))
    assert err.value.param == "suffix"


def test_fim_endpoint_needs_a_template_and_answers_chat_shapes() -> None:
    with pytest.raises(InvalidRequest) as err:
        bound({"prompt": "x"}, model(), FIM_CHAT)
    assert err.value.code == "fim_not_supported"
    req = bound({"prompt": "x"}, model(fim="starcoder"), FIM_CHAT)
    assert engine(req, FIM_CHAT)["prompt"] == "<fim_prefix>x<fim_suffix><fim_middle>"
    raw = orjson.dumps(
        {"model": "served", "choices": [{"index": 0, "text": "y", "finish_reason": "stop"}]}
    )
    answer = FIM_CHAT.answer(raw, "coder")
    assert orjson.loads(answer.body) == {
        "model": "coder",
        "object": "chat.completion",
        "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "y"}}
        ],
    }
    tr = FIM_CHAT.stream(req, "coder", collect=True)
    out = tr.event(
        b'data: {"model":"served","choices":[{"index":0,"text":"y","finish_reason":null}]}'
    )
    assert out is not None
    chunk = orjson.loads(out[5:])
    assert (
        chunk["choices"][0]["delta"] == {"content": "y"}
        and chunk["object"] == "chat.completion.chunk"
    )
    assert tr.assembled()[0]["text"] == "y"


def test_fim_setting_is_validated() -> None:
    with pytest.raises(ValidationError):
        model(fim="gpt")
    with pytest.raises(ValidationError):
        model(fim={"prefix": "<P>"})


def test_rerank_and_score_parse_and_count_every_pair() -> None:
    raw = orjson.dumps({"model": "r", "query": "q q", "documents": ["d1", "d2", {"text": "d3"}]})
    req = RERANK.parse(raw, Headers({}))
    assert not req.generates and not req.stream and req.max_output is None
    texts, extra = RERANK.prompt(req)
    assert sorted(texts) == sorted(["d1", "d2", "d3", "q q", "q q", "q q"])
    assert extra == 3 * 4
    req = SCORE.parse(
        orjson.dumps({"model": "r", "text_1": ["a", "b"], "text_2": ["c", "d"]}), Headers({})
    )
    assert sorted(SCORE.prompt(req)[0]) == ["a", "b", "c", "d"]
    for bad, param in (
        ({"model": "r", "documents": ["d"]}, "query"),
        ({"model": "r", "query": "q", "documents": []}, "documents"),
        ({"model": "r", "query": "q", "documents": ["d"], "stream": True}, "stream"),
        ({"model": "r", "query": "q", "documents": ["d"], "top_n": "2"}, "top_n"),
    ):
        with pytest.raises(InvalidRequest) as err:
            RERANK.parse(orjson.dumps(bad), Headers({}))
        assert err.value.param == param
    with pytest.raises(InvalidRequest) as err:
        SCORE.parse(b'{"model": "r", "text_1": "q"}', Headers({}))
    assert err.value.param == "text_2"


def test_rerank_needs_an_engine_that_serves_it() -> None:
    from bastion.engines.settings import DeploymentSettings

    vllm = DeploymentSettings(url="http://127.0.0.1:1", served_name="s")
    assert RERANK.via(vllm) is RERANK and SCORE.via(vllm) is SCORE
    llamacpp = DeploymentSettings(kind="llamacpp", url="http://127.0.0.1:1", served_name="s")
    with pytest.raises(InvalidRequest) as err:
        RERANK.via(llamacpp)
    assert err.value.code == "wrong_endpoint" and "deployments[].apis" in err.value.message
    # Completions (and so FIM) are not translated to chat either.
    assert FIM_COMPLETIONS.via(llamacpp) is FIM_COMPLETIONS
    chat_only = DeploymentSettings(url="http://127.0.0.1:1", served_name="s", apis=["chat"])
    with pytest.raises(InvalidRequest) as err:
        FIM_CHAT.via(chat_only)
    assert err.value.code == "wrong_endpoint"


def test_strict_shapes() -> None:
    answer = {
        "system_fingerprint": None,
        "usage": {
            "prompt_tokens": 1,
            "prompt_tokens_details": None,
            "completion_tokens_details": None,
        },
        "choices": [
            {
                "message": {
                    "role": "assistant",
                    "content": "x",
                    "annotations": None,
                    "function_call": None,
                },
                "logprobs": None,
            }
        ],
    }
    normalise(answer)
    assert "system_fingerprint" not in answer and answer["usage"] == {"prompt_tokens": 1}
    assert answer["choices"][0]["message"] == {
        "role": "assistant",
        "content": "x",
        "annotations": [],
    }
    chunk = {"choices": [{"delta": {"content": "x", "annotations": None, "function_call": None}}]}
    normalise(chunk)
    assert chunk["choices"][0]["delta"] == {"content": "x"}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**31), 2**31) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
FIELDS = st.sampled_from(
    [
        "model",
        "prompt",
        "suffix",
        "query",
        "documents",
        "text_1",
        "text_2",
        "queries",
        "top_n",
        "stream",
        "stop",
    ]
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([FIM_COMPLETIONS, FIM_CHAT, RERANK, SCORE]),
    st.dictionaries(FIELDS, json_values, max_size=6),
)
def test_only_clear_400s_for_any_body(wire: Any, body: dict[str, Any]) -> None:
    """Parse, bind to a FIM model, count and build the engine body: nothing but InvalidRequest."""
    body.setdefault("model", "m")
    try:
        req = wire.parse(orjson.dumps(body), Headers({}))
        wire.bind(req, model(fim="codestral"))
        wire.prompt(req)
        orjson.loads(wire.engine_body(req, "served"))
    except InvalidRequest:
        pass
