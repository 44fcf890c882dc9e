"""The control plane's OpenAPI document, made to tell the truth about what the routes answer.

FastAPI documents each route's success and a 422 for invalid input. Bastion answers invalid
input with a 400, and every route may also answer the errors of the layers around it: the
guard (401 no credential, 413 too large), the roles (403), a name that does not exist (404), a
change that contradicts the store (409), an audit trail or limits backend that cannot do its
job (503). They are declared here once, for every operation, in OpenAI's error format, rather
than on each route; so is the bearer credential, as a security scheme instead of a header.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from fastapi.routing import APIRoute

from bastion.core.errors import ERROR_SCHEMA

#: What every operation may answer besides its success.
ERRORS: dict[int, str] = {
    400: "The request is invalid: a parameter or the body does not validate.",
    401: "No valid credential (the admin key, an API key, a session or an SSO token).",
    403: "The credential's role may not do this.",
    404: "What the request names does not exist (or is not the caller's to see).",
    413: "The body is larger than the control plane accepts.",
    503: "A control cannot do its job (audit trail, limits backend, directory): nothing done.",
}
#: Only changes can conflict with what is stored.
CHANGE_ERRORS: dict[int, str] = {
    409: "The change contradicts what is stored (a name taken, a team under legal hold).",
}
#: Operations that answer more than the shared set.
EXTRA_ERRORS: dict[tuple[str, str], dict[int, str]] = {
    ("post", "/auth/login"): {429: "Too many failed sign-ins for this user or address."},
}
CHANGES = frozenset({"post", "put", "patch", "delete"})
#: What a created resource leads to (OpenAPI links: clients and stateful testers follow them).
_KEY = {"key_id": "$response.body#/id"}
LINKS: dict[tuple[str, str, str], dict[str, tuple[str, str, dict[str, str]]]] = {
    ("post", "/admin/keys", "201"): {
        "GetKey": ("get", "/admin/keys/{key_id}", _KEY),
        "SetKeyLimits": ("put", "/admin/keys/{key_id}/limits", _KEY),
        "RevokeKey": ("post", "/admin/keys/{key_id}/revoke", _KEY),
    },
    ("put", "/admin/keys/{key_id}/limits", "200"): {
        "RevokeKey": ("post", "/admin/keys/{key_id}/revoke", _KEY),
    },
    ("post", "/auth/keys", "201"): {
        "RevokeOwnKey": ("post", "/auth/keys/{key_id}/revoke", _KEY),
    },
    ("post", "/admin/audit/holds", "201"): {
        "ReleaseHold": ("delete", "/admin/audit/holds/{team}", {"team": "$response.body#/team"}),
    },
}


def document(doc: dict[str, Any], public: Iterable[str]) -> dict[str, Any]:
    """FastAPI's document, with the errors every operation answers and the bearer scheme."""
    public = frozenset(public)
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    schemas["Error"] = ERROR_SCHEMA
    components["securitySchemes"] = {
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "The admin key, an API key, a session token or an SSO token.",
        }
    }
    for path, operations in doc.get("paths", {}).items():
        for method, op in operations.items():
            # The credential is the security scheme's, not a parameter anyone may vary.
            params = [
                p
                for p in op.get("parameters", [])
                if not (p.get("in") == "header" and p.get("name", "").lower() == "authorization")
            ]
            if params:
                op["parameters"] = params
            else:
                op.pop("parameters", None)
            if path not in public:
                op["security"] = [{"bearer": []}]
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            errors = {**ERRORS, **(CHANGE_ERRORS if method in CHANGES else {})}
            errors.update(EXTRA_ERRORS.get((method, path), {}))
            for status, description in sorted(errors.items()):
                responses.setdefault(
                    str(status),
                    {
                        "description": description,
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}
                        },
                    },
                )
    _link(doc)
    return doc


def _link(doc: dict[str, Any]) -> None:
    paths = doc.get("paths", {})
    for (method, path, status), links in LINKS.items():
        response = paths.get(path, {}).get(method, {}).get("responses", {}).get(status)
        if response is None:
            continue
        for name, (to_method, to_path, parameters) in links.items():
            if to_method in paths.get(to_path, {}):
                pointer = to_path.replace("~", "~0").replace("/", "~1")
                response.setdefault("links", {})[name] = {
                    "operationRef": f"#/paths/{pointer}/{to_method}",
                    "parameters": parameters,
                }


class Methods:
    """The methods each control-plane path answers, to refuse any other with a 405 that lists
    all of them (FastAPI keeps one route per method and its 405 names only the first)."""

    def __init__(self, routes: Iterable[Any], extra: dict[str, set[str]] | None = None):
        table: dict[str, tuple[re.Pattern[str], set[str]]] = {}
        for route in routes:
            if isinstance(route, APIRoute):
                _, methods = table.setdefault(route.path, (route.path_regex, set()))
                methods.update(route.methods)
        for path, methods in (extra or {}).items():
            table.setdefault(path, (re.compile("^" + re.escape(path) + "$"), set()))[1].update(
                methods
            )
        self.table = list(table.values())

    def allowed(self, path: str) -> set[str] | None:
        """Every method of the paths that match, or None for a path no route serves."""
        found: set[str] = set()
        matched = False
        for regex, methods in self.table:
            if regex.match(path):
                matched = True
                found |= methods
        return found if matched else None
