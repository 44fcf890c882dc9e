import asyncio
import time
from collections import Counter

from bastion.engines.settings import DeploymentSettings
from bastion.routing import health
from bastion.routing.balancer import LeastOutstanding, ModelRoute
from bastion.routing.retry_budget import RetryBudget
from bastion.routing.settings import ModelSettings


def _route(*weights: float) -> ModelRoute:
    deps = [
        DeploymentSettings(url=f"http://127.0.0.1:{9000 + i}", served_name="m", weight=w)
        for i, w in enumerate(weights)
    ]
    return ModelRoute.build("m", ModelSettings(deployments=deps), LeastOutstanding())


def test_prefers_least_outstanding() -> None:
    route = _route(1, 1, 1)
    route.deployments[0].in_flight = 3
    route.deployments[1].in_flight = 1
    route.deployments[2].in_flight = 2
    assert [d.index for d in route.candidates()] == [1, 2, 0]


def test_weights_scale_the_load() -> None:
    route = _route(3, 1)
    picks: Counter[int] = Counter()
    for _ in range(400):  # simulate requests that stay in flight
        best = route.candidates()[0]
        best.in_flight += 1
        picks[best.index] += 1
    assert 280 <= picks[0] <= 320


def test_unavailable_deployments_go_last() -> None:
    route = _route(1, 1)
    route.deployments[0].eject()
    assert route.candidates()[0].index == 1 and len(route.candidates()) == 2
    route.deployments[0].ejected_until = 0
    route.deployments[1].healthy = False
    assert route.candidates()[0].index == 0


def test_ties_are_spread() -> None:
    route = _route(1, 1)
    firsts = Counter(route.candidates()[0].index for _ in range(200))
    assert min(firsts.values()) > 50


def test_a_lease_is_released_exactly_once() -> None:
    dep = _route(1).deployments[0]
    gauge = Counter[str]()

    class G:
        def inc(self) -> None:
            gauge["n"] += 1

        def dec(self) -> None:
            gauge["n"] -= 1

    lease = dep.lease(G())
    assert dep.in_flight == 1 and gauge["n"] == 1
    lease.release()
    lease.release()
    with lease:
        pass
    assert dep.in_flight == 0 and gauge["n"] == 0
    try:
        with dep.lease():
            assert dep.in_flight == 1
            raise RuntimeError("the request failed")
    except RuntimeError:
        pass
    assert dep.in_flight == 0


def test_the_retry_budget_is_a_share_of_recent_requests() -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=0, window=10)
    for _ in range(10):
        budget.request()
    assert [budget.try_retry() for _ in range(3)] == [True, True, False]
    reserve = RetryBudget(ratio=0.0, min_per_second=0.5, window=10)  # 5 per window, always
    assert sum(reserve.try_retry() for _ in range(8)) == 5
    route = _route(1, 1)
    for _ in range(10):
        route.plan(None)  # each planned request counts
    assert route.retries.try_retry()


def test_slow_start_lowers_the_share_of_a_recovered_replica() -> None:
    route = _route(1, 1)
    route.deployments[0].slow_start = route.deployments[1].slow_start = 30
    a = route.deployments[0]
    a.healthy = False
    a.checked(True)
    a.warm_from = time.monotonic() - 6  # 20 % of its weight
    picks: Counter[int] = Counter()
    for _ in range(120):
        best = route.candidates()[0]
        best.in_flight += 1
        picks[best.index] += 1
    assert 14 <= picks[0] <= 26  # ~1/6 of the load (0.2 : 1)
    a.eject()  # ejected: unavailable now, warming from when the ejection ends
    assert not a.available and a.warm_from == a.ejected_until


def test_a_single_failed_check_is_confirmed_before_down(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(health, "CONFIRM_SECONDS", 0)
    route = _route(1)
    dep = route.deployments[0]
    answers: list[bool] = []

    class Client:
        async def healthy(self, settings: DeploymentSettings) -> bool:
            return answers.pop(0)

    checker = health.HealthChecker(Client(), route.deployments)  # type: ignore[arg-type]
    answers[:] = [True]
    asyncio.run(checker.check_all())
    assert dep.healthy is True
    answers[:] = [False, True]  # a missed deadline, then fine: still up
    asyncio.run(checker.check_all())
    assert dep.healthy is True and not answers
    answers[:] = [False, False]
    asyncio.run(checker.check_all())
    assert dep.healthy is False and not answers
    answers[:] = [True]  # back: slow-start starts
    asyncio.run(checker.check_all())
    assert dep.healthy is True and dep.warm_from > time.monotonic() - 5
