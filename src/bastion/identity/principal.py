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
    #: This key's own limits, tightening `limits.defaults.key`; None: the defaults apply.
    limits: LimitSettings | None = None
    role: str = "member"

    @property
    def signed_in(self) -> bool:
        """A person the directory or the IdP vouched for (not an API key)."""
        return self.key_id.startswith(("ses_", "sso_"))

    @property
    def name(self) -> str:
        """Who acts, as authenticated: the signed-in user, else the key's id. A key's `user`
        is an attribution its creator typed, not proof of anyone, so it never names an actor."""
        return self.user if self.signed_in and self.user else self.key_id

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models
