"""The control plane's HTTP app (`/admin`, `/audit`, `/auth`): FastAPI, for typed validation
and its OpenAPI document (`/admin/openapi.json`), with every error in OpenAI's envelope.

Each capability brings its own router; the handlers read what they share (settings, database,
key store, admission, audit trail) from `request.app.state`, set once by the app's assembly.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bastion import __version__
from bastion.admin.openapi import Methods, document
from bastion.core.errors import (
    AuthenticationFailed,
    BastionError,
    BodyTooLarge,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    error_response,
)
from bastion.identity.access import Reader, acting

#: The largest body any control-plane route accepts (keys, teams, limits, holds, sign-ins).
MAX_BODY = 1024 * 1024
#: The control plane's own prefixes: anything else (an unknown URL) is a plain 404.
PROTECTED = ("/admin", "/audit", "/auth")
#: Routes that take no credential: sign-in carries its credentials in the body.
OPEN_PATHS = frozenset({"/auth/login"})


class Guard:
    """Runs before FastAPI reads a body: a credential that authenticates (roles are checked by
    each route), then a size limit, so an anonymous caller can make the gateway read nothing.
    Then a method the path does not answer is a 405 naming every method it does (FastAPI's
    names one route's only), and a NUL in the path or query a 400: no column can hold it."""

    def __init__(
        self, app: ASGIApp, public: frozenset[str] = OPEN_PATHS, methods: Methods | None = None
    ):
        self.app = app
        self.public = public
        self.methods = methods

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        try:
            path, authorization = scope["path"], request.headers.get("authorization")
            if path.startswith("/admin") and path not in self.public:
                await acting(request, authorization)  # the admin key, or a role's credential
            elif path.startswith(PROTECTED) and path not in self.public:
                await request.app.state.keys.authenticate(authorization)
            allowed = self.methods.allowed(path) if self.methods else None
            if allowed is not None and scope["method"] not in allowed:
                raise MethodNotAllowed(scope["method"], allowed)
            if "\x00" in path or b"%00" in scope.get("query_string", b""):
                raise InvalidRequest("The URL contains a NUL character.", code="invalid_value")
            receive = await _bounded(request, receive)
        except BastionError as exc:
            await error_response(exc)(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def _bounded(request: Request, receive: Receive) -> Receive:
    """The body, read here up to MAX_BODY (413 beyond), replayed to the route."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY:
        raise BodyTooLarge(f"Request body is {declared} bytes; the limit is {MAX_BODY} bytes.")
    if request.method in ("GET", "HEAD"):
        return receive
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            return receive  # the client left: let the route see it
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > MAX_BODY:
            raise BodyTooLarge(f"Request body exceeds the limit of {MAX_BODY} bytes.")
        more = message.get("more_body", False)
    replay: list[Message] = [{"type": "http.request", "body": b"".join(chunks)}]

    async def replayed() -> Message:
        return replay.pop() if replay else await receive()

    return replayed


def control_plane(routers: list[APIRouter], openapi_public: bool = True) -> FastAPI:
    app = FastAPI(
        title="Bastion admin API",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url="/admin/openapi.json" if openapi_public else None,
    )
    for router in routers:
        app.include_router(router)
    if not openapi_public:

        @app.get("/admin/openapi.json", include_in_schema=False)
        async def openapi(_reader: Reader) -> dict[str, Any]:
            return app.openapi()

    _install_error_handlers(app)
    public = OPEN_PATHS | ({"/admin/openapi.json"} if openapi_public else frozenset())
    generated, truth = app.openapi, {}

    def truthful() -> dict[str, Any]:
        if not truth:  # FastAPI's document once, amended once (see `admin/openapi.py`)
            truth.update(document(generated(), OPEN_PATHS))
        return truth

    app.openapi = truthful  # type: ignore[method-assign]
    methods = Methods(
        [r for router in routers for r in router.routes], {"/admin/openapi.json": {"GET"}}
    )
    app.add_middleware(Guard, public=frozenset(public), methods=methods)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    """Every error leaves in OpenAI's envelope, admin API included."""

    async def bastion_error(_req: Request, exc: Exception) -> Response:
        assert isinstance(exc, BastionError)
        return error_response(exc, "")

    async def validation_error(_req: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"] if p not in ("body", "query", "path"))
        return error_response(
            InvalidRequest(
                f"{where or 'request'}: {first['msg']}", param=where or None, code="invalid_value"
            ),
            "",
        )

    app.add_exception_handler(BastionError, bastion_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)


async def http_error(_req: Request, exc: Exception) -> Response:
    """Starlette's own errors (an unknown URL, a method a route does not answer), in OpenAI's
    envelope: the gateway's outer app uses it too."""
    assert isinstance(exc, HTTPException)
    err: BastionError
    if exc.status_code == 401:
        err = AuthenticationFailed(str(exc.detail))
    elif exc.status_code == 404:
        err = NotFound(
            str(exc.detail) if exc.detail != "Not Found" else "Unknown URL.", code="not_found"
        )
    else:
        err = InvalidRequest(str(exc.detail), code="http_error")
        err_status = exc.status_code
        return Response(
            err.json(),
            status_code=err_status,
            media_type="application/json",
            headers=getattr(exc, "headers", None),
        )
    return error_response(err, "")
