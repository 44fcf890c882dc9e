"""Settings of `identity:` (API key refresh, OIDC issuers, LDAP / AD, sessions, group
mappings), and of the `cost_centers:` and `teams:` that keys, users and groups belong to."""

from __future__ import annotations

from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, model_validator

from bastion.core.settings import NAME, SECRET, LimitSettings, Strict, section
from bastion.identity.roles import ROLE_HELP, Role

#: JWK key types by algorithm prefix: an issuer may only pin algorithms Bastion can verify.
KTY_BY_PREFIX = {"HS": "oct", "RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}
#: AD's LDAP_MATCHING_RULE_IN_CHAIN: every group a user is in, nesting resolved by the server.
IN_CHAIN_FILTER = "(member:1.2.840.113556.1.4.1941:={user_dn})"
#: AD: userAccountControl has ACCOUNTDISABLE (0x2), tested with LDAP_MATCHING_RULE_BIT_AND;
#: OpenLDAP's ppolicy: pwdAccountLockedTime is set. An attribute a server lacks matches nothing.
DISABLED_FILTER = "(|(userAccountControl:1.2.840.113556.1.4.803:=2)(pwdAccountLockedTime=*))"


class OidcConsole(Strict):
    """The console's sign-in at this IdP: OIDC authorization code flow with PKCE (S256). Register
    `<public URL>/console/oidc/callback` as the client's redirect URI at the IdP."""

    client_id: str = Field(description="The console's client id at the IdP (its ID tokens' `aud`).")
    client_secret: str | None = Field(
        None,
        repr=False,
        json_schema_extra=SECRET,
        description="A confidential client's secret (use `${ENV_VAR}`; sent as HTTP Basic); "
        "none: a public client (PKCE alone).",
    )
    name: str = Field("single sign-on", description="Shown on the button: 'Sign in with <name>'.")
    scopes: list[str] = Field(
        default_factory=lambda: ["openid", "profile", "email"],
        description="Scopes asked for; must include `openid`, and whatever makes the IdP put "
        "`user_claim` and `groups_claim` into the ID token.",
    )
    redirect_uri: str | None = Field(
        None,
        description="The callback URL registered at the IdP; none: this request's own "
        "`/console/oidc/callback` (set it behind a proxy that rewrites the host).",
    )
    session_seconds: int = Field(
        3600,
        ge=60,
        le=86400,
        description="Lifetime of a console session begun at this IdP. The IdP's groups are read "
        "at sign-in only: a changed membership counts from the next sign-in.",
    )

    @model_validator(mode="after")
    def _openid(self) -> OidcConsole:
        if "openid" not in self.scopes:
            raise ValueError("console.scopes must include 'openid'")
        if self.redirect_uri is not None and not self.redirect_uri.startswith(
            ("https://", "http://127.0.0.1", "http://localhost")
        ):
            raise ValueError("console.redirect_uri must be https:// (or http on loopback)")
        return self


class OidcIssuer(Strict):
    """One trusted IdP. Keys come from `jwks_file`, else `jwks_url`, else OIDC discovery."""

    issuer: str = Field(description="The IdP's issuer URL, exactly as in its tokens' `iss`.")
    audience: str = Field(description="The `aud` Bastion's tokens carry (exact match).")
    algorithms: list[str] = Field(
        default_factory=lambda: ["RS256"],
        description="Signature algorithms accepted from this issuer (pinned: the token header "
        "never chooses; `none` is refused).",
    )
    jwks_url: str | None = Field(
        None, description="Signing keys URL (default: from the issuer's OIDC discovery)."
    )
    jwks_file: str | None = Field(
        None, description="A local JWKS file instead of any network fetch (air-gapped)."
    )
    user_claim: str = Field("sub", description="Claim naming the user (e.g. preferred_username).")
    email_claim: str = Field("email", description="Claim with the e-mail address.")
    groups_claim: str = Field("groups", description="Claim listing the user's groups.")
    leeway_seconds: int = Field(30, ge=0, le=300, description="Clock skew allowed on exp/nbf/iat.")
    console: OidcConsole | None = Field(
        None, description="Console sign-in at this IdP (authorization code + PKCE); none: off."
    )

    @model_validator(mode="after")
    def _safe(self) -> OidcIssuer:
        """RFC 8725: refuse what would let a token choose how it is checked."""
        from jwt.algorithms import get_default_algorithms

        algs, known = self.algorithms, get_default_algorithms()
        hmac = {a.startswith("HS") for a in algs}
        checks = [
            (bool(self.issuer and self.audience), "needs both `issuer` and `audience`"),
            (bool(algs), "`algorithms` must not be empty"),
            (all(a.lower() != "none" for a in algs), "algorithm 'none' is never allowed"),
            (all(a in known and a[:2] in KTY_BY_PREFIX for a in algs), f"unsupported: {algs}"),
            (len(hmac) < 2, "do not mix HS* with asymmetric algorithms"),
            (hmac != {True} or bool(self.jwks_file), "HS* keys are secrets: only from `jwks_file`"),
            (not (self.jwks_url and self.jwks_file), "set `jwks_url` or `jwks_file`, not both"),
        ]
        for ok, problem in checks:
            if not ok:
                raise ValueError(f"OIDC issuer {self.issuer!r}: {problem}")
        return self


class LdapSettings(Strict):
    """Where and how to ask the directory. `{username}`/`{user_dn}` are filled in escaped."""

    url: str = Field(description="ldaps://host[:port] (or ldap:// with `start_tls: true`).")
    bind_dn: str = Field(description="Service account that searches the directory.")
    bind_password: str = Field(
        repr=False, json_schema_extra=SECRET, description="Its password (use `${ENV_VAR}`)."
    )
    user_base: str = Field(description="Where users are searched.")
    group_base: str = Field(description="Where groups are searched.")
    start_tls: bool = Field(False, description="Upgrade ldap:// with StartTLS.")
    ca_file: str | None = Field(
        None, description="CA bundle to verify the server (PEM); none: libldap's trust store."
    )
    verify_tls: bool = Field(True, description="Verify the server certificate and host name.")
    allow_insecure: bool = Field(
        False, description="Allow plain ldap:// without TLS (passwords in clear: tests only)."
    )
    user_filter: str = Field(
        "(uid={username})", description="AD: `(sAMAccountName={username})`; input is escaped."
    )
    username_attribute: str = Field(
        "uid", description="AD: `sAMAccountName`; the directory's spelling of the name wins."
    )
    group_filter: str = Field("(member={user_dn})", description="Groups a user is a member of.")
    group_name_attribute: str = Field("cn", description="The group name mappings refer to.")
    nested_groups: Literal["none", "recursive", "in_chain"] = Field(
        "recursive",
        description="Nested groups: `in_chain` (AD's LDAP_MATCHING_RULE_IN_CHAIN) or "
        "`recursive` (any LDAP server).",
    )
    in_chain_filter: str = Field(IN_CHAIN_FILTER, description="The filter `in_chain` uses.")
    max_nesting: int = Field(8, ge=0, description="Deepest group nesting `recursive` follows.")
    timeout_seconds: float = Field(
        5.0, gt=0, description="Per network step; a whole call gets three times this."
    )
    max_concurrent: int = Field(16, ge=1, description="Threads talking to the directory at once.")
    display_name_attributes: list[str] = Field(
        default_factory=lambda: ["displayName", "cn"],
        description="Attributes tried, in order, for the display name.",
    )
    email_attribute: str = Field("mail", description="The attribute holding the e-mail address.")
    disabled_filter: str | None = Field(
        DISABLED_FILTER,
        description="Matches a disabled or locked account (its groups then count for nothing: "
        "sessions end and self-service keys are revoked within `group_cache_seconds`). The "
        "default covers AD's ACCOUNTDISABLE bit and OpenLDAP ppolicy's lock; null: no check.",
    )

    @model_validator(mode="after")
    def _safe(self) -> LdapSettings:
        parts = urlsplit(self.url)
        if parts.scheme.lower() not in ("ldap", "ldaps") or not parts.hostname:
            raise ValueError(f"LDAP url must be ldap://host or ldaps://host, not {self.url!r}")
        if self.start_tls and parts.scheme.lower() == "ldaps":
            raise ValueError("start_tls is for ldap:// urls; ldaps:// is TLS already")
        if not self.tls and not self.allow_insecure:
            raise ValueError("plain ldap:// sends passwords in clear: set allow_insecure to allow")
        if "{username}" not in self.user_filter:
            raise ValueError("user_filter must contain {username}")
        for name in ("group_filter", "in_chain_filter"):
            if "{user_dn}" not in getattr(self, name):
                raise ValueError(f"{name} must contain {{user_dn}}")
        return self

    @property
    def tls(self) -> bool:
        return self.start_tls or self.url.lower().startswith("ldaps://")


class GroupMapping(Strict):
    group: str = Field(description="A group name as the IdP or directory reports it.")
    team: str = Field(description="The team its members act for (charged, limited, audited).")
    role: Role = Field("member", description=ROLE_HELP + ".")


class IdentitySettings(Strict):
    key_refresh_seconds: float = Field(
        2.0,
        gt=0,
        le=300,
        description="How often each replica re-reads keys changed elsewhere (revocations made "
        "by another replica or the CLI take effect within this time).",
    )
    oidc: list[OidcIssuer] = Field(
        default_factory=list,
        description="Identity providers whose JWTs are accepted as `Authorization: Bearer` "
        "next to API keys (validated per RFC 8725).",
    )
    ldap: LdapSettings | None = Field(
        None, description="LDAP / Active Directory for `bastion login` (search-then-bind)."
    )
    session_ttl_seconds: int = Field(
        28800, ge=60, description="Lifetime of a session token from `bastion login`."
    )
    group_cache_seconds: float = Field(
        300,
        gt=0,
        description="Directory groups are re-read this often: a user removed from a mapped "
        "group loses access, and their self-service keys are revoked, within this time.",
    )
    login_max_failures: int = Field(
        5,
        ge=1,
        description="Failed sign-ins allowed per user name within `login_lockout_seconds` "
        "(four times as many per source address); then sign-in answers 429 until they age out.",
    )
    login_lockout_seconds: float = Field(
        900, gt=0, description="The window failed sign-ins are counted in."
    )
    self_service_key_max_days: int = Field(
        90,
        ge=1,
        le=3650,
        description="Longest lifetime of a key a user mints for themselves (after `bastion "
        "login` or with an SSO token); never unlimited. Keys older than this stop working.",
    )
    session_key_file: str = Field(
        "var/session.key",
        description="Secret that signs session tokens (created on first start with the "
        "embedded SQLite database only; with PostgreSQL it must be given, or directory sign-in "
        "stops the start; env BASTION_SESSION_KEY takes precedence). The same on every replica.",
    )
    group_mappings: list[GroupMapping] = Field(
        default_factory=list,
        description="Group → team and role, first match wins; a user in no mapped group is "
        "refused (403).",
    )

    @model_validator(mode="after")
    def _ldap_installed(self) -> IdentitySettings:
        if self.ldap is not None:
            try:
                import ldap  # noqa: F401
            except ImportError:
                raise ValueError(
                    "ldap: needs the `ldap` extra (pip install 'bastion[ldap]')"
                ) from None
        return self


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


def _mapped_teams(settings: Any) -> list[str]:
    return [
        f"identity.group_mappings[{i}].team: unknown team {gm.team!r}"
        for i, gm in enumerate(settings.identity.group_mappings)
        if gm.team not in settings.teams
    ]


def _team_references(settings: Any) -> list[str]:
    errors: list[str] = []
    for team, ts in settings.teams.items():
        if ts.cost_center not in settings.cost_centers:
            errors.append(f"teams.{team}.cost_center: unknown cost center {ts.cost_center!r}")
        for i, m in enumerate(ts.models or []):
            if m not in settings.models:
                errors.append(f"teams.{team}.models[{i}]: unknown model {m!r}")
        for m in ts.model_limits:
            if m not in settings.models:
                errors.append(f"teams.{team}.model_limits.{m}: unknown model {m!r}")
    return errors


Names = Annotated[str, Field(pattern=NAME)]
section("identity", IdentitySettings, "How callers are authenticated.", check=_mapped_teams)
section(
    "cost_centers",
    dict[Names, CostCenterSettings],
    "Cost centers teams are charged to.",
    default_factory=dict,
)
section(
    "teams",
    dict[Names, TeamSettings],
    "Teams that own API keys.",
    default_factory=dict,
    check=_team_references,
)
