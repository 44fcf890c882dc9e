"""Encryption of audit contents at rest: a data key per team, wrapped by a master key.

Prompt and response bodies are sealed with AES-256-GCM under the team's data key; the data key
is stored only wrapped (AES-GCM under the master key, from a file or an environment variable —
`KeyWrapper` is the seam where a KMS or HSM plugs in). Destroying a team's wrapped data key
("crypto-shredding") makes every sealed body of that team unreadable, while the hash chain,
which covers the ciphertext, still verifies.

Groundwork for issue 3: the key store in the database and the request-path wiring come next.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bastion.core.randomness import random_bytes

NONCE = 12


class ContentUnavailable(Exception):
    """The content cannot be decrypted: its key was shredded, or it was altered."""


class KeyWrapper(Protocol):
    def wrap(self, data_key: bytes, team: str) -> bytes: ...

    def unwrap(self, wrapped: bytes, team: str) -> bytes: ...


class MasterKey:
    """Wraps data keys with a local 256-bit master key (base64 in a file or an env var).

    `older`: keys that still unwrap but never wrap: the outgoing key while a rotation is under
    way (keys.py), so a rotation cut short by a crash loses nothing."""

    def __init__(self, key: bytes, *older: bytes):
        for k in (key, *older):
            if len(k) != 32:
                raise ValueError(
                    "the audit master key must be 32 bytes (base64 of 32 random bytes)"
                )
        self._aead = AESGCM(key)
        self._older = [AESGCM(k) for k in older]

    @classmethod
    def from_base64(cls, text: str, *older: str) -> MasterKey:
        return cls(*(base64.b64decode(t.strip(), validate=True) for t in (text, *older)))

    def wrap(self, data_key: bytes, team: str) -> bytes:
        nonce = os.urandom(NONCE)
        # The team name is bound in: a wrapped key moved to another team does not unwrap.
        return nonce + self._aead.encrypt(nonce, data_key, b"bastion-team-key:" + team.encode())

    def unwrap(self, wrapped: bytes, team: str) -> bytes:
        for aead in (self._aead, *self._older):
            try:
                return aead.decrypt(
                    wrapped[:NONCE], wrapped[NONCE:], b"bastion-team-key:" + team.encode()
                )
            except InvalidTag:
                continue
        raise ContentUnavailable(
            f"the data key of team {team!r} does not unwrap with this master key "
            "(every replica needs the same audit master key)"
        )


def commitment(data_key: bytes, context: bytes, canonical_plaintext: bytes) -> tuple[str, bytes]:
    """A hiding commitment to a plaintext: SHA-256(salt || plaintext), where the salt is
    derived from the team's data key. It binds an export's plaintext to the hashed entry, and
    once the key is shredded the salt is gone too, so the commitment cannot confirm guesses."""
    # (hmac.new, not hmac.digest: the one-shot form lets go of the interpreter lock.)
    salt = hmac.new(data_key, b"bastion-commit:" + context, hashlib.sha256).digest()
    return hashlib.sha256(salt + canonical_plaintext).hexdigest(), salt


def new_data_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)


def seal(data_key: bytes, plaintext: bytes, context: bytes) -> bytes:
    """AES-256-GCM; `context` (e.g. replica and sequence number) is authenticated too."""
    nonce = random_bytes(NONCE)
    return nonce + AESGCM(data_key).encrypt(nonce, plaintext, context)


def open_sealed(data_key: bytes | None, sealed: bytes, context: bytes) -> bytes:
    if data_key is None:
        raise ContentUnavailable("the team's data key was destroyed (crypto-shredded)")
    try:
        return AESGCM(data_key).decrypt(sealed[:NONCE], sealed[NONCE:], context)
    except InvalidTag:
        raise ContentUnavailable("the content was altered or sealed under another key") from None
