"""One engine replica as the config declares it (`models.<alias>.deployments[]`)."""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from bastion.core.settings import SECRET, Strict

#: The wire APIs Bastion speaks, by the name usage records and metrics carry.
WireApi = Literal["chat", "completions", "embeddings", "messages", "responses", "rerank", "score"]
#: What each engine kind serves natively unless `apis` says otherwise.
NATIVE_APIS: dict[str, tuple[str, ...]] = {
    "vllm": ("chat", "completions", "embeddings", "messages", "responses", "rerank", "score"),
    "sglang": ("chat", "completions", "embeddings"),
    "llamacpp": ("chat", "completions", "embeddings"),
    "openai": ("chat", "completions", "embeddings", "responses"),
}


class KvEventsSettings(Strict):
    """Where a vLLM engine publishes its KV-cache events (`--kv-events-config`), for
    `routing.mode: precise` (docs/routing.md, "Precise mode")."""

    endpoint: str = Field(
        description="The engine's ZMQ publisher, e.g. tcp://10.0.0.5:5557 (the engine binds "
        "it when its own endpoint is a wildcard, tcp://*:5557). With `bind: true`, the "
        "address Bastion listens on and the engine connects to instead."
    )
    bind: bool = Field(
        False,
        description="Bastion binds `endpoint` and the engine connects to it: vLLM connects "
        "whenever its endpoint is not a wildcard (e.g. tcp://127.0.0.1:5557). One gateway "
        "process per endpoint then.",
    )
    replay_endpoint: str | None = Field(
        None,
        description="The engine's replay socket (`replay_endpoint` in --kv-events-config): "
        "missed batches are fetched from it after a gap instead of forgetting the replica's "
        "blocks.",
    )
    topic: str = Field("kv", description="The engine's topic (`topic` in --kv-events-config).")

    @field_validator("endpoint", "replay_endpoint")
    @classmethod
    def _is_zmq(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("tcp://", "ipc://")):
            raise ValueError("a ZMQ endpoint: tcp://host:port or ipc://path")
        return v


class DeploymentSettings(Strict):
    kind: Literal["vllm", "sglang", "llamacpp", "openai"] = Field(
        "vllm", description="Engine type behind this deployment."
    )
    url: str = Field(description="Base URL of the engine, e.g. http://10.0.0.5:8000 (no /v1).")
    served_name: str = Field(description="Model name the engine serves (its `model` field).")
    weight: float = Field(1.0, gt=0, description="Relative share of traffic.")
    api_key: str | None = Field(
        None, json_schema_extra=SECRET, description="Bearer key the engine expects, if any."
    )
    connect_timeout: float = Field(2.0, gt=0, description="Seconds to open a connection.")
    first_byte_timeout: float = Field(
        120.0, gt=0, description="Seconds to wait for the engine's response headers."
    )
    read_timeout: float = Field(
        60.0, gt=0, description="Seconds of silence allowed between streamed chunks."
    )
    launch: str | None = Field(
        None,
        description="`bastion up` starts this engine locally: a model directory, or "
        "`builtin:tiny-chat` / `builtin:all-minilm-l6-v2`. Loopback URLs only.",
    )
    registry: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}@[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$",
        description="The registry version this deployment serves (`NAME@VERSION`): at start it "
        "must be approved and its files must match the recorded digests (`registry.enforce`).",
    )
    model_path: str | None = Field(
        None,
        description="Where the gateway can read the weights this engine loads, to check them "
        "against `registry` (default: `launch`'s directory, else the path it was registered "
        "from).",
    )
    max_concurrency: int | None = Field(
        None, ge=1, description="Requests this deployment accepts at once (none: unlimited)."
    )
    apis: list[WireApi] | None = Field(
        None,
        description="Wire APIs this engine serves natively (none: what its `kind` serves; "
        "vllm: all). Bastion translates the others to chat completions where it can.",
    )

    kv_events: KvEventsSettings | None = Field(
        None,
        description="vLLM only: the engine's KV-cache event publisher, for routing.mode "
        "precise (the model's other modes ignore it).",
    )

    def serves_natively(self, api: str) -> bool:
        return api in (self.apis if self.apis is not None else NATIVE_APIS[self.kind])

    @property
    def display_url(self) -> str:
        """The URL without user or password: the only form shown in messages and logs."""
        parts = urlsplit(self.url)
        host = parts.netloc.rpartition("@")[2]
        return parts._replace(netloc=host).geturl()

    @field_validator("url")
    @classmethod
    def _is_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("not a URL")
        return v.rstrip("/")
