"""Scorers that call a model through the gateway: embedding similarity and LLM-as-judge.

Both use the run's client (the run's key, the run's `user` marker), so their calls show up in
usage and audit as eval traffic of the same run, governed like the calls they score.
"""

from __future__ import annotations

import math
import re
from typing import Any

from bastion.evals.scorers import Output, Score, ScoringContext, register
from bastion.evals.suite import Case


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
    return dot / (na * nb) if na and nb else 0.0


@register("embedding_similarity")
class EmbeddingSimilarity:
    """Cosine similarity of the answer and the reference (`expected`, or the best of a list)
    with the embedding alias `model`; passes at `threshold`. The value is the similarity
    clipped to [0, 1] (an unrelated answer is near 0 with MiniLM, not negative in practice)."""

    def __init__(self, model: str, threshold: float = 0.8, ctx: ScoringContext | None = None):
        if ctx is None:
            raise ValueError("embedding_similarity needs the gateway (run it with `eval run`)")
        self.model, self.threshold, self.ctx = model, float(threshold), ctx

    async def score(self, case: Case, output: Output) -> Score:
        refs = case.expected if isinstance(case.expected, list) else [case.expected]
        if not refs or refs[0] is None:
            raise ValueError(f"case {case.id!r}: embedding_similarity needs 'expected'")
        if not output.text.strip():
            return Score(0.0, False, error="empty answer")
        resp = await self.ctx.client.embeddings.create(
            model=self.model, input=[output.text, *map(str, refs)], user=self.ctx.marker
        )
        vecs = [d.embedding for d in sorted(resp.data, key=lambda d: d.index)]
        sim = max(cosine(vecs[0], v) for v in vecs[1:])
        value = min(1.0, max(0.0, sim))
        return Score(value, sim >= self.threshold, {"cosine": round(sim, 4)})


JUDGE_PROMPT = """You are grading an answer given by an AI assistant.

Rubric:
{rubric}

Question:
{question}

Reference answer (may be empty):
{reference}

Answer to grade:
{answer}

Reply with only a JSON object:
{{"reasoning": "<one or two sentences>", "score": <integer 1 to {scale}>}}"""

_SCORE = re.compile(r'"?score"?\s*[:=]\s*"?(\d+(?:\.\d+)?)', re.IGNORECASE)


def parse_verdict(text: str, scale: int) -> tuple[float, str]:
    """(score in 1..scale, reasoning) from a judge's reply; ValueError when there is none.

    A JSON object first; else a `score: N` anywhere (judges often add prose around it). A score
    outside 1..scale is not a verdict: it is reported, never clamped into one.
    """
    from bastion.evals.scorers import extract_json

    reasoning = ""
    raw: Any = None
    try:
        doc = extract_json(text)
        if isinstance(doc, dict):
            raw, reasoning = doc.get("score"), str(doc.get("reasoning", ""))
    except ValueError:
        pass
    if raw is None:
        m = _SCORE.search(text)
        if not m:
            raise ValueError("no score in the judge's reply")
        raw = m.group(1)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"score {raw!r} is not a number") from None
    if not 1 <= value <= scale:
        raise ValueError(f"score {value:g} is outside 1..{scale}")
    return value, reasoning


@register("judge")
class Judge:
    """LLM-as-judge: the alias `model` grades the answer against `rubric` on 1..`scale`;
    the value is (score-1)/(scale-1), passed at `pass_score`. The judge's reasoning and raw
    reply are kept in the score's detail; a reply without a usable verdict is a scored error
    (value 0, `error` set), never a crash of the run."""

    def __init__(
        self,
        model: str,
        rubric: str,
        scale: int = 5,
        pass_score: float | None = None,
        max_tokens: int = 256,
        ctx: ScoringContext | None = None,
    ):
        if ctx is None:
            raise ValueError("judge needs the gateway (run it with `eval run`)")
        if scale < 2:
            raise ValueError("scale is at least 2")
        self.model, self.rubric, self.scale, self.ctx = model, rubric, scale, ctx
        self.pass_score = pass_score if pass_score is not None else math.ceil(scale * 0.6)
        self.max_tokens = max_tokens

    async def score(self, case: Case, output: Output) -> Score:
        q = case.input.prompt or "\n".join(
            str(m.content) for m in case.input.messages or [] if m.role == "user"
        )
        prompt = JUDGE_PROMPT.format(
            rubric=self.rubric,
            question=q,
            reference="" if case.expected is None else case.expected,
            answer=output.text,
            scale=self.scale,
        )
        resp = await self.ctx.client.chat.completions.create(
            model=self.model,
            messages=[{"role": "user", "content": prompt}],
            temperature=0,
            max_tokens=self.max_tokens,
            user=self.ctx.marker,
        )
        reply = resp.choices[0].message.content or ""
        detail: dict[str, Any] = {"judge": self.model, "reply": reply[:2000]}
        try:
            value, reasoning = parse_verdict(reply, self.scale)
        except ValueError as exc:
            return Score(0.0, False, detail, error=f"unparseable verdict: {exc}")
        detail.update(score=value, reasoning=reasoning)
        return Score((value - 1) / (self.scale - 1), value >= self.pass_score, detail)
