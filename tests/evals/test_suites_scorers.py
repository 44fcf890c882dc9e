"""Suite loading (and its error messages) and the scorers that need no model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bastion.evals.model_scorers import parse_verdict
from bastion.evals.scorers import Output, Score, make_scorer
from bastion.evals.suite import Case, ScorerSpec, SuiteError, builtin_names, load_suite


class Shouty:
    """A custom scorer, loaded by dotted path as a bank would load its own."""

    def __init__(self, min_caps: int = 1):
        self.min_caps = min_caps

    def score(self, case: Case, output: Output) -> Score:
        caps = sum(ch.isupper() for ch in output.text)
        return Score(min(1.0, caps / 10), caps >= self.min_caps, {"caps": caps})


def _case(expected: object = None, **inp: object) -> Case:
    return Case(
        id="c1", input=inp or {"messages": [{"role": "user", "content": "q"}]}, expected=expected
    )


def _score(name: str, case: Case, text: str = "", **params: object) -> Score:
    s = make_scorer(ScorerSpec(name=name, params=params), None).score(case, Output(text=text))
    assert isinstance(s, Score)
    return s


def test_shipped_suites_load() -> None:
    assert set(builtin_names()) >= {"banking-faq", "json-extraction", "code-fim"}
    for name in builtin_names():
        suite, sha = load_suite(name)
        assert suite.cases and len(sha) == 64


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: s\ncases: []\n", "field cases: List should have at least 1 item"),
        (
            "name: s\ncases:\n- id: a\n  input: {prompt: x, messages: []}\n",
            "case 'a', field input: Value error, give exactly one of 'messages' or 'prompt'",
        ),
        (
            "name: s\ncases:\n- id: q7\n  input: {messages: [{role: robot, content: x}]}\n",
            "case 'q7', field input.messages.0.role",
        ),
        ("name: s\ncases:\n- input: {prompt: x}\n", "case #1, field id: Field required"),
        (
            "name: s\ncases:\n- {id: a, input: {prompt: x}}\n- {id: a, input: {prompt: y}}\n",
            "case id 'a' appears twice",
        ),
        ("name: s\ncases:\n- {id: a, input: {prompt: x}, expect: 1}\n", "field expect: Extra"),
        ("name: [s\n", "not valid YAML"),
    ],
)
def test_bad_suites_name_the_file_case_and_field(tmp_path: Path, text: str, message: str) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(SuiteError) as exc:
        load_suite(p)
    assert str(exc.value).startswith(str(p)) and message in str(exc.value)


def test_jsonl_suites_with_a_header_line(tmp_path: Path) -> None:
    p = tmp_path / "faq.jsonl"
    lines = [
        {"suite": {"name": "faq", "defaults": {"scorers": [{"name": "exact"}]}}},
        {"id": "a", "input": {"messages": [{"role": "user", "content": "hi"}]}, "expected": "x"},
    ]
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    suite, _ = load_suite(p)
    assert suite.name == "faq" and suite.scorers_for(suite.cases[0])[0].name == "exact"
    p.write_text('{"id": "a"}\n{oops\n')
    with pytest.raises(SuiteError, match="line 2: not JSON"):
        load_suite(p)


def test_unknown_or_misconfigured_scorers_are_refused() -> None:
    with pytest.raises(SuiteError, match="unknown scorer 'exakt'"):
        make_scorer(ScorerSpec(name="exakt"), None)
    with pytest.raises(SuiteError, match="bad parameters"):
        make_scorer(ScorerSpec(name="regex", params={"pattern": "("}), None)
    with pytest.raises(SuiteError, match="cannot be loaded"):
        make_scorer(ScorerSpec(name="no.such.module:X"), None)
    with pytest.raises(SuiteError, match="bad parameters"):
        make_scorer(ScorerSpec(name="json_schema", params={"schema": {"type": 7}}), None)


def test_text_scorers() -> None:
    c = _case(expected=["Paris", "paris, France"])
    assert _score("exact", c, " Paris\n").passed
    assert not _score("exact", c, "paris").passed
    assert _score("exact", c, "PARIS", ignore_case=True).passed
    s = _score("contains", _case(expected=["IBAN", "22"]), "An IBAN has 21 chars")
    assert (s.value, s.passed, s.detail) == (0.5, False, {"missing": ["22"]})
    assert _score("contains", _case(expected=["x", "IBAN"]), "iban", mode="any").passed
    assert _score("regex", c, "it is 42.", pattern=r"\b42\b").passed
    assert not _score("regex", c, "it is 42.", pattern=r"\d+", fullmatch=True).passed


def test_json_scorers() -> None:
    c = _case(expected={"amount": 250, "currency": "EUR"})
    prose = 'Sure! ```json\n{"amount": 250, "currency": "eur", "note": 1}\n``` Done.'
    assert _score("json_valid", c, prose).passed
    assert not _score("json_valid", c, "{amount: 250}").passed
    schema = {
        "type": "object",
        "required": ["amount"],
        "properties": {"amount": {"type": "number"}},
    }
    assert _score("json_schema", c, prose, schema=schema).passed
    bad = _score("json_schema", c, '{"amount": "250"}', schema=schema)
    assert not bad.passed and "amount: '250' is not of type 'number'" in bad.detail["errors"][0]
    assert _score("json_match", c, prose).passed  # case-insensitive strings, extra keys fine
    half = _score("json_match", c, '{"amount": 25, "currency": "EUR"}')
    assert (half.value, half.passed, half.detail) == (0.5, False, {"wrong": ["amount"]})


def test_tool_call_scorer() -> None:
    c = _case(expected={"name": "get_rate", "arguments": {"from": "EUR", "to": "USD"}})
    scorer = make_scorer(ScorerSpec(name="tool_call"), None)
    good = Output(tool_calls=[{"name": "get_rate", "arguments": '{"from": "EUR", "to": "USD"}'}])
    half = Output(tool_calls=[{"name": "get_rate", "arguments": '{"from": "EUR", "to": "GBP"}'}])
    none = Output(text="The rate is 1.1")
    assert scorer.score(c, good) == Score(1.0, True, None)
    assert scorer.score(c, half).value == 0.5 and not scorer.score(c, half).passed
    assert scorer.score(c, none).detail == {"called": []}


def test_budget_scorers_and_a_custom_scorer_by_dotted_path() -> None:
    c = _case()
    lat = make_scorer(ScorerSpec(name="latency", params={"max": 500}), None)
    assert lat.score(c, Output(latency_ms=499)).passed
    assert not lat.score(c, Output(latency_ms=501)).passed
    custom = make_scorer(ScorerSpec(name=f"{__name__}:Shouty", params={"min_caps": 2}), None)
    assert custom.score(c, Output(text="OK then")) == Score(0.2, True, {"caps": 2})


@pytest.mark.parametrize(
    ("reply", "score", "reasoning"),
    [
        ('{"reasoning": "Correct and brief.", "score": 4}', 4.0, "Correct and brief."),
        ('Here you go:\n```json\n{"score": 5, "reasoning": "ok"}\n```', 5.0, "ok"),
        ("The answer is fine. Score: 3", 3.0, ""),
    ],
)
def test_judge_verdicts_are_parsed(reply: str, score: float, reasoning: str) -> None:
    assert parse_verdict(reply, 5) == (score, reasoning)


@pytest.mark.parametrize("reply", ["I think it is good.", '{"score": 9}', '{"score": "great"}', ""])
def test_unusable_judge_verdicts_are_errors(reply: str) -> None:
    with pytest.raises(ValueError):
        parse_verdict(reply, 5)


def test_the_cli_refuses_a_bad_suite_before_any_call(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bastion.cli import main

    p = tmp_path / "s.yaml"
    p.write_text("name: s\ncases:\n- {id: a, input: {prompt: x}, scorers: [{name: exakt}]}\n")
    assert main(["eval", "validate", str(p)]) == 2
    assert "unknown scorer 'exakt'" in capsys.readouterr().err
    assert main(["eval", "validate", "banking-faq"]) == 0
    assert "suite OK: banking-faq v1, 6 case(s)" in capsys.readouterr().out
    assert main(["eval", "schema"]) == 0
    assert '"title": "Suite"' in capsys.readouterr().out


def test_streamed_pieces_are_joined_and_the_first_token_is_noticed() -> None:
    """The runner's stream reader on the SDK's own chunk types: the empty role chunk is not a
    token; tool-call names and arguments arrive in pieces by index."""
    from openai.types.chat import ChatCompletionChunk
    from openai.types.completion import Completion

    from bastion.evals.runner import _delta

    def chunk(delta: dict[str, object]) -> object:
        return ChatCompletionChunk.model_validate({
            "id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
        }).choices[0]  # fmt: skip

    parts: list[str] = []
    calls: dict[int, dict[str, str]] = {}
    assert not _delta(chunk({"role": "assistant", "content": ""}), parts, calls)
    assert _delta(chunk({"content": "Hel"}), parts, calls)
    assert _delta(chunk({"content": "lo"}), parts, calls)
    tc = {"index": 0, "id": "t", "type": "function", "function": {"name": "get_", "arguments": ""}}
    assert _delta(chunk({"tool_calls": [tc]}), parts, calls)
    more = {"index": 0, "function": {"name": "rate", "arguments": '{"ccy": "EUR"}'}}
    assert _delta(chunk({"tool_calls": [more]}), parts, calls)
    assert "".join(parts) == "Hello"
    assert calls == {0: {"name": "get_rate", "arguments": '{"ccy": "EUR"}'}}
    text = Completion.model_validate({
        "id": "c", "object": "text_completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "text": "def f", "finish_reason": "length", "logprobs": None}],
    }).choices[0]  # fmt: skip
    assert _delta(text, parts, calls) and parts[-1] == "def f"
