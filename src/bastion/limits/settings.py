"""Settings of `limits:`: the backend, defaults per level, request caps and fair share.

The limits of one level (`LimitSettings`) are a shared value type in `bastion.core.settings`:
teams, cost centers, models and keys carry them too."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from bastion.core.settings import SECRET, LimitSettings, Strict, section


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
        "redis://127.0.0.1:6379/0",
        json_schema_extra=SECRET,
        description="Redis for `backend: redis` (`${ENV}` allowed).",
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


section("limits", LimitsSettings, "Rate limits, budgets and request caps.")
