"""The gateway's route table: one route per wire API, the model list, and the probes.

These are plain Starlette routes: the request path pays for nothing it does not use. A POST to
a wire API's path does not even pass Starlette's router and middleware: `GatewayApp` hands it
to the pipeline directly (they cost a request about a tenth of its time; docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from bastion.core.errors import (
    AuthenticationFailed,
    BastionError,
    MethodNotAllowed,
    NotFound,
    error_response,
)
from bastion.gateway.pipeline import Gateway
from bastion.gateway.responses_api import responses_routes
from bastion.gateway.wire import ADAPTERS, WireAdapter
from bastion.gateway.wire.anthropic import MESSAGES, anthropic_error, anthropic_model_list
from bastion.identity.access import bearer_is
from bastion.registry.adapters import AdapterDeployment
from bastion.routing.balancer import ModelRoute


def gateway_routes(gateway: Gateway) -> list[Route]:
    routes, metrics = gateway.routes, gateway.metrics
    routers = gateway.settings.routers
    # What a caller may name as `model`, as /v1/models lists it: aliases, then routers.
    owners = {
        **{a: r.settings.owned_by for a, r in routes.items()},
        **{n: r.owned_by for n, r in routers.items()},
    }
    deployments = [d for r in routes.values() for d in r.deployments]

    def endpoint(wire: WireAdapter) -> Any:
        async def handle(request: Request) -> Any:
            return await gateway.handle(wire, request)

        return handle

    def model_card(alias: str) -> dict[str, Any]:
        return {"id": alias, "object": "model", "created": 0, "owned_by": owners[alias]}

    def adapter_card(t: AdapterDeployment) -> dict[str, Any]:
        # `parent`, as vLLM lists its own adapters: the base alias it runs on.
        return {**model_card(t.base_alias), "id": t.alias, "parent": t.base_alias}

    async def list_models(request: Request) -> Response:
        # Anthropic's SDKs send `anthropic-version` (and the key in x-api-key): their shape.
        anthropic = "anthropic-version" in request.headers
        try:
            principal = await gateway.keys.authenticate(MESSAGES.credential(request.headers))
        except BastionError as exc:
            return anthropic_error(exc) if anthropic else error_response(exc)
        allowed = [a for a in owners if principal.may_use(a)]
        deployed = gateway.adapters.callable_by(principal) if gateway.adapters else []
        if anthropic:
            names = allowed + [t.alias for t in deployed]
            return Response(anthropic_model_list(names), media_type="application/json")
        data = [model_card(a) for a in allowed] + [adapter_card(t) for t in deployed]
        return Response(
            orjson.dumps({"object": "list", "data": data}), media_type="application/json"
        )

    async def retrieve_model(request: Request) -> Response:
        anthropic = "anthropic-version" in request.headers
        fail = anthropic_error if anthropic else error_response
        try:
            principal = await gateway.keys.authenticate(MESSAGES.credential(request.headers))
        except BastionError as exc:
            return fail(exc)
        alias = request.path_params["model"]
        deployed = gateway.adapters.callable_by(principal) if gateway.adapters else []
        adapter = next((t for t in deployed if t.alias == alias), None)
        if adapter is None and (alias not in owners or not principal.may_use(alias)):
            return fail(NotFound(f"The model '{alias}' does not exist."))
        if anthropic:
            return Response(anthropic_model_list([alias], one=True), media_type="application/json")
        card = adapter_card(adapter) if adapter else model_card(alias)
        return Response(orjson.dumps(card), media_type="application/json")

    async def root(_request: Request) -> Response:
        # Claude Code checks that its base URL answers (HEAD /) before its first request.
        return Response(b"", status_code=200)

    async def healthz(_request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    def model_state(r: ModelRoute) -> dict[str, Any]:
        state: dict[str, Any] = {"ready": r.ready, "deployments": []}
        for d in r.deployments:
            dep = {"name": d.name, "healthy": d.healthy, "in_flight": d.in_flight}
            if d.registry_problem:  # the model registry's verdict at start (warn mode)
                dep["reason"] = d.registry_problem
                state["reason"] = "; ".join(filter(None, [state.get("reason"), d.registry_problem]))
            state["deployments"].append(dep)
        return state

    async def readyz(_request: Request) -> Response:
        models = {alias: model_state(r) for alias, r in routes.items()}
        ok = all(r.ready for r in routes.values())
        body: dict[str, Any] = {"status": "ready" if ok else "not ready", "models": models}
        if gateway.adapters and gateway.adapters.known:
            # Shown, not counted: one adapter that cannot load must not take the gateway out
            # of its load balancer (its alias answers 503 with the reason instead).
            body["adapters"] = gateway.adapters.status()
        return Response(
            orjson.dumps(body),
            status_code=200 if ok else 503,
            media_type="application/json",
        )

    metrics_key = gateway.settings.server.metrics_key

    def engines_now() -> None:
        for d in deployments:
            metrics.deployment_up.labels(d.name).set(1 if d.healthy else 0)
        for alias, queue in gateway.queues.items():
            metrics.queued.labels(alias).set(queue.queued)

    metrics.every_second(engines_now)

    async def prometheus(request: Request) -> Response:
        if metrics_key is not None and not bearer_is(
            request.headers.get("authorization"), metrics_key
        ):
            return error_response(
                AuthenticationFailed("/metrics needs its bearer key.", code="invalid_metrics_key")
            )
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    table = [
        *(Route(wire.path, endpoint(wire), methods=["POST"]) for wire in ADAPTERS),
        *responses_routes(gateway),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", retrieve_model, methods=["GET"]),
        Route("/", root, methods=["GET", "HEAD"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
    ]
    # Any other method on these paths is a 405 naming the ones they answer; without these the
    # control plane's catch-all mount would take the request and answer 404.
    return table + [Route(r.path, _NotAllowed(r.methods or set())) for r in table]


class GatewayApp(Starlette):
    """Starlette, with the wire APIs' POSTs dispatched before its router and middleware. The
    pipeline answers every error itself; anything else on these paths (another method, a
    `root_path` to strip) takes Starlette's way."""

    hot: dict[str, tuple[Gateway, WireAdapter]] = {}

    def serve_directly(self, gateway: Gateway) -> None:
        self.hot = {wire.path: (gateway, wire) for wire in ADAPTERS}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            target = self.hot.get(scope["path"])
            if target is not None:
                scope["app"] = self
                gateway, wire = target
                gateway.active += 1
                try:
                    response = await gateway.handle(wire, Request(scope, receive))
                    await response(scope, receive, send)
                finally:
                    gateway.active -= 1
                return
        await super().__call__(scope, receive, send)


class _NotAllowed:
    """An ASGI endpoint (so Starlette routes every method to it) answering 405."""

    def __init__(self, allowed: set[str]):
        self.allowed = frozenset(allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await error_response(MethodNotAllowed(scope["method"], self.allowed))(scope, receive, send)
