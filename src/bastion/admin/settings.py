"""Settings of `admin:`: the key of the /admin API, and four-eyes approvals."""

from __future__ import annotations

from pydantic import Field

from bastion.core.settings import SECRET, Strict, section


class AdminSettings(Strict):
    key: str | None = Field(
        None,
        json_schema_extra=SECRET,
        min_length=16,
        description="Bearer key for the /admin API (at least 16 characters). "
        "Env override: BASTION_ADMIN_KEY. Without it the admin API answers 401 to everyone.",
    )
    openapi_public: bool = Field(
        True,
        description="Serve `/admin/openapi.json` to anyone; false: only to the admin key or a "
        "credential with a control-plane role (admin, team-admin, auditor).",
    )
    four_eyes: bool = Field(
        False,
        description="Let an admin ask for an auditor key, made usable only when a second, "
        "distinct administrator approves (`/admin/approvals`). Off: auditors come only from "
        "`identity.group_mappings`. Releasing a legal hold and shredding always need a second "
        "administrator.",
    )
    key_may_approve: bool | None = Field(
        None,
        description="Whether the admin key's holder may decide another administrator's "
        "four-eyes request. Unset: only where no named administrator exists (no "
        "`identity.group_mappings` entry gives the admin role): where one does, the key's "
        "holder may also be a named administrator and could approve their own request.",
    )
    approval_ttl_hours: float = Field(
        24, gt=0, le=720, description="How long a request waits for its second administrator."
    )


section("admin", AdminSettings, "The /admin API.", env={"key": "BASTION_ADMIN_KEY"})
