"""Settings of `audit:`: the write-ahead log, signing and master keys, checkpoints, retention,
redaction."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from bastion.core.settings import NAME, Strict, section


class AuditSettings(Strict):
    enabled: bool = Field(
        True,
        description="Record every request and response in the tamper-evident audit trail.",
    )
    on_failure: Literal["closed", "open"] = Field(
        "closed",
        description="The trail cannot be written: `closed` answers 503 and forwards nothing; "
        "`open` (development only) forwards anyway, logged and counted every time.",
    )
    wal_dir: str = Field(
        "var/audit",
        description="Local write-ahead log; entries are fsynced here first and deleted once "
        "shipped to the database. Entries not yet shipped live only here: in a container, put it "
        "on a persistent volume that follows `replica` (the Helm chart's `gateway.workload: "
        "StatefulSet`); on an emptyDir they are lost with the pod.",
    )
    replica: str | None = Field(
        None,
        pattern=NAME,
        description="This gateway's chain id (default: `<hostname>-<port>`, which changes "
        "with every Deployment pod). Keep it stable across restarts, with the `wal_dir` it "
        "writes: in Kubernetes a StatefulSet pod name (env BASTION_REPLICA_ID from "
        "metadata.name). Two running processes must never share one.",
    )
    signing_key: str = Field(
        "var/audit-signing.pem",
        description="Ed25519 key that signs checkpoints, stored wrapped by the master key "
        "(env BASTION_AUDIT_SIGNING_KEY, base64 of the raw key, takes precedence); created on "
        "first start with the embedded SQLite database (with PostgreSQL it must be given: `bastion "
        "secrets init`) and its public key logged: put that in `trusted_public_keys`.",
    )
    trusted_public_keys: list[str] = Field(
        default_factory=list,
        description="The checkpoint-signing public keys (hex) `audit verify` trusts, and the "
        "only ones: every replica's, and retired ones. Nothing read from the data directory is "
        "trusted.",
    )
    anchor_dir: str | None = Field(
        "var/audit-anchor",
        description="Append-only place outside the database (a separate mount, a WORM "
        "bucket's mount) where signed manifests of every chain's head are written; `audit "
        "verify` checks the store against them, so deleted chains and cut tails are found. "
        "None: no anchor.",
    )
    anchor_seconds: float = Field(
        10.0, gt=0, description="Write a manifest to the anchor this often (if heads moved)."
    )
    max_unsigned_seconds: float = Field(
        120.0,
        gt=0,
        description="`audit verify` fails if entries not covered by a signed checkpoint are "
        "older than this, measured from the newest entry or manifest (bounds the unsigned "
        "tail; must exceed `checkpoint_seconds` plus shipping).",
    )
    master_key_file: str = Field(
        "var/audit-master.key",
        description="Master key (base64 of 32 bytes) that wraps each team's data key. Created "
        "on first start if absent only with the embedded SQLite database; with PostgreSQL "
        "every replica and CLI host must be given the same one (a start without it, or with "
        "one that does not unwrap the stored team keys, stops). Env BASTION_AUDIT_MASTER_KEY "
        "takes precedence. "
        "Lose it and every recorded content is unreadable: back it up.",
    )
    checkpoint_entries: int = Field(
        1000, ge=1, description="Sign a checkpoint at least every this many entries..."
    )
    checkpoint_seconds: float = Field(
        10.0, gt=0, description="...and at least this often while entries are written."
    )
    retention_days: int | None = Field(
        None,
        ge=1,
        description="Contents older than this are purged by `bastion audit purge` (metadata "
        "and hashes stay, so the chain still verifies). None: kept forever. Per team: "
        "`teams.<name>.audit_retention_days`.",
    )
    min_retention_days: int = Field(
        0,
        ge=0,
        le=36500,
        description="Regulatory floor: no content younger than this is ever shredded (a shred "
        "is refused while the team has any) and no retention may be shorter. 0: no floor.",
    )
    redact: list[Literal["card", "iban", "email", "phone", "secret"]] = Field(
        default_factory=list,
        description="Detectors whose matches are replaced by typed placeholders "
        "(`[CARD]`, `[IBAN]`, …) in the stored copy.",
    )
    redact_upstream: bool = Field(
        False, description="Also send the redacted prompt to the engine instead of the original."
    )

    @model_validator(mode="after")
    def _tail_outlasts_checkpoints(self) -> AuditSettings:
        # A bound tighter than the checkpoint cadence would fail every healthy trail.
        if self.max_unsigned_seconds <= self.checkpoint_seconds:
            raise ValueError("audit.max_unsigned_seconds must exceed audit.checkpoint_seconds")
        if self.retention_days is not None and self.retention_days < self.min_retention_days:
            raise ValueError("audit.retention_days is shorter than audit.min_retention_days")
        return self


def _team_retention_floor(settings: Any) -> list[str]:
    floor = settings.audit.min_retention_days
    return [
        f"teams.{name}.audit_retention_days: {t.audit_retention_days} is shorter than "
        f"audit.min_retention_days ({floor})"
        for name, t in settings.teams.items()
        if t.audit_retention_days is not None and t.audit_retention_days < floor
    ]


section(
    "audit",
    AuditSettings,
    "The audit trail of every request.",
    env={"replica": "BASTION_REPLICA_ID"},
    check=_team_retention_floor,
)
