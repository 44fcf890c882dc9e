"""Both counter backends implement the same all-or-nothing semantics."""

from __future__ import annotations

import asyncio
import secrets
import time

import pytest

from bastion.core.settings import LimitSettings
from bastion.limits.counters import Check, CounterBackend, MemoryCounters
from bastion.limits.levels import Level, Plan, checks_for
from bastion.limits.redis_counters import RedisCounters
from tests.conftest import REDIS_URL, RedisServer


def _check(kind: str, key: str, limit: int, amount: int, op: str = "window") -> Check:
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


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_sliding_window_refuses_the_boundary_burst(kind: str) -> None:
    """A full minute's allowance at xx:59.9 and again at xx:00.1 (2x within 0.2 s with fixed
    calendar minutes) is refused: no 60 s interval admits more than the limit, and the
    retry-after the refusal gives is when room really returns."""
    team = "boundary-" + secrets.token_hex(4)
    levels = [Level("team", team, f"team '{team}'", LimitSettings(rpm=5, tpm=100))]
    plan = Plan.compile(levels, "USD")
    start = 60 * 29_000_000 + 59.9  # 0.1 s before a calendar minute ends
    clock = Clock(start)

    async def scenario() -> None:
        backend = (
            MemoryCounters(clock) if kind == "memory" else RedisCounters(REDIS_URL, clock=clock)
        )

        async def admit(tokens: int, rid: str):  # type: ignore[no-untyped-def]
            return await backend.admit(checks_for(plan, tokens, 0, clock.now), rid)

        for i in range(5):
            assert (await admit(10, f"a{i}")).ok
        clock.now = start + 0.2  # the next calendar minute
        late = await admit(10, "b0")
        assert not late.ok and late.index == 0 and late.values == (5,)
        assert late.retry_after == pytest.approx(59.8, abs=0.01)
        assert late.empty_after == pytest.approx(59.8, abs=0.01)
        clock.now = start + 59.99
        assert not (await admit(10, "b1")).ok
        clock.now = start + 60.0  # the first five have left the window
        assert (await admit(10, "b2")).values == (1, 10)

        # tpm: a refund corrects the request's own entry, so it leaves the window with the
        # amount actually used.
        rpm, tpm = checks_for(plan, 60, 0, clock.now)
        await backend.adjust([(tpm, -4, "b2")])  # b2 used 6 of its 10
        clock.now += 1
        assert (await admit(90, "c0")).values == (2, 96)
        clock.now += 1
        refused = await admit(10, "c1")  # 96 + 10 > 100: 6 must leave, b2 leaves first
        assert not refused.ok and refused.index == 1 and refused.values == (96,)
        assert refused.retry_after == pytest.approx(58.0, abs=0.01)
        assert refused.empty_after == pytest.approx(59.0, abs=0.01)
        never = await admit(101, "c2")  # more than the window holds: never fits
        assert not never.ok and never.retry_after == 60
        clock.now = start + 120.0  # b2 gone with its 6 tokens, c0's 90 remain
        assert await backend.peek([rpm, tpm]) == [1, 90]
        await backend.close()

    asyncio.run(scenario())


def test_one_settlement_of_many_requests(kind: str) -> None:
    """Settlements of many requests at once (split into several script calls in Redis): each
    request's own window entry, slot and budget are corrected, and nothing else."""
    p = "test:" + secrets.token_hex(4)

    async def scenario() -> None:
        backend = make(kind)
        n = 700  # > RedisCounters.SETTLE_CHUNK / 3 requests' worth of counters
        tpm = _check("tpm", f"{p}:tpm", 10**9, 10)
        slots = _check("concurrent", f"{p}:inflight", 10**6, 1, "slots")
        budget = _check("budget_day", f"{p}:budget", 10**9, 5, "budget")
        await backend.seed(budget.key, 0, 60)
        for i in range(n):
            assert (await backend.admit([tpm, slots, budget], f"r{i}")).ok
        assert await backend.peek([tpm, slots, budget]) == [10 * n, n, 5 * n]
        items = []
        for i in range(n - 1):  # the last request is still in flight
            items += [(tpm, -3, f"r{i}"), (slots, -1, f"r{i}"), (budget, 2, f"r{i}")]
        items.append((tpm, 4, "gone"))  # a request no longer in the window: nothing to correct
        await backend.adjust(items)
        assert await backend.peek([tpm, slots, budget]) == [7 * (n - 1) + 10, 1, 7 * (n - 1) + 5]
        await backend.close()

    asyncio.run(scenario())


def test_a_redis_that_stops_answering_times_out_and_is_reconnected(
    private_redis: RedisServer,
) -> None:
    """One deadline covers a whole pipeline: a Redis that hangs (not closed: SIGSTOP) fails
    the waiting admissions within it, and the next call connects afresh."""
    import os
    import signal

    import redis.exceptions

    async def scenario() -> None:
        backend = RedisCounters(private_redis.url, timeout=0.3)
        rpm = _check("rpm", "test:hang:rpm", 100, 1)
        assert (await backend.admit([rpm], "a")).ok
        assert private_redis.proc is not None
        os.kill(private_redis.proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(redis.exceptions.TimeoutError, match=r"within 0\.3s"):
                await asyncio.gather(backend.admit([rpm], "b"), backend.admit([rpm], "c"))
            assert time.monotonic() - started < 2
        finally:
            os.kill(private_redis.proc.pid, signal.SIGCONT)
        assert (await backend.admit([rpm], "d")).ok
        await backend.close()

    asyncio.run(scenario())
