"""App assembly: settings → components → one ASGI app.

The /v1 routes are plain Starlette routes (the hot path pays for nothing it does not use);
the /admin API is a mounted FastAPI app, for its typed validation and its OpenAPI document.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route

from bastion import __version__
from bastion.admin.api import router as admin_router
from bastion.audit import api as audit_api
from bastion.audit.trail import AuditTrail
from bastion.config import Settings
from bastion.core.errors import (
    AuthenticationFailed,
    BastionError,
    InvalidRequest,
    NotFound,
    error_response,
)
from bastion.engines.client import EngineClient
from bastion.gateway.pipeline import Gateway
from bastion.gateway.wire import ADAPTERS, WireAdapter
from bastion.identity import api as identity_api
from bastion.identity.keys import KeyStore
from bastion.identity.sso import SsoAuthenticator
from bastion.identity.teams import open_store
from bastion.limits.admission import Admission
from bastion.limits.counters import CounterBackend, MemoryCounters
from bastion.limits.redis_counters import RedisCounters
from bastion.metering.usage import UsageWriter
from bastion.observability.metrics import Metrics
from bastion.routing.balancer import LeastOutstanding, ModelRoute
from bastion.routing.health import HealthChecker

log = logging.getLogger("bastion")


def build_app(
    settings: Settings, *, health_interval: float = 5.0, port: int | None = None
) -> Starlette:
    db = open_store(settings)
    metrics = Metrics()
    audit = (
        AuditTrail(settings, db, metrics, port or settings.server.port)
        if settings.audit.enabled
        else None
    )
    balancer = LeastOutstanding()
    routes = {alias: ModelRoute.build(alias, m, balancer) for alias, m in settings.models.items()}
    deployments = [d for r in routes.values() for d in r.deployments]
    client = EngineClient()
    sso = SsoAuthenticator(settings.identity) if settings.identity.oidc else None
    keys = KeyStore(db, settings.identity.key_refresh_seconds, sso)
    if settings.identity.ldap is not None:
        from bastion.identity.ldap_login import DirectoryLogin

        keys.login = DirectoryLogin(settings.identity, db, audit)
    usage = UsageWriter(db, settings.database.usage_flush_seconds)
    admission = Admission(settings, _counters(settings), db, metrics)
    gateway = Gateway(settings, keys, usage, client, metrics, routes, admission, audit)
    health = HealthChecker(client, deployments, interval=health_interval)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        await client.start()
        await keys.start()
        if audit is not None:
            await audit.start()  # before any request: recovers what a crash left behind
        if keys.login is not None:
            keys.login.start()
        usage.start()
        health.start()
        # Everything built so far lives as long as the process: keep it out of the cyclic GC's
        # full collections, which otherwise stall the event loop for tens of milliseconds.
        gc.collect()
        gc.freeze()
        log.info("bastion %s serving %d model(s)", __version__, len(routes))
        try:
            yield
        finally:
            await health.stop()
            await keys.stop()
            if keys.login is not None:
                await keys.login.stop()
            await admission.close()
            await client.close()
            usage.close()  # drains every queued usage record before the process exits
            if audit is not None:
                await audit.close()  # final checkpoint, everything shipped
            db.dispose()

    def endpoint(wire: WireAdapter) -> Any:
        async def handle(request: Request) -> Any:
            return await gateway.handle(wire, request)

        return handle

    async def list_models(request: Request) -> Response:
        try:
            principal = await keys.authenticate(request.headers.get("authorization"))
        except BastionError as exc:
            return error_response(exc, "")
        data = [
            {"id": alias, "object": "model", "created": 0, "owned_by": r.settings.owned_by}
            for alias, r in routes.items()
            if principal.may_use(alias)
        ]
        return Response(
            orjson.dumps({"object": "list", "data": data}), media_type="application/json"
        )

    async def retrieve_model(request: Request) -> Response:
        try:
            principal = await keys.authenticate(request.headers.get("authorization"))
        except BastionError as exc:
            return error_response(exc, "")
        alias = request.path_params["model"]
        route = routes.get(alias)
        if route is None or not principal.may_use(alias):
            return error_response(NotFound(f"The model '{alias}' does not exist."), "")
        return Response(
            orjson.dumps(
                {"id": alias, "object": "model", "created": 0, "owned_by": route.settings.owned_by}
            ),
            media_type="application/json",
        )

    async def healthz(_request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    async def readyz(_request: Request) -> Response:
        models = {
            alias: {
                "ready": r.ready,
                "deployments": [
                    {
                        "name": d.name,
                        "healthy": d.healthy,
                        "in_flight": d.in_flight,
                    }
                    for d in r.deployments
                ],
            }
            for alias, r in routes.items()
        }
        ok = all(r.ready for r in routes.values())
        return Response(
            orjson.dumps({"status": "ready" if ok else "not ready", "models": models}),
            status_code=200 if ok else 503,
            media_type="application/json",
        )

    async def prometheus(_request: Request) -> Response:
        for d in deployments:
            metrics.deployment_up.labels(d.name).set(1 if d.healthy else 0)
        for alias, queue in gateway.queues.items():
            metrics.queued.labels(alias).set(queue.queued)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    admin_app = FastAPI(
        title="Bastion admin API",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url="/admin/openapi.json",
    )
    admin_app.include_router(admin_router)
    admin_app.include_router(audit_api.router)
    admin_app.include_router(audit_api.admin_router)
    admin_app.include_router(identity_api.router)
    _install_error_handlers(admin_app)
    app = Starlette(
        lifespan=lifespan,
        routes=[
            *(Route(wire.path, endpoint(wire), methods=["POST"]) for wire in ADAPTERS),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", retrieve_model, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", prometheus, methods=["GET"]),
            # Everything else — /admin and unknown URLs (404 in OpenAI format) — goes to the
            # FastAPI app, so the hot path above never pays for its middleware.
            Mount("", app=admin_app),
        ],
    )
    for state in (app.state, admin_app.state):
        state.settings, state.db, state.keys = settings, db, keys
        state.admission, state.audit = admission, audit
    app.state.gateway = gateway
    app.state.health = health
    return app


def _counters(settings: Settings) -> CounterBackend:
    if settings.limits.backend == "redis":
        return RedisCounters(settings.limits.redis_url)
    return MemoryCounters()


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
