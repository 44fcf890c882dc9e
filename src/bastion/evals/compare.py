"""Comparing two runs case by case: per metric the means, the delta B - A with a paired
bootstrap CI, a verdict, and the cases that flipped.

`verdicts()` is the entry point for promotion gates (the registry): two run ids, a level and
optional thresholds in, one verdict per metric out, with everything needed as evidence.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import Engine

from bastion.evals import stats, store

#: Metrics where smaller is better; every other metric (pass rates, scores) is higher-better.
LOWER_IS_BETTER = {"latency_ms", "ttft_ms", "completion_tokens", "cost"}


@dataclass
class CaseAgg:
    """One case of one run, its samples averaged: the unit the bootstrap resamples."""

    tags: list[str]
    metrics: dict[str, float]
    passed: bool  # more than half of its samples passed
    n: int
    c: int  # samples passed


def aggregate(rows: list[dict[str, Any]], ks: list[int]) -> dict[str, CaseAgg]:
    by_case: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if not (r["error"] or "").startswith(store.CALL_FAILED):
            by_case[r["case_id"]].append(r)
    out: dict[str, CaseAgg] = {}
    for cid, rs in by_case.items():
        n, c = len(rs), sum(bool(r["passed"]) for r in rs)
        m: dict[str, float] = {"pass": c / n}
        for k in ks:
            if 1 < k <= n:
                m[f"pass@{k}"] = stats.pass_at_k(n, c, k)
        names = {name for r in rs for name in r["scores"]}
        for name in names:
            vals = [r["scores"][name]["value"] for r in rs if name in r["scores"]]
            m[f"score:{name}"] = stats.mean(vals)
        m["latency_ms"] = stats.mean([r["latency_ms"] for r in rs])
        ttfts = [r.get("ttft_ms") for r in rs]
        if all(x is not None for x in ttfts):  # runs stored before streaming have none
            m["ttft_ms"] = stats.mean([float(x) for x in ttfts if x is not None])
        m["completion_tokens"] = stats.mean([float(r["completion_tokens"]) for r in rs])
        costs = [r["cost_micros"] for r in rs]
        if all(x is not None for x in costs):
            m["cost"] = stats.mean([x / 1e6 for x in costs])
        out[cid] = CaseAgg(list(rs[0]["tags"] or []), m, c * 2 > n, n, c)
    return out


@dataclass
class MetricResult:
    metric: str
    higher_is_better: bool
    mean_a: float
    mean_b: float
    delta: float
    low: float
    high: float
    level: float
    n: int
    verdict: str
    #: Gates: the candidate's mean against a threshold, when one was given.
    threshold: float | None = None
    meets_threshold: bool | None = None

    @property
    def ok(self) -> bool:
        """No regression beyond the CI, and the threshold (if any) met: what a gate passes."""
        return self.verdict != "worse" and self.meets_threshold is not False


@dataclass
class Comparison:
    run_a: dict[str, Any]
    run_b: dict[str, Any]
    level: float
    resamples: int
    seed: int
    metrics: list[MetricResult]
    pass_to_fail: list[str]
    fail_to_pass: list[str]
    per_tag: dict[str, dict[str, float]]
    only_a: list[str]
    only_b: list[str]
    warnings: list[str] = field(default_factory=list)
    #: Per-case values of the primary metrics, for the report's plots.
    cases_a: dict[str, CaseAgg] = field(default_factory=dict, repr=False)
    cases_b: dict[str, CaseAgg] = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("cases_a", "cases_b")}
        for m, src in zip(d["metrics"], self.metrics, strict=True):
            m["ok"] = src.ok
        for key in ("run_a", "run_b"):
            d[key] = {k: (str(v) if k.endswith("_at") else v) for k, v in d[key].items()}
        return d


def _run(engine: Engine, run_id: str) -> dict[str, Any]:
    run = store.get_run(engine, run_id)
    if run is None:
        raise LookupError(f"no eval run {run_id!r} (see `bastion eval list`)")
    return run


def compare(
    engine: Engine,
    run_a: str,
    run_b: str,
    level: float = 0.95,
    resamples: int = stats.RESAMPLES,
    seed: int = stats.SEED,
    thresholds: dict[str, float] | None = None,
) -> Comparison:
    """B against A (A: the baseline, e.g. the version in production; B: the candidate)."""
    ra, rb = _run(engine, run_a), _run(engine, run_b)
    warnings = []
    if ra["suite"] != rb["suite"]:
        warnings.append(f"different suites: {ra['suite']} vs {rb['suite']}")
    elif ra["suite_sha256"] != rb["suite_sha256"]:
        warnings.append("the suite file changed between the runs (its SHA-256 differs)")
    for r in (ra, rb):
        if r["status"] != "finished":
            warnings.append(f"run {r['id']} is {r['status']}, not finished")
    store.attach_costs(engine, run_a)
    store.attach_costs(engine, run_b)
    ks = sorted({1, min(ra["samples"], rb["samples"])})
    ca = aggregate(store.results(engine, run_a), ks)
    cb = aggregate(store.results(engine, run_b), ks)
    common = sorted(set(ca) & set(cb))
    if not common:
        raise ValueError(f"runs {run_a} and {run_b} have no finished case in common")
    names = sorted(set.intersection(*(set(ca[c].metrics) & set(cb[c].metrics) for c in common)))
    order = ["pass"] + [n for n in names if n != "pass"]
    results = []
    for name in order:
        a = [ca[c].metrics[name] for c in common]
        b = [cb[c].metrics[name] for c in common]
        ci = stats.paired_bootstrap(a, b, level, resamples, seed)
        hib = name not in LOWER_IS_BETTER
        mr = MetricResult(
            name,
            hib,
            stats.mean(a),
            stats.mean(b),
            ci.delta,
            ci.low,
            ci.high,
            level,
            ci.n,
            stats.verdict(ci, hib),
        )
        if thresholds and name in thresholds:
            mr.threshold = thresholds[name]
            mr.meets_threshold = mr.mean_b >= mr.threshold if hib else mr.mean_b <= mr.threshold
        results.append(mr)
    tags: dict[str, dict[str, float]] = {}
    for tag in sorted({t for c in common for t in ca[c].tags}):
        ids = [c for c in common if tag in ca[c].tags]
        tags[tag] = {
            "n": len(ids),
            "a": stats.mean([ca[c].metrics["pass"] for c in ids]),
            "b": stats.mean([cb[c].metrics["pass"] for c in ids]),
        }
    return Comparison(
        run_a=ra,
        run_b=rb,
        level=level,
        resamples=resamples,
        seed=seed,
        metrics=results,
        pass_to_fail=[c for c in common if ca[c].passed and not cb[c].passed],
        fail_to_pass=[c for c in common if not ca[c].passed and cb[c].passed],
        per_tag=tags,
        only_a=sorted(set(ca) - set(cb)),
        only_b=sorted(set(cb) - set(ca)),
        warnings=warnings,
        cases_a={c: ca[c] for c in common},
        cases_b={c: cb[c] for c in common},
    )


def verdicts(
    engine: Engine,
    baseline_run: str,
    candidate_run: str,
    level: float = 0.95,
    thresholds: dict[str, float] | None = None,
) -> dict[str, MetricResult]:
    """For gates: per metric, the candidate against the baseline. A gate passes a metric when
    `result.ok`: not 'worse' at `level`, and its mean meets `thresholds[metric]` if given
    (>= for higher-better metrics such as 'pass' or 'score:judge', <= for latency/cost)."""
    c = compare(engine, baseline_run, candidate_run, level, thresholds=thresholds)
    out = {m.metric: m for m in c.metrics}
    missing = set(thresholds or {}) - set(out)
    if missing:
        raise ValueError(f"no such metric in both runs: {', '.join(sorted(missing))}")
    return out
