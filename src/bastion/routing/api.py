"""`GET /admin/routing`: each deployment's routing state, as `bastion routing status` shows it."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from bastion.core.bounds import Name
from bastion.core.errors import NotFound
from bastion.identity.access import Admin

router = APIRouter(prefix="/admin", tags=["admin"])


@router.get("/routing")
def get_routing(ctx: Admin, model: Name | None = None) -> list[dict[str, Any]]:
    """Per deployment: mode, availability, in-flight requests, routing decisions by reason and
    the prompt tokens read from its prefix cache, since the gateway started; for vLLM, its
    queue depth and KV-cache usage as last scraped; in precise mode, its KV-event state."""
    routes = ctx.state.routes
    if model is not None and model not in routes:
        raise NotFound(f"The model '{model}' does not exist.", code="model_not_found")
    chosen = [routes[model]] if model is not None else list(routes.values())
    # Per-deployment fields other components add (engine load, KV-event state), by name.
    extras = getattr(ctx.state, "routing_extras", ())
    rows = []
    for route in chosen:
        for dep, row in zip(route.deployments, route.status(), strict=True):
            for extra in extras:
                row.update(extra(dep))
            rows.append(row)
    return rows
