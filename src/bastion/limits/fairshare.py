"""Fair share of saturated engines: when every slot of a model's deployments is busy, waiting
requests queue per team and are admitted by weighted fair queuing (team weights from config).

Start-time fair queuing: each team's requests carry start tags that advance by 1/weight per
admitted request, and a team that was idle rejoins at the current virtual time (no credit for
idling). The next free slot goes to the smallest start tag. A team that floods the queue
therefore only delays itself: a light team's request is next in line as soon as it arrives.
Per gateway process (each replica shares out its own view of the engine slots).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
from collections import deque

from bastion.core.errors import QueueTimeout


class FairQueue:
    """Start-time fair queuing over one model's engine slots."""

    def __init__(self, capacity: int, timeout: float):
        self.capacity = capacity
        self.timeout = timeout
        self.in_use = 0
        self._waiting: dict[str, deque[tuple[int, asyncio.Future[None]]]] = {}
        self._next: dict[str, float] = {}  # each team's next start tag
        self._weights: dict[str, float] = {}
        self._clock = 0.0  # start tag of the request granted last
        self._arrivals = itertools.count()

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    def _grant(self, team: str) -> None:
        self._clock = self._next[team]
        self._next[team] += 1.0 / self._weights[team]
        self.in_use += 1

    async def acquire(self, team: str, weight: float) -> None:
        self._weights[team] = weight
        queue = self._waiting.setdefault(team, deque())
        if not queue:  # (re)joining: no credit for time spent idle
            self._next[team] = max(self._next.get(team, 0.0), self._clock)
        if self.in_use < self.capacity and not self.queued:
            self._grant(team)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (next(self._arrivals), fut)
        queue.append(entry)
        try:
            async with asyncio.timeout(self.timeout):
                await fut
        except BaseException as exc:  # timeout, or the client went away while waiting
            if fut.done() and not fut.cancelled():
                self.release()  # granted at the last instant: hand the slot on
            else:
                fut.cancel()
                with contextlib.suppress(ValueError):
                    queue.remove(entry)
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
            # Ties go to the team with less waiting (the light one), then to the oldest request.
            ready = [(self._next[t], len(q), q[0][0], t) for t, q in self._waiting.items() if q]
            if not ready:
                return
            *_order, team = min(ready)
            _seq, fut = self._waiting[team].popleft()
            if fut.cancelled():
                continue
            self._grant(team)
            fut.set_result(None)
