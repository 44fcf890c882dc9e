"""The gateway's route table: one route per wire API, the model list, and the probes.

These are plain Starlette routes: the request path pays for nothing it does not use.
"""

from __future__ import annotations

from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bastion.core.errors import AuthenticationFailed, BastionError, NotFound, error_response
from bastion.gateway.pipeline import Gateway
from bastion.gateway.responses_api import responses_routes
from bastion.gateway.wire import ADAPTERS, WireAdapter
from bastion.identity.access import bearer_is
from bastion.routing.balancer import ModelRoute


def gateway_routes(gateway: Gateway) -> list[Route]:
    routes, metrics = gateway.routes, gateway.metrics
    deployments = [d for r in routes.values() for d in r.deployments]

    def endpoint(wire: WireAdapter) -> Any:
        async def handle(request: Request) -> Any:
            return await gateway.handle(wire, request)

        return handle

    def model_card(alias: str, route: ModelRoute) -> dict[str, Any]:
        return {"id": alias, "object": "model", "created": 0, "owned_by": route.settings.owned_by}

    async def list_models(request: Request) -> Response:
        try:
            principal = await gateway.keys.authenticate(request.headers.get("authorization"))
        except BastionError as exc:
            return error_response(exc)
        data = [model_card(a, r) for a, r in routes.items() if principal.may_use(a)]
        return Response(
            orjson.dumps({"object": "list", "data": data}), media_type="application/json"
        )

    async def retrieve_model(request: Request) -> Response:
        try:
            principal = await gateway.keys.authenticate(request.headers.get("authorization"))
        except BastionError as exc:
            return error_response(exc)
        alias = request.path_params["model"]
        route = routes.get(alias)
        if route is None or not principal.may_use(alias):
            return error_response(NotFound(f"The model '{alias}' does not exist."))
        return Response(orjson.dumps(model_card(alias, route)), media_type="application/json")

    async def healthz(_request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    async def readyz(_request: Request) -> Response:
        models = {
            alias: {
                "ready": r.ready,
                "deployments": [
                    {"name": d.name, "healthy": d.healthy, "in_flight": d.in_flight}
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

    metrics_key = gateway.settings.server.metrics_key

    async def prometheus(request: Request) -> Response:
        if metrics_key is not None and not bearer_is(
            request.headers.get("authorization"), metrics_key
        ):
            return error_response(
                AuthenticationFailed("/metrics needs its bearer key.", code="invalid_metrics_key")
            )
        for d in deployments:
            metrics.deployment_up.labels(d.name).set(1 if d.healthy else 0)
        for alias, queue in gateway.queues.items():
            metrics.queued.labels(alias).set(queue.queued)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return [
        *(Route(wire.path, endpoint(wire), methods=["POST"]) for wire in ADAPTERS),
        *responses_routes(gateway),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", retrieve_model, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
    ]
