"""The Grafana dashboards (deploy/grafana) and alert rules (deploy/prometheus) cannot rot:
every metric an expression reads is one a running `bastion serve` exports on /metrics, and
every label it groups or matches by is one of those metrics' labels."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from bastion.observability.metrics import Metrics
from bastion.routing.engine_load import EngineLoadScraper
from tests.conftest import ROOT, base_config, pg_database
from tests.stub_engine import StubEngine

DASHBOARDS = sorted((ROOT / "deploy" / "grafana").glob("*.json"))
ALERTS = ROOT / "deploy" / "prometheus" / "bastion-alerts.yaml"
#: PromQL's functions, aggregations and keywords the expressions may use (extend as needed).
PROMQL = {
    "sum", "max", "min", "avg", "count", "rate", "increase", "deriv", "delta",
    "histogram_quantile", "by", "without", "and", "or", "unless", "on", "ignoring", "bool",
    "label_values", "clamp_min", "humanizePercentage",
}  # fmt: skip
#: Labels Prometheus adds to every series it scrapes, and the histogram bucket label.
ADDED_LABELS = {"instance", "job", "le"}
#: Series Prometheus makes itself (no gateway exports them).
PROMETHEUS_SERIES = {"up"}
SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
}


@pytest.fixture(scope="module")
def exported(make_gateway: Any) -> Iterator[set[str]]:
    """The series names a real gateway's /metrics exposes, after it served a request."""
    stub = StubEngine().start()
    models = {"stub": {"deployments": [{"url": stub.url, "served_name": "stub-served"}]}}
    try:
        with pg_database() as db:
            gw = make_gateway(base_config(db, models))
            key = gw.create_key("alpha")
            chat = {"model": "stub", "messages": [{"role": "user", "content": "hi"}]}
            r = httpx.post(
                gw.url + "/v1/chat/completions",
                json=chat,
                headers={"Authorization": f"Bearer {key}"},
            )
            assert r.status_code == 200, r.text
            text = httpx.get(gw.url + "/metrics").text
            gw.stop()
    finally:
        stub.stop()
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(family.name + s for s in SAMPLE_SUFFIXES.get(family.type, ()))
        names.update(s.name for s in family.samples)
    yield names


def declared_labels() -> dict[str, set[str]]:
    """Each metric's labels, by every series name it exposes, as the gateway declares them."""
    registry: CollectorRegistry = Metrics().registry
    EngineLoadScraper(None, [], registry)  # type: ignore[arg-type]  # (its gauges only)
    out: dict[str, set[str]] = {}
    for collector in list(registry._collector_to_names):
        for name in registry._collector_to_names[collector]:
            out[name] = set(getattr(collector, "_labelnames", ()))
    return out


def expressions() -> list[tuple[str, str]]:
    """(where, PromQL) of every dashboard target, template query and alert rule."""
    found: list[tuple[str, str]] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                found.append((where + ": " + str(node.get("refId", "")), node["expr"]))
            if node.get("type") == "query" and isinstance(node.get("definition"), str):
                found.append((where + ": $" + node["name"], node["definition"]))
            title = node.get("title")
            for v in node.values():
                walk(v, f"{where}/{title}" if isinstance(title, str) else where)
        elif isinstance(node, list):
            for v in node:
                walk(v, where)

    for path in DASHBOARDS:
        walk(json.loads(path.read_text()), path.name)
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            found.append((f"{ALERTS.name}/{rule['alert']}", rule["expr"]))
    return found


def test_there_are_dashboards_for_each_area() -> None:
    assert {p.name for p in DASHBOARDS} == {"bastion-gateway.json", "bastion-engines.json"}
    text = " ".join(expr for _, expr in expressions())
    for metric in (
        "bastion_requests_total", "bastion_time_to_first_token_seconds_bucket",
        "bastion_upstream_errors_total", "bastion_limit_rejections_total",
        "bastion_deployment_queue_depth", "bastion_deployment_kv_cache_usage",
        "bastion_deployment_prompt_tokens_total", "bastion_in_flight_requests",
        "bastion_audit_shipped_entries", "bastion_usage_pending_records",
    ):  # fmt: skip
        assert metric in text, metric
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        assert board["uid"] == path.stem and board["panels"]
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids))


def check(where: str, expr: str, exported: set[str], labels: dict[str, set[str]]) -> list[str]:
    """What is wrong with one expression: metrics not exported, labels they do not have."""
    bare = re.sub(r'"[^"]*"', '""', expr)  # label values, e.g. "$model" or "5.."
    bare = re.sub(r"\[[^\]]*\]", "", bare)  # ranges
    bare = re.sub(r"\$\w+|\b\d+(\.\d+)?\b", "", bare)  # variables, numbers
    tokens = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", bare))
    metrics = {t for t in tokens if t.startswith("bastion_") or ":" in t}
    problems = []
    if not metrics and not tokens & PROMETHEUS_SERIES:
        problems.append(f"{where}: reads no Bastion metric: {expr}")
    for m in sorted(metrics - exported):
        problems.append(f"{where}: {m} is not exported by the gateway")
    allowed = ADDED_LABELS | {lab for m in metrics for lab in labels.get(m, set())}
    for t in sorted(tokens - metrics - PROMQL - PROMETHEUS_SERIES - allowed):
        problems.append(f"{where}: {t!r} is neither a label of {sorted(metrics)} nor PromQL")
    return problems


def test_every_expression_reads_exported_metrics_by_their_labels(exported: set[str]) -> None:
    labels = declared_labels()
    problems = [p for where, expr in expressions() for p in check(where, expr, exported, labels)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "expr",
    [
        "sum(rate(bastion_request_total[5m]))",  # a renamed (typo'd) metric
        "sum by (status) (rate(bastion_tokens_total[5m]))",  # a label it does not have
        'rate(bastion_tokens_total{team="a"}[5m])',  # a matcher on one it does not have
        "rate(process_cpu_seconds_total[5m])",  # not the gateway's metric at all
    ],
)
def test_the_check_refuses_a_rotten_expression(exported: set[str], expr: str) -> None:
    assert check("t", expr, exported, declared_labels())
    fine = 'sum by (kind) (rate(bastion_tokens_total{model=~"$model"}[$__rate_interval]))'
    assert check("t", fine, exported, declared_labels()) == []


def test_the_json_is_what_the_builder_writes(tmp_path: Path) -> None:
    """deploy/grafana/build.py is the source: the committed JSON is its output."""
    import runpy

    before = {p.name: p.read_text() for p in DASHBOARDS}
    runpy.run_path(str(ROOT / "deploy" / "grafana" / "build.py"), run_name="__main__")
    assert {p.name: p.read_text() for p in DASHBOARDS} == before
