"""Admission: the request must fit every limit that applies, reserved before it is forwarded.

Reservation: prompt tokens (counted by the model's tokenizer when configured, else an upper
bound: a token is never shorter than one byte; see tokens.py) plus the completion the request
may produce (`max_tokens`, else the model's `default_max_tokens`, times `n`); its cost from
the price book. After the response the
reservation is replaced by the actual usage, so TPM and budgets end up charged exactly; a
cancelled stream is charged what was generated.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import ROUND_CEILING
from typing import Any

import redis.exceptions
from sqlalchemy import Engine, func, or_, select

from bastion.config import Settings
from bastion.core.errors import BudgetExceeded, LimitsUnavailable, PermissionDenied, RateLimited
from bastion.core.request import ParsedRequest
from bastion.identity.principal import Principal
from bastion.limits.counters import Check, CounterBackend, MemoryCounters, Verdict
from bastion.limits.levels import (
    Level,
    Plan,
    applicable_levels,
    budget_period,
    checks_for,
    model_level,
    team_model_levels,
)
from bastion.limits.tokens import PromptCounter
from bastion.metering.settings import PriceSettings, resolved_prices
from bastion.metering.usage import UsageRecord, cost_micros, money
from bastion.observability.metrics import Metrics
from bastion.store.schema import usage

log = logging.getLogger("bastion.limits")
BACKEND_ERRORS = (redis.exceptions.RedisError, OSError, TimeoutError)


def completion_reserve(req: ParsedRequest) -> int:
    """The most the request may generate. The caps stage has set the output ceiling already."""
    if not req.generates:
        return 0
    return (req.max_output or 0) * req.choices


def reserve_micros(prompt: int, completion: int, price: PriceSettings | None) -> int:
    """The most a request may cost, in micro-units (rounded up: never below what is charged)."""
    return 0 if price is None else cost_micros(prompt, 0, completion, price, ROUND_CEILING)


def check_priced(plan: Plan, model: str, price: PriceSettings | None) -> None:
    """A caller with a budget is never served a model its budget cannot count (no price, or a
    price in another currency): its spend would escape the budget. The configuration check
    refuses such a file; this catches budgets set later (keys, through the admin API)."""
    for level, currency in plan.budgets():
        if price is None or price.currency != currency:
            why = "has no price" if price is None else f"is priced in {price.currency}"
            raise PermissionDenied(
                f"Model '{model}' {why}, so it cannot be charged to the {currency} budget of "
                f"{level}; ask an administrator to price it (prices.{model}).",
                code="model_not_priced",
            )


def _for_model(alias: str) -> Any:
    """Usage a model's limits counted: requests called for it, and those it served for another
    alias (a fallback, a router's choice), as its admission saw both."""
    return or_(usage.c.model == alias, usage.c.served_model == alias)


@dataclass(slots=True)
class Ticket:
    """What was reserved for one request; settled once when it ends."""

    checks: list[Check]
    tokens: int
    cost_micros: int
    backend: CounterBackend
    headers: dict[str, str] = field(default_factory=dict)
    settled: bool = False
    #: The prompt tokens reserved (the model's tokenizer's count, else an upper bound).
    prompt_tokens: int = 0


def _duration(seconds: float) -> str:
    """OpenAI's reset format: 850ms, 12s, 6m0s."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    minutes, secs = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def ratelimit_headers(checks: list[Check], values: tuple[int, ...], now: float) -> dict[str, str]:
    """x-ratelimit-* as OpenAI sends them: the tightest requests and tokens limits."""
    headers: dict[str, str] = {}
    for kind, suffix in (("rpm", "requests"), ("tpm", "tokens")):
        pairs = [(c, v) for c, v in zip(checks, values, strict=True) if c.kind == kind]
        if not pairs:
            continue
        c, v = min(pairs, key=lambda cv: cv[0].limit - cv[1])
        headers[f"x-ratelimit-limit-{suffix}"] = str(c.limit)
        headers[f"x-ratelimit-remaining-{suffix}"] = str(max(0, c.limit - v))
        headers[f"x-ratelimit-reset-{suffix}"] = _duration(c.reset_at - now)
    return headers


class Admission:
    def __init__(self, settings: Settings, backend: CounterBackend, db: Engine, metrics: Metrics):
        self.settings = settings
        self.backend = backend
        self.local = MemoryCounters()  # used only when configured to fall back
        self.db = db
        self.metrics = metrics
        self.fail_open_locally = settings.limits.on_backend_failure == "local"
        self._plans: dict[tuple[object, ...], Plan] = {}
        self.prompts = PromptCounter(settings)
        self.prices = resolved_prices(settings)
        # Settlements for a remote backend are sent in batches, one pipeline per loop turn.
        self._pending: list[tuple[Check, int, str]] = []
        self._wake = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None

    def plan(self, p: Principal, model: str) -> Plan:
        key = (p.key_id, p.user, p.team, p.cost_center, p.limits, model)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) > 50_000:
                self._plans.clear()
            levels = applicable_levels(self.settings, p, model)
            plan = self._plans[key] = Plan.compile(levels, self.settings.metering.currency)
        return plan

    async def admit(self, p: Principal, req: ParsedRequest, request_id: str) -> Ticket | None:
        plan = self.plan(p, req.model)
        if not plan.templates:
            return None  # nothing to count: no round trip at all
        price = self.prices.get(req.model)
        check_priced(plan, req.model, price)
        prompt = await self.prompts.count(req)
        return await self._reserve(plan, req, prompt, price, request_id)

    async def admit_serving(
        self, p: Principal, req: ParsedRequest, alias: str, request_id: str, prompt: int
    ) -> Ticket | None:
        """A request called for another alias is about to be served by `alias` (a fallback):
        the caller's budgets must be able to count its price, and its own model limits (model,
        team x model) must admit it too. The caller's other levels admitted it once already.
        RateLimited or PermissionDenied: `alias` may not serve it."""
        check_priced(self.plan(p, req.model), alias, self.prices.get(alias))
        key = ("serving", p.team, alias)
        plan = self._plans.get(key)
        if plan is None:
            levels = [
                model_level(self.settings, alias),
                *team_model_levels(self.settings, p.team, alias),
            ]
            levels = [lv for lv in levels if not lv.limits.is_empty()]
            plan = self._plans[key] = Plan.compile(levels, self.settings.metering.currency)
        if not plan.templates:
            return None
        price = self.prices.get(alias)
        check_priced(plan, alias, price)
        return await self._reserve(plan, req, prompt, price, request_id)

    async def _reserve(
        self,
        plan: Plan,
        req: ParsedRequest,
        prompt: int,
        price: PriceSettings | None,
        request_id: str,
    ) -> Ticket:
        completion = completion_reserve(req)
        micros = reserve_micros(prompt, completion, price)
        tokens = prompt + completion
        checks = checks_for(plan, tokens, micros)
        backend, verdict = await self._ask(checks, request_id, plan.levels)
        now = time.time()
        if not verdict.ok:
            self._refuse(checks[verdict.index], verdict, tokens, micros, now)
        ticket = Ticket(checks, tokens, micros, backend)
        ticket.prompt_tokens = prompt
        ticket.headers = ratelimit_headers(checks, verdict.values, now)
        return ticket

    async def _ask(
        self, checks: list[Check], request_id: str, levels: tuple[Level, ...]
    ) -> tuple[CounterBackend, Verdict]:
        backend: CounterBackend = self.backend
        for _attempt in range(8):
            try:
                verdict = await backend.admit(checks, request_id)
            except BACKEND_ERRORS as exc:
                backend = self._backend_failed(exc)
                continue
            if not verdict.needs_seed:
                return backend, verdict
            check = checks[verdict.index]
            spent = await asyncio.to_thread(self._spent, check, levels)
            try:
                await backend.seed(check.key, spent, check.ttl)
            except BACKEND_ERRORS as exc:
                backend = self._backend_failed(exc)
        raise LimitsUnavailable(
            "Limits could not be evaluated; try again.", headers={"retry-after": "1"}
        )

    def _backend_failed(self, exc: BaseException) -> CounterBackend:
        self.metrics.limits_backend_failures.inc()
        if not self.fail_open_locally:
            log.error("limits backend unreachable (%s): refusing requests (fail closed)", exc)
            raise LimitsUnavailable(
                "The rate-limit service is unavailable, so the request was not forwarded.",
                headers={"retry-after": "1"},
            ) from exc
        log.warning("limits backend unreachable (%s): using this replica's local counters", exc)
        return self.local

    def _spent(self, check: Check, levels: tuple[Level, ...]) -> int:
        """Spend so far in the check's budget period, from the usage records (micros)."""
        level = next(lv for lv in levels if lv.label == check.level)
        _name, start, end = budget_period(check.kind, datetime.now(UTC))
        col = {
            "key": usage.c.key_id,
            "user": usage.c.user,
            "team": usage.c.team,
            "cost_center": usage.c.cost_center,
            "model": usage.c.model,
        }
        q = select(func.coalesce(func.sum(usage.c.cost_micros), 0)).where(
            usage.c.ts >= start, usage.c.ts < end, usage.c.currency == check.currency
        )
        if level.scope == "team_model":
            team, model = level.ident.split("|", 1)
            q = q.where(usage.c.team == team, _for_model(model))
        elif level.scope == "model":
            q = q.where(_for_model(level.ident))
        else:
            q = q.where(col[level.scope] == level.ident)
        with self.db.connect() as conn:
            return int(conn.execute(q).scalar_one())

    def _refuse(self, check: Check, verdict: Verdict, tokens: int, micros: int, now: float) -> None:
        self.metrics.limit_rejections.labels(check.kind).inc()
        value = verdict.values[0]
        wait = max(1, math.ceil(check.reset_at - now))
        if check.kind in ("budget_day", "budget_month"):
            period = "daily" if check.kind == "budget_day" else "monthly"
            raise BudgetExceeded(
                f"The {period} budget of {check.level} is exhausted "
                f"({money(value)} of {money(check.limit)} {check.currency} spent or reserved; "
                f"this request may cost up to {money(micros)}).",
                headers={"retry-after": str(wait), "x-should-retry": "false"},
            )
        if check.kind == "concurrent":
            raise RateLimited(
                f"Too many requests in flight for {check.level} (limit {check.limit}).",
                headers={"retry-after": "1"},
            )
        # A sliding window: retry when enough of its entries have left it for this request,
        # reset (x-ratelimit-reset-*) when all of them have.
        wait = max(1, math.ceil(verdict.retry_after or 0))
        emptied = replace(check, reset_at=now + (verdict.empty_after or 0))
        what = "requests" if check.kind == "rpm" else "tokens"
        asked = "" if check.kind == "rpm" else f" This request reserves {tokens} tokens."
        raise RateLimited(
            f"Rate limit reached for {check.level}: {check.limit} {what} per minute "
            f"(any 60 s), {value} used.{asked} Retry after {wait}s.",
            headers={"retry-after": str(wait), **ratelimit_headers([emptied], (value,), now)},
        )

    def settle(self, ticket: Ticket, rec: UsageRecord) -> None:
        """Replaces the reservation by what was used (called once, from the event loop)."""
        if ticket.settled:
            return
        ticket.settled = True
        used = rec.prompt_tokens + rec.completion_tokens
        items = []
        for c in ticket.checks:
            if c.kind == "tpm":
                items.append((c, used - ticket.tokens, rec.request_id))
            elif c.kind in ("budget_day", "budget_month"):
                # Only an amount in the budget's own currency counts against it.
                spent = rec.cost_micros if rec.currency == c.currency else 0
                items.append((c, spent - ticket.cost_micros, rec.request_id))
            elif c.kind == "concurrent":
                items.append((c, -1, rec.request_id))
        if not items:
            return
        if isinstance(ticket.backend, MemoryCounters):
            ticket.backend.apply(items)
            return
        self._pending.extend(items)
        self._wake.set()

    async def _flush_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._flush()

    async def _flush(self) -> None:
        items, self._pending = self._pending, []
        if not items:
            return
        try:
            await self.backend.adjust(items)
        except BACKEND_ERRORS as exc:
            # The reservations stay charged until their windows end: errs on the safe side.
            self.metrics.limits_backend_failures.inc()
            log.warning("could not settle limits for %d requests: %s", len(items), exc)

    async def start(self) -> None:
        self._flusher = asyncio.create_task(self._flush_forever(), name="bastion-limits-settle")

    async def stop(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self._flush()
        await self.backend.close()
