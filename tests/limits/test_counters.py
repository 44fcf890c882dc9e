"""Both counter backends implement the same all-or-nothing semantics."""

from __future__ import annotations

import asyncio
import secrets
import time

import pytest

from bastion.limits.counters import Check, CounterBackend, MemoryCounters
from bastion.limits.redis_counters import RedisCounters
from tests.conftest import REDIS_URL


def _check(kind: str, key: str, limit: int, amount: int, op: str = "counter") -> Check:
    return Check("team 't'", kind, key, op, limit, amount, 60, time.time() + 60)  # type: ignore[arg-type]


@pytest.fixture(params=["memory", "redis"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


def make(kind: str) -> CounterBackend:
    """Built inside the test's event loop (a Redis client belongs to one loop)."""
    return MemoryCounters() if kind == "memory" else RedisCounters(REDIS_URL)


def test_all_or_nothing(kind: str) -> None:
    p = "test:" + secrets.token_hex(4)

    async def scenario() -> None:
        backend = make(kind)
        rpm, tpm = _check("rpm", f"{p}:rpm", 3, 1), _check("tpm", f"{p}:tpm", 100, 40)
        assert (await backend.admit([rpm, tpm], "r1")).values == (1, 40)
        assert (await backend.admit([rpm, tpm], "r2")).values == (2, 80)
        refused = await backend.admit([rpm, tpm], "r3")  # tpm would be 120 > 100
        assert not refused.ok and refused.index == 1 and refused.values == (80,)
        assert await backend.peek([rpm, tpm]) == [2, 80]  # the rpm was not charged either
        await backend.adjust([(tpm, -30, "r1")])  # the answer was shorter than reserved
        assert (await backend.admit([rpm, tpm], "r3")).values == (3, 90)
        assert not (await backend.admit([rpm], "r4")).ok  # 4th request in the minute
        await backend.close()

    asyncio.run(scenario())


def test_slots_and_budget_seeding(kind: str) -> None:
    p = "test:" + secrets.token_hex(4)

    async def scenario() -> None:
        backend = make(kind)
        slots = _check("concurrent", f"{p}:inflight", 2, 1, "slots")
        assert (await backend.admit([slots], "a")).ok
        assert (await backend.admit([slots], "b")).ok
        assert not (await backend.admit([slots], "c")).ok
        await backend.adjust([(slots, -1, "a")])  # a finished
        assert (await backend.admit([slots], "c")).ok
        budget = _check("budget_day", f"{p}:budget", 1000, 300, "budget")
        first = await backend.admit([budget], "x")
        assert not first.ok and first.needs_seed
        await backend.seed(budget.key, 600, 60)
        await backend.seed(budget.key, 0, 60)  # a second seeder does not overwrite
        assert (await backend.admit([budget], "x")).values == (900,)
        assert not (await backend.admit([budget], "y")).ok
        await backend.close()

    asyncio.run(scenario())
