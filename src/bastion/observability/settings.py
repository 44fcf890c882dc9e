"""Settings of `logging:` (format and level of the process's logs) and `tracing:`
(OpenTelemetry traces over OTLP/HTTP; the `otel` extra)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from bastion.core.settings import SECRET, Strict, section

Level = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class LoggingSettings(Strict):
    format: Literal["text", "json"] = Field(
        "text",
        description="`text`: one human-readable line per event; `json`: one JSON object per "
        "line (timestamp, level, logger, message, and the request id, team and model of the "
        "request being served), for a log shipper. Uvicorn's own logs use the same format. Env "
        "override: BASTION_LOG_FORMAT.",
    )
    level: Level = Field(
        "INFO",
        description="The least severe level written (DEBUG, INFO, WARNING, ERROR). Env "
        "override: BASTION_LOG_LEVEL. `bastion serve --log-level` sets uvicorn's own.",
    )
    access_log: bool = Field(
        False,
        description="Also log one line per HTTP request (uvicorn's access log: client, "
        "method, path, status); usage records already hold every API call.",
    )

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v


class TracingSettings(Strict):
    enabled: bool = Field(
        False,
        description="Export a trace of every API request over OTLP/HTTP (needs the `otel` "
        "extra: pip install 'bastion[otel]'). Attributes follow OpenTelemetry's GenAI "
        "semantic conventions; a client's W3C `traceparent` is continued and passed on to "
        "the engine.",
    )
    endpoint: str = Field(
        "http://127.0.0.1:4318/v1/traces",
        description="The collector's OTLP/HTTP traces URL (protobuf).",
    )
    headers: dict[str, str] = Field(
        default_factory=dict,
        json_schema_extra=SECRET,
        description="Headers sent with every export, e.g. `authorization: Bearer ${OTEL_TOKEN}` "
        "(write tokens as `${VAR}`).",
    )
    service_name: str = Field("bastion", min_length=1, description="The `service.name`.")
    sample_ratio: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Share of new traces recorded (0..1); a client's sampled `traceparent` is "
        "followed either way.",
    )
    capture_content: bool = Field(
        False,
        description="Put prompts and answers on the request span (`gen_ai.input.messages`, "
        "`gen_ai.output.messages`). Off: no message text ever leaves in a trace.",
    )
    timeout_seconds: float = Field(
        10.0, gt=0, le=300, description="Give up one export after this long."
    )

    @model_validator(mode="after")
    def _url(self) -> TracingSettings:
        if not self.endpoint.startswith(("http://", "https://")):
            raise ValueError("endpoint: not an http(s) URL")
        return self


section(
    "logging",
    LoggingSettings,
    "Logs: format and level.",
    env={"level": "BASTION_LOG_LEVEL", "format": "BASTION_LOG_FORMAT"},
)
section("tracing", TracingSettings, "OpenTelemetry traces (OTLP/HTTP).")
