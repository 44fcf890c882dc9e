"""Prometheus metrics, one registry per app (so several apps can live in one test process).

Under `bastion serve --workers N` a scrape reaches one worker, yet must count them all: the
supervisor sets PROMETHEUS_MULTIPROC_DIR before it starts them, and prometheus_client's
multiprocess mode then keeps every worker's values in files there, which `exposition()` sums.
Counters and histograms add up (a dead worker's stay counted); each gauge says how its workers'
values combine (`multiprocess_mode`); gauges read from a function (`follow`) are written to the
files every second instead, as multiprocess mode cannot call another process's function.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

log = logging.getLogger("bastion.metrics")
M = TypeVar("M", Counter, Gauge, Histogram)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: How often a worker writes its tracked gauges for the others' scrapes.
TRACK_SECONDS = 1.0


def mark_process_dead(pid: int) -> None:
    """A worker is gone: its live gauges leave the sums (its counters stay)."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        #: One of several worker processes (see the module's docstring).
        self.shared = bool(os.environ.get(MULTIPROC_ENV))
        self._updates: list[Callable[[], None]] = []
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._ticker: threading.Thread | None = None
        r = self.registry
        self.requests = Counter(
            "bastion_requests",
            "Requests by model, endpoint and status.",
            ["model", "endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "bastion_request_duration_seconds",
            "Time from request to last byte.",
            ["model", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "bastion_time_to_first_token_seconds",
            "Time from request to the first streamed token.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "bastion_tokens",
            "Tokens by model and kind (prompt, cached, completion).",
            ["model", "kind"],
            registry=r,
        )
        self.in_flight = Gauge(
            "bastion_in_flight_requests",
            "Requests being served now.",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.upstream_errors = Counter(
            "bastion_upstream_errors",
            "Engine failures by deployment and kind.",
            ["deployment", "kind"],
            registry=r,
        )
        self.limit_rejections = Counter(
            "bastion_limit_rejections",
            "Requests refused by a limit, by kind "
            "(rpm, tpm, concurrent, budget_day, budget_month).",
            ["kind"],
            registry=r,
        )
        self.limits_backend_failures = Counter(
            "bastion_limits_backend_failures",
            "Times the limits backend (Redis) could not be used.",
            registry=r,
        )
        self.queued = Gauge(
            "bastion_queued_requests",
            "Requests waiting for an engine slot (fair-share queue).",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.deployment_up = Gauge(
            "bastion_deployment_up",
            "1 if the deployment passed its last health check (with several workers: every "
            "worker's last check).",
            ["deployment"],
            registry=r,
            multiprocess_mode="livemin",
        )
        self.routing = Counter(
            "bastion_routing_decisions",
            "Requests sent to a deployment, by why the balancer chose it (session, prefix, ring, "
            "spill, return, slow-start, cached-prefix, fallback-to-available, least-loaded, "
            "least-outstanding, only).",
            ["deployment", "reason"],
            registry=r,
        )
        self.retries = Counter(
            "bastion_routing_retries",
            "Requests moved to another replica after a refused connection (retried), or answered "
            "503 instead because the model's retry budget was spent (budget-spent).",
            ["model", "outcome"],
            registry=r,
        )
        self.fallbacks = Counter(
            "bastion_fallbacks",
            "Requests moved from one alias to the next of its `fallbacks`, by why (unavailable, "
            "overloaded, first_byte_timeout, queue_timeout).",
            ["from", "to", "reason"],
            registry=r,
        )
        self.router_decisions = Counter(
            "bastion_router_decisions",
            "Requests a router (`routers:`) sent to a target, by the rule that matched "
            "(`default`: none did).",
            ["router", "rule", "target"],
            registry=r,
        )
        self.deployment_tokens = Counter(
            "bastion_deployment_prompt_tokens",
            "Prompt tokens by deployment and kind (prompt: all; cached: read from the engine's "
            "prefix cache): cached / prompt is the deployment's cache-hit ratio.",
            ["deployment", "kind"],
            registry=r,
        )
        self.audit_failures = Counter(
            "bastion_audit_failures",
            "Audit entries that could not be made durable, by what happened to the request "
            "(refused: fail closed; forwarded: audit.on_failure=open).",
            ["action"],
            registry=r,
        )
        self.audit_shipped = Gauge(
            "bastion_audit_shipped_entries",
            "Audit entries moved from the local log into the store since the gateway started.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.usage_pending = Gauge(
            "bastion_usage_pending_records",
            "Usage records queued for the database, not yet written (grows while it is slow or "
            "down; drained at shutdown).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.audit_ship_errors = Gauge(
            "bastion_audit_ship_errors",
            "Failed attempts to move audit entries into the store since start (retried).",
            registry=r,
            multiprocess_mode="livesum",
        )

    def of(self, metric: M, *values: str) -> M:
        """`metric.labels(*values)`, looked up once per label set: the request path asks for
        about ten children a request, and prometheus_client validates and locks on each."""
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child  # type: ignore[no-any-return]

    def follow(self, gauge: Gauge, read: Callable[[], float]) -> None:
        """`gauge` shows `read()`: asked at each scrape in one process; in several, written
        every second, where the other workers' scrapes read it."""
        if self.shared:
            self.every_second(lambda: gauge.set(read()))
        else:
            gauge.set_function(read)

    def every_second(self, update: Callable[[], None]) -> None:
        """`update` sets gauges: before each scrape, and, in several processes, every second."""
        self._updates.append(update)
        if self.shared and self._ticker is None:
            self._ticker = threading.Thread(target=self._tick, name="bastion-metrics", daemon=True)
            self._ticker.start()

    def _tick(self) -> None:
        while True:
            time.sleep(TRACK_SECONDS)
            try:
                self._update()
            except Exception:  # a gauge is stale until the next second; the ticker goes on
                log.exception("updating the shared metrics failed")

    def _update(self) -> None:
        for update in list(self._updates):
            update()

    def exposition(self) -> bytes:
        """The text a scrape gets: this process's registry, or every worker's, summed."""
        self._update()
        if not self.shared:
            return generate_latest(self.registry)
        summed = CollectorRegistry()
        multiprocess.MultiProcessCollector(summed)
        return generate_latest(summed)
