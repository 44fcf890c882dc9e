"""Redis Cluster runs a Lua script only over keys of one hash slot: every counter one admission
touches (and the `|a` hash each window derives in the script) shares the slot, and the
behaviour on the single Redis node is what it was."""

from __future__ import annotations

import asyncio
import secrets

import redis
from redis.crc import key_slot

from bastion.core.settings import LimitSettings
from bastion.limits.levels import Level, Plan, checks_for
from bastion.limits.redis_counters import HASH_TAG, RedisCounters, redis_key
from tests.conftest import REDIS_URL

FULL = LimitSettings(rpm=5, tpm=1000, concurrent=2, budget_day="1", budget_month="10")


def _levels(tag: str) -> list[Level]:
    """Every level an admission can check, with names a bank might use ({, }, | included)."""
    return [
        Level("key", f"k{tag}", "key", FULL),
        Level("user", f"jane.{{doe}}@bank{tag}", "user", FULL),
        Level("team", f"payments-{tag}", "team", FULL),
        Level("cost_center", f"cc-{tag}", "cost center", FULL),
        Level("model", f"gpt-{tag}", "model", FULL),
        Level("team_model", f"payments-{tag}|gpt-{tag}", "team on model", FULL),
    ]


def test_every_counter_of_an_admission_is_in_one_slot() -> None:
    slots = set()
    for tag in ("a", "b", "zz9"):
        checks = checks_for(Plan.compile(_levels(tag), "EUR"), 100, 5_000)
        assert len(checks) == 6 * 5
        for c in checks:
            slots.add(key_slot(redis_key(c.key).encode()))
            slots.add(key_slot((redis_key(c.key) + "|a").encode()))  # the window's hash
    slots.add(key_slot(redis_key("login|user:jane").encode()))  # the shared sign-in throttle
    assert slots == {key_slot(HASH_TAG.encode())}
    # Without the tag the same counters would spread over many slots (CROSSSLOT on Cluster).
    untagged = {
        key_slot(c.key.encode()) for c in checks_for(Plan.compile(_levels("a"), "EUR"), 1, 1)
    }
    assert len(untagged) > 1


def test_the_real_redis_keeps_its_counters_under_the_tag() -> None:
    tag = secrets.token_hex(4)
    checks = checks_for(Plan.compile(_levels(tag), "EUR"), 100, 5_000)

    async def scenario() -> list[int]:
        backend = RedisCounters(REDIS_URL)
        for c in checks:  # budgets are seeded from the database first, as admission does
            if c.op == "budget":
                await backend.seed(c.key, 0, c.ttl)
        verdict = await backend.admit(checks, "r1")
        assert verdict.ok, verdict
        assert (await backend.admit(checks, "r2")).ok
        assert not (await backend.admit(checks, "r3")).ok  # concurrent: 2
        values = await backend.peek(checks)
        await backend.close()
        return values

    values = asyncio.run(scenario())
    by_kind = {c.kind: v for c, v in zip(checks, values, strict=True)}
    assert by_kind["rpm"] == 2 and by_kind["tpm"] == 200 and by_kind["concurrent"] == 2
    assert by_kind["budget_day"] == 10_000  # micro-units, refused r3 not charged
    client = redis.Redis.from_url(REDIS_URL)
    try:
        stored = {k.decode() for k in client.scan_iter(match=f"*{tag}*")}
        assert stored and all(k.startswith(HASH_TAG) for k in stored)
        assert {key_slot(k.encode()) for k in stored} == {key_slot(HASH_TAG.encode())}
        assert any(k.endswith("|a") for k in stored)  # the windows' hashes, same slot
    finally:
        client.close()
