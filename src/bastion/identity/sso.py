"""Single sign-on callers: an IdP's JWT in place of an API key, mapped to a team and a role.

The token is validated by `oidc.py` (RFC 8725: pinned algorithms, issuer, audience, expiry);
its groups are mapped through `identity.group_mappings`, first match wins. The caller is the
token's user, acting for the mapped team: charged, limited and audited as that team, with a
stable synthetic key id per (issuer, subject), so per-key limits and usage reports work too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from bastion.core.errors import AuthenticationFailed, PermissionDenied
from bastion.identity.oidc import Identity, InvalidToken, OidcValidator
from bastion.identity.principal import Principal
from bastion.identity.settings import GroupMapping, IdentitySettings
from bastion.identity.teams import Team


class SsoAuthenticator:
    def __init__(self, settings: IdentitySettings):
        self.validator = OidcValidator(settings.oidc)
        self.mappings = settings.group_mappings
        #: Told what every valid token maps its user to (the key store revokes SSO-minted keys
        #: of a team the user has left).
        self.membership: Callable[[str, GroupMapping | None], None] | None = None

    async def authenticate(self, token: str, teams: dict[str, Team]) -> Principal:
        try:
            who = await self.validator.validate(token)
        except InvalidToken as exc:  # logged by the validator, without the token
            raise AuthenticationFailed(
                f"The bearer token was rejected: {exc.reason}.", code="invalid_token"
            ) from None
        return self.map(who, teams)[1]

    def map(self, who: Identity, teams: dict[str, Team]) -> tuple[GroupMapping, Principal]:
        """The mapping and caller a validated identity makes (API tokens and console sign-ins
        alike); 403 for a user in no mapped group. SSO-minted keys follow the result."""
        mapping = first_mapping(self.mappings, who.groups)
        if self.membership is not None:
            self.membership(who.user, mapping)
        if mapping is None:
            raise not_mapped(who.user)
        return mapping, mapped_principal(mapping, teams, who.user, "sso", sso_identity(who))


def sso_identity(who: Identity) -> str:
    """What the synthetic key id of an IdP user is derived from: stable per issuer and subject."""
    return f"{who.issuer}\0{who.subject}"


def first_mapping(mappings: list[GroupMapping], groups: tuple[str, ...]) -> GroupMapping | None:
    return next((m for m in mappings if m.group in groups), None)


def not_mapped(user: str) -> PermissionDenied:
    return PermissionDenied(
        f"Signed in as {user}, but none of your groups is mapped to a Bastion team: ask your "
        "administrator for access.",
        code="no_mapped_group",
    )


def mapped_principal(
    mapping: GroupMapping, teams: dict[str, Team], user: str, kind: str, identity: str
) -> Principal:
    """The caller a group mapping makes of a signed-in user, with a stable synthetic key id."""
    team = teams.get(mapping.team)
    if team is None:
        raise PermissionDenied(
            f"Your group maps to team '{mapping.team}', which does not exist.",
            code="no_mapped_group",
        )
    key_id = f"{kind}_" + hashlib.sha256(identity.encode()).hexdigest()[:16]
    return Principal(key_id, team.name, team.cost_center, user, team.models, None, mapping.role)
