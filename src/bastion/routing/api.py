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
    the prompt tokens read from its prefix cache, since the gateway started."""
    routes = ctx.state.routes
    if model is not None and model not in routes:
        raise NotFound(f"The model '{model}' does not exist.", code="model_not_found")
    chosen = [routes[model]] if model is not None else list(routes.values())
    return [row for route in chosen for row in route.status()]
