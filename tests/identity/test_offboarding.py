"""Offboarding and sign-in throttling against a real OpenLDAP slapd and real gateway replicas
sharing one PostgreSQL database: logout and revocation reach every replica, a disabled account
loses its session and keys, self-service keys have a lifetime cap, and guesses cannot outrun
the sign-in throttle (concurrently, by spelling, or by a forged X-Forwarded-For)."""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import ldap
import pytest

from tests.conftest import ADMIN_KEY, Gateway, base_config, pg_database
from tests.identity.slapd import Slapd, user_dn
from tests.stub_engine import StubEngine

PASSWORD = "offboard-Pa55!"


@pytest.fixture(scope="module")
def stub() -> Iterator[StubEngine]:
    s = StubEngine().start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def config(
    stub: StubEngine, slapd: Slapd, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    # Every replica signs and checks sessions with the same secret, given to them (on a shared
    # database none is created at start).
    session_key = tmp_path_factory.mktemp("sessions") / "session.key"
    session_key.write_text(base64.b64encode(secrets.token_bytes(32)).decode())
    with pg_database() as url:
        cfg = base_config(url, {"stub": {"deployments": [{"url": stub.url, "served_name": "s"}]}})
        cfg["admin"] = {"key": ADMIN_KEY}
        cfg["identity"].update(
            {
                # The default filter (AD and ppolicy) has nothing to match on this slapd.
                "ldap": slapd.ldap_settings(disabled_filter="(employeeType=disabled)"),
                "group_cache_seconds": 1,
                "self_service_key_max_days": 30,
                "session_key_file": str(session_key),
                "group_mappings": [{"group": "all-engineering", "team": "alpha"}],
            }
        )
        yield cfg


@pytest.fixture(scope="module")
def replicas(make_gateway: Callable[..., Gateway], config: dict[str, Any]) -> list[Gateway]:
    return [make_gateway(config), make_gateway(config)]


def _user(slapd: Slapd, uid: str) -> str:
    """A fresh directory user in a mapped group (nested: payments-devs in all-engineering)."""
    slapd.add_user(uid, PASSWORD)
    slapd.add_member("payments-devs", user_dn(uid))
    return uid


def _login(gw: Gateway, user: str, password: str = PASSWORD, **headers: str) -> httpx.Response:
    body = {"username": user, "password": password}
    return httpx.post(f"{gw.url}/auth/login", json=body, headers=headers, timeout=30)


def _get(gw: Gateway, token: str, path: str = "/auth/keys") -> httpx.Response:
    return httpx.get(gw.url + path, headers={"Authorization": f"Bearer {token}"}, timeout=10)


def _refused_everywhere(replicas: list[Gateway], token: str, path: str, code: str) -> None:
    deadline = time.monotonic() + 5
    for gw in replicas:
        while (r := _get(gw, token, path)).status_code != 401:
            assert time.monotonic() < deadline, f"{gw.url} still accepts it: {r.text}"
            time.sleep(0.1)
        assert r.json()["error"]["code"] == code, r.text


def test_logout_ends_the_session_on_every_replica(replicas: list[Gateway], slapd: Slapd) -> None:
    a, b = replicas
    user = _user(slapd, "olga")
    token = _login(a, user).json()["token"]
    other = _login(a, user).json()["token"]
    assert _get(a, token).status_code == 200 and _get(b, token).status_code == 200
    out = httpx.post(a.url + "/auth/logout", headers={"Authorization": f"Bearer {token}"})
    assert out.status_code == 200 and out.json() == {"sessions_ended": 1}
    assert _get(a, token).json()["error"]["code"] == "session_revoked"  # at once, here
    _refused_everywhere(replicas, token, "/auth/keys", "session_revoked")
    assert _get(b, other).status_code == 200  # only that session ended
    everywhere = httpx.post(
        b.url + "/auth/logout", json={"everywhere": True},
        headers={"Authorization": f"Bearer {other}"},
    )  # fmt: skip
    assert everywhere.json() == {"sessions_ended": 1}
    _refused_everywhere(replicas, other, "/auth/keys", "session_revoked")


def test_offboarding_ends_sessions_and_keys_everywhere(
    replicas: list[Gateway], slapd: Slapd
) -> None:
    a, b = replicas
    user = _user(slapd, "pete")
    session = _login(b, user).json()["token"]
    minted = httpx.post(
        b.url + "/auth/keys", json={}, headers={"Authorization": f"Bearer {session}"}
    )
    assert minted.status_code == 201, minted.text
    key = minted.json()["key"]
    assert _get(a, key, "/v1/models").status_code == 200
    done = httpx.post(
        f"{a.url}/admin/users/{user}/offboard", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    assert done.status_code == 200 and done.json()["sessions_ended"] == 1
    assert done.json()["keys_revoked"] == [minted.json()["id"]]
    _refused_everywhere(replicas, session, "/auth/keys", "session_revoked")
    _refused_everywhere(replicas, key, "/v1/models", "key_revoked")


def test_self_service_keys_have_a_lifetime_cap(replicas: list[Gateway], slapd: Slapd) -> None:
    a, _ = replicas
    session = _login(a, _user(slapd, "quinn")).json()["token"]
    auth = {"Authorization": f"Bearer {session}"}
    too_long = httpx.post(a.url + "/auth/keys", json={"expires_in": "31d"}, headers=auth)
    assert too_long.status_code == 403 and "30 days" in too_long.json()["error"]["message"]
    never = httpx.post(a.url + "/auth/keys", json={"expires_in": None}, headers=auth).json()
    from datetime import UTC, datetime, timedelta

    expires = datetime.fromisoformat(never["expires_at"])
    assert timedelta(days=29) < expires - datetime.now(UTC) <= timedelta(days=30)
    assert never["source"] == "self-service" and never["created_by"] == "quinn"


def test_a_disabled_account_loses_its_session_and_keys(
    replicas: list[Gateway], slapd: Slapd
) -> None:
    a, b = replicas
    user = _user(slapd, "rita")
    session = _login(a, user).json()["token"]
    minted = httpx.post(
        a.url + "/auth/keys", json={}, headers={"Authorization": f"Bearer {session}"}
    )
    key = minted.json()["key"]
    assert _get(b, session).status_code == 200 and _get(b, key, "/v1/models").status_code == 200
    conn = slapd.admin()
    try:  # still in every group: only disabled
        conn.modify_s(user_dn(user), [(ldap.MOD_ADD, "employeeType", [b"disabled"])])
    finally:
        conn.unbind_s()
    _refused_everywhere(replicas, session, "/auth/keys", "session_revoked")
    _refused_everywhere(replicas, key, "/v1/models", "key_revoked")  # the sweep, ~1 s
    refused = _login(b, user)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_credentials"


# -- sign-in throttling ---------------------------------------------------------------------------
def _guesses(gws: list[Gateway], user: str, n: int) -> list[int]:
    """`n` wrong passwords for `user` at once, spread over `gws`: the statuses."""

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=60) as client:
            body = {"username": user, "password": "wrong"}
            sent = [client.post(f"{gws[i % len(gws)].url}/auth/login", json=body) for i in range(n)]
            return [r.status_code for r in await asyncio.gather(*sent)]

    return asyncio.run(burst())


def test_concurrent_guesses_cannot_outrun_the_throttle(
    make_gateway: Callable[..., Gateway], config: dict[str, Any], slapd: Slapd
) -> None:
    """Red team: 300 concurrent guesses all reached the directory with login_max_failures 5."""
    gw = make_gateway(config)
    user = _user(slapd, "sven")

    codes = _guesses([gw], user, 60)
    assert set(codes) <= {401, 429}
    assert codes.count(401) <= 5, codes  # at most login_max_failures reached the directory
    # Spelled as the directory compares names, it is the same user.
    for spelling in (user.upper(), f"  {user} ", user.title()):
        assert _login(gw, spelling).status_code == 429, spelling


def test_guesses_spread_over_replicas_share_one_throttle_in_redis(
    make_gateway: Callable[..., Gateway],
    config: dict[str, Any],
    slapd: Slapd,
    private_redis: Any,
) -> None:
    """With the limits in Redis, N replicas together let login_max_failures guesses per user
    reach the directory, not N times as many."""
    shared = {**config, "limits": {"backend": "redis", "redis_url": private_redis.url}}
    pair = [make_gateway(shared), make_gateway(shared)]
    user = _user(slapd, "ursula")

    codes = _guesses(pair, user, 40)
    assert set(codes) <= {401, 429}
    assert codes.count(401) <= 5, codes  # not 2 x 5
    assert _login(pair[0], user).status_code == 429 == _login(pair[1], user).status_code


def test_x_forwarded_for_is_believed_only_from_trusted_proxies(
    make_gateway: Callable[..., Gateway], config: dict[str, Any], slapd: Slapd
) -> None:
    """Red team: behind an ingress every sign-in came from the balancer's address, so twenty junk
    failures locked everyone out; and a forged X-Forwarded-For must not dodge the address limit."""
    user = _user(slapd, "tina")
    untrusted = make_gateway(config)
    for i in range(20):  # four times login_max_failures: the per-address limit
        forged = {"X-Forwarded-For": f"198.51.100.{i}"}
        assert _login(untrusted, f"nobody{i}", "x", **forged).status_code == 401
    blocked = _login(untrusted, user, **{"X-Forwarded-For": "203.0.113.7"})
    assert blocked.status_code == 429  # the forged addresses were all 127.0.0.1

    behind_lb = make_gateway({**config, "server": {"trusted_proxies": ["127.0.0.0/8"]}})
    for i in range(20):
        junk = {"X-Forwarded-For": "198.51.100.66"}
        assert _login(behind_lb, f"nobody{i}", "x", **junk).status_code == 401
    assert _login(behind_lb, "nobody", "x", **junk).status_code == 429  # that client only
    ok = _login(behind_lb, user, **{"X-Forwarded-For": "203.0.113.7"})
    assert ok.status_code == 200, ok.text  # everyone else still signs in
