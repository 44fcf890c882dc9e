"""What each vLLM engine says about its own load: its /metrics, scraped on the health-check
interval. Queue depth (`vllm:num_requests_waiting`), requests running and KV-cache usage
become gauges in Bastion's /metrics, fields of `GET /admin/routing`, and a tie-breaker for
precise routing (`Precise.engine`).

Bastion's own in-flight count only knows this gateway process's requests; the engine's
counts include every gateway replica's, and requests the engine queued for lack of KV cache.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.parser import text_string_to_metric_families

from bastion.routing.poller import Poller
from bastion.routing.precise import LoadView

if TYPE_CHECKING:
    from bastion.engines.client import EngineClient
    from bastion.routing.balancer import Deployment

log = logging.getLogger("bastion.routing")

#: vLLM's metric names → our field names.
FIELDS = {
    "vllm:num_requests_waiting": "queue_depth",
    "vllm:num_requests_running": "running",
    "vllm:kv_cache_usage_perc": "kv_cache_usage",
}
#: A scrape older than this many intervals is not shown or used (the engine stopped answering).
STALE_INTERVALS = 3


@dataclass(slots=True)
class EngineLoad:
    queue_depth: float
    running: float
    kv_cache_usage: float
    at: float


def parse_metrics(text: str, served_name: str | None = None) -> dict[str, float]:
    """The load fields from a vLLM /metrics answer (summed over its engines, for the served
    model when its samples name one)."""
    out = dict.fromkeys(FIELDS.values(), 0.0)
    seen = dict.fromkeys(FIELDS.values(), 0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = FIELDS.get(sample.name)
            if name is None:
                continue
            model = sample.labels.get("model_name")
            if served_name is not None and model is not None and model != served_name:
                continue
            out[name] += sample.value
            seen[name] += 1
    if not any(seen.values()):
        raise ValueError("no vLLM load metrics in the answer")
    # Several engine cores (data parallel): queues add up, usage is their mean.
    out["kv_cache_usage"] /= max(seen["kv_cache_usage"], 1)
    return out


class EngineLoadScraper(LoadView, Poller):
    """Scrapes every vLLM deployment's /metrics each `interval` seconds."""

    _task_name = "bastion-engine-load"

    def __init__(
        self,
        client: EngineClient,
        deployments: Iterable[Deployment],
        registry: CollectorRegistry,
        interval: float = 5.0,
    ):
        self._client = client
        self._deployments = [d for d in deployments if d.settings.kind == "vllm"]
        self._interval = interval
        self.loads: dict[str, EngineLoad] = {}
        self._queue = Gauge(
            "bastion_deployment_queue_depth",
            "Requests waiting in the engine's own queue (vllm:num_requests_waiting), by "
            "deployment, as last scraped.",
            ["deployment"],
            registry=registry,
        )
        self._kv = Gauge(
            "bastion_deployment_kv_cache_usage",
            "The engine's KV-cache usage, 0..1 (vllm:kv_cache_usage_perc), as last scraped.",
            ["deployment"],
            registry=registry,
        )

    def current(self, deployment: Deployment) -> EngineLoad | None:
        load = self.loads.get(deployment.name)
        if load is None or time.monotonic() - load.at > STALE_INTERVALS * self._interval:
            return None
        return load

    def load(self, deployment: Deployment) -> tuple[float, float]:
        load = self.current(deployment)
        if load is None:
            return (0.0, 0.0)
        return (load.queue_depth + load.running, load.kv_cache_usage)

    def row(self, deployment: Deployment) -> dict[str, Any]:
        """The fields `GET /admin/routing` shows for the deployment (None: not known)."""
        load = self.current(deployment)
        return {
            "queue_depth": load.queue_depth if load else None,
            "running": load.running if load else None,
            "kv_cache_usage": round(load.kv_cache_usage, 4) if load else None,
        }

    async def scrape(self, dep: Deployment) -> None:
        headers = (
            {"Authorization": f"Bearer {dep.settings.api_key}"} if dep.settings.api_key else {}
        )
        try:
            async with self._client.session.get(
                dep.settings.url + "/metrics",
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=min(2.0, self._interval)),
            ) as resp:
                if resp.status != 200:
                    return
                text = await resp.text()
            fields = parse_metrics(text, dep.settings.served_name)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.debug("metrics of %s not scraped: %s", dep.name, exc)
            return
        self.loads[dep.name] = EngineLoad(**fields, at=time.monotonic())
        self._queue.labels(dep.name).set(fields["queue_depth"])
        self._kv.labels(dep.name).set(fields["kv_cache_usage"])

    @property
    def _has_work(self) -> bool:
        return bool(self._deployments)

    async def poll(self) -> None:
        await asyncio.gather(*(self.scrape(d) for d in self._deployments))
