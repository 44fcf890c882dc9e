"""Every control-plane surface (`/admin`, `/audit`, `/auth`) fuzzed from its own OpenAPI
document by schemathesis, against a real gateway on PostgreSQL with a real directory (slapd).

All of schemathesis' checks run: no 5xx for any input, every status and body as documented,
schema-valid requests accepted and schema-violating ones refused, no auth ignored, nothing
usable after it was deleted. Each surface runs as the role it is for (a signed-in user for
`/auth`, an auditor for `/audit`, the admin key for `/admin`), example by example (examples,
coverage and fuzzing phases) and as stateful workflows whose steps feed each other. Afterwards
everything stored must still read back, and every key must still be revocable: an
out-of-range limit once stored made a key unrevocable (issue 10, item 18).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.conftest import ADMIN_KEY, Gateway, base_config, pg_database
from tests.identity.slapd import PASSWORDS

pytestmark = pytest.mark.postgres

#: Examples per operation and workflows per surface: enough to find what the red team found
#: (it took one out-of-range integer), small enough for CI (the module runs in about a minute).
EXAMPLES = 25
WORKFLOWS = 12
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same cases on every run: a failure here is reproducible
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def control_plane(
    make_gateway: Callable[..., Gateway], slapd: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    with pg_database() as url:
        cfg = base_config(
            url,
            {"m": {"deployments": [{"url": "http://127.0.0.1:9", "served_name": "m"}]}},
        )
        cfg["identity"].update(
            {
                "ldap": {
                    "url": slapd.ldaps_url,
                    "ca_file": str(slapd.ca_file),
                    "bind_dn": slapd.service_dn,
                    "bind_password": slapd.service_password,
                    "user_base": slapd.base_dn,
                    "group_base": slapd.group_base,
                },
                "group_mappings": [
                    {"group": "bastion-auditors", "team": "beta", "role": "auditor"},
                    {"group": "all-engineering", "team": "alpha"},
                ],
                # The fuzzer signs in with made-up names all along: no lockout for the
                # real sign-ins the surfaces are called with.
                "login_max_failures": 1_000_000,
            }
        )
        gw = make_gateway(cfg)
        yield gw
        gw.stop()


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def credential(gw: Gateway, role: str) -> str:
    """The admin key, a team-admin key of alpha, or a fresh session: alice (a member of
    alpha) or carol (an auditor)."""
    if role == "admin":
        return ADMIN_KEY
    if role == "team-admin":
        made = httpx.post(
            f"{gw.url}/admin/keys",
            json={"team": "alpha", "user": "lee", "role": "team-admin"},
            headers=_bearer(ADMIN_KEY),
        )
        assert made.status_code == 201, made.text
        return str(made.json()["key"])
    user = {"session": "alice", "auditor": "carol"}[role]
    login = httpx.post(f"{gw.url}/auth/login", json={"username": user, "password": PASSWORDS[user]})
    assert login.status_code == 200, login.text
    return str(login.json()["token"])


#: Each surface is called as the role it is for.
SURFACES = {
    "auth": ("^/auth/", "session"),
    "audit": ("^/audit/", "auditor"),
    "lead": ("^/admin/", "team-admin"),  # a team-admin: only their team's member keys
    "admin": ("^/admin/", "admin"),
}


def surface_schema(gw: Gateway, surface: str) -> Any:
    """The control plane's OpenAPI document, as served, for one surface and the credential it
    is for: declared to schemathesis as the auth, so its checks know what the credential is,
    and signed in again whenever a call answers 401 (the fuzzer signs out too)."""
    paths, role = SURFACES[surface]
    schema = schemathesis.openapi.from_url(f"{gw.url}/admin/openapi.json").include(path_regex=paths)

    @schema.auth()
    class Credential:
        def get(self, case: Any, ctx: Any) -> str:
            return credential(gw, role)

        def set(self, case: Any, data: str, ctx: Any) -> None:
            case.headers = {**(case.headers or {}), **_bearer(data)}

    return schema


@pytest.fixture
def control_plane_schema(control_plane: Gateway, request: pytest.FixtureRequest) -> Any:
    return surface_schema(control_plane, request.node.name.split("_")[1])


def _lazy(surface: str) -> Any:
    """The surface's operations of the fixture's document (the filter must be the lazy
    schema's: schemathesis replaces the fixture schema's own with it)."""
    lazy = schemathesis.pytest.from_fixture("control_plane_schema")
    return lazy.include(path_regex=SURFACES[surface][0])


# Order matters: the admin key may revoke any key it finds, so its surface runs last.
@_lazy("auth").parametrize()
@FUZZ
def test_auth_surface(case: Any) -> None:
    case.call_and_validate()


@_lazy("audit").parametrize()
@FUZZ
def test_audit_surface(case: Any) -> None:
    case.call_and_validate()


@_lazy("lead").parametrize()
@FUZZ
def test_lead_surface(case: Any) -> None:
    case.call_and_validate()


@_lazy("admin").parametrize()
@FUZZ
def test_admin_surface(case: Any) -> None:
    case.call_and_validate()


@pytest.mark.parametrize("surface", list(SURFACES))
def test_stateful_workflows(surface: str, control_plane: Gateway) -> None:
    """Sequences of calls, each step using what the earlier ones answered (ids, names)."""
    surface_schema(control_plane, surface).as_state_machine().run(
        settings=settings(
            max_examples=WORKFLOWS,
            stateful_step_count=6,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
    )


def test_everything_stored_still_reads(control_plane: Gateway) -> None:
    """After all of the above: every list and report reads, the trail verifies, and every key
    the fuzzing left can still be read, given limits and revoked."""
    url = control_plane.url
    auditor = credential(control_plane, "auditor")
    with httpx.Client(base_url=url, headers=_bearer(auditor), timeout=60) as c:
        verdict = c.get("/audit/verify")
        assert verdict.status_code == 200 and verdict.json()["ok"], verdict.text
        assert c.get("/audit/entries", params={"limit": 1000}).status_code == 200
    with httpx.Client(base_url=url, headers=_bearer(ADMIN_KEY), timeout=30) as c:
        for path in ("/admin/cost-centers", "/admin/teams", "/admin/limits", "/admin/audit/holds"):
            assert c.get(path).status_code == 200, path
        for by in ("team", "cost-center", "model", "day", "key", "user"):
            assert c.get("/admin/usage", params={"by": by}).status_code == 200, by
        keys = c.get("/admin/keys")
        assert keys.status_code == 200 and len(keys.json()) > 3, keys.text
        for key in keys.json():
            assert c.get(f"/admin/keys/{key['id']}").status_code == 200, key
            limits = c.put(f"/admin/keys/{key['id']}/limits", json={"rpm": 10**12})
            assert limits.status_code == 200, limits.text
            revoked = c.post(f"/admin/keys/{key['id']}/revoke")
            assert revoked.status_code == 200 and revoked.json()["status"] == "revoked", key
