"""Scorers: one small interface, registered by name, plus custom ones by dotted path.

A scorer is any class with `score(case, output) -> Score` (or an awaitable of one), built
with its suite parameters as keyword arguments. A scorer that calls the gateway (embedding
similarity, LLM-as-judge) also takes `ctx`, the run's `ScoringContext`, so its calls are made
with the run's key and marked as the run's traffic like the calls it scores.

A scorer never raises for a bad model answer: an answer that cannot be scored is a `Score` with
`error` set (value 0, not passed), which the run stores and the report counts.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from bastion.evals.suite import Case, ScorerSpec, SuiteError

if TYPE_CHECKING:
    import openai


@dataclass(slots=True)
class Score:
    value: float  # in [0, 1]
    passed: bool
    detail: Any = None
    #: Set when the answer (or the judge's verdict) could not be scored at all.
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "passed": self.passed,
            "detail": self.detail,
            "error": self.error,
        }


@dataclass(slots=True)
class Output:
    """What the model answered for one sample of one case, and what it cost."""

    text: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    latency_ms: float = 0.0
    #: Time to the first token (the first streamed chunk with text or a tool call); None when
    #: nothing came (an empty answer, a failed call).
    ttft_ms: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float | None = None  # in the gateway's currency, filled in from its usage records
    request_id: str | None = None
    finish_reason: str | None = None
    error: str | None = None


@dataclass(slots=True)
class ScoringContext:
    client: openai.AsyncOpenAI
    #: The `user` field every call of the run carries (usage.client_user, audit client_user).
    marker: str


class Scorer(Protocol):
    def score(self, case: Case, output: Output) -> Score | Awaitable[Score]: ...


SCORERS: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        SCORERS[name] = cls
        return cls

    return deco


def make_scorer(spec: ScorerSpec, ctx: ScoringContext | None) -> Scorer:
    """The scorer a spec names; a bad name or parameter is a SuiteError before the run."""
    if ":" in spec.name:
        mod, _, attr = spec.name.partition(":")
        try:
            cls = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as exc:
            raise SuiteError(f"scorer {spec.name!r} cannot be loaded: {exc}") from None
    else:
        _load_gateway_scorers()
        if spec.name not in SCORERS:
            raise SuiteError(f"unknown scorer {spec.name!r} (known: {', '.join(sorted(SCORERS))})")
        cls = SCORERS[spec.name]
    kwargs = dict(spec.params)
    if "ctx" in inspect.signature(cls).parameters:
        kwargs["ctx"] = ctx
    try:
        return cls(**kwargs)  # type: ignore[no-any-return]
    except Exception as exc:  # re.error, jsonschema's SchemaError, a custom one's
        raise SuiteError(f"scorer {spec.name!r}: bad parameters: {exc}") from None


def _load_gateway_scorers() -> None:
    import bastion.evals.model_scorers  # noqa: F401  (registers embedding_similarity, judge)


def _expected_list(case: Case, given: Any) -> list[str]:
    exp = given if given is not None else case.expected
    if exp is None:
        raise ValueError(f"case {case.id!r} has no 'expected' for this scorer")
    return [str(e) for e in exp] if isinstance(exp, list) else [str(exp)]


@register("exact")
class Exact:
    """The answer equals the expected text (or one of a list), after stripping whitespace."""

    def __init__(self, ignore_case: bool = False, expected: Any = None):
        self.ignore_case, self.expected = ignore_case, expected

    def score(self, case: Case, output: Output) -> Score:
        norm = (lambda s: s.strip().lower()) if self.ignore_case else (lambda s: s.strip())
        ok = norm(output.text) in {norm(e) for e in _expected_list(case, self.expected)}
        return Score(float(ok), ok)


@register("contains")
class Contains:
    """Every expected string appears in the answer (`mode: any`: at least one); the value is
    the fraction found, so a partial answer scores between 0 and 1."""

    def __init__(self, ignore_case: bool = True, mode: str = "all", expected: Any = None):
        if mode not in ("all", "any"):
            raise ValueError("mode is 'all' or 'any'")
        self.ignore_case, self.mode, self.expected = ignore_case, mode, expected

    def score(self, case: Case, output: Output) -> Score:
        text = output.text.lower() if self.ignore_case else output.text
        wanted = _expected_list(case, self.expected)
        found = [w for w in wanted if (w.lower() if self.ignore_case else w) in text]
        frac = len(found) / len(wanted)
        ok = bool(found) if self.mode == "any" else len(found) == len(wanted)
        return Score(
            1.0 if (ok and self.mode == "any") else frac,
            ok,
            {"missing": sorted(set(wanted) - set(found))},
        )


@register("regex")
class Regex:
    """The answer matches `pattern` (re.search; `fullmatch: true` for the whole answer)."""

    def __init__(self, pattern: str, ignore_case: bool = False, fullmatch: bool = False):
        self.rx = re.compile(pattern, re.IGNORECASE if ignore_case else 0)
        self.full = fullmatch

    def score(self, case: Case, output: Output) -> Score:
        text = output.text.strip()
        m = self.rx.fullmatch(text) if self.full else self.rx.search(text)
        return Score(float(bool(m)), bool(m), {"match": m.group(0)} if m else None)


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


def extract_json(text: str) -> Any:
    """The JSON in an answer: the whole text, else a fenced block, else the outermost {...}.
    Raises ValueError when there is none; models wrap JSON in prose more often than not."""
    candidates = [text.strip()]
    candidates += [m.strip() for m in _FENCE.findall(text)]
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        candidates.append(text[start : end + 1])
    for c in candidates:
        try:
            return json.loads(c)
        except json.JSONDecodeError:
            continue
    raise ValueError("no JSON found in the answer")


@register("json_valid")
class JsonValid:
    def score(self, case: Case, output: Output) -> Score:
        try:
            extract_json(output.text)
        except ValueError as exc:
            return Score(0.0, False, str(exc))
        return Score(1.0, True)


@register("json_schema")
class JsonSchema:
    """The answer's JSON conforms to `schema` (JSON Schema 2020-12, checked by `jsonschema`)."""

    def __init__(self, schema: dict[str, Any]):
        from jsonschema import Draft202012Validator

        Draft202012Validator.check_schema(schema)  # a bad schema is the suite's fault: refuse it
        self.validator = Draft202012Validator(schema)

    def score(self, case: Case, output: Output) -> Score:
        try:
            doc = extract_json(output.text)
        except ValueError as exc:
            return Score(0.0, False, str(exc))
        errors = [
            f"{'/'.join(map(str, e.absolute_path)) or '$'}: {e.message}"
            for e in self.validator.iter_errors(doc)
        ]
        return Score(0.0 if errors else 1.0, not errors, {"errors": errors[:5]} if errors else None)


@register("json_match")
class JsonMatch:
    """The answer's JSON has the expected fields with the expected values (extra fields are
    fine); the value is the fraction of expected fields right."""

    def __init__(self, ignore_case: bool = True):
        self.ignore_case = ignore_case

    def _eq(self, a: Any, b: Any) -> bool:
        if self.ignore_case and isinstance(a, str) and isinstance(b, str):
            return a.strip().lower() == b.strip().lower()
        return bool(a == b)

    def score(self, case: Case, output: Output) -> Score:
        if not isinstance(case.expected, dict) or not case.expected:
            raise ValueError(f"case {case.id!r}: json_match needs an object as 'expected'")
        try:
            doc = extract_json(output.text)
        except ValueError as exc:
            return Score(0.0, False, str(exc))
        if not isinstance(doc, dict):
            return Score(0.0, False, "the answer's JSON is not an object")
        wrong = [k for k, v in case.expected.items() if not self._eq(doc.get(k), v)]
        frac = 1 - len(wrong) / len(case.expected)
        return Score(frac, not wrong, {"wrong": wrong} if wrong else None)


@register("tool_call")
class ToolCall:
    """The model called the expected tool (`expected: {name, arguments}`) with those arguments.
    `partial: true` scores the fraction of expected arguments right; extra arguments are
    ignored unless `strict: true`."""

    def __init__(self, partial: bool = True, strict: bool = False):
        self.partial, self.strict = partial, strict

    def score(self, case: Case, output: Output) -> Score:
        exp = case.expected
        if not isinstance(exp, dict) or "name" not in exp:
            raise ValueError(f"case {case.id!r}: tool_call needs expected: {{name, arguments}}")
        calls = [c for c in output.tool_calls if c.get("name") == exp["name"]]
        if not calls:
            got = [c.get("name") for c in output.tool_calls]
            return Score(0.0, False, {"called": got})
        try:
            args = json.loads(calls[0].get("arguments") or "{}")
        except json.JSONDecodeError:
            return Score(0.0, False, {"error": "arguments are not JSON"})
        want: dict[str, Any] = exp.get("arguments") or {}
        wrong = [k for k, v in want.items() if args.get(k) != v]
        extra = sorted(set(args) - set(want)) if self.strict else []
        ok = not wrong and not extra
        value = (1 - len(wrong) / len(want) if want else 1.0) if self.partial else float(ok)
        return Score(
            value if not extra else 0.0, ok, {"wrong": wrong, "extra": extra} if not ok else None
        )


class _Budget:
    metric = ""

    def __init__(self, max: float):
        self.max = float(max)

    def measure(self, output: Output) -> float | None:
        raise NotImplementedError

    def score(self, case: Case, output: Output) -> Score:
        v = self.measure(output)
        if v is None:
            return Score(0.0, False, error=f"no {self.metric} known for this call")
        ok = v <= self.max
        return Score(float(ok), ok, {self.metric: v, "max": self.max})


@register("latency")
class Latency(_Budget):
    """The call took at most `max` milliseconds (client side, through the gateway)."""

    metric = "latency_ms"

    def measure(self, output: Output) -> float | None:
        return output.latency_ms


@register("tokens")
class Tokens(_Budget):
    """The answer used at most `max` completion tokens (the engine's count, via the gateway)."""

    metric = "completion_tokens"

    def measure(self, output: Output) -> float | None:
        return float(output.completion_tokens)
