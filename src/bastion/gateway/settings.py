"""Settings of `server:`: where and how the gateway listens."""

from __future__ import annotations

import ipaddress

from pydantic import Field, field_validator

from bastion.core.settings import SECRET, Strict, section


class ServerSettings(Strict):
    host: str = Field("127.0.0.1", description="Address the gateway listens on.")
    port: int = Field(8080, ge=1, le=65535, description="TCP port the gateway listens on.")
    max_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Largest accepted request body; larger gets 413."
    )
    public_url: str | None = Field(
        None, description="URL clients use to reach the gateway (shown by `bastion up`)."
    )
    metrics_key: str | None = Field(
        None,
        min_length=16,
        json_schema_extra=SECRET,
        description="Bearer key `/metrics` requires (at least 16 characters); none: open, as "
        "is usual on an internal network. Env override: BASTION_METRICS_KEY.",
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="Addresses or networks (CIDR) of the load balancers in front of the "
        "gateway. Only from these is `X-Forwarded-For` believed (its right-most untrusted "
        "address is the client, for sign-in throttling and the audit trail); from anyone else, "
        "and by default, the client is the socket peer.",
    )

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for item in value:
            ipaddress.ip_network(item, strict=False)  # ValueError names the bad entry
        return value


section(
    "server",
    ServerSettings,
    "Where and how the gateway listens.",
    env={"metrics_key": "BASTION_METRICS_KEY"},
)


class ResponsesSettings(Strict):
    store: bool = Field(
        True,
        description="Keep responses of `POST /v1/responses` asked with `store: true` (the API's "
        "default) in Bastion's database, sealed with the team's audit data key, so "
        "`previous_response_id` and `GET /v1/responses/{id}` work on every replica. Off: "
        "nothing is kept, and `previous_response_id` is refused.",
    )
    retention_days: int = Field(
        30,
        ge=1,
        description="Days a stored response stays readable; expired ones are deleted.",
    )
    purge_interval_seconds: float = Field(
        3600.0, gt=0, description="How often each replica deletes expired stored responses."
    )


section(
    "responses",
    ResponsesSettings,
    "Stored responses of the OpenAI Responses API (`store`, `previous_response_id`).",
)
