"""Counters in Redis: one Lua script per admission (one round trip), exact across replicas.

Every key is stored under the hash tag `{bastion}`, so all of them hash to one slot: a Lua
script may only touch keys of one slot on Redis Cluster, and one request's checks (key, user,
team, cost center, model, team-on-model) share counters with other requests through every
level, so no finer tag keeps each admission's keys together. The counters are small and an
admission is one script call, so one primary carries them easily (docs/deploy.md)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import hiredis
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.connection import Connection

from bastion.limits.counters import Check, Verdict

# A sliding window (rpm, tpm) is a sorted set KEY (request id scored by admission time) and a
# hash KEY..'|a' (request id -> amount, '#sum' -> their total). Entries at or before the edge
# are dropped in chunks (Lua's unpack has a stack limit), each once: O(1) amortized.
_WINDOW = """
local function prune(key, edge)
  local hkey = key .. '|a'
  while true do
    local gone = redis.call('ZRANGEBYSCORE', key, '-inf', edge, 'LIMIT', 0, 500)
    if #gone == 0 then break end
    local amounts = redis.call('HMGET', hkey, unpack(gone))
    local s = 0
    for j = 1, #amounts do s = s + (tonumber(amounts[j]) or 0) end
    redis.call('HINCRBY', hkey, '#sum', -s)
    redis.call('HDEL', hkey, unpack(gone))
    redis.call('ZREM', key, unpack(gone))
  end
  return tonumber(redis.call('HGET', hkey, '#sum') or '0')
end
local function clock()
  local n = tonumber(ARGV[1])
  if n then return n end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
"""
# KEYS: the counters. ARGV: now ('' = the Redis server's clock, one clock for all replicas),
# request id, then per key: op (1 window, 2 budget, 3 slots), limit, amount, ttl. All checks
# first, then all increments: all-or-nothing. A refused window also answers, in milliseconds,
# when this request would fit and when the window will be empty (see counters.py).
_ADMIT = (
    _WINDOW
    + """
local now = clock()
local rid = ARGV[2]
local cur = {}
for i = 1, #KEYS do
  local b = 2 + (i - 1) * 4
  local op, limit = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2])
  local amount, ttl = tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
  local v
  if op == 3 then
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
    v = redis.call('ZCARD', KEYS[i])
  elseif op == 1 then
    v = prune(KEYS[i], now - ttl)
  else
    v = redis.call('GET', KEYS[i])
    if not v then
      if op == 2 then return {-2, i - 1} end
      v = 0
    else
      v = tonumber(v)
    end
  end
  if v + amount > limit then
    if op ~= 1 then return {-1, i - 1, v} end
    local last = redis.call('ZRANGE', KEYS[i], -1, -1, 'WITHSCORES')
    local empty = 0
    if #last > 0 then empty = tonumber(last[2]) + ttl - now end
    local retry = empty
    if amount > limit then
      retry = ttl
    else
      local need, freed, start, found = v + amount - limit, 0, 0, false
      while not found do
        local page = redis.call('ZRANGE', KEYS[i], start, start + 99, 'WITHSCORES')
        if #page == 0 then break end
        local ids = {}
        for j = 1, #page, 2 do ids[#ids + 1] = page[j] end
        local amounts = redis.call('HMGET', KEYS[i] .. '|a', unpack(ids))
        for j = 1, #ids do
          freed = freed + (tonumber(amounts[j]) or 0)
          if freed >= need then
            retry, found = tonumber(page[2 * j]) + ttl - now, true
            break
          end
        end
        start = start + 100
      end
    end
    return {-1, i - 1, v, math.floor(retry * 1000), math.floor(empty * 1000)}
  end
  cur[i] = v
end
local out = {0}
for i = 1, #KEYS do
  local b = 2 + (i - 1) * 4
  local op, amount, ttl = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
  if op == 3 then
    redis.call('ZADD', KEYS[i], now + ttl, rid)
    redis.call('EXPIRE', KEYS[i], ttl)
  elseif op == 1 then
    local hkey = KEYS[i] .. '|a'
    redis.call('ZADD', KEYS[i], now, rid)
    redis.call('HSET', hkey, rid, amount)
    redis.call('HINCRBY', hkey, '#sum', amount)
    redis.call('EXPIRE', KEYS[i], ttl + 1)
    redis.call('EXPIRE', hkey, ttl + 1)
  else
    redis.call('INCRBY', KEYS[i], amount)
    redis.call('EXPIRE', KEYS[i], ttl, 'NX')
  end
  out[i + 1] = cur[i] + amount
end
return out
"""
)
# Settlements, many requests' at once (one reply instead of one per counter). KEYS: the
# counters; ARGV: per key op ('w' window, 'z' slots, 'i' budget), request id, delta. A window
# corrects the request's own entry if it is still there; a budget only where it still exists
# (never resurrect an expired one); slots free the request's.
_SETTLE = """
for i = 1, #KEYS do
  local b = (i - 1) * 3
  local op, rid, delta = ARGV[b + 1], ARGV[b + 2], ARGV[b + 3]
  if op == 'z' then
    redis.call('ZREM', KEYS[i], rid)
  elseif op == 'w' then
    local hkey = KEYS[i] .. '|a'
    if redis.call('HEXISTS', hkey, rid) == 1 then
      redis.call('HINCRBY', hkey, rid, delta)
      redis.call('HINCRBY', hkey, '#sum', delta)
    end
  elseif redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('INCRBY', KEYS[i], delta)
  end
end
return #KEYS
"""
# What `limits status` shows: the window's total now (dropping what has left it changes no
# outcome, so the read may prune).
_PEEK_WINDOW = _WINDOW + "return prune(KEYS[1], clock() - tonumber(ARGV[2]))"
_OPS = {"window": 1, "budget": 2, "slots": 3}
#: Prefixed to every key (the window's `|a` hash derives from its key, so it follows).
HASH_TAG = "{bastion}"


def redis_key(key: str) -> str:
    """The Redis key of a counter: in the one hash slot all counters share."""
    return HASH_TAG + key


class RedisCounters:
    def __init__(
        self, url: str, timeout: float = 0.5, clock: Callable[[], float] | None = None
    ) -> None:
        # None: windows and leases run on the Redis server's clock, the same for every
        # replica whatever their own clocks say (tests pass one to move time).
        self._clock = clock
        self._timeout = timeout
        self._redis = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=30,
        )
        self._admit = self._redis.register_script(_ADMIT)
        self._settle = self._redis.register_script(_SETTLE)
        self._peek_window = self._redis.register_script(_PEEK_WINDOW)
        # Admissions (and settlements) that arrive in the same event-loop turn go out as one
        # pipeline on a dedicated connection: one round trip for all of them, each script
        # still atomic. redis-py's pool costs more per call than the round trip itself.
        self._batch: list[tuple[list[object], asyncio.Future[Any]]] = []
        self._sending = False
        self._sender: asyncio.Task[None] | None = None
        self._conn: Connection | None = None

    async def admit(self, checks: list[Check], request_id: str) -> Verdict:
        args: list[object] = ["EVALSHA", self._admit.sha, len(checks)]
        args += [redis_key(c.key) for c in checks]
        args += ["" if self._clock is None else self._clock(), request_id]
        for c in checks:
            args += [_OPS[c.op], c.limit, c.amount, c.ttl]
        res = await self._call(args)
        if res[0] == 0:
            return Verdict(True, tuple(int(v) for v in res[1:]))
        if res[0] == -2:
            return Verdict(False, (), int(res[1]), needs_seed=True)
        if len(res) > 3:  # a window: when it has room, when it is empty
            return Verdict(
                False,
                (int(res[2]),),
                int(res[1]),
                retry_after=res[3] / 1000,
                empty_after=res[4] / 1000,
            )
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
            pool = self._redis.connection_pool
            # No per-operation timeouts on this connection: redis-py puts each write in a task
            # of its own (asyncio.wait_for) and each reply under a timer, which cost more than
            # the round trip; one deadline covers a whole pipeline instead (`_send`).
            conn = pool.connection_class(**{**pool.connection_kwargs, "socket_timeout": None})
            try:
                await conn.connect()
                for script in (_ADMIT, _SETTLE):
                    await conn.send_command("SCRIPT", "LOAD", script)
                    await conn.read_response()
            except BaseException:
                with contextlib.suppress(Exception):
                    await conn.disconnect()
                raise
            self._conn = conn
        return self._conn

    async def _send(self) -> None:
        try:
            while self._batch:
                batch, self._batch = self._batch, []
                try:
                    # hiredis packs in C: redis-py's Python packer was a visible cost.
                    packed = b"".join(hiredis.pack_command(tuple(a)) for a, _f in batch)
                    replies = []
                    async with asyncio.timeout(self._timeout):  # (re)connecting included
                        conn = await self._connection()
                        await conn.send_packed_command(packed, check_health=False)
                        for _ in batch:
                            try:
                                replies.append(await conn.read_response())
                            except redis.exceptions.ResponseError as exc:
                                replies.append(exc)
                except BaseException as exc:
                    if type(exc) is TimeoutError:  # our deadline, not a socket's
                        exc = redis.exceptions.TimeoutError(
                            f"Redis did not answer within {self._timeout:g}s"
                        )
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

    #: Counters per settlement script call: each call is one short stretch of Redis's time.
    SETTLE_CHUNK = 600

    async def adjust(self, items: list[tuple[Check, int, str]]) -> None:
        todo = [
            (redis_key(c.key), "z" if c.op == "slots" else "w" if c.op == "window" else "i", rid, d)
            for c, d, rid in items
            if d or c.op == "slots"
        ]
        calls = []
        for i in range(0, len(todo), self.SETTLE_CHUNK):
            chunk = todo[i : i + self.SETTLE_CHUNK]
            args = [a for _key, *triple in chunk for a in triple]
            keys = [key for key, *_triple in chunk]
            calls.append(self._call(["EVALSHA", self._settle.sha, len(keys), *keys, *args]))
        await asyncio.gather(*calls)

    async def seed(self, key: str, value: int, ttl: int) -> None:
        await self._redis.set(redis_key(key), value, ex=ttl, nx=True)

    async def peek(self, checks: list[Check]) -> list[int]:
        now = time.time() if self._clock is None else self._clock()
        at = "" if self._clock is None else now
        async with self._redis.pipeline(transaction=False) as pipe:
            for c in checks:
                key = redis_key(c.key)
                if c.op == "slots":
                    pipe.zcount(key, now, "+inf")
                elif c.op == "window":
                    await self._peek_window(keys=[key], args=[at, c.ttl], client=pipe)
                else:
                    pipe.get(key)
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
