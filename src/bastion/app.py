"""App assembly: settings → components → one ASGI app.

Components are built here, started in dependency order when the server starts and stopped in
reverse when it stops (`core/lifecycle.py`); nothing starts lazily on a request. Each
capability brings its own route table: the gateway's `/v1` routes and probes are plain
Starlette routes, so the hot path pays for nothing it does not use; `/admin`, `/audit` and
`/auth` form the control plane, a mounted FastAPI app that also answers unknown URLs (404 in
OpenAI's format).
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import TYPE_CHECKING

from sqlalchemy import Engine
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.responses import RedirectResponse
from starlette.routing import Mount, Route

from bastion import __version__
from bastion.admin.api import router as admin_router
from bastion.admin.app import control_plane, http_error
from bastion.admin.approvals import router as approvals_router
from bastion.audit import api as audit_api
from bastion.audit.trail import AuditTrail, TeamKeys
from bastion.config import Settings
from bastion.console.app import console_app
from bastion.core.lifecycle import Component, running
from bastion.engines.client import EngineClient
from bastion.gateway.pipeline import Gateway
from bastion.gateway.routes import GatewayApp, gateway_routes
from bastion.gateway.stored_responses import ResponseStore, TeamSealer
from bastion.identity import api as identity_api
from bastion.identity.keystore import KeyStore
from bastion.identity.oidc_login import IdpLogin
from bastion.identity.sessions import Sessions
from bastion.identity.sso import SsoAuthenticator
from bastion.identity.teams import open_store
from bastion.limits.admission import Admission
from bastion.limits.counters import CounterBackend, MemoryCounters
from bastion.limits.login_throttle import SharedLoginThrottle
from bastion.limits.redis_counters import RedisCounters
from bastion.metering.usage import UsageWriter
from bastion.observability.metrics import Metrics
from bastion.observability.tracing import Tracing
from bastion.registry import api as registry_api
from bastion.registry import deploy_api
from bastion.registry.enforce import check_deployments
from bastion.registry.serving import AdapterServing
from bastion.routing import api as routing_api
from bastion.routing.balancer import ModelRoute
from bastion.routing.engine_load import EngineLoadScraper
from bastion.routing.health import HealthChecker
from bastion.store.db import Database

if TYPE_CHECKING:
    from bastion.routing.kv_events import KvEventHub

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
    routes = {alias: ModelRoute.build(alias, m) for alias, m in settings.models.items()}
    for (alias, i), why in check_deployments(settings, db).items():  # refuse mode: raises
        routes[alias].deployments[i].registry_problem = why
    client = EngineClient()
    sso = SsoAuthenticator(settings.identity) if settings.identity.oidc else None
    counters = _counters(settings)
    keys = KeyStore(
        db,
        settings.identity.key_refresh_seconds,
        sso,
        self_service_max=timedelta(days=settings.identity.self_service_key_max_days),
        trail=audit,
    )
    console_sso = sso is not None and any(i.console for i in settings.identity.oidc)
    if settings.identity.ldap is not None or console_sso:  # one session secret for both
        # A shared database means a shared session key: never one invented here.
        keys.sessions = Sessions(settings.identity, db, create_key=settings.database.embedded)
    if sso is not None and keys.sessions is not None and console_sso:
        keys.idp_login = IdpLogin(settings.identity.oidc, sso, keys.sessions)
    if settings.identity.ldap is not None:
        from bastion.identity.ldap_login import DirectoryLogin  # needs the `ldap` extra

        keys.login = DirectoryLogin(
            settings.identity, db, audit, _login_throttle(settings, counters), keys.sessions
        )
    usage = UsageWriter(db, settings.database.usage_flush_seconds)
    metrics.follow(metrics.usage_pending, usage.pending)
    admission = Admission(settings, counters, db, metrics)
    responses = _response_store(settings, db, audit)
    adapters = AdapterServing(db, client, routes, interval=settings.registry.adapter_refresh_s)
    tracing = Tracing(settings.tracing, __version__) if settings.tracing.enabled else None
    gateway = Gateway(
        settings, keys, usage, client, metrics, routes, admission, audit, {"responses": responses},
        adapters, tracing,
    )  # fmt: skip
    health = HealthChecker(
        client, [d for r in routes.values() for d in r.deployments], interval=health_interval
    )
    engine_load, kv_events = _engine_watch(routes, client, metrics, health_interval)
    # Started in this order, stopped in reverse. The audit trail starts before any request can
    # arrive (it recovers what a crash left behind) and stops after every writer (its final
    # checkpoint covers them); usage records drain before it, the database closes last.
    components: list[Component | None] = [
        Database(db),
        audit,
        usage,
        client,
        keys,
        keys.login,
        admission,
        responses,
        health,
        adapters,
        engine_load,
        kv_events,
        tracing,
    ]

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        async with running([c for c in components if c is not None]):
            # Everything built so far lives as long as the process: keep it out of the cyclic
            # GC's full collections, which otherwise stall the event loop for tens of ms.
            gc.collect()
            gc.freeze()
            log.info("bastion %s serving %d model(s)", __version__, len(routes))
            yield

    admin = control_plane(
        [
            admin_router,
            approvals_router,
            audit_api.router,
            audit_api.admin_router,
            identity_api.router,
            routing_api.router,
            registry_api.router,
            deploy_api.router,
        ],
        openapi_public=settings.admin.openapi_public,
    )
    console = console_app()
    app = GatewayApp(
        lifespan=lifespan,
        routes=[
            *gateway_routes(gateway),
            Route("/console", lambda _r: RedirectResponse("/console/", status_code=308)),
            Mount("/console", app=console),
            Mount("", app=admin),
        ],
        # What no route serves (a /v1 route's other methods; URLs the mount cannot match, a
        # newline in the path) answers in OpenAI's format too.
        exception_handlers={HTTPException: http_error},
    )
    for state in (app.state, admin.state, console.state):
        state.settings, state.db, state.keys = settings, db, keys
        state.admission, state.audit = admission, audit
    for state in (admin.state, console.state):
        state.routes = routes
        state.routing_extras = [c.row for c in (engine_load, kv_events) if c is not None]
    app.state.gateway = gateway
    app.serve_directly(gateway)
    app.state.health = health
    return app


def _engine_watch(
    routes: dict[str, ModelRoute], client: EngineClient, metrics: Metrics, interval: float
) -> tuple[EngineLoadScraper, KvEventHub | None]:
    """Engine load from vLLM's /metrics (every vLLM deployment), and, for precise-mode
    models, their KV-cache event subscribers (docs/routing.md)."""
    deployments = [d for r in routes.values() for d in r.deployments]
    scraper = EngineLoadScraper(client, deployments, metrics.registry, interval)
    if not any(r.settings.routing.mode == "precise" for r in routes.values()):
        return scraper, None
    from bastion.routing.kv_events import KvEventHub  # needs the `precise` extra
    from bastion.routing.precise import Precise

    precise = [r for r in routes.values() if isinstance(r.balancer, Precise)]
    for route in precise:
        route.balancer.engine = scraper
    return scraper, KvEventHub(precise, metrics.registry)


def _response_store(settings: Settings, db: Engine, audit: AuditTrail | None) -> ResponseStore:
    """Stored responses are sealed like audit contents: with the team's audit data keys."""
    if audit is not None:
        keys = audit.keys
    else:
        from bastion.audit.keys import load_master_key

        keys = TeamKeys(db, load_master_key(settings.audit, create=settings.database.embedded))
    return ResponseStore(settings.responses, db, TeamSealer(db, keys))


def _login_throttle(settings: Settings, counters: CounterBackend) -> SharedLoginThrottle | None:
    """Sign-in failures counted across replicas where the limits live in Redis."""
    if settings.limits.backend != "redis":
        return None
    identity = settings.identity
    return SharedLoginThrottle(
        counters,
        identity.login_max_failures,
        identity.login_lockout_seconds,
    )


def _counters(settings: Settings) -> CounterBackend:
    if settings.limits.backend == "redis":
        return RedisCounters(settings.limits.redis_url)
    return MemoryCounters()
