"""Settings of `registry:`: how model approvals are decided and enforced at `bastion serve`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from bastion.core.settings import Strict, section

#: The metrics a gate may test: those `bastion eval compare` reports (docs/evals.md).
METRIC = re.compile(r"^(pass|pass@[2-9][0-9]*|score:[A-Za-z0-9_.:-]{1,128}|latency_ms"
                    r"|ttft_ms|completion_tokens|cost)$")  # fmt: skip
LOWER_IS_BETTER = ("latency_ms", "ttft_ms", "completion_tokens", "cost")


class GateSettings(Strict):
    """A promotion gate: before a version matching it is approved, its newest finished run of
    `suite` must meet the threshold and (with `no_regression`) not be worse than the version in
    production beyond the confidence interval."""

    name: str | None = Field(
        None,
        max_length=128,
        description="How messages and evidence name it (default: SUITE:METRIC).",
    )
    models: list[str] = Field(
        ["*"],
        min_length=1,
        description="Registry names it applies to; shell-style patterns (`legal`, `tiny-*`).",
    )
    kinds: list[Literal["base", "adapter"]] | None = Field(
        None, description="Only these kinds (default: both)."
    )
    risk_tiers: list[Literal["low", "medium", "high", "critical"]] | None = Field(
        None, description="Only versions documented with these risk tiers (default: any)."
    )
    suite: str = Field(
        min_length=1,
        description="A suite file or a shipped suite's name; checked when the config is loaded "
        "(a relative path is taken from the working directory then, and kept absolute).",
    )
    metric: str = Field(
        "pass",
        description="`pass` (pass rate), `pass@K`, `score:SCORER` (a scorer's mean value), "
        "`latency_ms`, `ttft_ms`, `completion_tokens` or `cost`.",
    )
    min: float | None = Field(
        None, description="The candidate's mean must be at least this (higher-better metrics)."
    )
    max: float | None = Field(
        None, description="The candidate's mean must be at most this (latency, tokens, cost)."
    )
    no_regression: bool = Field(
        False,
        description="Blocked when the paired bootstrap CI of candidate minus production (the "
        "newest other approved version of the same name) says `worse` on the metric.",
    )
    level: float = Field(0.95, gt=0.5, lt=1, description="Confidence level of that interval.")

    @field_validator("suite")
    @classmethod
    def _suite_exists(cls, v: str) -> str:
        from bastion.evals.suite import BUILTIN_DIR, SuiteError, load_suite, resolve_path

        try:
            path = resolve_path(v)
            load_suite(path)
        except (SuiteError, OSError) as exc:
            raise ValueError(f"suite {v!r} cannot be used: {exc}") from None
        # A shipped suite stays a name: it follows Bastion's own copy across upgrades.
        return v if path.parent == BUILTIN_DIR and not Path(v).exists() else str(path.resolve())

    @model_validator(mode="after")
    def _coherent(self) -> GateSettings:
        if not METRIC.match(self.metric):
            raise ValueError(
                f"metric {self.metric!r}: one of pass, pass@K, score:SCORER, latency_ms, "
                "ttft_ms, completion_tokens, cost"
            )
        lower = self.metric in LOWER_IS_BETTER
        if self.min is not None and lower:
            raise ValueError(f"{self.metric} is lower-better: give `max`, not `min`")
        if self.max is not None and not lower:
            raise ValueError(f"{self.metric} is higher-better: give `min`, not `max`")
        if self.min is None and self.max is None and not self.no_regression:
            raise ValueError("a gate needs `min`/`max`, `no_regression: true`, or both")
        if self.metric.startswith("score:"):
            from bastion.evals.runner import _scorer_names
            from bastion.evals.suite import load_suite

            suite, _ = load_suite(self.suite)
            scorers = {n for case in suite.cases for n in _scorer_names(suite, case)}
            if self.metric[6:] not in scorers:
                raise ValueError(
                    f"suite {self.suite!r} has no scorer {self.metric[6:]!r} "
                    f"(it has: {', '.join(sorted(scorers))})"
                )
        return self

    @property
    def label(self) -> str:
        return self.name or f"{Path(self.suite).stem}:{self.metric}"


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
    gates: list[GateSettings] = Field(
        [],
        description="Promotion gates: eval suites a version must pass before it is approved "
        "(docs/models.md, Promotion gates).",
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
