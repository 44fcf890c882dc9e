"""Bastion's one error tree, and the one place that renders it (OpenAI JSON, or an SSE event).

    BastionError                        status  type                   default code
    ├── InvalidRequest                   400    invalid_request_error  (set per case)
    │   ├── BodyTooLarge                 413    invalid_request_error  request_too_large
    │   ├── MethodNotAllowed             405    invalid_request_error  method_not_allowed
    │   └── UpstreamRejected             400    invalid_request_error  engine_rejected
    ├── AuthenticationFailed             401    authentication_error   invalid_api_key
    ├── PermissionDenied                 403    permission_error       model_not_allowed
    ├── NotFound                         404    invalid_request_error  model_not_found
    ├── Conflict                         409    invalid_request_error  conflict
    ├── RateLimited                      429    rate_limit_error       rate_limit_exceeded
    │   └── BudgetExceeded               429    rate_limit_error       budget_exceeded
    ├── LimitsUnavailable                503    service_unavailable    limits_unavailable
    ├── AuditUnavailable                 503    service_unavailable    audit_unavailable
    ├── DirectoryDown                    503    service_unavailable    directory_unavailable
    ├── InternalError                    500    internal_error         internal_error
    └── UpstreamError                    502    upstream_error         upstream_error
        ├── UpstreamUnavailable          503    service_unavailable    engine_unavailable
        │   ├── EngineConnectError       503    service_unavailable    engine_unavailable
        │   ├── EngineOverloaded         503    service_unavailable    engine_overloaded
        │   └── QueueTimeout             503    service_unavailable    queue_timeout
        └── UpstreamTimeout              504    timeout                engine_timeout
            └── FirstByteTimeout         504    timeout                first_byte_timeout

Who raises what: the wire adapters `InvalidRequest`/`BodyTooLarge`; identity
`AuthenticationFailed`, `PermissionDenied` and (LDAP sign-in) `DirectoryDown`; routing
`NotFound`; limits `RateLimited`, `BudgetExceeded`, `LimitsUnavailable` and (fair share)
`QueueTimeout`; the audit trail `AuditUnavailable`; the engine client every `Upstream*`
(`EngineConnectError` means nothing was sent, so another replica may be tried). Anything else
that escapes a request becomes `InternalError`.

The statuses are the ones that make the official `openai` SDK raise its matching class
(BadRequestError, AuthenticationError, PermissionDeniedError, NotFoundError, ConflictError,
RateLimitError, InternalServerError). `outcome` is how the request appears in the usage records.
"""

from __future__ import annotations

from typing import Any, ClassVar

import orjson
from starlette.responses import Response


class BastionError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal_error"
    default_code: ClassVar[str | None] = None
    #: How the request ends up in the usage records.
    outcome: ClassVar[str] = "client_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        #: Extra response headers (retry-after, x-ratelimit-*).
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def json(self) -> bytes:
        return orjson.dumps(self.body())

    def sse(self) -> bytes:
        """A streaming error: one SSE error event, then [DONE] (as vLLM and OpenAI do)."""
        return b"data: " + self.json() + b"\n\ndata: [DONE]\n\n"


#: The error body as a JSON Schema, for the OpenAPI documents (`admin/openapi.py`,
#: `gateway/openapi.py`).
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


def error_response(exc: BastionError, request_id: str = "") -> Response:
    """The error as an OpenAI JSON response, with its headers and the request id."""
    return Response(
        exc.json(),
        status_code=exc.status,
        media_type="application/json",
        headers={**({"x-request-id": request_id} if request_id else {}), **exc.headers},
    )


class InvalidRequest(BastionError):
    status = 400
    type = "invalid_request_error"


class BodyTooLarge(InvalidRequest):
    status = 413
    default_code = "request_too_large"


class MethodNotAllowed(InvalidRequest):
    """A method the URL does not answer; `allow` names the ones it does."""

    status = 405
    default_code = "method_not_allowed"

    def __init__(self, method: str, allowed: set[str] | frozenset[str]):
        allow = ", ".join(sorted(allowed))
        super().__init__(f"{method} is not allowed here; use {allow}.", headers={"allow": allow})


class UpstreamRejected(InvalidRequest):
    """The engine refused the request as invalid (e.g. context too long): the client's fault."""

    default_code = "engine_rejected"


class AuthenticationFailed(BastionError):
    status = 401
    type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDenied(BastionError):
    status = 403
    type = "permission_error"
    default_code = "model_not_allowed"


class NotFound(BastionError):
    status = 404
    type = "invalid_request_error"
    default_code = "model_not_found"


class Conflict(BastionError):
    """The object is not in a state that allows this (an approval already decided, a name
    taken, a team under legal hold)."""

    status = 409
    type = "invalid_request_error"
    default_code = "conflict"


class RateLimited(BastionError):
    """A rate, concurrency or budget limit refused the request (OpenAI's 429)."""

    status = 429
    type = "rate_limit_error"
    default_code = "rate_limit_exceeded"
    outcome = "rate_limited"


class BudgetExceeded(RateLimited):
    default_code = "budget_exceeded"


class LimitsUnavailable(BastionError):
    """The limits backend cannot be asked, and the policy is to fail closed."""

    status = 503
    type = "service_unavailable"
    default_code = "limits_unavailable"
    outcome = "limits_unavailable"


class AuditUnavailable(BastionError):
    """The audit trail cannot record the request: nothing is forwarded (fail closed)."""

    status = 503
    type = "service_unavailable"
    default_code = "audit_unavailable"
    outcome = "audit_unavailable"


class DirectoryDown(BastionError):
    """The LDAP/AD directory cannot be reached for a sign-in."""

    status = 503
    type = "service_unavailable"
    default_code = "directory_unavailable"
    outcome = "directory_unavailable"


class InternalError(BastionError):
    status = 500
    type = "internal_error"
    default_code = "internal_error"
    outcome = "internal_error"


class UpstreamError(BastionError):
    status = 502
    type = "upstream_error"
    default_code = "upstream_error"
    outcome = "upstream_error"


class UpstreamUnavailable(UpstreamError):
    status = 503
    type = "service_unavailable"
    default_code = "engine_unavailable"


class EngineConnectError(UpstreamUnavailable):
    """No connection could be made, or the engine dropped it before answering at all: nothing
    reached the client, so another replica may take the request. (A dropped request may have
    begun generating on the lost engine; generation has no side effect but its compute.)"""


class EngineOverloaded(UpstreamUnavailable):
    """The engine answered 429: it is saturated (not the client's fault, so not a 4xx)."""

    default_code = "engine_overloaded"


class QueueTimeout(UpstreamUnavailable):
    """No engine slot became free within `limits.queue_timeout_seconds` (fair share)."""

    default_code = "queue_timeout"


class UpstreamTimeout(UpstreamError):
    status = 504
    type = "timeout"
    default_code = "engine_timeout"


class FirstByteTimeout(UpstreamTimeout):
    """No byte of the answer within `models.<alias>.routing.first_byte_timeout_s`."""

    default_code = "first_byte_timeout"


class DeploymentError(Exception):
    """Not a request's error: the deployment is not ready for this command or start (schema
    behind, a shared key missing). The message says what to do; the CLI prints it, exits 2."""
