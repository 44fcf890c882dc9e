"""Counter backends: every limit check of one request, checked and applied atomically.

A request's `Check`s (one per limit at every level that applies) are evaluated all-or-nothing:
either every counter has room and all are incremented together, or nothing changes and the
first full one is reported. `MemoryCounters` does this in one process; `RedisCounters`
(redis_counters.py) in one Lua script, so N gateway replicas share exact counts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal, Protocol

#: counter: a number that expires with its window (rpm, tpm);
#: budget: the same, but it must be seeded from the usage records when absent;
#: slots: requests in flight, each a lease that expires if its gateway died.
Op = Literal["counter", "budget", "slots"]
Kind = Literal["rpm", "tpm", "concurrent", "budget_day", "budget_month"]
SLOT_LEASE_SECONDS = 900


@dataclass(frozen=True, slots=True)
class Check:
    level: str  # what the client is told: "team 'alpha'"
    kind: Kind
    key: str
    op: Op
    limit: int
    amount: int
    ttl: int
    reset_at: float  # epoch seconds when this window or period starts afresh


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    #: ok: each check's value after this request; refused: the value that was too high.
    values: tuple[int, ...]
    #: The first check that refused, or the first budget counter that needs seeding.
    index: int = -1
    needs_seed: bool = False


class CounterBackend(Protocol):
    async def admit(self, checks: list[Check], request_id: str) -> Verdict: ...

    async def adjust(self, items: list[tuple[Check, int, str]]) -> None:
        """Applies corrections after responses (actual minus reserved) and frees slots:
        (check, delta, request id) for any number of requests."""
        ...

    async def seed(self, key: str, value: int, ttl: int) -> None:
        """Sets a budget counter's starting value unless another replica already did."""
        ...

    async def peek(self, checks: list[Check]) -> list[int]:
        """Current values without changing anything (for `limits status`)."""
        ...

    async def close(self) -> None: ...


class MemoryCounters:
    """One process's counters. Single-threaded use from the event loop: no locks needed."""

    def __init__(self) -> None:
        self._values: dict[str, tuple[int, float]] = {}  # key -> (value, expires_at)
        self._slots: dict[str, dict[str, float]] = {}  # key -> {request_id: lease_end}

    def _get(self, check: Check, now: float) -> int | None:
        if check.op == "slots":
            leases = self._slots.get(check.key, {})
            if len(leases) + check.amount > check.limit:  # full: drop leases of lost requests
                for rid in [r for r, end in leases.items() if end <= now]:
                    del leases[rid]
            return len(leases)
        value = self._values.get(check.key)
        if value is None or value[1] <= now:
            return None
        return value[0]

    async def admit(self, checks: list[Check], request_id: str) -> Verdict:
        now = time.time()
        current = []
        for i, c in enumerate(checks):
            v = self._get(c, now)
            if v is None:
                if c.op == "budget":
                    return Verdict(False, (), i, needs_seed=True)
                v = 0
            if v + c.amount > c.limit:
                return Verdict(False, (v,), i)
            current.append(v)
        for c, v in zip(checks, current, strict=True):
            if c.op == "slots":
                self._slots.setdefault(c.key, {})[request_id] = now + c.ttl
            else:
                self._values[c.key] = (v + c.amount, now + c.ttl)
        return Verdict(True, tuple(v + c.amount for c, v in zip(checks, current, strict=True)))

    async def adjust(self, items: list[tuple[Check, int, str]]) -> None:
        self.apply(items)

    def apply(self, items: list[tuple[Check, int, str]]) -> None:
        now = time.time()
        for c, delta, request_id in items:
            if c.op == "slots":
                self._slots.get(c.key, {}).pop(request_id, None)
            elif (value := self._values.get(c.key)) is not None and value[1] > now:
                self._values[c.key] = (value[0] + delta, value[1])

    async def seed(self, key: str, value: int, ttl: int) -> None:
        now = time.time()
        current = self._values.get(key)
        if current is None or current[1] <= now:
            self._values[key] = (value, now + ttl)

    async def peek(self, checks: list[Check]) -> list[int]:
        now = time.time()
        return [self._get(c, now) or 0 for c in checks]

    async def close(self) -> None:
        return None
