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
import os
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE = 12


class ContentUnavailable(Exception):
    """The content cannot be decrypted: its key was shredded, or it was altered."""


class KeyWrapper(Protocol):
    def wrap(self, data_key: bytes, team: str) -> bytes: ...

    def unwrap(self, wrapped: bytes, team: str) -> bytes: ...


class MasterKey:
    """Wraps data keys with a local 256-bit master key (base64 in a file or an env var)."""

    def __init__(self, key: bytes):
        if len(key) != 32:
            raise ValueError("the audit master key must be 32 bytes (base64 of 32 random bytes)")
        self._aead = AESGCM(key)

    @classmethod
    def from_base64(cls, text: str) -> MasterKey:
        return cls(base64.b64decode(text.strip(), validate=True))

    def wrap(self, data_key: bytes, team: str) -> bytes:
        nonce = os.urandom(NONCE)
        # The team name is bound in: a wrapped key moved to another team does not unwrap.
        return nonce + self._aead.encrypt(nonce, data_key, b"bastion-team-key:" + team.encode())

    def unwrap(self, wrapped: bytes, team: str) -> bytes:
        try:
            return self._aead.decrypt(
                wrapped[:NONCE], wrapped[NONCE:], b"bastion-team-key:" + team.encode()
            )
        except InvalidTag:
            raise ContentUnavailable(
                f"the data key of team {team!r} does not unwrap with this master key "
                "(every replica needs the same audit master key)"
            ) from None


def new_data_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)


def seal(data_key: bytes, plaintext: bytes, context: bytes) -> bytes:
    """AES-256-GCM; `context` (e.g. replica and sequence number) is authenticated too."""
    nonce = os.urandom(NONCE)
    return nonce + AESGCM(data_key).encrypt(nonce, plaintext, context)


def open_sealed(data_key: bytes | None, sealed: bytes, context: bytes) -> bytes:
    if data_key is None:
        raise ContentUnavailable("the team's data key was destroyed (crypto-shredded)")
    try:
        return AESGCM(data_key).decrypt(sealed[:NONCE], sealed[NONCE:], context)
    except InvalidTag:
        raise ContentUnavailable("the content was altered or sealed under another key") from None
