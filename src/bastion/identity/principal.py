"""Who is calling: decided server-side only, from the credential, never from the body."""

from __future__ import annotations

from dataclasses import dataclass

from bastion.core.settings import LimitSettings


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: str
    team: str
    cost_center: str
    user: str | None
    #: Model aliases this caller may use; None means every model.
    models: frozenset[str] | None
    #: This key's own limits, replacing `limits.defaults.key`; None: the defaults apply.
    limits: LimitSettings | None = None
    role: str = "member"

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models
