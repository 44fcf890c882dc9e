"""Eval runs against the real tiny vLLM model through a real `bastion serve`, with the
official SDK: stored outputs and scores, eval traffic marked in usage and audit, resume,
the judge and embedding scorers on real served models, and a comparison with a deliberately
worse configuration."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
import sqlalchemy as sa
import yaml

from bastion.evals import store
from bastion.evals.model_scorers import EmbeddingSimilarity
from bastion.evals.runner import marker
from bastion.evals.scorers import Output, ScoringContext
from bastion.evals.suite import Case
from bastion.local.launcher import VllmProcess
from bastion.store.db import make_engine
from bastion.store.schema import usage
from tests.audit_api import entries_of
from tests.conftest import TINY, Gateway, base_config, engine_models

N = 8


def _suite(path: Path, n: int = N, judge: bool = False) -> Path:
    """Cases the tiny model answers deterministically at temperature 0 with some text; an
    answer of one token (`--max-tokens 1`) is too short for the regex: the worse candidate."""
    scorers: list[dict[str, Any]] = [
        {"name": "regex", "params": {"pattern": r"(?s)\S.{7,}"}},
        {"name": "latency", "params": {"max": 60000}, "gate": False},
    ]
    if judge:
        scorers = [{"name": "judge", "params": {"model": "tiny", "rubric": "Is it polite?"}}]
    doc = {
        "name": "smoke",
        "defaults": {"params": {"temperature": 0, "max_tokens": 12}, "scorers": scorers},
        "cases": [
            {
                "id": f"q{i}",
                "tags": ["even" if i % 2 == 0 else "odd"],
                "input": {"messages": [{"role": "user", "content": f"Tell me about number {i}."}]},
            }
            for i in range(n)
        ],
    }
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def gateway(
    make_gateway: Callable[..., Gateway],
    chat_engine: VllmProcess,
    embed_engine: VllmProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> Gateway:
    """The real engines behind a gateway of this module's own, with a priced chat alias and a
    fill-in-the-middle alias (the shipped code-fim suite) over the same tiny engine."""
    db = tmp_path_factory.mktemp("evals") / "bastion.db"
    models = engine_models(chat_engine, embed_engine)
    models["coder"] = {"kind": "completion", "fim": "qwen-coder", "deployments": [
        {"url": chat_engine.url, "served_name": TINY}]}  # fmt: skip
    cfg = base_config(
        f"sqlite:///{db}", models, prices={"tiny": {"prompt": 1.0, "completion": 2.0}}
    )
    gw = make_gateway(cfg)
    gw.wait_ready()
    return gw


@pytest.fixture(scope="module")
def svc_key(gateway: Gateway) -> str:
    """The eval service identity: an ordinary key of its own, governed like any other."""
    return gateway.create_key("alpha", "--user", "svc-evals", "--name", "evals")


def _eval(
    gw: Gateway, key: str, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    extra = ("--url", gw.url, "--key", key) if args[0] == "run" else ()
    return gw.cli("eval", *args, *extra, check=check)


def _db(gw: Gateway) -> sa.Engine:
    return make_engine(gw.config["database"]["url"])


def _marked(gw: Gateway, run_id: str, expect: int | None = None) -> int:
    """Usage records of the run's traffic, waiting for the gateway's batch writer."""
    engine = _db(gw)
    deadline = time.monotonic() + 10
    q = sa.select(sa.func.count()).select_from(usage).where(usage.c.client_user == marker(run_id))
    while True:
        with engine.connect() as conn:
            n = conn.execute(q).scalar_one()
        if expect is None or n >= expect or time.monotonic() > deadline:
            engine.dispose()
            return int(n)
        time.sleep(0.1)


def test_a_run_stores_outputs_scores_and_costs_and_is_marked_in_usage_and_audit(
    gateway: Gateway, svc_key: str, tmp_path: Path
) -> None:
    suite = _suite(tmp_path / "smoke.yaml")
    r = _eval(gateway, svc_key, "run", str(suite), "--model", "tiny", "--concurrency", "4")
    run_id = r.stdout.strip()
    assert f"[{N}/{N}]" in r.stderr and run_id in r.stderr  # progress on stderr
    engine = _db(gateway)
    rows = store.results(engine, run_id)
    assert len(rows) == N and store.get_run(engine, run_id)["status"] == "finished"  # type: ignore[index]
    for row in rows:
        assert row["output"] and row["error"] is None and row["request_id"]
        assert set(row["scores"]) == {"regex", "latency"} and row["passed"]
        assert row["completion_tokens"] > 0 and row["latency_ms"] > 0
        # Streamed: the first token comes before the end of the answer.
        assert 0 < row["ttft_ms"] <= row["latency_ms"]
        assert row["cost_micros"] > 0 and row["currency"]  # the gateway's price book, via usage
    assert _marked(gateway, run_id, N) == N
    # The audit trail's request entry carries the marker as the client's `user` field.
    auditor = gateway.create_auditor_key()
    entries = entries_of(gateway.url, auditor, rows[0]["request_id"])
    assert [e["kind"] for e in entries] == ["request", "completion"]
    assert entries[0]["client_user"] == marker(run_id)
    shown = _eval(gateway, svc_key, "show", run_id).stdout
    assert f"run {run_id}: suite smoke" in shown and "q7#0" in shown
    assert "  ttft_ms " in shown and "ttft   total" in shown
    assert run_id in _eval(gateway, svc_key, "list").stdout
    engine.dispose()


def test_an_interrupted_run_keeps_what_finished_and_resume_does_not_repeat_it(
    gateway: Gateway, svc_key: str, tmp_path: Path
) -> None:
    suite = _suite(tmp_path / "smoke.yaml")
    cmd = [sys.executable, "-m", "bastion.cli", "eval", "run", str(suite), "--model", "tiny",
           "--concurrency", "1", "--url", gateway.url, "--key", svc_key,
           "--config", str(gateway.config_path)]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=gateway.env)
    assert proc.stderr is not None
    first = proc.stderr.readline()
    run_id = first.split()[2].rstrip(":")
    for line in proc.stderr:
        if line.startswith("[3/"):
            proc.send_signal(signal.SIGINT)  # Ctrl-C after three cases
            break
    rest = proc.stderr.read()
    assert proc.wait(30) == 130 and f"--resume {run_id}" in rest
    engine = _db(gateway)
    kept = len(store.results(engine, run_id))
    assert 3 <= kept < N and store.get_run(engine, run_id)["status"] == "interrupted"  # type: ignore[index]
    time.sleep(1)  # a call in flight at the interrupt still reaches usage
    before = _marked(gateway, run_id)
    r = _eval(gateway, svc_key, "run", str(suite), "--resume", run_id)
    assert f"{kept} of {N} already done" in r.stderr
    assert _marked(gateway, run_id, before + N - kept) == before + N - kept  # no case repeated
    assert len(store.results(engine, run_id)) == N
    assert store.get_run(engine, run_id)["status"] == "finished"  # type: ignore[index]
    # Resuming with another suite text is refused.
    (tmp_path / "smoke.yaml").write_text(suite.read_text() + "\n# edited\n")
    bad = _eval(gateway, svc_key, "run", str(suite), "--resume", run_id, check=False)
    assert bad.returncode == 2 and "SHA-256 differs" in bad.stderr
    engine.dispose()


def test_the_judge_scorer_with_the_tiny_model_as_judge(
    gateway: Gateway, svc_key: str, tmp_path: Path
) -> None:
    suite = _suite(tmp_path / "judged.yaml", n=2, judge=True)
    run_id = _eval(gateway, svc_key, "run", str(suite), "--model", "tiny").stdout.strip()
    engine = _db(gateway)
    for row in store.results(engine, run_id):
        j = row["scores"]["judge"]
        assert isinstance(j["detail"]["reply"], str) and j["detail"]["judge"] == "tiny"
        if j["error"]:  # the tiny model babbles: recorded as an unparseable verdict
            assert j["error"].startswith("unparseable verdict") and j["value"] == 0.0
            assert not j["passed"] and not row["passed"]
        else:
            assert 1 <= j["detail"]["score"] <= 5 and 0 <= j["value"] <= 1
    # The judge's calls are the run's traffic too: one answer and one verdict per case.
    assert _marked(gateway, run_id, 4) == 4
    engine.dispose()


def test_embedding_similarity_with_the_real_minilm(gateway: Gateway, svc_key: str) -> None:
    async def scores() -> list[Any]:
        async with openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=svc_key) as client:
            s = EmbeddingSimilarity("minilm", 0.8, ctx=ScoringContext(client, "bastion-eval:t"))
            case = Case(
                id="c",
                input={"messages": [{"role": "user", "content": "card lost?"}]},
                expected="Block your card immediately in the banking app.",
            )
            texts = [
                "Block your card immediately in the banking app.",
                "Please block the card right away using the app.",
                "The quarterly dividend was raised by two cents.",
            ]
            return [await s.score(case, Output(text=t)) for t in texts]

    same, para, other = asyncio.run(scores())
    assert same.value == pytest.approx(1.0, abs=1e-3) and same.passed
    assert para.detail["cosine"] > other.detail["cosine"] + 0.2
    assert not other.passed and 0.0 <= other.value < 0.5


def test_comparing_with_a_deliberately_worse_candidate(
    gateway: Gateway, svc_key: str, tmp_path: Path
) -> None:
    suite = _suite(tmp_path / "smoke.yaml")
    base = _eval(gateway, svc_key, "run", str(suite), "--model", "tiny").stdout.strip()
    worse = _eval(
        gateway, svc_key, "run", str(suite), "--model", "tiny", "--max-tokens", "1"
    ).stdout.strip()
    out = tmp_path / "report.json"
    _eval(gateway, svc_key, "compare", base, worse, "--format", "json", "--out", str(out))
    rep = json.loads(out.read_text())
    m = {x["metric"]: x for x in rep["metrics"]}
    assert m["pass"]["mean_a"] == 1.0 and m["pass"]["mean_b"] == 0.0
    assert m["pass"]["high"] < 0 and m["pass"]["verdict"] == "worse" and not m["pass"]["ok"]
    assert m["completion_tokens"]["verdict"] == "better"  # one token is fewer tokens
    assert len(rep["pass_to_fail"]) == N and rep["fail_to_pass"] == []
    html = tmp_path / "report.html"
    r = _eval(gateway, svc_key, "compare", base, worse, "--format", "html", "--out", str(html))
    assert "| pass | 1.000 | 0.000 | -1.000 | [-1.000, -1.000] | worse |" in r.stdout
    assert "<svg" in html.read_text()
    failing = _eval(gateway, svc_key, "compare", base, worse, "--fail-on-worse", check=False)
    assert failing.returncode == 1


def test_samples_give_pass_at_k_and_the_shipped_fim_suite_runs(
    gateway: Gateway, svc_key: str, tmp_path: Path
) -> None:
    suite = _suite(tmp_path / "smoke.yaml", n=2)
    run_id = _eval(
        gateway, svc_key, "run", str(suite), "--model", "tiny", "--samples", "3",
        "--temperature", "1.0", "--max-tokens", "6",
    ).stdout.strip()  # fmt: skip
    shown = json.loads(_eval(gateway, svc_key, "show", run_id, "--format", "json").stdout)
    assert len(shown["results"]) == 6 and {r["sample"] for r in shown["results"]} == {0, 1, 2}
    assert 0.0 <= shown["metrics"]["pass@3"] <= 1.0 and shown["metrics"]["pass@3"] >= shown[
        "metrics"]["pass"]  # fmt: skip
    # code-fim: prompt + suffix on /v1/completions through the alias's FIM template. The tiny
    # model writes no code, so the regexes fail; the run itself must be complete and clean.
    fim = _eval(gateway, svc_key, "run", "code-fim", "--model", "coder").stdout.strip()
    rows = store.results(_db(gateway), fim)
    assert len(rows) == 3 and all(r["error"] is None and r["request_id"] for r in rows)
    assert all(set(r["scores"]) == {"regex"} for r in rows)


def test_a_run_the_gateway_refuses_stops_at_once(
    gateway: Gateway, svc_key: str, tmp_path: Path
) -> None:
    suite = _suite(tmp_path / "smoke.yaml")
    bad = _eval(gateway, "bst-not-a-key", "run", str(suite), "--model", "tiny", check=False)
    assert bad.returncode == 2 and "error: the gateway refused the run: 401" in bad.stderr
    unknown = _eval(gateway, svc_key, "run", str(suite), "--model", "nope", check=False)
    assert unknown.returncode == 2 and "refused the run: 404" in unknown.stderr
    run_id = unknown.stderr.split()[2].rstrip(":")
    assert store.get_run(_db(gateway), run_id)["status"] == "failed"  # type: ignore[index]
