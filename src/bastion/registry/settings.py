"""Settings of `registry:`: how model approvals are decided and enforced at `bastion serve`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from bastion.core.settings import Strict, section


class RegistrySettings(Strict):
    approval: Literal["single", "four-eyes"] = Field(
        "single",
        description="`single`: an administrator approves a validated model. `four-eyes`: an "
        "administrator asks (`POST /admin/models/{name}/{version}/approve`) and a second, "
        "distinct person approves it at `/admin/approvals`; neither may be who registered it.",
    )
    enforce: Literal["refuse", "warn"] = Field(
        "refuse",
        description="A deployment whose `registry` version is not approved, or whose files do "
        "not match the recorded digests: `refuse` stops `bastion serve` with the model and "
        "file named; `warn` starts, logs at ERROR, and `/readyz` reports the model not ready "
        "with the reason.",
    )
    verify: Literal["cached", "full"] = Field(
        "cached",
        description="At start, `cached`: re-read only files whose inode, size, mtime or ctime "
        "changed since they were last verified on this host (ctime cannot be set from user "
        "space; see docs/models.md). `full`: hash every file at every start (also catches "
        "silent media corruption).",
    )
    verify_workers: int = Field(
        4, ge=1, le=64, description="Files hashed at once when verifying at start."
    )

    adapter_refresh_s: float = Field(
        2.0,
        gt=0,
        le=300,
        description="Seconds between two rounds in which each gateway makes its engines serve "
        "the deployed adapters (`bastion models deploy`): loads new ones, unloads removed "
        "ones, reloads after an engine restart.",
    )


section("registry", RegistrySettings, "The model registry: approvals and serve-time checks.")
