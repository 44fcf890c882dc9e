"""The console's browser-facing defences: headers, cookies, CSRF tokens and who is signed in.

- **Headers.** Every console response carries a strict Content-Security-Policy (only this
  origin's scripts, styles and connections; no inline script or style, no framing), and
  `nosniff`, `no-referrer` and `no-store` (pages show keys and spend).
- **Cookies.** The session cookie holds the same `bss-` session token `bastion login` gets, so
  revocation, expiry and directory re-checks work exactly as for the API. It is `Secure`,
  `HttpOnly` and `SameSite=Strict`, scoped to `/console`.
- **CSRF.** Every form carries a token: an HMAC, under a secret derived from the session key,
  of a random per-browser nonce (its own cookie) bound to the current session. A cross-site
  form cannot read either cookie, so it cannot produce the token; SameSite=Strict is a second
  wall, not the only one.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bastion.core.errors import (
    AuthenticationFailed,
    BastionError,
    BodyTooLarge,
    InvalidRequest,
    PermissionDenied,
)
from bastion.identity.principal import Principal

SESSION_COOKIE = "bastion_session"
NONCE_COOKIE = "bastion_csrf"
COOKIE_PATH = "/console"
MAX_FORM = 64 * 1024
FORM_TYPES = ("application/x-www-form-urlencoded", "")
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
]


class SecurityHeaders:
    """Adds the headers above to every response under /console (errors included); pages and
    JSON are not cached, vendored assets may be."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope["path"].startswith("/console/static/")

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0] != b"cache-control"]
                headers += HEADERS
                headers.append(
                    (b"cache-control", b"public, max-age=3600" if static else b"no-store")
                )
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)


def set_cookie(response: Response, name: str, value: str, max_age: int | None = None) -> None:
    response.set_cookie(
        name, value, max_age=max_age, path=COOKIE_PATH, secure=True, httponly=True,
        samesite="strict",
    )  # fmt: skip


def clear_cookie(response: Response, name: str) -> None:
    response.delete_cookie(name, path=COOKIE_PATH, secure=True, httponly=True, samesite="strict")


def _csrf_secret(request: Request) -> bytes:
    sessions = request.app.state.keys.sessions
    if sessions is not None:
        return sessions.derive("console-csrf")  # type: ignore[no-any-return]
    # No sign-in configured: no session can exist, and a per-process secret protects nothing
    # that another replica must check.
    state = request.app.state
    if getattr(state, "csrf_fallback", None) is None:
        state.csrf_fallback = secrets.token_bytes(32)
    return state.csrf_fallback  # type: ignore[no-any-return]


def nonce(request: Request) -> tuple[str, bool]:
    """The browser's CSRF nonce, and whether it is new (then the response must set it)."""
    have = request.cookies.get(NONCE_COOKIE, "")
    if len(have) == 43 and have.replace("-", "").replace("_", "").isalnum():
        return have, False
    return secrets.token_urlsafe(32), True


def csrf_token(request: Request, browser_nonce: str) -> str:
    session = request.cookies.get(SESSION_COOKIE, "")
    bound = hashlib.sha256(session.encode()).hexdigest()
    mac = hmac.new(_csrf_secret(request), f"{browser_nonce}|{bound}".encode(), hashlib.sha256)
    return mac.hexdigest()


async def check_csrf(request: Request) -> dict[str, str]:
    """The form's fields, if its CSRF token is right for this browser and session (else 403)."""
    form = await read_form(request)
    sent = form.get("csrf", "")
    have = request.cookies.get(NONCE_COOKIE, "")
    if not have or not hmac.compare_digest(sent, csrf_token(request, have)):
        raise PermissionDenied(
            "The form's security token is missing or stale: reload the page and try again.",
            code="csrf_failed",
        )
    return form


async def read_form(request: Request) -> dict[str, str]:
    """An url-encoded form (the only kind the console's pages send), at most MAX_FORM bytes;
    a field given twice keeps its first value."""
    if request.headers.get("content-type", "").split(";")[0].strip() not in FORM_TYPES:
        raise InvalidRequest("Send the form as application/x-www-form-urlencoded.")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM:
            raise BodyTooLarge(f"A console form is at most {MAX_FORM} bytes.")
    fields: dict[str, str] = {}
    for name, value in parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True):
        fields.setdefault(name, value)
    return fields


async def viewer(request: Request) -> Principal | None:
    """The signed-in person, from the session cookie; None if there is none or it no longer
    works (signed out, expired, revoked, or the directory's groups changed)."""
    token = request.cookies.get(SESSION_COOKIE)
    if not token or not token.startswith("bss-"):
        return None
    try:
        who: Principal = await request.app.state.keys.authenticate(f"Bearer {token}")
    except AuthenticationFailed:
        return None
    except BastionError:
        raise  # the directory is down (503): say so rather than pretend nobody is signed in
    return who if who.signed_in else None
