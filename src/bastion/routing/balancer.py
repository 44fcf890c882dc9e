"""Which engine replica serves a request.

A balancer orders a model's deployments by preference; the pipeline tries them in that order
and moves to the next only when a connection could not be made (nothing was sent yet). A
request holds a `Lease` on the deployment it uses: taken when it is tried, given back exactly
once, whatever happens, so the in-flight counts balancers rely on never drift.
Each choice carries a reason (for metrics): why this replica, e.g. `session`, `prefix`, `spill`.
Prefix-affinity routing is `bastion.routing.affinity.Affinity`; `least-outstanding` is here.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from bastion.engines.settings import DeploymentSettings
from bastion.routing.retry_budget import RetryBudget
from bastion.routing.settings import ModelSettings

if TYPE_CHECKING:
    from bastion.core.request import ParsedRequest

#: After a refused connection, a deployment is skipped for this long unless nothing else is up.
EJECT_SECONDS = 5.0
#: Share of its weight a replica takes at the start of its slow-start window (Envoy's default).
MIN_WARMTH = 0.1


@dataclass(eq=False)
class Deployment:
    model: str
    index: int
    settings: DeploymentSettings
    in_flight: int = 0
    #: Last active health check result; None until the first check has run.
    healthy: bool | None = None
    ejected_until: float = 0.0
    #: Seconds a recovering replica takes to reach its full weight (`routing.slow_start_s`),
    #: and when its current window began (-inf: never recovered, no window).
    slow_start: float = 0.0
    warm_from: float = float("-inf")
    #: Since start: requests sent here by the balancer's reason, and the prompt tokens its
    #: usage reported (all, and read from its prefix cache): `bastion routing status`.
    decisions: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    #: Why the model registry says it may not serve (`registry.enforce: warn`), else None.
    registry_problem: str | None = None
    #: Registry adapters (NAME@VERSION) the engine serves now, as last seen
    #: (`routing/adapters.py`); forgotten when it goes down (a restart loses them).
    adapters: set[str] = field(default_factory=set)
    name: str = field(init=False)

    def __post_init__(self) -> None:
        self.name = f"{self.model}[{self.index}]"

    @property
    def available(self) -> bool:
        return self.healthy is not False and self.ejected_until <= time.monotonic()

    @property
    def warmth(self) -> float:
        """Share of its weight the replica takes: below 1 only during slow-start, rising from
        MIN_WARMTH linearly. A replica back from a failure has cold caches (and on some engines
        cold kernels): the full share at once would be slow for everyone sent there."""
        if not self.slow_start:
            return 1.0
        elapsed = time.monotonic() - self.warm_from
        if elapsed >= self.slow_start:
            return 1.0
        return max(MIN_WARMTH, elapsed / self.slow_start)

    @property
    def effective_weight(self) -> float:
        return self.settings.weight * self.warmth

    def eject(self) -> None:
        self.ejected_until = time.monotonic() + EJECT_SECONDS
        self.warm_from = self.ejected_until
        self.adapters.clear()

    def checked(self, ok: bool) -> None:
        """The active health check's verdict. Coming back from DOWN, or passing the check
        while ejected, starts slow-start now."""
        if ok and (self.healthy is False or self.ejected_until > time.monotonic()):
            self.warm_from = time.monotonic()
        self.healthy = ok
        if ok:
            self.ejected_until = 0.0
        else:
            self.adapters.clear()

    def lease(self, gauge: Gauge | None = None) -> Lease:
        """A slot on this deployment for one request (also counted in `gauge`, if given)."""
        return Lease(self, gauge)


class Gauge(Protocol):
    def inc(self) -> None: ...
    def dec(self) -> None: ...


class Lease:
    """One request's slot on a deployment: taken on creation, released exactly once — by
    `release()` or by leaving a `with` block, whichever comes first."""

    __slots__ = ("_gauge", "_held", "deployment")

    def __init__(self, deployment: Deployment, gauge: Gauge | None = None):
        self.deployment = deployment
        self._gauge = gauge
        self._held = True
        deployment.in_flight += 1
        if gauge is not None:
            gauge.inc()

    def release(self) -> None:
        if self._held:
            self._held = False
            self.deployment.in_flight -= 1
            if self._gauge is not None:
                self._gauge.dec()

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class Balancer(Protocol):
    def key(self, req: ParsedRequest | None) -> Any:
        """What the balancer routes this request by (computed once per request), or None."""
        ...

    def order(
        self, deployments: Sequence[Deployment], key: Any = None
    ) -> list[tuple[Deployment, str]]:
        """Every deployment, most preferred first, each with the reason it is where it is."""
        ...

    def served(self, key: Any, deployment: Deployment, reason: str) -> None:
        """The request was sent to `deployment` (for balancers that learn)."""
        ...


class LeastOutstanding:
    """Fewest requests in flight relative to (effective) weight; available replicas first;
    ties at random."""

    def key(self, req: ParsedRequest | None) -> None:
        return None

    def order(
        self, deployments: Sequence[Deployment], key: Any = None
    ) -> list[tuple[Deployment, str]]:
        if len(deployments) == 1:
            return [(deployments[0], "only")]
        ranked = sorted(
            deployments,
            key=lambda d: (
                not d.available,
                (d.in_flight + 1) / d.effective_weight,
                random.random(),
            ),
        )
        return [(ranked[0], "least-outstanding")] + [
            (d, "fallback-to-available") for d in ranked[1:]
        ]

    def served(self, key: Any, deployment: Deployment, reason: str) -> None:
        pass


@dataclass(slots=True)
class Plan:
    """One request's routing: the deployments to try in order, why, and the balancer's key."""

    choices: list[tuple[Deployment, str]]
    key: Any


@dataclass
class ModelRoute:
    alias: str
    settings: ModelSettings
    deployments: list[Deployment]
    balancer: Balancer
    retries: RetryBudget = field(default_factory=RetryBudget)

    @classmethod
    def build(
        cls, alias: str, settings: ModelSettings, balancer: Balancer | None = None
    ) -> ModelRoute:
        """A route with the balancer its settings name (`routing.mode`), unless one is given."""
        routing = settings.routing
        deps = [
            Deployment(alias, i, d, slow_start=routing.slow_start_s)
            for i, d in enumerate(settings.deployments)
        ]
        if balancer is None:
            if routing.mode == "affinity":
                from bastion.routing.affinity import Affinity

                balancer = Affinity(deps, routing.load_factor, routing.load_floor)
            elif routing.mode == "precise":
                from bastion.routing.precise import build_precise

                balancer = build_precise(alias, deps, settings)
            else:
                balancer = LeastOutstanding()
        budget = routing.retry_budget
        retries = RetryBudget(budget.ratio, budget.min_per_second, budget.window_s)
        return cls(alias, settings, deps, balancer, retries)

    def plan(self, req: ParsedRequest | None = None) -> Plan:
        """The deployments to try for one request (which also counts for the retry budget)."""
        self.retries.request()
        key = self.balancer.key(req)
        return Plan(self.balancer.order(self.deployments, key), key)

    def candidates(self, req: ParsedRequest | None = None) -> list[Deployment]:
        return [d for d, _ in self.plan(req).choices]

    def served(self, plan: Plan, deployment: Deployment, reason: str) -> None:
        deployment.decisions[reason] = deployment.decisions.get(reason, 0) + 1
        self.balancer.served(plan.key, deployment, reason)

    def status(self) -> list[dict[str, Any]]:
        """Each deployment's routing state, for `GET /admin/routing`."""
        mode = self.settings.routing.mode if len(self.deployments) > 1 else "only"
        return [
            {
                "model": self.alias,
                "deployment": d.name,
                "url": d.settings.display_url,
                "mode": mode,
                "available": d.available,
                "warmth": round(d.warmth, 3),
                "in_flight": d.in_flight,
                "adapters": sorted(d.adapters),
                "decisions": dict(sorted(d.decisions.items())),
                "prompt_tokens": d.prompt_tokens,
                "cached_tokens": d.cached_tokens,
                "cache_hit_ratio": round(d.cached_tokens / d.prompt_tokens, 4)
                if d.prompt_tokens
                else None,
            }
            for d in self.deployments
        ]

    @property
    def capacity(self) -> int | None:
        """Requests all deployments accept at once; None if any of them is unbounded."""
        caps = [d.settings.max_concurrency for d in self.deployments]
        return None if None in caps else sum(c for c in caps if c is not None)

    @property
    def ready(self) -> bool:
        # A deployment serving an unapproved or altered model keeps the alias not ready.
        return any(d.healthy for d in self.deployments) and not any(
            d.registry_problem for d in self.deployments
        )
