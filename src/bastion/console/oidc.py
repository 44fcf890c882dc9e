"""The console's sign-in at the bank's IdP (OIDC authorization code + PKCE; the protocol is in
identity/oidc_login.py, the audit and session in identity/api.py's `idp_sign_in`).

`GET /console/oidc/start?idp=<issuer>` (a link on the login page) sends the browser to the IdP
and sets the flow cookie; the IdP sends it back to `GET /console/oidc/callback`, which checks the
flow and sets the same session cookie a directory sign-in sets. Starting is a link, not a form:
the CSP's `form-action 'self'` also stops a form's redirect to another origin, and a started
flow grants nothing (the browser still signs in at the IdP, as its own user, and `state` binds
the answer to this browser).

The flow cookie is `SameSite=Lax`, not Strict: the IdP's redirect back is a cross-site
navigation, on which a Strict cookie would not be sent. For the same reason the callback does
not redirect to the console: the session cookie is Strict, and a redirect in that cross-site
chain would arrive without it; a page that moves on by itself (meta refresh: no script, so the
CSP stays strict) starts a same-site navigation instead.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from bastion.console.security import COOKIE_PATH, SESSION_COOKIE, set_cookie
from bastion.core.errors import NotFound
from bastion.identity import api as identity_api
from bastion.identity.oidc_login import FLOW_SECONDS

FLOW_COOKIE = "bastion_oidc_flow"
FLOW_PATH = COOKIE_PATH + "/oidc"
#: Callback parameters read (anything else the IdP adds is ignored), each bounded.
CALLBACK_PARAMS = ("code", "state", "error", "error_description", "iss")


def providers(request: Request) -> list[tuple[str, str]]:
    """(issuer, label) of the IdPs the login page offers."""
    idp = request.app.state.keys.idp_login
    return idp.providers() if idp is not None else []


def set_flow(response: Response, value: str, max_age: int | None) -> None:
    response.set_cookie(
        FLOW_COOKIE, value, max_age=max_age, path=FLOW_PATH, secure=True, httponly=True,
        samesite="lax",
    )  # fmt: skip


async def begin(request: Request) -> Response:
    """The redirect to the IdP, with the flow cookie; a BastionError for the login page."""
    idp = request.app.state.keys.idp_login
    if idp is None:
        raise NotFound("Sign-in at an identity provider is not configured.", code="not_found")
    issuer = request.query_params.get("idp", "")
    url, flow = await idp.start(issuer, str(request.url_for("oidc_callback")))
    response = RedirectResponse(url, status_code=303)
    set_flow(response, flow, FLOW_SECONDS)
    return response


async def complete(request: Request) -> dict[str, Any]:
    """The finished sign-in (session token, user, team, role); a BastionError otherwise."""
    params = {k: v[:4096] for k, v in request.query_params.items() if k in CALLBACK_PARAMS}
    idp = request.app.state.keys.idp_login
    if idp is None:
        raise NotFound("Sign-in at an identity provider is not configured.", code="not_found")
    flow = idp.flow(request.cookies.get(FLOW_COOKIE))
    return await identity_api.idp_sign_in(request, flow, params)


def signed_in(response: Response, result: dict[str, Any]) -> Response:
    """Sets the session cookie (as a directory sign-in does) and ends the flow."""
    max_age = max(1, int(result["expires_at"]) - int(datetime.now(UTC).timestamp()))
    set_cookie(response, SESSION_COOKIE, result["token"], max_age)
    set_flow(response, "", 0)
    return response
