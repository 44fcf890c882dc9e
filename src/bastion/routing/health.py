"""Active health checks: each deployment's health endpoint, polled; feeds routing and /readyz."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable

from bastion.engines.client import EngineClient
from bastion.routing.balancer import Deployment

log = logging.getLogger("bastion.routing")


class HealthChecker:
    def __init__(
        self, client: EngineClient, deployments: Iterable[Deployment], interval: float = 5.0
    ):
        self._client = client
        self._deployments = list(deployments)
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    async def check_all(self) -> None:
        results = await asyncio.gather(
            *(self._client.healthy(d.settings) for d in self._deployments)
        )
        for dep, ok in zip(self._deployments, results, strict=True):
            if dep.healthy is not ok:
                log.log(
                    logging.INFO if ok else logging.WARNING,
                    "deployment %s (%s) is %s",
                    dep.name,
                    dep.settings.display_url,
                    "up" if ok else "DOWN",
                )
            dep.healthy = ok
            if ok:
                dep.ejected_until = 0.0

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="bastion-health")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            try:
                await self.check_all()
            except Exception:
                log.exception("health check round failed")
            await asyncio.sleep(self._interval)
