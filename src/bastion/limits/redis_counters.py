"""Counters in Redis: one Lua script per admission (one round trip), exact across replicas."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.connection import Connection

from bastion.limits.counters import Check, Verdict

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
# Corrections apply only where the window still exists: never resurrect an expired one.
_INCR_EXISTING = """
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('INCRBY', KEYS[1], ARGV[1]) end
return 0
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
        self._incr_existing = self._redis.register_script(_INCR_EXISTING)
        # Admissions (and settlements) that arrive in the same event-loop turn go out as one
        # pipeline on a dedicated connection: one round trip for all of them, each script
        # still atomic. redis-py's pool costs more per call than the round trip itself.
        self._batch: list[tuple[list[object], asyncio.Future[Any]]] = []
        self._sending = False
        self._sender: asyncio.Task[None] | None = None
        self._conn: Connection | None = None

    async def admit(self, checks: list[Check], request_id: str) -> Verdict:
        args: list[object] = ["EVALSHA", self._admit.sha, len(checks)]
        args += [c.key for c in checks]
        args += [time.time(), request_id]
        for c in checks:
            args += [_OPS[c.op], c.limit, c.amount, c.ttl]
        res = await self._call(args)
        if res[0] == 0:
            return Verdict(True, tuple(int(v) for v in res[1:]))
        if res[0] == -2:
            return Verdict(False, (), int(res[1]), needs_seed=True)
        return Verdict(False, (int(res[2]),), int(res[1]))

    def _call(self, command: list[object]) -> asyncio.Future[Any]:
        """Queues one command for the next pipeline on the dedicated connection."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._batch.append((command, fut))
        if not self._sending:
            self._sending = True
            self._sender = loop.create_task(self._send())
        return fut

    async def _connection(self) -> Connection:
        if self._conn is None:
            conn = self._redis.connection_pool.make_connection()
            await conn.connect()
            for script in (_ADMIT, _INCR_EXISTING):
                await conn.send_command("SCRIPT", "LOAD", script)
                await conn.read_response()
            self._conn = conn
        return self._conn

    async def _send(self) -> None:
        try:
            while self._batch:
                batch, self._batch = self._batch, []
                try:
                    conn = await self._connection()
                    await conn.send_packed_command(conn.pack_commands([a for a, _f in batch]))
                    replies = []
                    for _ in batch:
                        try:
                            replies.append(await conn.read_response())
                        except redis.exceptions.ResponseError as exc:
                            replies.append(exc)
                except BaseException as exc:
                    await self._drop_connection()
                    for _args, fut in batch:
                        if not fut.done():
                            fut.set_exception(_as_backend_error(exc))
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for (_args, fut), reply in zip(batch, replies, strict=True):
                    if fut.done():
                        continue
                    if isinstance(reply, Exception):
                        fut.set_exception(reply)
                    else:
                        fut.set_result(reply)
        finally:
            self._sending = False

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.disconnect()

    async def adjust(self, items: list[tuple[Check, int, str]]) -> None:
        commands: list[list[object]] = []
        for c, delta, request_id in items:
            if c.op == "slots":
                commands.append(["ZREM", c.key, request_id])
            elif delta:
                commands.append(["EVALSHA", self._incr_existing.sha, 1, c.key, delta])
        await asyncio.gather(*(self._call(cmd) for cmd in commands))

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
        await self._drop_connection()
        await self._redis.aclose()


def _as_backend_error(exc: BaseException) -> Exception:
    """Whatever broke the connection surfaces as a Redis error (the policy's failure mode)."""
    if isinstance(exc, redis.exceptions.RedisError | OSError | TimeoutError):
        return exc
    return redis.exceptions.ConnectionError(f"{type(exc).__name__}: {exc}")
