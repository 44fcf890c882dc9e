"""Console sign-in at the bank's IdP: OpenID Connect authorization code flow with PKCE.

Why it is built this way:
- **PKCE (RFC 7636, S256), `state` and `nonce`.** The verifier never leaves this browser's flow
  cookie and Bastion's token request, so an intercepted code is useless; `state` ties the
  callback to the browser that started the flow (no login CSRF); `nonce` ties the ID token to
  this flow (no replayed ID token).
- **Stateless flows.** What the callback must check (issuer, state, nonce, verifier, redirect
  URI) travels in one short-lived cookie, a JWT signed (PyJWT, HS256) with a key derived from
  the session secret, so any replica can finish a flow another started, and an expired or
  tampered flow is refused by the JWT checks themselves.
- **The API's validator for the ID token.** Pinned algorithms, issuer, expiry, signature from
  the issuer's JWKS, audience = the console's client id; then the nonce. Groups go through
  `SsoAuthenticator.map`, exactly as an API caller's token: same team and role, same 403 for a
  user in no mapped group, and SSO-minted keys follow the result.
- **The IdP's endpoints from discovery** (`/.well-known/openid-configuration`), whose `issuer`
  must be the configured one (RFC 8414 mix-up defence), fetched with aiohttp (the
  gateway's own HTTP client) and cached.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import aiohttp
import jwt
import orjson

from bastion.core.errors import AuthenticationFailed, DirectoryDown, InvalidRequest
from bastion.identity.oidc import Identity, InvalidToken
from bastion.identity.principal import Principal
from bastion.identity.sessions import Sessions
from bastion.identity.settings import GroupMapping, OidcConsole, OidcIssuer
from bastion.identity.sso import SsoAuthenticator
from bastion.identity.teams import Team

#: How long a browser may spend at the IdP between starting and finishing a sign-in.
FLOW_SECONDS = 600
FLOW_ISSUER = "bastion-console-oidc"
#: Largest IdP response read (discovery, token): a misbehaving IdP cannot exhaust memory.
MAX_RESPONSE = 1 << 20


class SignInFailed(AuthenticationFailed):
    """The IdP sign-in did not complete; the message is shown on the login page."""


@dataclass(frozen=True)
class SignedIn:
    identity: Identity
    mapping: GroupMapping
    principal: Principal
    token: str
    expires_at: int


@dataclass(frozen=True)
class Flow:
    """One sign-in in progress, as its cookie carries it."""

    issuer: str
    state: str
    nonce: str
    verifier: str
    redirect_uri: str


def challenge(verifier: str) -> str:
    """RFC 7636 S256: BASE64URL(SHA256(verifier)), unpadded."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class IdpLogin:
    """Console sign-in at each issuer of `identity.oidc` that has a `console:` section."""

    def __init__(
        self, issuers: list[OidcIssuer], sso: SsoAuthenticator, sessions: Sessions
    ) -> None:
        self.issuers = {i.issuer: i for i in issuers if i.console is not None}
        self.sso = sso
        self.sessions = sessions
        self._flow_key = sessions.derive("console-oidc-flow")
        self._meta: dict[str, dict[str, Any]] = {}

    def providers(self) -> list[tuple[str, str]]:
        """(issuer, button label) of each IdP the login page offers."""
        return [(i.issuer, i.console.name) for i in self.issuers.values() if i.console]

    def _console(self, issuer: str) -> tuple[OidcIssuer, OidcConsole]:
        found = self.issuers.get(issuer)
        if found is None or found.console is None:
            raise InvalidRequest("No such identity provider.", code="unknown_idp")
        return found, found.console

    async def _fetch(
        self, method: str, url: str, auth: aiohttp.BasicAuth | None = None, **kwargs: Any
    ) -> Any:
        """JSON from the IdP; 503 if it cannot be reached or answers nonsense."""
        try:
            timeout = aiohttp.ClientTimeout(total=5.0)
            async with (
                aiohttp.ClientSession(timeout=timeout) as http,
                http.request(method, url, auth=auth, allow_redirects=False, **kwargs) as resp,
            ):
                status, raw = resp.status, bytearray()
                async for chunk in resp.content.iter_chunked(1 << 16):
                    raw += chunk
                    if len(raw) > MAX_RESPONSE:
                        raise ValueError("response too large")
            body = orjson.loads(raw)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise DirectoryDown(
                f"The identity provider cannot be reached ({type(exc).__name__}); try again.",
                code="idp_unavailable",
            ) from None
        if status >= 400:
            error = body.get("error") if isinstance(body, dict) else None
            error = str(error or status)[:100]
            raise SignInFailed(
                f"The identity provider refused the sign-in: {error}.",
                code="idp_refused",
            )
        return body

    async def _discover(self, issuer: str) -> dict[str, Any]:
        meta = self._meta.get(issuer)
        if meta is None:
            meta = await self._fetch(
                "GET", issuer.rstrip("/") + "/.well-known/openid-configuration"
            )
            endpoints = ("authorization_endpoint", "token_endpoint")
            methods = (
                meta.get("code_challenge_methods_supported", ["S256"])
                if isinstance(meta, dict)
                else []
            )
            if (
                not isinstance(meta, dict)
                or meta.get("issuer") != issuer
                or not all(isinstance(meta.get(e), str) for e in endpoints)
                or "S256" not in methods
            ):
                raise DirectoryDown(
                    "The identity provider's discovery document does not fit (issuer, "
                    "endpoints or PKCE S256): ask your administrator.",
                    code="idp_unavailable",
                )
            self._meta[issuer] = meta
        return meta

    async def start(self, issuer: str, callback: str) -> tuple[str, str]:
        """The IdP's authorization URL to send the browser to, and the flow cookie's value."""
        settings, console = self._console(issuer)
        meta = await self._discover(settings.issuer)
        flow = Flow(
            settings.issuer,
            secrets.token_urlsafe(32),
            secrets.token_urlsafe(32),
            secrets.token_urlsafe(48),
            console.redirect_uri or callback,
        )
        query = urlencode(
            {
                "response_type": "code",
                "client_id": console.client_id,
                "redirect_uri": flow.redirect_uri,
                "scope": " ".join(console.scopes),
                "state": flow.state,
                "nonce": flow.nonce,
                "code_challenge": challenge(flow.verifier),
                "code_challenge_method": "S256",
            }
        )
        endpoint = str(meta["authorization_endpoint"])
        url = endpoint + ("&" if "?" in endpoint else "?") + query
        now = int(time.time())
        cookie = jwt.encode(
            {"iss": FLOW_ISSUER, "iat": now, "exp": now + FLOW_SECONDS, "idp": flow.issuer,
             "st": flow.state, "n": flow.nonce, "v": flow.verifier, "r": flow.redirect_uri},
            self._flow_key, algorithm="HS256",
        )  # fmt: skip
        return url, cookie

    def flow(self, cookie: str | None) -> Flow:
        """The flow this browser started; refused if none, expired or not ours."""
        if not cookie:
            raise SignInFailed(
                "This sign-in was not started in this browser (or its cookie was lost): "
                "start again.",
                code="oidc_no_flow",
            )
        try:
            c = jwt.decode(
                cookie, self._flow_key, algorithms=["HS256"], issuer=FLOW_ISSUER,
                options={"require": ["exp", "iss"]},
            )  # fmt: skip
        except jwt.ExpiredSignatureError:
            raise SignInFailed(
                f"The sign-in took longer than {FLOW_SECONDS // 60} minutes: start again.",
                code="oidc_flow_expired",
            ) from None
        except jwt.PyJWTError:
            raise SignInFailed("The sign-in could not be verified: start again.",
                               code="oidc_bad_flow") from None  # fmt: skip
        return Flow(str(c["idp"]), str(c["st"]), str(c["n"]), str(c["v"]), str(c["r"]))

    async def finish(self, flow: Flow, params: dict[str, str]) -> Identity:
        """Checks the callback's parameters against the flow, trades the code and validates
        the ID token: who signed in (`admit` then maps them)."""
        if "error" in params:
            detail = params.get("error_description") or params["error"]
            raise SignInFailed(
                f"The identity provider did not sign you in: {detail[:200]}.", code="idp_refused"
            )
        if not hmac.compare_digest(params.get("state", ""), flow.state):
            raise SignInFailed(
                "The sign-in's state does not match the one this browser started (a stale or "
                "forged link): start again.",
                code="oidc_state_mismatch",
            )
        if params.get("iss") not in (None, flow.issuer):  # RFC 9207, where the IdP sends it
            raise SignInFailed("The answer came from another identity provider.",
                               code="oidc_issuer_mismatch")  # fmt: skip
        code = params.get("code", "")
        if not code or len(code) > 4096:
            raise SignInFailed("The identity provider sent no code.", code="oidc_no_code")
        settings, console = self._console(flow.issuer)
        meta = await self._discover(settings.issuer)
        form = {"grant_type": "authorization_code", "code": code,
                "redirect_uri": flow.redirect_uri, "code_verifier": flow.verifier}  # fmt: skip
        auth = None
        if console.client_secret is not None:
            auth = aiohttp.BasicAuth(console.client_id, console.client_secret)
        else:
            form["client_id"] = console.client_id
        tokens = await self._fetch("POST", str(meta["token_endpoint"]), data=form, auth=auth)
        id_token = tokens.get("id_token") if isinstance(tokens, dict) else None
        if not isinstance(id_token, str):
            raise SignInFailed("The identity provider sent no ID token.", code="oidc_no_id_token")
        return await self._id_token(id_token, flow, console)

    async def admit(self, who: Identity, teams: dict[str, Team]) -> SignedIn:
        """Maps the user's groups as for an API token (403 if none is mapped), then issues the
        console session."""
        console = self._console(who.issuer)[1]
        mapping, principal = self.sso.map(who, teams)
        token, expires = await _issue(self.sessions, who, mapping, console.session_seconds)
        return SignedIn(who, mapping, principal, token, expires)

    async def _id_token(self, id_token: str, flow: Flow, console: OidcConsole) -> Identity:
        try:
            who = await self.sso.validator.validate(id_token, audience=console.client_id)
        except InvalidToken as exc:
            raise SignInFailed(
                f"The identity provider's ID token was rejected: {exc.reason}.",
                code="invalid_token",
            ) from None
        if who.issuer != flow.issuer:
            raise SignInFailed("The ID token is from another identity provider.",
                               code="oidc_issuer_mismatch")  # fmt: skip
        nonce = who.claims.get("nonce")
        if not isinstance(nonce, str) or not hmac.compare_digest(nonce, flow.nonce):
            raise SignInFailed("The ID token was not issued for this sign-in (nonce).",
                               code="oidc_nonce_mismatch")  # fmt: skip
        aud = who.claims.get("aud")
        if isinstance(aud, list) and len(aud) > 1 and who.claims.get("azp") != console.client_id:
            raise SignInFailed("The ID token was issued to another client (azp).",
                               code="invalid_token")  # fmt: skip
        return who


async def _issue(
    sessions: Sessions, who: Identity, mapping: GroupMapping, ttl: int
) -> tuple[str, int]:
    return await asyncio.to_thread(
        lambda: sessions.issue(
            who.user, mapping.team, mapping.role, ttl, idp=who.issuer, idp_sub=who.subject
        )
    )
