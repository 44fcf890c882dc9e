"""Counters in Redis: one Lua script per admission (one round trip), exact across replicas."""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from bastion.policy.counters import Check, Verdict

# KEYS: the counters. ARGV: now, request id, then per key: op (1 counter, 2 budget, 3 slots),
# limit, amount, ttl. All checks first, then all increments: all-or-nothing.
_ADMIT = """
local now = tonumber(ARGV[1])
local rid = ARGV[2]
local cur = {}
for i = 1, #KEYS do
  local b = 2 + (i - 1) * 4
  local op, limit, amount = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  local v
  if op == 3 then
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
    v = redis.call('ZCARD', KEYS[i])
  else
    v = redis.call('GET', KEYS[i])
    if not v then
      if op == 2 then return {-2, i - 1} end
      v = 0
    else
      v = tonumber(v)
    end
  end
  if v + amount > limit then return {-1, i - 1, v} end
  cur[i] = v
end
local out = {0}
for i = 1, #KEYS do
  local b = 2 + (i - 1) * 4
  local op, amount, ttl = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
  if op == 3 then
    redis.call('ZADD', KEYS[i], now + ttl, rid)
    redis.call('EXPIRE', KEYS[i], ttl)
  else
    redis.call('INCRBY', KEYS[i], amount)
    redis.call('EXPIRE', KEYS[i], ttl, 'NX')
  end
  out[i + 1] = cur[i] + amount
end
return out
"""
_OPS = {"counter": 1, "budget": 2, "slots": 3}


class RedisCounters:
    def __init__(self, url: str, timeout: float = 0.5):
        self._redis = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=30,
        )
        self._admit = self._redis.register_script(_ADMIT)

    async def admit(self, checks: list[Check], request_id: str) -> Verdict:
        args: list[str | int | float] = [time.time(), request_id]
        for c in checks:
            args += [_OPS[c.op], c.limit, c.amount, c.ttl]
        res = await self._admit(keys=[c.key for c in checks], args=args)
        if res[0] == 0:
            return Verdict(True, tuple(int(v) for v in res[1:]))
        if res[0] == -2:
            return Verdict(False, (), int(res[1]), needs_seed=True)
        return Verdict(False, (int(res[2]),), int(res[1]))

    async def adjust(self, items: list[tuple[Check, int]], request_id: str) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for c, delta in items:
                if c.op == "slots":
                    pipe.zrem(c.key, request_id)
                elif delta:
                    # Only where the window still exists: never resurrect an expired one.
                    pipe.eval(
                        "if redis.call('EXISTS', KEYS[1]) == 1 then "
                        "return redis.call('INCRBY', KEYS[1], ARGV[1]) end return 0",
                        1,
                        c.key,
                        delta,
                    )
            await pipe.execute()

    async def seed(self, key: str, value: int, ttl: int) -> None:
        await self._redis.set(key, value, ex=ttl, nx=True)

    async def peek(self, checks: list[Check]) -> list[int]:
        now = time.time()
        async with self._redis.pipeline(transaction=False) as pipe:
            for c in checks:
                if c.op == "slots":
                    pipe.zcount(c.key, now, "+inf")
                else:
                    pipe.get(c.key)
            values = await pipe.execute()
        return [int(v or 0) for v in values]

    async def close(self) -> None:
        await self._redis.aclose()
