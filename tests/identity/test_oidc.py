"""OIDC bearer tokens: a real IdP (oidc-provider under Node) end to end, then the attacks of
RFC 8725 one by one, JWKS caching and flooding, an IdP outage, and an air-gapped issuer.

Tokens the provider would never issue (expired, not yet valid, missing claims) are signed with a
second, air-gapped issuer whose private key the test holds and whose JWKS is a local file.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import secrets
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from bastion.identity.oidc import Identity, InvalidToken, OidcValidator, looks_like_jwt
from bastion.identity.settings import OidcIssuer
from tests.conftest import OIDC_USERS as USERS
from tests.identity.oidc_provider import DEFAULT_RESOURCE, OidcProvider

LOGGER = "bastion.identity.oidc"
AIRGAP = "https://idp.airgap.bank.test/realms/staff"
AIRGAP_AUD = "bastion-airgap"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def craft(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    return (
        f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}.{b64(signature)}"
    )


def payload_of(token: str) -> dict[str, Any]:
    return dict(json.loads(unb64(token.split(".")[1])))


class Airgap:
    """An issuer whose keys live in a local JWKS file and whose private key the test holds."""

    def __init__(self, directory: Path) -> None:
        self.jwks_file = directory / "jwks.json"
        self.keys: dict[str, rsa.RSAPrivateKey] = {}
        self.add_key("airgap-1")

    def add_key(self, kid: str) -> None:
        self.keys[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwks = []
        for key_id, key in self.keys.items():
            jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
            jwks.append({**jwk, "kid": key_id, "use": "sig", "alg": "RS256"})
        self.jwks_file.write_text(json.dumps({"keys": jwks}))

    def sign(self, kid: str | None = "airgap-1", drop: tuple[str, ...] = (), **claims: Any) -> str:
        now = int(time.time())
        payload = {"iss": AIRGAP, "aud": AIRGAP_AUD, "sub": "carol", "iat": now, "exp": now + 300}
        payload = {k: v for k, v in {**payload, **claims}.items() if k not in drop}
        headers = {"kid": kid} if kid else {}
        key = self.keys.get(kid or "", self.keys["airgap-1"])  # unknown kid: signed with ours
        return jwt.encode(payload, key, algorithm="RS256", headers=headers)

    def settings(self) -> OidcIssuer:
        return OidcIssuer(issuer=AIRGAP, audience=AIRGAP_AUD, jwks_file=str(self.jwks_file))


@pytest.fixture(scope="module")
def provider(oidc_provider: OidcProvider) -> OidcProvider:
    return oidc_provider


@pytest.fixture
def airgap(tmp_path: Path) -> Airgap:
    return Airgap(tmp_path)


def settings_for(op: OidcProvider, **overrides: Any) -> OidcIssuer:
    values: dict[str, Any] = {
        "issuer": op.issuer,
        "audience": DEFAULT_RESOURCE,
        "user_claim": "preferred_username",
    }
    return OidcIssuer(**{**values, **overrides})


@pytest.fixture
def validator(provider: OidcProvider, airgap: Airgap) -> OidcValidator:
    return OidcValidator([settings_for(provider), airgap.settings()])


def validate(validator: OidcValidator, token: str) -> Identity:
    return asyncio.run(validator.validate(token))


def rejected(validator: OidcValidator, token: str, caplog: pytest.LogCaptureFixture) -> str:
    """The rejection reason; checks the one WARNING line it logged, without the token."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER), pytest.raises(InvalidToken) as info:
        validate(validator, token)
    lines = [r for r in caplog.records if r.getMessage().startswith("oidc token rejected")]
    assert len(lines) == 1
    assert (lines[0].name, lines[0].levelno) == (LOGGER, logging.WARNING)
    assert info.value.reason in lines[0].getMessage()
    for record in caplog.records:
        assert token not in record.getMessage()
        payload = token.split(".")[1]
        assert len(payload) < 16 or payload not in record.getMessage()
    return info.value.reason


# -- the real provider ----------------------------------------------------------------------------
def test_provider_token_validates_and_maps_claims(
    provider: OidcProvider, validator: OidcValidator
) -> None:
    identity = validate(validator, provider.token("alice-cli"))
    assert identity.issuer == provider.issuer
    assert identity.subject == "alice-cli"
    assert identity.user == "alice"
    assert identity.email == "alice@bank.test"
    assert identity.groups == ("risk-analysts", "gpu-users")
    assert identity.claims["aud"] == DEFAULT_RESOURCE
    assert time.time() + 500 < identity.expires_at <= time.time() + 600 + 5

    bob = validate(validator, provider.token("bob-cli"))
    assert (bob.user, bob.email, bob.groups) == ("bob", None, ("trading",))
    assert validator.jwks_fetches(provider.issuer) == 1  # the second token used the cached keys

    by_sub = OidcValidator([settings_for(provider, user_claim="sub")])
    assert validate(by_sub, provider.token("bob-cli")).user == "bob-cli"


def test_concurrent_cold_validations_share_one_fetch(provider: OidcProvider) -> None:
    fresh = OidcValidator([settings_for(provider)])
    tokens = [provider.token("alice-cli") for _ in range(20)]
    before = provider.jwks_hits()

    async def scenario() -> list[Identity]:
        return await asyncio.gather(*(fresh.validate(t) for t in tokens))

    assert {i.user for i in asyncio.run(scenario())} == {"alice"}
    assert fresh.jwks_fetches(provider.issuer) == 1
    assert provider.jwks_hits() - before == 1


# -- attacks --------------------------------------------------------------------------------------
@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_is_rejected(
    provider: OidcProvider, validator: OidcValidator, caplog: pytest.LogCaptureFixture, alg: str
) -> None:
    claims = payload_of(provider.token("alice-cli"))
    token = craft({"alg": alg, "typ": "JWT", "kid": provider.kid}, claims)
    assert rejected(validator, token, caplog) == "algorithm not allowed"


def test_hs256_signed_with_the_public_key_is_rejected(
    provider: OidcProvider, validator: OidcValidator, caplog: pytest.LogCaptureFixture
) -> None:
    (jwk,) = provider.jwks()["keys"]
    pem = RSAAlgorithm.from_jwk(jwk).public_bytes(  # type: ignore[union-attr]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": "HS256", "typ": "at+jwt", "kid": jwk["kid"]}
    claims = {**payload_of(provider.token("bob-cli")), "groups": ["admins"]}
    unsigned = craft(header, claims).rsplit(".", 1)[0]
    signature = hmac.new(pem, unsigned.encode(), hashlib.sha256).digest()
    assert rejected(validator, f"{unsigned}.{b64(signature)}", caplog) == "algorithm not allowed"


def test_expired_token_is_rejected_beyond_the_leeway(
    airgap: Airgap, validator: OidcValidator, caplog: pytest.LogCaptureFixture
) -> None:
    now = int(time.time())
    assert validate(validator, airgap.sign(exp=now - 10)).user == "carol"  # within 30 s leeway
    token = airgap.sign(iat=now - 600, exp=now - 120)
    assert rejected(validator, token, caplog) == "token expired"


@pytest.mark.parametrize("claim", ["nbf", "iat"])
def test_not_yet_valid_token_is_rejected(
    airgap: Airgap, validator: OidcValidator, caplog: pytest.LogCaptureFixture, claim: str
) -> None:
    now = int(time.time())
    assert validate(validator, airgap.sign(**{claim: now + 10})).subject == "carol"
    token = airgap.sign(**{claim: now + 120})
    assert rejected(validator, token, caplog) == "token not yet valid"


def test_wrong_audience_is_rejected(
    provider: OidcProvider,
    airgap: Airgap,
    validator: OidcValidator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    other = provider.token("alice-cli", resource="https://other-service.bank.test/api")
    assert rejected(validator, other, caplog) == "audience mismatch"
    prefixed = airgap.sign(aud=AIRGAP_AUD + "-admin")
    assert rejected(validator, prefixed, caplog) == "audience mismatch"
    assert validate(validator, airgap.sign(aud=["someone-else", AIRGAP_AUD])).user == "carol"


def test_wrong_issuer_is_rejected(
    provider: OidcProvider,
    airgap: Airgap,
    validator: OidcValidator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    only_airgap = OidcValidator([airgap.settings()])
    assert rejected(only_airgap, provider.token("alice-cli"), caplog) == "unknown issuer"
    assert rejected(validator, airgap.sign(iss=AIRGAP + "/"), caplog) == "unknown issuer"
    # Our key, claiming to be the real provider: its key id or ours, neither verifies.
    forged = airgap.sign(iss=provider.issuer, aud=DEFAULT_RESOURCE, preferred_username="eve")
    assert rejected(validator, forged, caplog) == "unknown signing key"
    forged = airgap.sign(kid=provider.kid, iss=provider.issuer, aud=DEFAULT_RESOURCE)
    assert rejected(validator, forged, caplog) == "signature verification failed"


def test_tampered_payload_is_rejected(
    provider: OidcProvider, validator: OidcValidator, caplog: pytest.LogCaptureFixture
) -> None:
    header, payload, signature = provider.token("bob-cli").split(".")
    claims = {**json.loads(unb64(payload)), "groups": ["trading", "admins"]}
    tampered = f"{header}.{b64(json.dumps(claims).encode())}.{signature}"
    assert rejected(validator, tampered, caplog) == "signature verification failed"


@pytest.mark.parametrize("claim", ["sub", "exp", "aud", "iss"])
def test_missing_required_claim_is_rejected(
    airgap: Airgap, validator: OidcValidator, caplog: pytest.LogCaptureFixture, claim: str
) -> None:
    reason = rejected(validator, airgap.sign(drop=(claim,)), caplog)
    assert reason == f"missing required claim '{claim}'"


def test_malformed_tokens_are_rejected(
    validator: OidcValidator, caplog: pytest.LogCaptureFixture
) -> None:
    assert rejected(validator, "eyJhbGciOiJSUzI1NiJ9.not-json.x", caplog).startswith("malformed")
    assert rejected(validator, "eyJ" + "A" * 20_000 + ".e.e", caplog) == "token too large"


def test_unknown_kid_flood_fetches_the_jwks_at_most_twice(
    provider: OidcProvider, airgap: Airgap, caplog: pytest.LogCaptureFixture
) -> None:
    fresh = OidcValidator([settings_for(provider)])  # cold: the flood causes the first fetch
    before = provider.jwks_hits()
    junk = [
        airgap.sign(kid=secrets.token_hex(8), iss=provider.issuer, aud=DEFAULT_RESOURCE)
        for _ in range(50)
    ]

    async def flood() -> list[BaseException | Identity]:
        together = [fresh.validate(t) for t in junk[:25]]  # concurrently, then one by one
        results = await asyncio.gather(*together, return_exceptions=True)
        for token in junk[25:]:
            try:
                results.append(await fresh.validate(token))
            except InvalidToken as exc:
                results.append(exc)
        return results

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        results = asyncio.run(flood())
    assert all(isinstance(r, InvalidToken) and r.reason == "unknown signing key" for r in results)
    assert len([r for r in caplog.records if "token rejected" in r.getMessage()]) == 50
    assert validate(fresh, provider.token("alice-cli")).user == "alice"  # from the cache
    assert fresh.jwks_fetches(provider.issuer) <= 2
    assert provider.jwks_hits() - before <= 2


def test_unknown_kid_refetches_after_the_interval(airgap: Airgap) -> None:
    rotating = OidcValidator([airgap.settings()], min_refetch_seconds=1.0)
    assert validate(rotating, airgap.sign()).user == "carol"
    airgap.add_key("airgap-2")  # the IdP rotates its key
    new_token = airgap.sign(kid="airgap-2")
    with pytest.raises(InvalidToken, match="unknown signing key"):
        validate(rotating, new_token)  # the file was read at start: too soon to reread
    time.sleep(1.0)
    assert validate(rotating, new_token).user == "carol"
    assert rotating.jwks_fetches(AIRGAP) == 2  # startup + one reread


def test_cached_keys_keep_working_while_the_idp_is_down(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with OidcProvider(USERS, tmp_path / "op.log") as op:
        down = OidcValidator([settings_for(op)], min_refetch_seconds=0)
        assert validate(down, op.token("alice-cli")).user == "alice"
        minted_before_stop = op.token("bob-cli")
        op.stop()
        assert validate(down, minted_before_stop).groups == ("trading",)
        unknown = craft({"alg": "RS256", "kid": "rotated"}, payload_of(minted_before_stop), b"x")
        assert rejected(down, unknown, caplog) == "unknown signing key"
        assert any("not loaded" in r.getMessage() for r in caplog.records)  # it tried, and failed
        assert validate(down, minted_before_stop).user == "bob"  # the failure kept the cache

        cold = OidcValidator([settings_for(op)])
        assert rejected(cold, minted_before_stop, caplog) == "signing keys unavailable"


# -- air-gapped issuer ----------------------------------------------------------------------------
def test_jwks_file_issuer_needs_no_network(
    airgap: Airgap, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("an air-gapped issuer must not open HTTP sessions")

    validator = OidcValidator([airgap.settings()])
    monkeypatch.setattr(aiohttp, "ClientSession", no_network)
    identity = validate(validator, airgap.sign(email="carol@bank.test", groups="ops"))
    assert (identity.user, identity.email, identity.groups) == (
        "carol",
        "carol@bank.test",
        ("ops",),
    )
    assert rejected(validator, airgap.sign(kid="airgap-9"), caplog) == "unknown signing key"

    airgap.add_key("airgap-2")
    two_keys = OidcValidator([airgap.settings()])
    assert validate(two_keys, airgap.sign(kid="airgap-2")).user == "carol"
    assert rejected(two_keys, airgap.sign(kid=None), caplog).startswith("kid required")
    bad_groups = airgap.sign(groups=[1, 2])
    assert rejected(two_keys, bad_groups, caplog) == "malformed 'groups' claim"


# -- configuration and routing --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("algorithms", "extra"),
    [
        (("none",), {}),
        (("RS256", "none"), {}),
        (("RS256", "HS256"), {"jwks_file": "/x.json"}),
        (("HS256",), {}),
        ((), {}),
        (("RS257",), {}),
        (("RS256",), {"jwks_file": "/x.json", "jwks_url": "https://idp/jwks"}),
    ],
)
def test_unsafe_configurations_are_refused(
    algorithms: tuple[str, ...], extra: dict[str, Any]
) -> None:
    with pytest.raises(ValueError):
        OidcIssuer(issuer=AIRGAP, audience="a", algorithms=algorithms, **extra)


def test_issuer_configured_twice_is_refused(airgap: Airgap) -> None:
    with pytest.raises(ValueError, match="twice"):
        OidcValidator([airgap.settings(), airgap.settings()])


def test_looks_like_jwt(provider: OidcProvider) -> None:
    token = provider.token("alice-cli")
    assert looks_like_jwt(token)
    assert looks_like_jwt(f"Bearer {token}")
    assert not looks_like_jwt("bst-" + secrets.token_urlsafe(32))
    assert not looks_like_jwt("Bearer bst-abc.def.ghi")
    assert not looks_like_jwt("eyJhbGciOiJub25lIn0.e30")
    assert not looks_like_jwt("abc.def.ghi")
    assert not looks_like_jwt("eyJh bGc.e30.x")
