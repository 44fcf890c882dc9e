"""Writes the Grafana dashboards of this folder (`python deploy/grafana/build.py`): the
JSON files are what is imported or provisioned; this script is their source, so a panel is
changed here and the JSON regenerated (tests/observability/test_dashboards.py checks every
expression against the metrics a running gateway exports)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DS = {"type": "prometheus", "uid": "${datasource}"}
RATE = "[$__rate_interval]"
M = '{model=~"$model"}'
D = '{deployment=~"$deployment"}'


def var(name: str, query: str, label: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "query": {"query": query, "refId": name},
        "definition": query,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"text": "All", "value": "$__all"},
        "refresh": 2,
        "sort": 1,
    }


class Board:
    def __init__(self, uid: str, title: str, variables: list[dict[str, Any]]):
        self.uid, self.title, self.variables = uid, title, variables
        self.panels: list[dict[str, Any]] = []
        self.y = 0
        self.x = 0

    def row(self, title: str) -> None:
        self.y += 8 if self.x else 0
        self.x = 0
        self.panels.append(
            {
                "type": "row",
                "title": title,
                "collapsed": False,
                "id": len(self.panels) + 1,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
                "panels": [],
            }
        )
        self.y += 1

    def panel(
        self,
        title: str,
        targets: list[tuple[str, str]],
        unit: str = "short",
        description: str = "",
        kind: str = "timeseries",
        w: int = 8,
    ) -> None:
        if self.x + w > 24:
            self.x, self.y = 0, self.y + 8
        self.panels.append(
            {
                "type": kind,
                "title": title,
                "description": description,
                "id": len(self.panels) + 1,
                "datasource": DS,
                "gridPos": {"h": 8, "w": w, "x": self.x, "y": self.y},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
                "targets": [
                    {
                        "datasource": DS,
                        "expr": expr,
                        "legendFormat": legend,
                        "refId": chr(ord("A") + i),
                    }
                    for i, (expr, legend) in enumerate(targets)
                ],
            }
        )
        self.x += w

    def write(self) -> None:
        board = {
            "uid": self.uid,
            "title": self.title,
            "tags": ["bastion"],
            "editable": True,
            "schemaVersion": 39,
            "time": {"from": "now-3h", "to": "now"},
            "refresh": "30s",
            "templating": {
                "list": [
                    {
                        "name": "datasource",
                        "label": "Prometheus",
                        "type": "datasource",
                        "query": "prometheus",
                        "current": {},
                    },
                    *self.variables,
                ]
            },
            "panels": self.panels,
        }
        path = HERE / f"{self.uid}.json"
        path.write_text(json.dumps(board, indent=2) + "\n")


def quantiles(metric: str, by: str = "") -> list[tuple[str, str]]:
    group = f"le{', ' + by if by else ''}"
    return [
        (
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{M}{RATE})))",
            f"p{int(q * 100)}" + (f" {{{{{by}}}}}" if by else ""),
        )
        for q in (0.5, 0.95, 0.99)
    ]


def gateway() -> Board:
    b = Board(
        "bastion-gateway",
        "Bastion: gateway",
        [var("model", "label_values(bastion_requests_total, model)", "Model")],
    )
    b.row("Traffic")
    b.panel(
        "Requests / s by model",
        [(f"sum by (model) (rate(bastion_requests_total{M}{RATE}))", "{{model}}")],
        "reqps",
    )
    b.panel(
        "Requests / s by status",
        [(f"sum by (status) (rate(bastion_requests_total{M}{RATE}))", "{{status}}")],
        "reqps",
    )
    b.panel(
        "Tokens / s by kind",
        [(f"sum by (kind) (rate(bastion_tokens_total{M}{RATE}))", "{{kind}}")],
        description="prompt, cached (read from an engine's prefix cache), completion.",
    )
    b.panel(
        "In flight and queued",
        [
            (f"sum by (model) (bastion_in_flight_requests{M})", "in flight {{model}}"),
            (f"sum by (model) (bastion_queued_requests{M})", "queued {{model}}"),
        ],
        description="Queued: waiting for an engine slot in the fair-share queue.",
    )
    b.panel(
        "Requests / s by endpoint",
        [(f"sum by (endpoint) (rate(bastion_requests_total{M}{RATE}))", "{{endpoint}}")],
        "reqps",
    )
    b.panel(
        "Routers: decisions / s",
        [
            (
                f"sum by (router, rule, target) (rate(bastion_router_decisions_total{RATE}))",
                "{{router}} {{rule}} → {{target}}",
            )
        ],
        "reqps",
    )
    b.row("Latency")
    b.panel("Request duration (to last byte)", quantiles("bastion_request_duration_seconds"), "s")
    b.panel("Time to first token (streams)", quantiles("bastion_time_to_first_token_seconds"), "s")
    b.panel(
        "p95 duration by model", quantiles("bastion_request_duration_seconds", "model")[1:2], "s"
    )
    b.row("Errors")
    b.panel(
        "Error ratio (5xx)",
        [
            (
                f'sum(rate(bastion_requests_total{{model=~"$model",status=~"5.."}}{RATE})) '
                f"/ sum(rate(bastion_requests_total{M}{RATE}))",
                "5xx",
            )
        ],
        "percentunit",
    )
    b.panel(
        "Engine failures / s",
        [
            (
                f"sum by (deployment, kind) (rate(bastion_upstream_errors_total{RATE}))",
                "{{deployment}} {{kind}}",
            )
        ],
    )
    b.panel(
        "Retries and fallbacks / s",
        [
            (
                f"sum by (model, outcome) (rate(bastion_routing_retries_total{M}{RATE}))",
                "retry {{model}} {{outcome}}",
            ),
            (
                f"sum by (from, to, reason) (rate(bastion_fallbacks_total{RATE}))",
                "fallback {{from}} → {{to}} ({{reason}})",
            ),
        ],
    )
    b.row("Limits")
    b.panel(
        "Refusals / s by limit",
        [(f"sum by (kind) (rate(bastion_limit_rejections_total{RATE}))", "{{kind}}")],
        description="rpm, tpm, concurrent, budget_day, budget_month.",
    )
    b.panel(
        "Answered 429 / s",
        [
            (
                "sum by (model) "
                f'(rate(bastion_requests_total{{model=~"$model",status="429"}}{RATE}))',
                "{{model}}",
            )
        ],
        "reqps",
    )
    b.panel(
        "Limits backend (Redis) failures",
        [(f"sum(increase(bastion_limits_backend_failures_total{RATE}))", "failures")],
        description="Each is a request admitted on the local fallback counters.",
    )
    b.row("Audit and usage")
    b.panel(
        "Audit entries not made durable",
        [
            (
                f"sum by (action) (increase(bastion_audit_failures_total{RATE}))",
                "{{action}}",
            )
        ],
        description="refused: the request was answered 503 (fail closed); forwarded: "
        "audit.on_failure=open let it through.",
    )
    b.panel(
        "Audit shipping (entries / s, errors)",
        [
            (
                "sum by (instance) (deriv(bastion_audit_shipped_entries[5m]))",
                "shipped {{instance}}",
            ),
            ("sum by (instance) (delta(bastion_audit_ship_errors[5m]))", "errors {{instance}}"),
        ],
        description="From each replica's local log into the store; errors are retried.",
    )
    b.panel(
        "Usage records waiting for the database",
        [("sum by (instance) (bastion_usage_pending_records)", "{{instance}}")],
    )
    return b


def engines() -> Board:
    b = Board(
        "bastion-engines",
        "Bastion: engines",
        [var("deployment", "label_values(bastion_deployment_up, deployment)", "Deployment")],
    )
    b.row("Health and load")
    b.panel(
        "Deployments up",
        [(f"bastion_deployment_up{D}", "{{deployment}}")],
        description="1: passed its last health check.",
        kind="state-timeline",
        w=24,
    )
    b.panel(
        "Engine queue (waiting in vLLM)",
        [(f"max by (deployment) (bastion_deployment_queue_depth{D})", "{{deployment}}")],
    )
    b.panel(
        "KV-cache usage",
        [
            (
                f"max by (deployment) (bastion_deployment_kv_cache_usage{D})",
                "{{deployment}}",
            )
        ],
        "percentunit",
    )
    b.panel(
        "Prefix-cache hit ratio",
        [
            (
                f'sum by (deployment) (rate(bastion_deployment_prompt_tokens_total{{deployment=~"$deployment",kind="cached"}}{RATE})) '  # noqa: E501
                f'/ sum by (deployment) (rate(bastion_deployment_prompt_tokens_total{{deployment=~"$deployment",kind="prompt"}}{RATE}))',  # noqa: E501
                "{{deployment}}",
            )
        ],
        "percentunit",
        description="Prompt tokens the engine read from its prefix cache.",
    )
    b.panel(
        "Gateway requests in flight and queued, by model",
        [
            ("sum by (model) (bastion_in_flight_requests)", "in flight {{model}}"),
            ("sum by (model) (bastion_queued_requests)", "queued {{model}}"),
        ],
    )
    b.panel(
        "Routing decisions / s",
        [
            (
                f"sum by (deployment, reason) (rate(bastion_routing_decisions_total{D}{RATE}))",
                "{{deployment}} {{reason}}",
            )
        ],
        "reqps",
        description="Why the balancer chose each deployment.",
    )
    b.panel(
        "Engine failures / s",
        [
            (
                f"sum by (deployment, kind) (rate(bastion_upstream_errors_total{D}{RATE}))",
                "{{deployment}} {{kind}}",
            )
        ],
    )
    return b


if __name__ == "__main__":
    gateway().write()
    engines().write()
