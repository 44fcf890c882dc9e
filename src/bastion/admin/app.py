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

from bastion import __version__
from bastion.core.errors import (
    AuthenticationFailed,
    BastionError,
    InvalidRequest,
    NotFound,
    error_response,
)
from bastion.identity.access import Reader


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

    async def http_error(_req: Request, exc: Exception) -> Response:
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

    app.add_exception_handler(BastionError, bastion_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
