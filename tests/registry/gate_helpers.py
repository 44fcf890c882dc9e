"""Shared by the gate tests: a suite file, and eval runs stored the way `bastion eval run`
stores them (through the evals store), with chosen answers passing or failing."""

from __future__ import annotations

from pathlib import Path

import yaml
from sqlalchemy import Engine

from bastion.evals import store
from bastion.evals.suite import load_suite

CASES = 40


def suite_file(directory: Path, name: str = "facts", cases: int = CASES) -> Path:
    data = {
        "name": name,
        "version": "1",
        "defaults": {"scorers": [{"name": "contains"}]},
        "cases": [
            {
                "id": f"q{i:02d}",
                "tags": ["even" if i % 2 == 0 else "odd"],
                "input": {"messages": [{"role": "user", "content": f"Fact {i}?"}]},
                "expected": [f"fact-{i}"],
            }
            for i in range(cases)
        ],
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def stored_run(
    db: Engine, suite: Path, ref: str | None, passed: list[bool], status: str = "finished"
) -> str:
    """A run of `suite` on the alias serving `ref`: case i answered right iff passed[i]."""
    s, sha = load_suite(suite)
    run_id = store.create_run(
        db, suite=s.name, version=s.version, sha256=sha, path=str(suite), model="tiny:cand",
        samples=1, cases_total=len(s.cases), params={}, registry_ref=ref,
    )  # fmt: skip
    for i, ok in enumerate(passed):
        answer = f"It is fact-{i}." if ok else "I do not know."
        store.save_result(
            db,
            run_id,
            {
                "case_id": f"q{i:02d}", "sample": 0, "tags": [], "output": answer,
                "tool_calls": None, "passed": ok, "error": None,
                "scores": {"contains": {"value": float(ok), "passed": ok, "detail": None,
                                        "error": None}},
                "latency_ms": 120.0 + i, "prompt_tokens": 12, "completion_tokens": 6,
                "request_id": None,
            },
        )  # fmt: skip
    store.set_status(db, run_id, status)
    return run_id


def first_n(n: int, total: int = CASES) -> list[bool]:
    """The first n cases right, the rest wrong."""
    return [i < n for i in range(total)]
