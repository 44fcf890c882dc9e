"""Settings: one YAML file declares the world; every key is declared once here.

Each field carries its default and its help text; `docs/config.md` is generated from these
models (`bastion config docs`) and a test checks the two agree. A wrong key, type or reference
stops the start with the exact path in the file, e.g. `models.fast.deployments[0].url: not a URL`.

Secrets never need to live in the file: any string value may be `${ENV_VAR}`, and
`BASTION_ADMIN_KEY` / `BASTION_DATABASE_URL` override the file outright.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from bastion.audit.settings import AuditSettings
from bastion.core.settings import NAME, Strict
from bastion.identity.settings import (
    GroupMapping,
    IdentitySettings,
    LdapSettings,
    OidcIssuer,
)

__all__ = [
    "NAME",
    "AuditSettings",
    "ConfigError",
    "GroupMapping",
    "IdentitySettings",
    "LdapSettings",
    "OidcIssuer",
    "Settings",
    "load_settings",
    "parse_settings",
]

DEFAULT_CONFIG_PATHS = ("bastion.yaml", "/etc/bastion/bastion.yaml")
ENV_REF = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")


class ConfigError(Exception):
    """The configuration cannot be used; the message names every offending path."""


class ServerSettings(Strict):
    host: str = Field("127.0.0.1", description="Address the gateway listens on.")
    port: int = Field(8080, ge=1, le=65535, description="TCP port the gateway listens on.")
    max_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Largest accepted request body; larger gets 413."
    )
    public_url: str | None = Field(
        None, description="URL clients use to reach the gateway (shown by `bastion up`)."
    )


class DatabaseSettings(Strict):
    url: str = Field(
        "sqlite:///var/bastion.db",
        description="SQLAlchemy URL: `sqlite:///relative.db`, `sqlite:////abs.db` or "
        "`postgresql+psycopg://user@host/db`. Env override: BASTION_DATABASE_URL.",
    )
    usage_flush_seconds: float = Field(
        0.25, gt=0, le=60, description="Usage records are written in batches this often."
    )

    @field_validator("url")
    @classmethod
    def _known_dialect(cls, v: str) -> str:
        if not v.startswith(("sqlite:", "postgresql")):
            raise ValueError("only sqlite:// and postgresql+psycopg:// URLs are supported")
        return v


class AdminSettings(Strict):
    key: str | None = Field(
        None,
        min_length=16,
        description="Bearer key for the /admin API (at least 16 characters). "
        "Env override: BASTION_ADMIN_KEY. Without it the admin API answers 401 to everyone.",
    )


class DeploymentSettings(Strict):
    kind: Literal["vllm", "sglang", "llamacpp", "openai"] = Field(
        "vllm", description="Engine type behind this deployment."
    )
    url: str = Field(description="Base URL of the engine, e.g. http://10.0.0.5:8000 (no /v1).")
    served_name: str = Field(description="Model name the engine serves (its `model` field).")
    weight: float = Field(1.0, gt=0, description="Relative share of traffic.")
    api_key: str | None = Field(None, description="Bearer key the engine expects, if any.")
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
    max_concurrency: int | None = Field(
        None, ge=1, description="Requests this deployment accepts at once (none: unlimited)."
    )

    @field_validator("url")
    @classmethod
    def _is_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("not a URL")
        return v.rstrip("/")


class LimitSettings(Strict):
    """Limits at one level (key, user, team, cost center, model, team x model); unset = none."""

    rpm: int | None = Field(None, ge=0, description="Requests per minute.")
    tpm: int | None = Field(
        None, ge=0, description="Tokens per minute (prompt + completion; reserved up front)."
    )
    concurrent: int | None = Field(None, ge=0, description="Requests in flight at once.")
    budget_day: float | None = Field(
        None, ge=0, description="Spend per UTC day, in the price book's currency."
    )
    budget_month: float | None = Field(
        None, ge=0, description="Spend per UTC calendar month, in the price book's currency."
    )

    def is_empty(self) -> bool:
        return all(v is None for v in self.model_dump().values())


class LimitDefaults(Strict):
    key: LimitSettings = Field(
        default_factory=LimitSettings, description="Each key, unless the key has its own."
    )
    user: LimitSettings = Field(default_factory=LimitSettings, description="Each user.")
    team: LimitSettings = Field(
        default_factory=LimitSettings, description="Each team without `teams.<name>.limits`."
    )
    cost_center: LimitSettings = Field(
        default_factory=LimitSettings,
        description="Each cost center without `cost_centers.<name>.limits`.",
    )


class LimitsSettings(Strict):
    backend: Literal["memory", "redis"] = Field(
        "memory",
        description="Where counters live: `memory` (one gateway process) or `redis` "
        "(exact across replicas).",
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0", description="Redis for `backend: redis` (`${ENV}` allowed)."
    )
    on_backend_failure: Literal["closed", "local"] = Field(
        "closed",
        description="Redis unreachable: `closed` answers 503 and forwards nothing; `local` "
        "falls back to this replica's own counters, logged and counted every time.",
    )
    defaults: LimitDefaults = Field(
        default_factory=LimitDefaults, description="Limits applied to every key/user/team/CC."
    )
    max_messages: int = Field(
        1000, ge=1, description="Most `messages` a chat request may carry (400 beyond)."
    )
    max_n: int = Field(8, ge=1, description="Largest `n` (choices per request).")
    queue_timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="How long a request may wait for a free engine slot (fair share) before "
        "a 503 with retry-after.",
    )


class ModelSettings(Strict):
    deployments: list[DeploymentSettings] = Field(
        min_length=1, description="Engine replicas serving this alias."
    )
    kind: Literal["chat", "completion", "embedding"] = Field(
        "chat", description="What the model does; embeddings models only serve /v1/embeddings."
    )
    owned_by: str = Field("bastion", description="Shown in /v1/models.")
    max_tokens: int | None = Field(
        None, ge=1, description="Ceiling on a request's `max_tokens` (400 above it)."
    )
    tokenizer: str | None = Field(
        None,
        description="The model's tokenizer (its directory or tokenizer.json), for exact "
        "prompt-token reservations; without it one token per UTF-8 byte is reserved "
        "(an upper bound). Needs the `tokenizers` extra.",
    )
    default_max_tokens: int = Field(
        1024,
        ge=1,
        description="`max_tokens` for requests that set none: sent to the engine and reserved "
        "against token limits and budgets. Keep it within the engine's context length.",
    )
    limits: LimitSettings = Field(
        default_factory=LimitSettings, description="Limits for the model as a whole."
    )


class PriceSettings(Strict):
    currency: str = Field("USD", pattern=r"^[A-Z]{3}$", description="ISO 4217 code.")
    prompt: float = Field(0.0, ge=0, description="Price per 1M uncached prompt tokens.")
    cached_prompt: float | None = Field(
        None, ge=0, description="Price per 1M cached prompt tokens (default: prompt price)."
    )
    completion: float = Field(0.0, ge=0, description="Price per 1M completion tokens.")


class CostCenterSettings(Strict):
    name: str = Field("", description="Human-readable name (e.g. 'Retail Banking IT').")
    limits: LimitSettings | None = Field(
        None, description="This cost center's limits (else `limits.defaults.cost_center`)."
    )


class TeamSettings(Strict):
    cost_center: str = Field(description="The cost center this team is charged to.")
    models: list[str] | None = Field(
        None, description="Model aliases this team may use (none: all)."
    )
    limits: LimitSettings | None = Field(
        None, description="This team's limits (else `limits.defaults.team`)."
    )
    model_limits: dict[str, LimitSettings] = Field(
        default_factory=dict, description="Limits for this team on one model (team x model)."
    )
    weight: float = Field(
        1.0, gt=0, description="Share of saturated engines this team gets (fair share)."
    )
    audit_retention_days: int | None = Field(
        None, ge=1, description="This team's audit content retention (else `audit.retention_days`)."
    )


class Settings(Strict):
    server: ServerSettings = Field(
        default_factory=ServerSettings, description="Where and how the gateway listens."
    )
    database: DatabaseSettings = Field(
        default_factory=DatabaseSettings, description="Where keys, teams and usage are kept."
    )
    admin: AdminSettings = Field(default_factory=AdminSettings, description="The /admin API.")
    identity: IdentitySettings = Field(
        default_factory=IdentitySettings, description="How callers are authenticated."
    )
    limits: LimitsSettings = Field(
        default_factory=LimitsSettings, description="Rate limits, budgets and request caps."
    )
    audit: AuditSettings = Field(
        default_factory=AuditSettings, description="The audit trail of every request."
    )
    cost_centers: dict[Annotated[str, Field(pattern=NAME)], CostCenterSettings] = Field(
        default_factory=dict, description="Cost centers teams are charged to."
    )
    teams: dict[Annotated[str, Field(pattern=NAME)], TeamSettings] = Field(
        default_factory=dict, description="Teams that own API keys."
    )
    models: dict[Annotated[str, Field(pattern=NAME)], ModelSettings] = Field(
        default_factory=dict, description="Model aliases clients call, each → deployments."
    )
    prices: dict[str, PriceSettings] = Field(
        default_factory=dict, description="Price book per model alias (per 1M tokens)."
    )

    @model_validator(mode="after")
    def _references(self) -> Settings:
        errors: list[str] = []
        for team, ts in self.teams.items():
            if ts.cost_center not in self.cost_centers:
                errors.append(f"teams.{team}.cost_center: unknown cost center {ts.cost_center!r}")
            for i, m in enumerate(ts.models or []):
                if m not in self.models:
                    errors.append(f"teams.{team}.models[{i}]: unknown model {m!r}")
            for m in ts.model_limits:
                if m not in self.models:
                    errors.append(f"teams.{team}.model_limits.{m}: unknown model {m!r}")
        for m in self.prices:
            if m not in self.models:
                errors.append(f"prices.{m}: unknown model {m!r}")
        for i, gm in enumerate(self.identity.group_mappings):
            if gm.team not in self.teams:
                errors.append(f"identity.group_mappings[{i}].team: unknown team {gm.team!r}")
        if errors:
            raise ValueError("; ".join(errors))
        return self


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in ("function-after[_is_url()]",):
            out += f".{part}" if out else str(part)
    return out


def _interpolate(node: Any, path: str) -> Any:
    """Replaces `${VAR}` strings by the environment's value; a missing one is an error."""
    if isinstance(node, dict):
        return {k: _interpolate(v, f"{path}.{k}" if path else str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, f"{path}[{i}]") for i, v in enumerate(node)]
    if isinstance(node, str) and (m := ENV_REF.match(node)):
        value = os.environ.get(m.group(1))
        if value is None:
            raise ConfigError(f"{path}: environment variable {m.group(1)} is not set")
        return value
    return node


def _env_overrides(raw: dict[str, Any]) -> dict[str, Any]:
    if key := os.environ.get("BASTION_ADMIN_KEY"):
        raw.setdefault("admin", {})["key"] = key
    if url := os.environ.get("BASTION_DATABASE_URL"):
        raw.setdefault("database", {})["url"] = url
    return raw


def parse_settings(raw: Any, source: str = "<config>") -> Settings:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of settings")
    raw = _env_overrides(_interpolate(raw, ""))
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = _format_loc(err["loc"]) or "(top level)"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown setting"
            lines.append(f"{where}: {msg}")
        raise ConfigError(f"{source}: invalid configuration\n  " + "\n  ".join(lines)) from None


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Reads the config file: `path`, else $BASTION_CONFIG, else ./bastion.yaml; none → defaults."""
    chosen = path or os.environ.get("BASTION_CONFIG")
    if chosen is None:
        chosen = next((p for p in DEFAULT_CONFIG_PATHS if Path(p).is_file()), None)
    if chosen is None:
        return parse_settings({}, "<defaults>")
    file = Path(chosen)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read config file: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {exc}") from None
    return parse_settings(raw, str(file))
