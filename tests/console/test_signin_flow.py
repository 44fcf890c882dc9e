"""The IdP sign-in's own checks, without a browser: the PKCE challenge (RFC 7636's own
example), the flow cookie refused when expired, forged or from another gateway, and the
settings an operator cannot get wrong silently."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import jwt
import pytest
from pydantic import ValidationError

from bastion.core.errors import AuthenticationFailed, InvalidRequest
from bastion.identity.oidc_login import FLOW_ISSUER, IdpLogin, challenge
from bastion.identity.sessions import Sessions
from bastion.identity.settings import IdentitySettings, OidcIssuer
from bastion.identity.sso import SsoAuthenticator

ISSUER = "https://idp.example"


def _login(tmp_path: Path, name: str = "a") -> IdpLogin:
    identity = IdentitySettings(
        session_key_file=str(tmp_path / f"{name}.key"),
        oidc=[
            OidcIssuer(issuer=ISSUER, audience="api", console={"client_id": "console"}),  # type: ignore[arg-type]
            OidcIssuer(issuer="https://api-only.example", audience="api"),
        ],
    )
    return IdpLogin(identity.oidc, SsoAuthenticator(identity), Sessions(identity, None))  # type: ignore[arg-type]


def _cookie(login: IdpLogin, **claims: object) -> str:
    now = int(time.time())
    body = {"iss": FLOW_ISSUER, "iat": now, "exp": now + 60, "idp": ISSUER, "st": "s",
            "n": "n", "v": "v", "r": "https://gw/console/oidc/callback", **claims}  # fmt: skip
    return jwt.encode(body, login._flow_key, algorithm="HS256")


def test_the_pkce_challenge_is_rfc_7636s_example() -> None:
    # RFC 7636, appendix B.
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert challenge(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def test_only_issuers_with_a_console_section_are_offered(tmp_path: Path) -> None:
    login = _login(tmp_path)
    assert login.providers() == [(ISSUER, "single sign-on")]
    with pytest.raises(InvalidRequest, match="No such identity provider"):
        asyncio.run(login.start("https://api-only.example", "https://gw/cb"))


def test_a_flow_cookie_is_refused_when_missing_expired_forged_or_foreign(tmp_path: Path) -> None:
    login = _login(tmp_path)
    flow = login.flow(_cookie(login))
    assert (flow.issuer, flow.state, flow.nonce, flow.verifier) == (ISSUER, "s", "n", "v")
    cases = {
        "": "oidc_no_flow",
        _cookie(login, exp=int(time.time()) - 5): "oidc_flow_expired",
        _cookie(login)[:-3] + "AAA": "oidc_bad_flow",  # a tampered signature
        _cookie(_login(tmp_path, "other")): "oidc_bad_flow",  # another gateway's secret
        _cookie(login, iss="bastion-session"): "oidc_bad_flow",  # not a flow
    }
    for cookie, code in cases.items():
        with pytest.raises(AuthenticationFailed) as info:
            login.flow(cookie)
        assert info.value.code == code, cookie


def test_console_settings_refuse_what_cannot_work() -> None:
    with pytest.raises(ValidationError, match="must include 'openid'"):
        OidcIssuer(issuer=ISSUER, audience="a", console={"client_id": "c", "scopes": ["email"]})  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="https"):
        OidcIssuer(
            issuer=ISSUER, audience="a",
            console={"client_id": "c", "redirect_uri": "http://bastion.bank/console/oidc/callback"},  # type: ignore[arg-type]
        )  # fmt: skip
