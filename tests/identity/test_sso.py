"""SSO end to end: tokens from a real OIDC provider used as the `openai` SDK's API key against a
real gateway and vLLM engine; groups decide team and role; forged tokens are refused."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import orjson
import pytest

from bastion.local.launcher import VllmProcess
from tests.audit_api import entries_of
from tests.conftest import ADMIN_KEY, Gateway, base_config, engine_models, usage_rows
from tests.identity.oidc_provider import DEFAULT_RESOURCE

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def sso_gateway(
    make_gateway: Callable[..., Gateway],
    chat_engine: VllmProcess,
    embed_engine: VllmProcess,
    oidc_provider: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Gateway:
    db = tmp_path_factory.mktemp("sso") / "b.db"
    cfg = base_config(f"sqlite:///{db}", engine_models(chat_engine, embed_engine))
    cfg["identity"].update(
        {
            "oidc": [
                {
                    "issuer": oidc_provider.issuer,
                    "audience": DEFAULT_RESOURCE,
                    "user_claim": "preferred_username",
                }
            ],
            "group_mappings": [
                {"group": "bastion-auditors", "team": "beta", "role": "auditor"},
                {"group": "risk-analysts", "team": "alpha"},
            ],
        }
    )
    gw = make_gateway(cfg)
    gw.wait_ready()
    return gw


def _chat(gw: Gateway, token: str) -> Any:
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=token, max_retries=0) as client:
        return client.chat.completions.with_raw_response.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )


def test_a_mapped_user_calls_models_as_their_team(sso_gateway: Gateway, oidc_provider: Any) -> None:
    raw = _chat(sso_gateway, oidc_provider.token("alice-cli"))
    assert raw.parse().choices
    (row,) = usage_rows(
        str(sso_gateway.config["database"]["url"]), request_id=raw.headers["x-request-id"]
    )
    assert (row.user, row.team, row.cost_center) == ("alice", "alpha", "cc-1")
    assert row.key_id.startswith("sso_")
    # The same person gets the same synthetic key id on every token (limits and reports).
    again = _chat(sso_gateway, oidc_provider.token("alice-cli"))
    (row2,) = usage_rows(
        str(sso_gateway.config["database"]["url"]), request_id=again.headers["x-request-id"]
    )
    assert row2.key_id == row.key_id


def test_a_user_in_no_mapped_group_is_refused_with_a_reason(
    sso_gateway: Gateway, oidc_provider: Any
) -> None:
    with pytest.raises(openai.PermissionDeniedError) as info:
        _chat(sso_gateway, oidc_provider.token("bob-cli"))
    assert "none of your groups is mapped" in str(info.value)


def _b64(obj: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(obj)).rstrip(b"=").decode()


def test_forged_tokens_are_refused(sso_gateway: Gateway, oidc_provider: Any) -> None:
    real = oidc_provider.token("bob-cli")
    header, payload, signature = real.split(".")
    claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    promoted = _b64({**claims, "groups": ["risk-analysts"]})  # bob makes himself a risk analyst
    unsigned = _b64({"alg": "none", "typ": "JWT"})
    for forged in (f"{header}.{promoted}.{signature}", f"{unsigned}.{promoted}."):
        with pytest.raises(openai.AuthenticationError) as info:
            _chat(sso_gateway, forged)
        assert info.value.code == "invalid_token"
    log = sso_gateway.log_path.read_text()
    assert "oidc token rejected" in log and real not in log


def test_an_auditor_group_reads_the_trail_and_calls_no_model(
    sso_gateway: Gateway, oidc_provider: Any
) -> None:
    rid = _chat(sso_gateway, oidc_provider.token("alice-cli")).headers["x-request-id"]
    entries = entries_of(sso_gateway.url, oidc_provider.token("carol-cli"), rid, want=1)
    assert entries, "the auditor group could not read the request's entries"
    request_entry = entries[0]
    assert (request_entry["user"], request_entry["team"]) == ("alice", "alpha")
    with pytest.raises(openai.PermissionDeniedError):
        _chat(sso_gateway, oidc_provider.token("carol-cli"))


def test_sso_roles_apply_on_the_admin_api(sso_gateway: Gateway, oidc_provider: Any) -> None:
    carol = {"Authorization": f"Bearer {oidc_provider.token('carol-cli')}"}  # auditor
    alice = {"Authorization": f"Bearer {oidc_provider.token('alice-cli')}"}  # member
    assert httpx.get(f"{sso_gateway.url}/admin/usage", headers=carol).status_code == 200
    assert httpx.get(f"{sso_gateway.url}/admin/keys", headers=carol).status_code == 403
    assert httpx.get(f"{sso_gateway.url}/admin/usage", headers=alice).status_code == 403
    minted = httpx.post(f"{sso_gateway.url}/auth/keys", json={"name": "sso"}, headers=alice)
    assert minted.status_code == 201 and minted.json()["user"] == "alice"


def test_sso_minted_keys_follow_the_users_groups(sso_gateway: Gateway, oidc_provider: Any) -> None:
    """Red team: keys minted with an SSO token were never swept. A later token showing the user
    out of the group now revokes them (and they never outlive self_service_key_max_days)."""
    url = sso_gateway.url
    before = oidc_provider.token("erin-cli")  # erin, in risk-analysts → team alpha
    minted = httpx.post(
        url + "/auth/keys", json={"name": "laptop"}, headers={"Authorization": f"Bearer {before}"}
    )
    assert minted.status_code == 201, minted.text
    key = minted.json()
    assert key["source"] == "sso" and key["user"] == "erin" and key["expires_at"] is not None
    headers = {"Authorization": f"Bearer {key['key']}"}
    assert httpx.get(url + "/v1/models", headers=headers).status_code == 200
    after = oidc_provider.token("erin-moved-cli")  # erin again, now only in `trading`
    moved = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {after}"})
    assert moved.status_code == 403 and moved.json()["error"]["code"] == "no_mapped_group"
    r = httpx.get(url + "/v1/models", headers=headers)
    assert r.status_code == 401 and r.json()["error"]["code"] == "key_revoked", r.text
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    deadline = time.monotonic() + 5  # stored, not only refused on this replica
    while httpx.get(f"{url}/admin/keys/{key['id']}", headers=admin).json()["status"] != "revoked":
        assert time.monotonic() < deadline
        time.sleep(0.1)
