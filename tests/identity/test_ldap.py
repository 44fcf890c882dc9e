"""LDAP login against a real OpenLDAP slapd (LDAPS and StartTLS, real certificates)."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any

import ldap
import pytest

from bastion.identity.ldap import DirectoryUnavailable, DirectoryUser, LdapDirectory, LoginFailed
from bastion.identity.settings import DISABLED_FILTER, LdapSettings

from .slapd import EVE, PASSWORDS, Slapd, group_dn, user_dn

ALICE_PW = PASSWORDS["alice"]


def replace(cfg: LdapSettings, **changes: Any) -> LdapSettings:
    """A changed copy, validated again as the config file would be."""
    return LdapSettings.model_validate({**cfg.model_dump(), **changes})


@pytest.fixture(scope="module")
def cfg(slapd: Slapd) -> LdapSettings:
    return LdapSettings(
        url=slapd.ldaps_url,
        ca_file=slapd.ca_file,
        bind_dn=slapd.service_dn,
        bind_password=slapd.service_password,
        user_base=slapd.base_dn,
        group_base=slapd.group_base,
    )


def login(config: LdapSettings, username: str, password: str) -> DirectoryUser:
    return asyncio.run(LdapDirectory(config).authenticate(username, password))


def groups_of(config: LdapSettings, username: str) -> DirectoryUser | None:
    return asyncio.run(LdapDirectory(config).groups_of(username))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- happy paths ----------------------------------------------------------------------------------
def test_alice_over_ldaps_gets_direct_and_nested_groups(cfg: LdapSettings, slapd: Slapd) -> None:
    user = login(cfg, "alice", ALICE_PW)
    assert user == DirectoryUser(
        username="alice",
        dn=user_dn("alice"),
        display_name="Alice Example",
        email="alice@bank.test",
        groups=("all-engineering", "payments-devs"),
    )


def test_alice_over_starttls(cfg: LdapSettings, slapd: Slapd) -> None:
    starttls = replace(cfg, url=slapd.ldap_url, start_tls=True)
    assert login(starttls, "alice", ALICE_PW).groups == ("all-engineering", "payments-devs")
    assert login(starttls, "bob", PASSWORDS["bob"]).groups == ("risk-analysts",)


def test_username_comes_back_as_the_directory_spells_it(cfg: LdapSettings) -> None:
    assert login(cfg, "ALICE", ALICE_PW).username == "alice"


def test_nesting_none_reads_direct_groups_only(cfg: LdapSettings) -> None:
    assert login(replace(cfg, nested_groups="none"), "alice", ALICE_PW).groups == ("payments-devs",)
    assert login(replace(cfg, max_nesting=0), "alice", ALICE_PW).groups == ("payments-devs",)


def test_group_cycle_terminates(cfg: LdapSettings, slapd: Slapd) -> None:
    slapd.add_member("payments-devs", group_dn("all-engineering"))
    try:
        assert login(cfg, "alice", ALICE_PW).groups == ("all-engineering", "payments-devs")
    finally:
        slapd.remove_member("payments-devs", group_dn("all-engineering"))


def test_concurrent_logins_share_nothing(cfg: LdapSettings) -> None:
    directory = LdapDirectory(cfg)

    async def one(uid: str, password: str) -> str:
        try:
            return ",".join((await directory.authenticate(uid, password)).groups)
        except LoginFailed:
            return "denied"

    async def many() -> list[str]:
        calls = [("alice", ALICE_PW), ("bob", PASSWORDS["bob"]), ("carol", "nope")] * 8
        return await asyncio.gather(*(one(u, p) for u, p in calls))

    assert asyncio.run(many()) == ["all-engineering,payments-devs", "risk-analysts", "denied"] * 8


# -- refused logins -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("username", "password"),
    [("alice", "wrong"), ("alice", ALICE_PW + " "), ("nobody", ALICE_PW), ("", ALICE_PW)],
)
def test_bad_credentials_fail_with_one_message(
    cfg: LdapSettings, username: str, password: str
) -> None:
    with pytest.raises(LoginFailed) as err:
        login(cfg, username, password)
    assert str(err.value) == err.value.reason == "invalid username or password"


def test_empty_password_is_refused_before_any_bind(cfg: LdapSettings) -> None:
    with pytest.raises(LoginFailed):
        login(cfg, "alice", "")
    # nothing listens there: had it tried the network, this would be DirectoryUnavailable
    nowhere = replace(cfg, url=f"ldaps://127.0.0.1:{closed_port()}")
    with pytest.raises(LoginFailed):
        login(nowhere, "alice", "")


@pytest.mark.parametrize("username", ["*", "ali*", "alice)(|(uid=*", "*)(uid=*", "alice\x00"])
def test_filter_metacharacters_cannot_match_another_user(
    cfg: LdapSettings, slapd: Slapd, username: str
) -> None:
    with pytest.raises(LoginFailed):
        login(cfg, username, ALICE_PW)
    assert groups_of(cfg, username) is None


def test_unescaped_wildcard_would_have_matched_alice(slapd: Slapd) -> None:
    """Shows the injection test above is meaningful: `(uid=ali*)` finds exactly alice."""
    conn = slapd.admin()
    try:
        found = conn.search_s(slapd.base_dn, ldap.SCOPE_SUBTREE, "(uid=ali*)", ["uid"])
    finally:
        conn.unbind_s()
    assert [dn for dn, _ in found] == [user_dn("alice")]


def test_user_whose_uid_is_made_of_metacharacters_logs_in(cfg: LdapSettings) -> None:
    user = login(cfg, EVE, PASSWORDS[EVE])
    assert user.username == EVE
    assert user.groups == ("bastion-auditors",)  # their DN was escaped in the group filter


def test_two_matching_entries_is_a_failure(cfg: LdapSettings, slapd: Slapd) -> None:
    dns = [slapd.add_user("frank", "frank-Pa55!", ou) for ou in ("people", "contractors")]
    try:
        with pytest.raises(LoginFailed):
            login(cfg, "frank", "frank-Pa55!")
        assert groups_of(cfg, "frank") is None
        narrow = replace(cfg, user_base=slapd.people_base)
        assert login(narrow, "frank", "frank-Pa55!").dn == dns[0]
    finally:
        for dn in dns:
            slapd.delete_entry(dn)


# -- TLS and reachability -------------------------------------------------------------------------
def test_untrusted_certificate_is_refused(cfg: LdapSettings, slapd: Slapd) -> None:
    for bad in (
        replace(cfg, ca_file=slapd.other_ca_file),
        replace(cfg, ca_file=None),  # the system store doesn't know the test CA
        replace(cfg, url=slapd.ldap_url, start_tls=True, ca_file=slapd.other_ca_file),
        replace(cfg, url=slapd.ldap_url, start_tls=True, ca_file=None),
    ):
        with pytest.raises(DirectoryUnavailable):
            login(bad, "alice", ALICE_PW)
        with pytest.raises(DirectoryUnavailable):
            groups_of(bad, "alice")


def test_certificate_for_another_host_is_refused(cfg: LdapSettings, slapd: Slapd) -> None:
    # The certificate names IP 127.0.0.1 only; "localhost" reaches the same slapd.
    with pytest.raises(DirectoryUnavailable):
        login(replace(cfg, url=f"ldaps://localhost:{slapd.ldaps_port}"), "alice", ALICE_PW)


def test_verification_off_must_be_explicit_and_works(cfg: LdapSettings, slapd: Slapd) -> None:
    unverified = replace(cfg, ca_file=slapd.other_ca_file, verify_tls=False)
    assert login(unverified, "alice", ALICE_PW).username == "alice"


def test_plain_ldap_is_refused_unless_allowed(cfg: LdapSettings, slapd: Slapd) -> None:
    with pytest.raises(ValueError, match="allow_insecure"):
        replace(cfg, url=slapd.ldap_url)
    insecure = replace(cfg, url=slapd.ldap_url, allow_insecure=True)
    assert login(insecure, "alice", ALICE_PW).username == "alice"


def test_config_is_validated(cfg: LdapSettings) -> None:
    with pytest.raises(ValueError, match="ldaps:// is TLS"):
        replace(cfg, start_tls=True)
    with pytest.raises(ValueError, match="must be ldap://host"):
        replace(cfg, url="http://127.0.0.1")
    with pytest.raises(ValueError, match="username"):
        replace(cfg, user_filter="(uid=alice)")
    with pytest.raises(ValueError, match="user_dn"):
        replace(cfg, group_filter="(member=*)")
    assert cfg.bind_password not in repr(cfg)


def test_unreachable_server_is_unavailable(cfg: LdapSettings) -> None:
    nowhere = replace(cfg, url=f"ldaps://127.0.0.1:{closed_port()}")
    with pytest.raises(DirectoryUnavailable):
        login(nowhere, "alice", ALICE_PW)


def test_silent_server_times_out(cfg: LdapSettings) -> None:
    with socket.socket() as silent:  # accepts TCP (backlog) but never answers TLS
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"ldaps://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(DirectoryUnavailable):
            login(replace(cfg, url=url, timeout_seconds=0.5), "alice", ALICE_PW)
        assert time.monotonic() - started < 5


def test_rejected_service_account_is_unavailable(cfg: LdapSettings) -> None:
    with pytest.raises(DirectoryUnavailable, match="service account"):
        login(replace(cfg, bind_password="wrong"), "alice", ALICE_PW)


# -- membership changes ---------------------------------------------------------------------------
def test_removed_membership_shows_in_groups_of(cfg: LdapSettings, slapd: Slapd) -> None:
    before = groups_of(cfg, "alice")
    assert before is not None
    assert before.groups == ("all-engineering", "payments-devs")
    slapd.remove_member("payments-devs", user_dn("alice"))
    try:
        after = groups_of(cfg, "alice")
        assert after is not None
        assert after.groups == ()
    finally:
        slapd.add_member("payments-devs", user_dn("alice"))


def test_deleted_user_is_gone(cfg: LdapSettings, slapd: Slapd) -> None:
    dn = slapd.add_user("mallory", "mallory-Pa55!")
    slapd.add_member("bastion-auditors", dn)
    try:
        user = groups_of(cfg, "mallory")
        assert user is not None
        assert user.groups == ("bastion-auditors",)
    finally:
        slapd.remove_member("bastion-auditors", dn)
        slapd.delete_entry(dn)
    assert groups_of(cfg, "mallory") is None
    with pytest.raises(LoginFailed):
        login(cfg, "mallory", "mallory-Pa55!")


# -- logging --------------------------------------------------------------------------------------
def test_passwords_are_never_logged(
    cfg: LdapSettings, slapd: Slapd, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    login(cfg, "alice", ALICE_PW)
    with pytest.raises(LoginFailed):
        login(cfg, "alice", "Wr0ng-s3cret")
    with pytest.raises(DirectoryUnavailable):
        login(replace(cfg, bind_password="svc-s3cret"), "alice", ALICE_PW)
    assert any(r.name == "bastion.identity.ldap" for r in caplog.records)
    for secret in (ALICE_PW, "Wr0ng-s3cret", "svc-s3cret", slapd.service_password):
        assert secret not in caplog.text


# -- AD's in-chain rule (OpenLDAP lacks it): the filter sent, against a stand-in connection -----
class _FakeAd:
    """Answers like AD for one user in two groups, recording every filter it is sent."""

    filters: list[str] = []
    disabled = False

    def set_option(self, *_: Any) -> None: ...

    def start_tls_s(self) -> None: ...

    def simple_bind_s(self, *_: Any) -> None: ...

    def unbind_s(self) -> None: ...

    def search_ext_s(self, base: str, _scope: int, flt: str, **_: Any) -> list[Any]:
        self.filters.append(flt)
        if flt == DISABLED_FILTER:  # the base search on the user's own entry
            return [(base, {})] if self.disabled else []
        if flt.startswith("(sAMAccountName="):
            return [("CN=J\\, Doe (ops),OU=Users,DC=ad", {"sAMAccountName": [b"jdoe"]})]
        return [
            ("CN=a,DC=ad", {"cn": [b"Team A"]}),
            ("CN=b,DC=ad", {"cn": [b"Team B"]}),
            (None, ["ldap://referral.ad/DC=ad"]),
        ]


def test_in_chain_sends_one_matching_rule_filter(
    cfg: LdapSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_FakeAd, "filters", [])
    monkeypatch.setattr(ldap, "initialize", lambda _url: _FakeAd())
    ad = replace(cfg, user_filter="(sAMAccountName={username})", nested_groups="in_chain")
    ad = replace(ad, username_attribute="sAMAccountName")
    user = login(ad, "jdoe", "pw")
    assert user.groups == ("Team A", "Team B")
    assert user.username == "jdoe"
    assert _FakeAd.filters == [
        "(sAMAccountName=jdoe)",
        DISABLED_FILTER,
        "(member:1.2.840.113556.1.4.1941:=CN=J\\5c, Doe \\28ops\\29,OU=Users,DC=ad)",
    ]


def test_a_disabled_ad_account_cannot_sign_in_and_has_no_groups(
    cfg: LdapSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AD's ACCOUNTDISABLE bit, as the default `disabled_filter` asks for it."""
    monkeypatch.setattr(_FakeAd, "filters", [])
    monkeypatch.setattr(_FakeAd, "disabled", True)
    monkeypatch.setattr(ldap, "initialize", lambda _url: _FakeAd())
    ad = replace(cfg, user_filter="(sAMAccountName={username})", nested_groups="in_chain")
    ad = replace(ad, username_attribute="sAMAccountName")
    with pytest.raises(LoginFailed):
        login(ad, "jdoe", "pw")
    looked_up = asyncio.run(LdapDirectory(ad).groups_of("jdoe"))
    assert looked_up is not None and looked_up.disabled and looked_up.groups == ()
    assert "userAccountControl:1.2.840.113556.1.4.803:=2" in DISABLED_FILTER


def test_an_openldap_account_locked_by_ppolicy_has_no_groups(
    cfg: LdapSettings, slapd: Slapd
) -> None:
    """OpenLDAP's half of the default `disabled_filter`: an account its password policy
    locked (pwdAccountLockedTime, set here as an administrator locks one by hand) keeps its
    group entries in the directory, yet counts as in no group and cannot sign in."""
    assert cfg.disabled_filter == DISABLED_FILTER
    conn = slapd.admin()
    try:
        conn.modify_s(
            user_dn("alice"), [(ldap.MOD_ADD, "pwdAccountLockedTime", [b"000001010000Z"])]
        )
    finally:
        conn.unbind_s()
    try:
        locked = groups_of(cfg, "alice")
        assert locked is not None and locked.disabled and locked.groups == ()
        with pytest.raises(LoginFailed):
            login(cfg, "alice", ALICE_PW)
    finally:
        conn = slapd.admin()
        try:
            conn.modify_s(user_dn("alice"), [(ldap.MOD_DELETE, "pwdAccountLockedTime", None)])
        finally:
            conn.unbind_s()
    unlocked = groups_of(cfg, "alice")
    assert unlocked is not None and not unlocked.disabled and unlocked.groups


def test_login_throttle_window() -> None:
    from bastion.core.errors import RateLimited
    from bastion.identity.ldap_login import LoginThrottle

    throttle = LoginThrottle(max_failures=2, window=0.3)
    who = ("user:eve", "source:10.0.0.9")
    throttle.reserve(who)
    throttle.reserve(who)  # two attempts in flight count as two failures already
    with pytest.raises(RateLimited):
        throttle.reserve(who)
    throttle.reserve(("user:ann", "source:10.0.0.9"))  # the address has room for more names
    time.sleep(0.35)
    first = throttle.reserve(who)  # the failures aged out
    throttle.release(who, first)  # ... and this one proved right
    throttle.succeeded("user:eve")
    throttle.reserve(who)
    throttle.reserve(who)  # a success started the user's count afresh
    with pytest.raises(RateLimited):
        throttle.reserve(who)


def test_user_names_are_counted_as_the_directory_compares_them() -> None:
    from bastion.identity.ldap_login import normalised

    assert {normalised(n) for n in ("Alice", " alice", "ALICE ", "\uff21lice")} == {"alice"}
    assert normalised("Mary  Ann") == normalised("mary ann")
