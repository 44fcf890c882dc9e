"""Roles, and what each may see: enforced on every admin, usage and audit endpoint.

- `admin`: everything but reading audit contents.
- `auditor`: reads the audit trail and usage, changes nothing, calls no model.
- `team-admin`: manages the keys and sees the usage and limits of their own team.
- `member`: calls models, and creates and sees their own keys (`/auth/keys`).

Object-level checks answer 404 for another team's objects, exactly as for ones that do not
exist, so a team-admin learns nothing about other teams.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from bastion.core.errors import NotFound

#: The one list of roles; settings, the admin API and the CLI all take theirs from here.
Role = Literal["member", "team-admin", "admin", "auditor"]
ROLES: tuple[str, ...] = get_args(Role)
ROLE_HELP = (
    "member: calls models, mints own keys; team-admin: also manages the team's keys and sees "
    "its usage and limits; admin: everything but audit contents; auditor: reads the audit "
    "trail and usage only"
)
#: Roles whose holders may call models.
CALLERS = frozenset({"member", "team-admin", "admin"})


@dataclass(frozen=True)
class Actor:
    role: str
    team: str | None
    #: As authenticated: "admin-key", a signed-in user's name, or an API key's id.
    name: str
    #: A person vouched for (signed in, or the admin key's holder), not an API key.
    person: bool = False

    def team_scope(self, team: str | None) -> str | None:
        """The team a query may cover: as asked for admins and auditors; a team-admin's own."""
        if self.role in ("admin", "auditor"):
            return team
        if team is not None and team != self.team:
            raise NotFound(f"No team '{team}'.", code="team_not_found")
        return self.team

    def may_manage(self, team: str, role: str = "member") -> bool:
        """An admin manages every key; a team-admin only the member keys of their own team."""
        if self.role == "admin":
            return True
        return self.role == "team-admin" and team == self.team and role == "member"
