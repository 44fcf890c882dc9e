"""LDAP / Active Directory login by search-then-bind, with group memberships (nested too).

Why: banks keep who-may-use-what in AD/OpenLDAP groups; the gateway must hold no passwords. A
service account finds the one entry matching a configurable filter (input escaped per RFC 4515:
`*` or `)(` can't widen it), a bind as that DN checks the password, and groups are read as the
service account: directly, by AD's LDAP_MATCHING_RULE_IN_CHAIN, or level by level. TLS is verified
by default. `LoginFailed` (401, one message for unknown user and wrong password) is kept apart
from `DirectoryUnavailable` (503). Each call has its own connection (TLS options per connection:
threads share nothing) in its own daemon thread, not `asyncio.to_thread`: Debian's libldap (GnuTLS)
never times out a TLS handshake that a server accepts but doesn't answer (with libldap's network
timeout it even spins a core), so such a call must not pin a shared executor thread. Callers get
503 at a deadline, `max_concurrent` caps the threads, and a Python socket checks reachability.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import ldap
import ldap.filter

from bastion.identity.settings import LdapSettings

log = logging.getLogger("bastion.identity.ldap")
_escape = ldap.filter.escape_filter_chars  # RFC 4515: backslash, *, (, ) and NUL
T = TypeVar("T")
Entry = tuple[str, dict[str, list[bytes]]]
_BATCH = 32  # member DNs per OR-filter when walking nested groups
_USER_BIND_REFUSED = (ldap.INVALID_CREDENTIALS, ldap.UNWILLING_TO_PERFORM, ldap.INAPPROPRIATE_AUTH)


class LoginFailed(Exception):
    """Unknown user, wrong or empty password, ambiguous match: the caller answers 401."""

    def __init__(self, reason: str = "invalid username or password") -> None:
        super().__init__(reason)
        self.reason = reason


class DirectoryUnavailable(Exception):
    """The directory can't be asked (down, TLS refused, service account rejected): 503."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class DirectoryUser:
    """Who logged in, and the names of every group they are in (nesting resolved), sorted."""

    username: str
    dn: str
    display_name: str | None
    email: str | None
    groups: tuple[str, ...]
    #: The directory marks the account disabled or locked (`disabled_filter`): no groups count.
    disabled: bool = False


class LdapDirectory:
    """Search-then-bind login and group lookups against one LDAP/AD server."""

    def __init__(self, config: LdapSettings) -> None:
        self.config = config
        self._slots = threading.BoundedSemaphore(config.max_concurrent)
        if not config.tls:
            log.warning("LDAP without TLS (allow_insecure) for %s", config.url)
        elif not config.verify_tls:
            log.warning("LDAP TLS certificate verification is OFF for %s", config.url)

    async def authenticate(self, username: str, password: str) -> DirectoryUser:
        """The user, if `password` is theirs; else `LoginFailed` (or `DirectoryUnavailable`)."""
        if not password or not username:  # a bind with no password is anonymous: it succeeds!
            log.info("LDAP login refused for %r: empty username or password", username)
            raise LoginFailed()
        return await self._run(self._authenticate, username, password)

    async def groups_of(self, username: str) -> DirectoryUser | None:
        """The user's current entry and groups, read as the service account; None if gone."""
        return await self._run(self._lookup, username) if username else None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in a daemon thread; DirectoryUnavailable once the deadline has passed."""
        deadline = time.monotonic() + 3 * self.config.timeout_seconds
        outcome: concurrent.futures.Future[T] = concurrent.futures.Future()

        def work() -> None:
            if not outcome.set_running_or_notify_cancel():
                return  # the caller gave up already
            try:
                if not self._slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
                    raise DirectoryUnavailable("LDAP: too many calls in flight")
                try:
                    outcome.set_result(fn(*args))
                finally:
                    self._slots.release()
            except BaseException as e:
                outcome.set_exception(e)

        threading.Thread(target=work, name="bastion-ldap", daemon=True).start()
        try:
            waited = asyncio.wrap_future(outcome)
            return await asyncio.wait_for(waited, max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            log.warning("LDAP call to %s timed out", self.config.url)
            raise DirectoryUnavailable("LDAP server did not answer in time") from None

    # -- blocking part, one connection per call ------------------------------------------------
    def _authenticate(self, username: str, password: str) -> DirectoryUser:
        with self._connection() as conn:
            found = self._find_user(conn, username)
            if found is None:
                raise LoginFailed()
            try:
                conn.simple_bind_s(found[0], password)
            except _USER_BIND_REFUSED as e:
                log.info("LDAP login failed for %r: %s", username, _describe(e))
                raise LoginFailed() from None
            self._bind_service(conn)  # groups are read with the service account's rights
            user = self._user(conn, username, found)
            if user.disabled:
                log.info(
                    "LDAP login refused for %r (%s): the account is disabled", username, user.dn
                )
                raise LoginFailed()
            log.info("LDAP login ok for %r (%s): %d groups", username, user.dn, len(user.groups))
            return user

    def _lookup(self, username: str) -> DirectoryUser | None:
        with self._connection() as conn:
            found = self._find_user(conn, username)
            return None if found is None else self._user(conn, username, found)

    @contextlib.contextmanager
    def _connection(self) -> Iterator[Any]:
        cfg = self.config
        parts = urlsplit(cfg.url)
        address = (parts.hostname or "", parts.port or (636 if parts.scheme == "ldaps" else 389))
        try:  # libldap's own connect timeout would switch TLS to its spinning non-blocking path
            socket.create_connection(address, timeout=cfg.timeout_seconds).close()
        except OSError as e:
            log.warning("LDAP server %s unreachable: %s", parts.netloc, e)
            raise DirectoryUnavailable(f"LDAP server {parts.netloc} unreachable") from None
        conn = ldap.initialize(cfg.url)
        try:
            conn.set_option(ldap.OPT_PROTOCOL_VERSION, ldap.VERSION3)
            conn.set_option(ldap.OPT_REFERRALS, 0)  # AD: don't chase referrals with our creds
            conn.set_option(ldap.OPT_TIMEOUT, cfg.timeout_seconds)
            if cfg.tls:  # always explicit, so LDAPTLS_REQCERT or ldap.conf can't weaken it
                demand = ldap.OPT_X_TLS_DEMAND if cfg.verify_tls else ldap.OPT_X_TLS_NEVER
                conn.set_option(ldap.OPT_X_TLS_REQUIRE_CERT, demand)
                conn.set_option(ldap.OPT_X_TLS_PROTOCOL_MIN, ldap.OPT_X_TLS_PROTOCOL_TLS1_2)
                if cfg.ca_file:
                    conn.set_option(ldap.OPT_X_TLS_CACERTFILE, cfg.ca_file)
                conn.set_option(ldap.OPT_X_TLS_NEWCTX, 0)  # this connection's own TLS context
            if cfg.start_tls:
                conn.start_tls_s()
            self._bind_service(conn)
            yield conn
        except ldap.LDAPError as e:
            reason = f"LDAP request to {parts.netloc} failed: {_describe(e)}"
            if cfg.tls and isinstance(e, ldap.SERVER_DOWN | ldap.CONNECT_ERROR):
                reason += " (TLS handshake or certificate verification failed?)"
            log.warning("%s", reason)
            raise DirectoryUnavailable(reason) from None
        finally:
            with contextlib.suppress(ldap.LDAPError):
                conn.unbind_s()

    def _bind_service(self, conn: Any) -> None:
        try:
            conn.simple_bind_s(self.config.bind_dn, self.config.bind_password)
        except ldap.INVALID_CREDENTIALS:
            log.warning("LDAP service account %s was rejected", self.config.bind_dn)
            raise DirectoryUnavailable("LDAP service account was rejected") from None

    def _find_user(self, conn: Any, username: str) -> Entry | None:
        cfg = self.config
        flt = cfg.user_filter.replace("{username}", _escape(username))
        attrs = [cfg.username_attribute, *cfg.display_name_attributes, cfg.email_attribute]
        try:
            found = self._search(conn, cfg.user_base, flt, attrs, limit=2)
        except ldap.SIZELIMIT_EXCEEDED:
            found = [("", {})] * 2  # 2: at least two
        if len(found) != 1:  # none, or ambiguous: never guess which one
            log.info("LDAP user %r: %s entries match %s", username, len(found) or "no", flt)
        return found[0] if len(found) == 1 else None

    def _user(self, conn: Any, username: str, entry: Entry) -> DirectoryUser:
        cfg, (dn, attrs) = self.config, entry
        names = (_first(attrs, a) for a in cfg.display_name_attributes)
        disabled = self._disabled(conn, dn)
        return DirectoryUser(
            username=_first(attrs, cfg.username_attribute) or username,
            dn=dn,
            display_name=next((n for n in names if n), None),
            email=_first(attrs, cfg.email_attribute),
            groups=() if disabled else self._groups(conn, dn),
            disabled=disabled,
        )

    def _disabled(self, conn: Any, user_dn: str) -> bool:
        """Whether the user's own entry matches `disabled_filter` (a base search on it)."""
        flt = self.config.disabled_filter
        if not flt:
            return False
        kw = {"attrlist": ["1.1"], "timeout": self.config.timeout_seconds}
        try:
            found = conn.search_ext_s(user_dn, ldap.SCOPE_BASE, flt, **kw)
        except ldap.NO_SUCH_OBJECT:
            return True  # deleted between the two searches
        return any(dn is not None for dn, _ in found)

    def _groups(self, conn: Any, user_dn: str) -> tuple[str, ...]:
        cfg = self.config
        if cfg.nested_groups == "in_chain":  # AD resolves the whole chain in one search
            found = self._member_of(conn, cfg.in_chain_filter, [user_dn])
            return tuple(sorted({name for _, name in found}))
        names, seen, frontier = set[str](), set[str](), [user_dn]
        depth = cfg.max_nesting if cfg.nested_groups == "recursive" else 0
        for level in range(depth + 1):  # level 0: direct groups; then groups of those groups
            found = self._member_of(conn, cfg.group_filter, frontier)
            names.update(name for _, name in found)
            frontier = [dn for dn, _ in found if dn.lower() not in seen]  # stops cycles
            seen.update(dn.lower() for dn in frontier)
            if not frontier:
                break
            if level == depth and depth:
                log.warning("LDAP groups of %s nest deeper than %d levels", user_dn, depth)
        return tuple(sorted(names))

    def _member_of(self, conn: Any, template: str, member_dns: list[str]) -> list[tuple[str, str]]:
        """(dn, name) of the groups that have any of `member_dns` as a member."""
        attr = self.config.group_name_attribute
        out: list[tuple[str, str]] = []
        for i in range(0, len(member_dns), _BATCH):
            batch = member_dns[i : i + _BATCH]
            parts = [template.replace("{user_dn}", _escape(dn)) for dn in batch]
            flt = parts[0] if len(parts) == 1 else "(|" + "".join(parts) + ")"
            for dn, attrs in self._search(conn, self.config.group_base, flt, [attr]):
                if name := _first(attrs, attr):
                    out.append((dn, name))
        return out

    def _search(
        self, conn: Any, base: str, flt: str, attrs: list[str], limit: int = 0
    ) -> list[Entry]:
        kw = {"attrlist": attrs, "timeout": self.config.timeout_seconds, "sizelimit": limit}
        result = conn.search_ext_s(base, ldap.SCOPE_SUBTREE, flt, **kw)
        return [(dn, a) for dn, a in result if dn is not None]  # AD: drop referral entries


def _first(attrs: dict[str, list[bytes]], name: str) -> str | None:
    """The first value of attribute `name` (names are case-insensitive), as text."""
    values = next((v for k, v in attrs.items() if k.lower() == name.lower() and v), None)
    return values[0].decode("utf-8", errors="replace") if values else None


def _describe(e: ldap.LDAPError) -> str:
    info = e.args[0] if e.args and isinstance(e.args[0], dict) else {}
    return " ".join(str(info[k]) for k in ("desc", "info") if info.get(k)) or type(e).__name__
