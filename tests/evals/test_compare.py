"""Comparisons of stored runs (written as a run writes them) and the reports made of them."""

from __future__ import annotations

from pathlib import Path
from xml.etree import ElementTree

import pytest
from sqlalchemy import Engine

from bastion.evals import report, store
from bastion.evals.compare import compare, verdicts
from bastion.store.db import open_database


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Engine:
    """The same store code on both databases Bastion supports."""
    if request.param == "postgres":
        return open_database(request.getfixturevalue("pg_url"))
    return open_database(f"sqlite:///{tmp_path / 'evals.db'}")


def _run(db: Engine, model: str, passed: list[bool], latency: float, samples: int = 1) -> str:
    run_id = store.create_run(
        db,
        suite="facts",
        version="1",
        sha256="0" * 64,
        path="facts.yaml",
        model=model,
        samples=samples,
        cases_total=len(passed),
        params={},
    )
    for i, ok in enumerate(passed):
        for s in range(samples):
            ok_s = ok if s == 0 else not ok
            store.save_result(
                db,
                run_id,
                {
                    "case_id": f"c{i:02d}",
                    "sample": s,
                    "tags": ["even" if i % 2 == 0 else "odd"],
                    "output": "x",
                    "tool_calls": None,
                    "passed": ok_s,
                    "error": None,
                    "scores": {
                        "contains": {
                            "value": float(ok_s),
                            "passed": ok_s,
                            "detail": None,
                            "error": None,
                        }
                    },
                    "latency_ms": latency + i,
                    "prompt_tokens": 10,
                    "completion_tokens": 5,
                    "request_id": None,
                },
            )
    store.set_status(db, run_id, "finished")
    return run_id


def test_a_worse_candidate_is_worse_with_an_interval_excluding_zero(db: Engine) -> None:
    base = _run(db, "prod", [True] * 30, latency=100)
    cand = _run(db, "cand", [i % 3 != 0 for i in range(30)], latency=300)  # 10 of 30 break
    c = compare(db, base, cand)
    m = {r.metric: r for r in c.metrics}
    assert m["pass"].mean_a == 1.0 and m["pass"].mean_b == pytest.approx(20 / 30)
    assert m["pass"].high < 0 and m["pass"].verdict == "worse"
    assert m["score:contains"].verdict == "worse"
    assert m["latency_ms"].delta == pytest.approx(200) and m["latency_ms"].verdict == "worse"
    assert m["completion_tokens"].verdict == "no detectable difference"
    assert c.pass_to_fail == [f"c{i:02d}" for i in range(0, 30, 3)] and c.fail_to_pass == []
    assert c.per_tag["even"]["n"] == 15
    # The other way round, the same runs make a better candidate.
    assert {r.metric: r.verdict for r in compare(db, cand, base).metrics}["pass"] == "better"


def test_gate_verdicts_with_thresholds(db: Engine) -> None:
    base = _run(db, "prod", [True] * 20, latency=100)
    same = _run(db, "cand", [True] * 19 + [False], latency=100)
    v = verdicts(db, base, same, thresholds={"pass": 0.9, "latency_ms": 50})
    assert v["pass"].verdict == "no detectable difference" and v["pass"].ok
    assert v["latency_ms"].meets_threshold is False and not v["latency_ms"].ok
    with pytest.raises(ValueError, match="no such metric in both runs: score:judge"):
        verdicts(db, base, same, thresholds={"score:judge": 0.5})
    with pytest.raises(LookupError, match="no eval run 'ev_nope'"):
        verdicts(db, base, "ev_nope")


def test_pass_at_k_from_samples(db: Engine) -> None:
    a = _run(db, "a", [True, False] * 5, latency=10, samples=3)
    b = _run(db, "b", [True, False] * 5, latency=10, samples=3)
    m = {r.metric: r for r in compare(db, a, b).metrics}
    # Each case: 1 of 3 samples (or 2 of 3) passed -> pass@3 = 1 for every case.
    assert m["pass@3"].mean_a == 1.0 and m["pass"].mean_a == pytest.approx(0.5)


def test_reports_markdown_json_and_a_self_contained_html(db: Engine) -> None:
    base = _run(db, "prod", [True] * 12, latency=100)
    cand = _run(db, "cand", [i % 2 == 0 for i in range(12)], latency=150)
    c = compare(db, base, cand)
    md = report.markdown(c)
    assert "| pass | 1.000 | 0.500 | -0.500 |" in md and "worse" in md
    assert "Flipped pass → fail (6)" in md
    assert '"verdict": "worse"' in report.as_json(c)
    html = report.html(c)
    assert html.count("<svg") >= 4 and "pass rate per tag" in html
    # No network assets: the only URL is the SVG namespace.
    for svg in html.split("<svg")[1:]:  # each plot is well-formed XML
        ElementTree.fromstring("<svg" + svg.split("</svg>")[0] + "</svg>")
    assert "<script" not in html and "<link" not in html
    assert {u for u in html.split('"') if u.startswith("http")} == {"http://www.w3.org/2000/svg"}


def test_failed_calls_are_asked_again_on_resume_and_left_out_of_comparisons(db: Engine) -> None:
    from bastion.evals.compare import aggregate

    run_id = _run(db, "m", [True, True], latency=10)
    row = {
        "case_id": "c01", "sample": 0, "tags": [], "output": "", "tool_calls": None,
        "scores": {}, "passed": False, "error": store.CALL_FAILED + "RateLimitError: 429",
        "latency_ms": 1.0, "prompt_tokens": 0, "completion_tokens": 0, "request_id": None,
    }  # fmt: skip
    store.save_result(db, run_id, row)  # replaces the earlier answer of the same sample
    assert store.done_keys(db, run_id) == {("c00", 0)}
    assert set(aggregate(store.results(db, run_id), [1])) == {"c00"}
    assert len(store.results(db, run_id)) == 2


def test_time_to_first_token_is_compared_when_every_answer_has_one(db: Engine) -> None:
    base = _run(db, "prod", [True] * 10, latency=100)
    cand = _run(db, "cand", [True] * 10, latency=100)
    # Runs stored before answers were streamed have no TTFT: no metric, not a zero.
    assert "ttft_ms" not in {m.metric for m in compare(db, base, cand).metrics}
    skip = ("run_id", "created_at", "cost_micros", "currency")
    for run_id, ttft in ((base, 20.0), (cand, 60.0)):
        for row in store.results(db, run_id):
            kept = {k: v for k, v in row.items() if k not in skip}
            store.save_result(db, run_id, {**kept, "ttft_ms": ttft})
    c = compare(db, base, cand)
    m = {r.metric: r for r in c.metrics}["ttft_ms"]
    assert not m.higher_is_better and m.delta == pytest.approx(40) and m.verdict == "worse"
    assert "| ttft_ms | 20 | 60 | +40 |" in report.markdown(c)
    assert "mean ttft_ms" in report.html(c)
