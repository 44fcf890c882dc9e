"""Running a suite through the gateway with the official `openai` SDK.

The gateway is the judge of governance: the run uses an ordinary API key (a service key for
eval traffic is recommended: `bastion keys create --team ml-evals --user svc-evals --name
evals`), so limits, budgets, audit and usage apply to every call. Every call of a run, the
judge's and the embedding scorer's included, carries the OpenAI `user` field
`bastion-eval:<run id>`, which the gateway records as `client_user` in usage and in the audit
trail's request entries: eval traffic is found and billed by that marker.
"""

from __future__ import annotations

import asyncio
import inspect
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import openai
from sqlalchemy import Engine

from bastion.evals import store
from bastion.evals.scorers import Output, Score, Scorer, ScoringContext, make_scorer
from bastion.evals.suite import Case, Suite

MARKER_PREFIX = "bastion-eval:"


def marker(run_id: str) -> str:
    return MARKER_PREFIX + run_id


class RunAborted(RuntimeError):
    """The gateway refused the run itself (the key, the model): no case can succeed."""


#: Answers that say the run is misconfigured, not that one case failed: asking the remaining
#: cases would only repeat them (and fill the audit trail with refusals).
FATAL = (
    openai.AuthenticationError,
    openai.PermissionDeniedError,
    openai.NotFoundError,
)


async def call_model(
    client: Any, suite: Suite, case: Case, model: str, user: str, overrides: dict[str, Any]
) -> Output:
    """One answer for one case; a failed call is an Output with `error` (never raised).

    The call is streamed so that the time to the first token (`ttft_ms`: the first chunk that
    carries text or a tool call, not the empty role chunk) is measured as a user of a chat
    front-end feels it; `latency_ms` stays the whole call, to the end of the stream. Usage
    comes in the stream's last chunk (`stream_options.include_usage`)."""
    params = {**suite.params_for(case), **overrides, "stream": True,
              "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = time.perf_counter()
    ttft: float | None = None
    parts: list[str] = []
    calls: dict[int, dict[str, str]] = {}
    finish, usage = None, None
    try:
        if case.input.endpoint == "chat":
            extra = {"tools": case.input.tools} if case.input.tools else {}
            raw = await client.chat.completions.with_raw_response.create(
                model=model, messages=suite.messages_for(case), user=user, **extra, **params
            )
        else:
            extra = {"suffix": case.input.suffix} if case.input.suffix is not None else {}
            raw = await client.completions.with_raw_response.create(
                model=model, prompt=case.input.prompt, user=user, **extra, **params
            )
        async for chunk in raw.parse():
            usage = chunk.usage or usage
            for choice in chunk.choices[:1] if chunk.choices else []:
                got = _delta(choice, parts, calls)
                if got and ttft is None:
                    ttft = (time.perf_counter() - t0) * 1000
                finish = choice.finish_reason or finish
    except FATAL as exc:
        raise RunAborted(f"the gateway refused the run: {exc.status_code} {exc.message}") from None
    except Exception as exc:
        return Output(
            latency_ms=(time.perf_counter() - t0) * 1000,
            error=store.CALL_FAILED + f"{type(exc).__name__}: {exc}"[:1000],
        )
    return Output(
        text="".join(parts),
        tool_calls=[calls[i] for i in sorted(calls)],
        latency_ms=(time.perf_counter() - t0) * 1000,
        ttft_ms=ttft,
        prompt_tokens=usage.prompt_tokens if usage else 0,
        completion_tokens=usage.completion_tokens if usage else 0,
        request_id=raw.headers.get("x-request-id"),
        finish_reason=finish,
    )


def _delta(choice: Any, parts: list[str], calls: dict[int, dict[str, str]]) -> bool:
    """Adds one streamed choice's text and tool-call pieces; whether it carried any."""
    delta = getattr(choice, "delta", None)
    if delta is None:  # /v1/completions: the text is on the choice
        text = choice.text or ""
        parts.append(text)
        return bool(text)
    got = bool(delta.content)
    parts.append(delta.content or "")
    for tc in delta.tool_calls or []:
        got = True
        call = calls.setdefault(tc.index, {"name": "", "arguments": ""})
        if tc.function is not None:
            call["name"] += tc.function.name or ""
            call["arguments"] += tc.function.arguments or ""
    return got


async def score_all(
    scorers: list[tuple[str, Scorer, bool]], case: Case, out: Output
) -> tuple[dict[str, Any], bool]:
    """Every scorer's Score, and whether the sample passed (every gating scorer passed).
    A scorer that raises is recorded as that scorer's error, so one bad case or one broken
    custom scorer does not end a run of hundreds."""
    scores: dict[str, Any] = {}
    passed = out.error is None
    for name, scorer, gate in scorers:
        if out.error is not None:
            s = Score(0.0, False, error="no answer")
        else:
            try:
                r = scorer.score(case, out)
                s = await r if inspect.isawaitable(r) else r
            except Exception as exc:
                s = Score(0.0, False, error=f"{type(exc).__name__}: {exc}"[:1000])
        s.value = min(1.0, max(0.0, float(s.value)))
        scores[name] = s.as_dict()
        if gate and (not s.passed or s.error):
            passed = False
    return scores, passed


def _scorer_names(suite: Suite, case: Case) -> list[str]:
    """Unique names per case: the same scorer twice (two regexes) becomes regex, regex#2."""
    names: list[str] = []
    for spec in suite.scorers_for(case):
        n, i = spec.name, 2
        while n in names:
            n, i = f"{spec.name}#{i}", i + 1
        names.append(n)
    return names


async def run_suite(
    engine: Engine,
    client: Any,
    suite: Suite,
    run_id: str,
    model: str,
    samples: int = 1,
    concurrency: int = 4,
    overrides: dict[str, Any] | None = None,
    progress: TextIO = sys.stderr,
    on_result: Callable[[str, int], None] | None = None,
) -> tuple[int, int]:
    """Runs every (case, sample) of the run not yet done; returns (done now, failed calls)."""
    ctx = ScoringContext(client=client, marker=marker(run_id))
    built = {
        c.id: [
            (n, make_scorer(spec, ctx), spec.gate)
            for n, spec in zip(_scorer_names(suite, c), suite.scorers_for(c), strict=True)
        ]
        for c in suite.cases
    }
    done = store.done_keys(engine, run_id)
    todo = [(c, s) for c in suite.cases for s in range(samples) if (c.id, s) not in done]
    total, finished, failed = len(suite.cases) * samples, len(done), 0
    if done:
        progress.write(f"resuming {run_id}: {len(done)} of {total} already done\n")
    sem = asyncio.Semaphore(max(1, concurrency))
    t_start = time.monotonic()

    async def one(case: Case, sample: int) -> None:
        nonlocal finished, failed
        async with sem:
            out = await call_model(client, suite, case, model, ctx.marker, overrides or {})
            scores, passed = await score_all(built[case.id], case, out)
        row = {
            "case_id": case.id,
            "sample": sample,
            "tags": case.tags,
            "output": out.text,
            "tool_calls": out.tool_calls or None,
            "scores": scores,
            "passed": passed,
            "error": out.error,
            "latency_ms": out.latency_ms,
            "ttft_ms": out.ttft_ms,
            "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.completion_tokens,
            "request_id": out.request_id,
        }
        await asyncio.to_thread(store.save_result, engine, run_id, row)
        finished += 1
        failed += out.error is not None
        mark = "error" if out.error else ("pass" if passed else "fail")
        progress.write(
            f"[{finished}/{total}] {case.id}#{sample} {mark} {out.latency_ms:.0f} ms"
            f" ({time.monotonic() - t_start:.1f}s)\n"
        )
        progress.flush()
        if on_result:
            on_result(case.id, sample)

    await asyncio.gather(*(one(c, s) for c, s in todo))
    return len(todo), failed
