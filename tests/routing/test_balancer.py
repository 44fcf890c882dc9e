from collections import Counter

from bastion.engines.settings import DeploymentSettings
from bastion.routing.balancer import LeastOutstanding, ModelRoute
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
