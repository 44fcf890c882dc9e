"""Counter backends: every limit check of one request, checked and applied atomically.

A request's `Check`s (one per limit at every level that applies) are evaluated all-or-nothing:
either every counter has room and all are incremented together, or nothing changes and the
first full one is reported. `MemoryCounters` does this in one process; `RedisCounters`
(redis_counters.py) in one Lua script, so N gateway replicas share exact counts.

rpm and tpm are sliding windows kept as a log: one entry (time, request id, amount) per
admitted request, dropped `ttl` seconds after it was admitted. A request fits when the entries
of the last `ttl` seconds plus its own amount stay within the limit, so no `ttl`-long interval
(wherever it starts) ever holds more than the limit. A settlement corrects the request's own
entry, so refunds land where they were charged and nothing that already left the window comes
back.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

#: window: a sliding-window log (rpm, tpm), `ttl` is the window's length;
#: budget: a number for its period, seeded from the usage records when absent;
#: slots: requests in flight, each a lease that expires if its gateway died.
Op = Literal["window", "budget", "slots"]
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
    currency: str | None = None  # a budget's: only amounts in it count


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    #: ok: each check's value after this request; refused: the value that was too high.
    values: tuple[int, ...]
    #: The first check that refused, or the first budget counter that needs seeding.
    index: int = -1
    needs_seed: bool = False
    #: A refused window: seconds until enough of its entries leave it for this request to fit
    #: (the window's length when the request could never fit), and until it is empty.
    retry_after: float | None = None
    empty_after: float | None = None


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


@dataclass(slots=True)
class _Entry:
    at: float
    request_id: str
    amount: int


@dataclass(slots=True)
class _Window:
    entries: deque[_Entry] = field(default_factory=deque)
    by_request: dict[str, _Entry] = field(default_factory=dict)
    total: int = 0

    def prune(self, edge: float) -> int:
        """Drops the entries admitted at or before `edge`; returns what the rest hold."""
        while self.entries and self.entries[0].at <= edge:
            gone = self.entries.popleft()
            self.total -= gone.amount
            self.by_request.pop(gone.request_id, None)
        return self.total

    def waits(self, check: Check, value: int, now: float) -> tuple[float, float]:
        """(seconds until `check.amount` fits, seconds until empty) of a full window."""
        empty = self.entries[-1].at + check.ttl - now if self.entries else 0.0
        if check.amount > check.limit:
            return float(check.ttl), empty
        need, freed = value + check.amount - check.limit, 0
        for e in self.entries:
            freed += e.amount
            if freed >= need:
                return e.at + check.ttl - now, empty
        return empty, empty


class MemoryCounters:
    """One process's counters. Single-threaded use from the event loop: no locks needed."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._values: dict[str, tuple[int, float]] = {}  # key -> (value, expires_at)
        self._windows: dict[str, _Window] = {}
        self._slots: dict[str, dict[str, float]] = {}  # key -> {request_id: lease_end}

    def _get(self, check: Check, now: float) -> int | None:
        if check.op == "slots":
            leases = self._slots.get(check.key, {})
            if len(leases) + check.amount > check.limit:  # full: drop leases of lost requests
                for rid in [r for r, end in leases.items() if end <= now]:
                    del leases[rid]
            return len(leases)
        if check.op == "window":
            window = self._windows.get(check.key)
            if window is None:
                return 0
            value = window.prune(now - check.ttl)
            if not window.entries:
                del self._windows[check.key]
            return value
        value = self._values.get(check.key)
        if value is None or value[1] <= now:
            return None
        return value[0]

    async def admit(self, checks: list[Check], request_id: str) -> Verdict:
        now = self._clock()
        current = []
        for i, c in enumerate(checks):
            v = self._get(c, now)
            if v is None:  # only a budget counter is ever absent
                return Verdict(False, (), i, needs_seed=True)
            if v + c.amount > c.limit:
                if c.op != "window":
                    return Verdict(False, (v,), i)
                retry, empty = self._windows.get(c.key, _Window()).waits(c, v, now)
                return Verdict(False, (v,), i, retry_after=retry, empty_after=empty)
            current.append(v)
        for c, v in zip(checks, current, strict=True):
            if c.op == "slots":
                self._slots.setdefault(c.key, {})[request_id] = now + c.ttl
            elif c.op == "window":
                window = self._windows.setdefault(c.key, _Window())
                entry = _Entry(now, request_id, c.amount)
                window.entries.append(entry)
                window.by_request[request_id] = entry
                window.total += c.amount
            else:
                self._values[c.key] = (v + c.amount, now + c.ttl)
        return Verdict(True, tuple(v + c.amount for c, v in zip(checks, current, strict=True)))

    async def adjust(self, items: list[tuple[Check, int, str]]) -> None:
        self.apply(items)

    def apply(self, items: list[tuple[Check, int, str]]) -> None:
        now = self._clock()
        for c, delta, request_id in items:
            if c.op == "slots":
                self._slots.get(c.key, {}).pop(request_id, None)
            elif c.op == "window":
                window = self._windows.get(c.key)
                entry = window.by_request.get(request_id) if window else None
                if window is not None and entry is not None and entry.at > now - c.ttl:
                    entry.amount += delta
                    window.total += delta
            elif (value := self._values.get(c.key)) is not None and value[1] > now:
                self._values[c.key] = (value[0] + delta, value[1])

    async def seed(self, key: str, value: int, ttl: int) -> None:
        now = self._clock()
        current = self._values.get(key)
        if current is None or current[1] <= now:
            self._values[key] = (value, now + ttl)

    async def peek(self, checks: list[Check]) -> list[int]:
        now = self._clock()
        return [self._get(c, now) or 0 for c in checks]

    async def close(self) -> None:
        return None
