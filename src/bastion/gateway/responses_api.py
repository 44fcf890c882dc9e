"""`GET`/`DELETE /v1/responses/{id}`, its input items, and `cancel`: a team's stored responses.

Another team's response, an expired or a shredded one answer 404, as an unknown id does: the
caller learns nothing about responses that are not its own team's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bastion.core.errors import (
    BastionError,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    error_response,
)
from bastion.gateway.pipeline import Gateway
from bastion.gateway.stored_responses import ResponseStore
from bastion.identity.principal import Principal
from bastion.identity.roles import CALLERS


def responses_routes(gateway: Gateway) -> list[Route]:
    store = gateway.hooks.get("responses")
    if not isinstance(store, ResponseStore):
        return []

    def guarded(
        action: Callable[[Principal, str, Request], Awaitable[Any]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def handle(request: Request) -> Response:
            try:
                principal = await gateway.keys.authenticate(request.headers.get("authorization"))
                if principal.role not in CALLERS:
                    raise PermissionDenied(
                        f"The {principal.role} role cannot use responses.",
                        code="role_not_allowed",
                    )
                body = await action(principal, request.path_params["response_id"], request)
            except BastionError as exc:
                return error_response(exc)
            return Response(orjson.dumps(body), media_type="application/json")

        return handle

    async def one(p: Principal, rid: str, request: Request) -> Any:
        if request.method == "DELETE":
            await store.delete(p.team, rid)
            return {"id": rid, "object": "response", "deleted": True}
        return await store.get(p.team, rid)

    async def items(p: Principal, rid: str, _r: Request) -> Any:
        data = await store.input_items(p.team, rid)
        return {"object": "list", "data": data, "has_more": False}

    async def cancel(p: Principal, rid: str, _r: Request) -> Any:
        if await store.read(p.team, rid) is None:
            raise NotFound(f"Response with id '{rid}' not found.", code="not_found")
        raise InvalidRequest(
            "Only responses created with 'background': true can be cancelled, and Bastion "
            "runs none in the background.",
            code="not_cancellable",
        )

    return [
        # One route per path, so a 405 names every method the path answers.
        Route("/v1/responses/{response_id}", guarded(one), methods=["GET", "DELETE"]),
        Route("/v1/responses/{response_id}/input_items", guarded(items), methods=["GET"]),
        Route("/v1/responses/{response_id}/cancel", guarded(cancel), methods=["POST"]),
    ]
