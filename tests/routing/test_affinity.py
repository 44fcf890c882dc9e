"""The affinity balancer's ordering, deterministically: no engine, no clock, no randomness."""

import time
from collections import Counter
from typing import Any

from bastion.engines.settings import DeploymentSettings
from bastion.routing.affinity import BLOCK_BYTES, Affinity, Key, prefix_blocks
from bastion.routing.balancer import ModelRoute
from bastion.routing.settings import ModelSettings

SYSTEM = {"role": "system", "content": "You are the bank's assistant. " * 40}


def _route(n: int = 2, load_factor: float = 1.25, **routing: Any) -> ModelRoute:
    deps = [
        DeploymentSettings(url=f"http://10.0.0.{i + 1}:8000", served_name="m") for i in range(n)
    ]
    settings = ModelSettings(deployments=deps, routing={"load_factor": load_factor, **routing})
    route = ModelRoute.build("m", settings)
    assert isinstance(route.balancer, Affinity)  # the default mode
    return route


def _key(*messages: dict) -> Key:
    return Key(None, prefix_blocks({"messages": list(messages)}))


def _first(route: ModelRoute, key: Key) -> tuple[int, str]:
    dep, reason = route.balancer.order(route.deployments, key)[0]
    return dep.index, reason


def test_block_hashes_are_chained_prefixes() -> None:
    user = {"role": "user", "content": "What is my balance? " * 30}
    one = prefix_blocks({"messages": [SYSTEM, user]})
    grown = prefix_blocks(
        {"messages": [SYSTEM, user, {"role": "assistant", "content": "x" * 600}, user]}
    )
    assert len(one) >= 4 and len(grown) > len(one)
    # Every complete block of the shorter conversation is a prefix of the longer one's...
    assert grown[: len(one)] == one
    # ...key order does not matter, and a different system prompt shares nothing.
    reordered = {k: SYSTEM[k] for k in ("content", "role")}
    assert prefix_blocks({"messages": [reordered, user]}) == one
    other = prefix_blocks({"messages": [{"role": "system", "content": "Other. " * 200}, user]})
    assert not set(other) & set(one)
    # Tools come before messages (engines render them into the system prompt).
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    with_tools = prefix_blocks({"messages": [SYSTEM, user], "tools": tools})
    assert with_tools[0] != one[0]
    # A prompt shorter than a block has nothing to be affine to.
    assert prefix_blocks({"messages": [{"role": "user", "content": "hi"}]}) == []
    assert len(prefix_blocks({"prompt": "a" * (BLOCK_BYTES * 3 + 10)})) == 3


def test_a_conversation_follows_its_longest_known_prefix() -> None:
    route = _route(3)
    user = {"role": "user", "content": "Summarise the account history. " * 20}
    first = _key(SYSTEM, user)
    owner, reason = _first(route, first)
    assert reason == "ring"
    assert _first(route, first) == (owner, "ring")  # the ring alone is stable
    route.served(route.plan(None), route.deployments[owner], reason)  # no key: learns nothing
    route.balancer.served(first, route.deployments[owner], reason)
    grown = _key(SYSTEM, user, {"role": "assistant", "content": "ok " * 200}, user)
    assert _first(route, grown) == (owner, "prefix")
    # Learned even where the ring points elsewhere: teach a different replica, it is followed.
    elsewhere = (owner + 1) % 3
    route.balancer.served(grown, route.deployments[elsewhere], "prefix")
    longer = _key(SYSTEM, user, {"role": "assistant", "content": "ok " * 200}, user, user)
    assert _first(route, longer) == (elsewhere, "prefix")


def test_sessions_stick_and_spread() -> None:
    route = _route(2)
    firsts = Counter(_first(route, Key(f"session-{i}", []))[0] for i in range(400))
    assert set(firsts) == {0, 1} and min(firsts.values()) > 120  # an even-ish split
    for i in range(20):
        assert _first(route, Key(f"session-{i}", [])) == _first(route, Key(f"session-{i}", []))
        assert _first(route, Key(f"session-{i}", []))[1] == "session"


def test_load_bound_spills_to_the_next_replica() -> None:
    route = _route(2, load_factor=1.25)
    key = Key("hot", [])
    owner, _ = _first(route, key)
    other = 1 - owner
    a, b = route.deployments[owner], route.deployments[other]
    a.in_flight, b.in_flight = 1, 0  # mean with this request 1; cap ceil(1.25) = 2: stays
    assert _first(route, key) == (owner, "session")
    a.in_flight = 2  # 3 with this one: cap ceil(1.875) = 2, owner would hold 3
    assert _first(route, key) == (other, "spill")
    a.in_flight, b.in_flight = 5, 3  # 9: cap ceil(5.625) = 6: owner takes its 6th
    assert _first(route, key) == (owner, "session")
    a.in_flight = 7  # 11: cap ceil(6.875) = 7, owner would hold 8
    assert _first(route, key) == (other, "spill")
    # A looser bound keeps more on the owner.
    loose = _route(2, load_factor=2.0)
    loose.deployments[owner].in_flight = 7
    loose.deployments[other].in_flight = 3
    assert _first(loose, key) == (owner, "session")


def test_spill_does_not_move_the_prefix() -> None:
    route = _route(2)
    user = {"role": "user", "content": "Explain the fee schedule. " * 20}
    key = _key(SYSTEM, user)
    owner, reason = _first(route, key)
    route.balancer.served(key, route.deployments[owner], reason)
    route.balancer.served(key, route.deployments[1 - owner], "spill")
    assert _first(route, key) == (owner, "prefix")


def test_unavailable_replicas_are_skipped_and_tried_last() -> None:
    route = _route(3)
    key = Key("s", [])
    order = [d.index for d, _ in route.balancer.order(route.deployments, key)]
    route.deployments[order[0]].eject()
    choices = route.balancer.order(route.deployments, key)
    assert [d.index for d, _ in choices] == [order[1], order[2], order[0]]
    assert choices[0][1] == "fallback-to-available"
    route.deployments[order[1]].healthy = False
    assert [d.index for d in route.candidates()][:1] != [order[1]]
    # Nothing up: all of them, the owner first.
    route.deployments[order[2]].healthy = False
    assert [d.index for d, _ in route.balancer.order(route.deployments, key)] == order


def test_no_key_and_one_replica() -> None:
    route = _route(2)
    route.deployments[0].in_flight = 2
    assert route.balancer.order(route.deployments, None)[0] == (
        route.deployments[1],
        "least-loaded",
    )
    single = ModelRoute.build(
        "s", ModelSettings(deployments=[DeploymentSettings(url="http://h:1", served_name="m")])
    )
    assert single.plan(None).choices == [(single.deployments[0], "only")]
    lo = ModelRoute.build(
        "l",
        ModelSettings(
            deployments=[
                DeploymentSettings(url="http://h:1", served_name="m"),
                DeploymentSettings(url="http://h:2", served_name="m"),
            ],
            routing={"mode": "least-outstanding"},
        ),
    )
    assert lo.plan(None).choices[0][1] == "least-outstanding"


def test_key_from_the_parsed_request() -> None:
    from bastion.core.request import ParsedRequest
    from bastion.gateway.wire.openai import CHAT

    route = _route(2)
    body = {"model": "m", "messages": [SYSTEM, {"role": "user", "content": "hi"}]}
    plain = route.balancer.key(ParsedRequest(CHAT, body, "m", False))
    assert plain.session is None and plain.blocks == prefix_blocks(body)
    hinted = route.balancer.key(ParsedRequest(CHAT, body, "m", False, session="codex-7"))
    assert hinted.session == "codex-7" and hinted.blocks == []  # the hint wins, nothing hashed
    assert route.plan(ParsedRequest(CHAT, body, "m", False, session="codex-7")).choices[0][1] == (
        "session"
    )


def test_the_load_floor_keeps_light_load_on_the_owner() -> None:
    key = Key("light", [])
    for floor, expected in ((2, "session"), (1, "spill")):
        route = _route(4, load_floor=floor)
        owner, _ = _first(route, key)
        route.deployments[owner].in_flight = 1  # 2 with this one: ceil(1.25 * 2 / 4) = 1
        assert _first(route, key)[1] == expected
    route = _route(4)
    route.deployments[owner].in_flight = 2  # the floor is a floor: a third request spills
    assert _first(route, key)[1] == "spill"


def _groups(n: int) -> list[Key]:
    return [_key({"role": "system", "content": f"Desk {i} instructions. " * 30}) for i in range(n)]


def test_a_recovered_replica_takes_its_groups_back_gradually() -> None:
    route = _route(2, slow_start_s=30)
    a, b = route.deployments
    keys = [k for k in _groups(200) if _first(route, k)[0] == 0]  # groups a owns
    a.checked(True)
    b.checked(True)
    assert a.warmth == 1.0  # the first verdict is no recovery
    a.checked(False)  # a goes down: its groups move to b, learned as displaced
    for k in keys:
        assert _first(route, k) == (1, "fallback-to-available")
        route.balancer.served(k, b, "fallback-to-available")
        assert _first(route, k) == (1, "prefix")
    a.checked(True)  # back: slow-start begins at 10 % of its weight
    assert 0.1 <= a.warmth < 0.12
    a.warm_from = time.monotonic() - 15  # halfway through the window
    first = [_first(route, k) for k in keys]
    back = [k for k, (i, reason) in zip(keys, first, strict=True) if reason == "return"]
    assert all(i == 0 for i, reason in first if reason == "return")
    assert all((i, reason) == (1, "prefix") for i, reason in first if reason != "return")
    assert 0.35 < len(back) / len(keys) < 0.65
    assert [_first(route, k) for k in keys] == first  # fixed per group: no flapping
    for k in back:
        route.balancer.served(k, a, "return")
    a.warm_from = time.monotonic() - 31  # the window is over: every group is home
    assert all(_first(route, k) in ((0, "return"), (0, "prefix")) for k in keys)
    assert all(_first(route, k) == (0, "prefix") for k in back)


def test_new_groups_reach_a_warming_replica_by_its_warmth() -> None:
    route = _route(2, slow_start_s=30)
    a = route.deployments[0]
    keys = [k for k in _groups(200) if _first(route, k)[0] == 0]
    a.healthy = False
    a.checked(True)
    a.warm_from = time.monotonic() - 6  # 20 % warm
    reasons = Counter(_first(route, k)[1] for k in keys)
    assert set(reasons) == {"ring", "slow-start"}
    assert 0.1 < reasons["ring"] / len(keys) < 0.3
    sessions = Counter(_first(route, Key(f"s{i}", []))[1] for i in range(400))
    assert sessions["slow-start"] > 100  # sessions a owns, not yet taken back
    no_start = _route(2, slow_start_s=0)
    no_start.deployments[0].healthy = False
    no_start.deployments[0].checked(True)
    assert no_start.deployments[0].warmth == 1.0
