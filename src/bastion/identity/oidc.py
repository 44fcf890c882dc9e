"""OIDC single sign-on: validates `Authorization: Bearer <JWT>` access tokens from the bank's IdP.

Why it is built this way (RFC 8725, JWT best current practices):
- Algorithms are pinned per issuer and never taken from the token, so neither `alg: none` nor
  RS/HS confusion (the public key used as an HMAC secret) gets through; `none` cannot even be
  configured, nor HS* mixed with RS/ES/PS/EdDSA.
- The unverified `iss` only picks the issuer's configuration and keys; the token is then fully
  verified with them (signature, exp, iss, aud, sub, nbf/iat with leeway). Unknown issuer: refused.
- Keys come from the issuer's JWKS (discovered, a configured URL, or `jwks_file` for air-gapped
  setups), cached in memory. An unknown `kid` refetches at most once per `min_refetch_seconds` per
  issuer and concurrent callers share that fetch, so junk `kid`s cannot flood the IdP; while the
  IdP is down, cached keys keep working.
- A rejection raises `InvalidToken(reason)` and logs one WARNING: reason, iss, kid; never the token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
from jwt import PyJWK

from bastion.identity.settings import KTY_BY_PREFIX, OidcIssuer

log = logging.getLogger("bastion.identity.oidc")
_Json = dict[str, Any]

_JWT_SHAPE = re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


class InvalidToken(Exception):
    """The bearer token is not acceptable; `reason` is safe to log (it never holds the token)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Identity:
    """Who a validated token speaks for."""

    issuer: str
    subject: str
    user: str
    email: str | None
    groups: tuple[str, ...]
    claims: dict[str, Any] = field(hash=False, repr=False)
    expires_at: float


@dataclass(frozen=True)
class _Key:
    kid: str | None
    kty: str
    alg: str | None
    key: Any


def looks_like_jwt(authorization_value: str) -> bool:
    """Compact JWS shape (`eyJ...`, three base64url parts)? API keys start with `bst-` instead."""
    value = authorization_value.strip()
    scheme, _, rest = value.partition(" ")
    if scheme.lower() == "bearer":
        value = rest.strip()
    return _JWT_SHAPE.fullmatch(value) is not None


def _parse_jwks(document: Any) -> list[_Key]:
    """The usable signature keys of a JWKS (PyJWK parses each; others are skipped)."""
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ValueError("not a JWK Set")
    keys = []
    for entry in entries:
        signing = isinstance(entry, dict) and entry.get("use", "sig") == "sig"
        if not signing or "verify" not in entry.get("key_ops", ["verify"]):
            continue
        try:
            parsed = PyJWK(entry)
        except (jwt.PyJWTError, ValueError, TypeError):
            continue  # unknown kty/crv/alg or bad numbers: not a key we could verify with
        key = parsed.key.public_key() if hasattr(parsed.key, "public_key") else parsed.key
        kid, alg = entry.get("kid"), entry.get("alg")
        keys.append(_Key(kid if isinstance(kid, str) else None, str(entry["kty"]), alg, key))
    if not keys:
        raise ValueError("JWK Set has no usable signature keys")
    return keys


class _IssuerKeys:
    """The cached signing keys of one issuer, refetched on unknown `kid` at a bounded rate."""

    def __init__(self, settings: OidcIssuer, validator: OidcValidator) -> None:
        self.settings = settings
        self.jwks_fetches = 0
        self._validator = validator
        self._keys: list[_Key] = []
        self._jwks_url = settings.jwks_url
        self._last_attempt = -math.inf
        self._inflight: asyncio.Task[None] | None = None
        if settings.jwks_file:  # fail fast on a broken file, at startup rather than per request
            self._keys = _parse_jwks(json.loads(Path(settings.jwks_file).read_bytes()))
            self._last_attempt, self.jwks_fetches = time.monotonic(), 1

    def _find(self, kid: str | None) -> _Key | None:
        if kid is None and len(self._keys) > 1:
            raise InvalidToken("kid required: the issuer has several signing keys")
        return next((k for k in self._keys if kid is None or k.kid == kid), None)

    async def key_for(self, kid: str | None, alg: str) -> Any:
        found = self._find(kid)
        if found is None:
            await self._refresh()
            found = self._find(kid)
        if found is None:
            raise InvalidToken("unknown signing key" if self._keys else "signing keys unavailable")
        if found.kty != KTY_BY_PREFIX[alg[:2]] or found.alg not in (None, alg):
            raise InvalidToken("signing key does not match the algorithm")
        return found.key

    async def _refresh(self) -> None:
        task = self._inflight
        if task is None or task.done():
            if time.monotonic() - self._last_attempt < self._validator.min_refetch_seconds:
                return
            self._last_attempt = time.monotonic()
            task = self._inflight = asyncio.create_task(self._fetch())
        await asyncio.shield(task)  # a cancelled caller must not cancel everyone's fetch

    async def _fetch(self) -> None:
        s = self.settings
        self.jwks_fetches += 1
        try:
            if s.jwks_file:
                document = json.loads(await asyncio.to_thread(Path(s.jwks_file).read_bytes))
            else:
                if self._jwks_url is None:
                    url = s.issuer.rstrip("/") + "/.well-known/openid-configuration"
                    meta = await self._validator.get_json(url)
                    meta = meta if isinstance(meta, dict) else {}
                    if meta.get("issuer") != s.issuer or not isinstance(meta.get("jwks_uri"), str):
                        raise ValueError("discovery: issuer mismatch or no jwks_uri")
                    self._jwks_url = meta["jwks_uri"]
                document = await self._validator.get_json(str(self._jwks_url))
            self._keys = _parse_jwks(document)
        except Exception as exc:  # whatever went wrong, the keys we had stay in use
            cached = len(self._keys)
            log.warning("oidc: keys of %s not loaded (%r); %d cached", s.issuer, exc, cached)


_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not yet valid"),
    (jwt.InvalidAudienceError, "audience mismatch"),
    (jwt.InvalidIssuerError, "issuer mismatch"),
    (jwt.InvalidAlgorithmError, "algorithm not allowed"),
    (jwt.InvalidSignatureError, "signature verification failed"),
    (jwt.InvalidIssuedAtError, "invalid iat claim"),
    (jwt.exceptions.InvalidSubjectError, "invalid sub claim"),
)


def _reason(exc: jwt.PyJWTError) -> str:
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"missing required claim {exc.claim!r}"
    if isinstance(exc, jwt.DecodeError) and not isinstance(exc, jwt.InvalidSignatureError):
        return f"malformed token ({str(exc)[:120]})"
    return next((r for t, r in _REASONS if isinstance(exc, t)), f"invalid token ({exc})"[:160])


class OidcValidator:
    """Validates bearer JWTs against a set of trusted issuers (see the module docstring)."""

    def __init__(
        self,
        issuers: Iterable[OidcIssuer],
        *,
        session: aiohttp.ClientSession | None = None,
        min_refetch_seconds: float = 30.0,
        fetch_timeout_seconds: float = 3.0,
    ) -> None:
        self.min_refetch_seconds = min_refetch_seconds
        self._timeout = aiohttp.ClientTimeout(total=fetch_timeout_seconds)
        self._session = session  # else one short-lived session per (rare) key fetch
        configured = list(issuers)
        self._issuers = {settings.issuer: _IssuerKeys(settings, self) for settings in configured}
        if len(self._issuers) != len(configured):
            raise ValueError("an OIDC issuer is configured twice")

    def jwks_fetches(self, issuer: str) -> int:
        """How many times this issuer's JWKS was (tried to be) downloaded or read."""
        return self._issuers[issuer].jwks_fetches

    async def get_json(self, url: str) -> Any:
        session = self._session or aiohttp.ClientSession()
        try:
            async with session.get(url, timeout=self._timeout) as resp:
                resp.raise_for_status()
                body = bytearray()
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > 1 << 20:
                        raise ValueError(f"{url} is larger than 1 MiB")
            return json.loads(body)
        finally:
            if session is not self._session:
                await session.close()

    async def validate(self, token: str, audience: str | None = None) -> Identity:
        """The identity a valid token speaks for; raises `InvalidToken` (and logs) otherwise.
        `audience` replaces the issuer's configured one (an ID token's is the client id)."""
        header: _Json = {}
        unverified: _Json = {}
        try:
            if len(token) > 16 * 1024:
                raise InvalidToken("token too large")
            try:
                header = jwt.get_unverified_header(token)
                unverified = jwt.decode(token, options={"verify_signature": False})
            except jwt.PyJWTError as exc:
                raise InvalidToken(_reason(exc)) from exc
            return await self._verify(token, header, unverified, audience)
        except InvalidToken as exc:
            log.warning(
                "oidc token rejected: %s (iss=%.200r kid=%.100r)",
                exc.reason, unverified.get("iss"), header.get("kid"),
            )  # fmt: skip
            raise

    async def _verify(
        self, token: str, header: _Json, unverified: _Json, audience: str | None
    ) -> Identity:
        iss = unverified.get("iss")
        issuer = self._issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise InvalidToken("unknown issuer" if iss else "missing required claim 'iss'")
        s = issuer.settings
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in s.algorithms:
            raise InvalidToken("algorithm not allowed")
        key = await issuer.key_for(header.get("kid"), alg)
        try:
            claims: _Json = jwt.decode(
                token, key, algorithms=[alg], audience=audience or s.audience, issuer=s.issuer,
                leeway=s.leeway_seconds, options={"require": ["exp", "iss", "aud", "sub"]},
            )  # fmt: skip
        except jwt.PyJWTError as exc:
            raise InvalidToken(_reason(exc)) from exc
        user = claims.get(s.user_claim)
        if not isinstance(user, str) or not user:
            raise InvalidToken(f"missing required claim {s.user_claim!r}")
        email, groups = claims.get(s.email_claim), claims.get(s.groups_claim, [])
        groups = [groups] if isinstance(groups, str) else groups
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise InvalidToken(f"malformed {s.groups_claim!r} claim")
        email, expires = email if isinstance(email, str) else None, float(claims["exp"])
        return Identity(s.issuer, claims["sub"], user, email, tuple(groups), claims, expires)
