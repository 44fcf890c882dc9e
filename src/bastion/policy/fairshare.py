"""Fair share of saturated engines: when every slot of a model's deployments is busy, waiting
requests queue per team and are admitted by weighted fair queuing (team weights from config).

Each team has a virtual time that advances by 1/weight per admitted request; the next free
slot goes to the waiting team with the smallest virtual time. A team that floods the queue
therefore only delays itself: another team's request waits for at most about one slot turn
per unit of its weight. Per gateway process (each replica shares its own engine slots).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque

from bastion.gateway.errors import UpstreamUnavailable


class QueueTimeout(UpstreamUnavailable):
    default_code = "queue_timeout"


class FairQueue:
    def __init__(self, capacity: int, timeout: float):
        self.capacity = capacity
        self.timeout = timeout
        self.in_use = 0
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {}
        self._vtime: dict[str, float] = {}
        self._weights: dict[str, float] = {}

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    def _floor(self) -> float:
        """A team that was idle starts at the busiest teams' level: no credit for idling."""
        active = [self._vtime[t] for t, q in self._waiting.items() if q]
        return min(active) if active else max(self._vtime.values(), default=0.0)

    async def acquire(self, team: str, weight: float) -> None:
        self._weights[team] = weight
        if self.in_use < self.capacity and not self.queued:
            self._vtime[team] = max(self._vtime.get(team, 0.0), self._floor()) + 1.0 / weight
            self.in_use += 1
            return
        queue = self._waiting.setdefault(team, deque())
        if not queue:
            self._vtime[team] = max(self._vtime.get(team, 0.0), self._floor())
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append(fut)
        try:
            async with asyncio.timeout(self.timeout):
                await fut
        except BaseException as exc:  # timeout, or the client went away while waiting
            if fut.done() and not fut.cancelled():
                self.release()  # granted at the last instant: hand the slot on
            else:
                fut.cancel()
                with contextlib.suppress(ValueError):
                    queue.remove(fut)
            if isinstance(exc, TimeoutError):
                raise QueueTimeout(
                    f"All engines for this model are busy; the request waited "
                    f"{self.timeout:g}s for a slot.",
                    headers={"retry-after": str(max(1, math.ceil(self.timeout / 4)))},
                ) from None
            raise

    def release(self) -> None:
        self.in_use -= 1
        while self.in_use < self.capacity:
            ready = [(self._vtime[t], t) for t, q in self._waiting.items() if q]
            if not ready:
                return
            _vt, team = min(ready)
            fut = self._waiting[team].popleft()
            if fut.cancelled():
                continue
            self._vtime[team] += 1.0 / self._weights[team]
            self.in_use += 1
            fut.set_result(None)
