"""Active health checks: each deployment's health endpoint, polled; feeds routing and /readyz."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from bastion.engines.client import EngineClient
from bastion.routing.balancer import Deployment
from bastion.routing.poller import Poller

log = logging.getLogger("bastion.routing")

#: Delay before a failed check of a healthy deployment is repeated to confirm it.
CONFIRM_SECONDS = 1.0


class HealthChecker(Poller):
    _task_name = "bastion-health"

    def __init__(
        self, client: EngineClient, deployments: Iterable[Deployment], interval: float = 5.0
    ):
        self._client = client
        self._deployments = list(deployments)
        self._interval = interval

    async def _check(self, deployments: list[Deployment]) -> list[bool]:
        return list(await asyncio.gather(*(self._client.healthy(d.settings) for d in deployments)))

    async def check_all(self) -> None:
        deps = self._deployments
        results = await self._check(deps)
        # One failed check on a healthy replica is confirmed by a second before it is marked
        # DOWN: a busy engine can miss one 2-second deadline, and DOWN moves its traffic (and
        # its cache affinity) away. A refused connection needs no check: it ejects at once.
        doubted = [
            i for i, (d, ok) in enumerate(zip(deps, results, strict=True)) if d.healthy and not ok
        ]
        if doubted:
            await asyncio.sleep(CONFIRM_SECONDS)
            for i, ok in zip(doubted, await self._check([deps[i] for i in doubted]), strict=True):
                results[i] = ok
        for dep, ok in zip(deps, results, strict=True):
            if dep.healthy is not ok:
                log.log(
                    logging.INFO if ok else logging.WARNING,
                    "deployment %s (%s) is %s",
                    dep.name,
                    dep.settings.display_url,
                    "up" if ok else "DOWN",
                )
            dep.checked(ok)

    async def poll(self) -> None:
        await self.check_all()
