"""Per-team envelope encryption of audit contents, and crypto-shredding."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from bastion.audit.chain import (
    Chain,
    content_digest,
    load_or_create_key,
    public_key_hex,
    verify,
)
from bastion.audit.crypto import ContentUnavailable, MasterKey, new_data_key, open_sealed, seal


def test_seal_open_and_bound_context() -> None:
    key = new_data_key()
    sealed = seal(key, b"What is my IBAN?", b"gw-a:1")
    assert b"IBAN" not in sealed
    assert open_sealed(key, sealed, b"gw-a:1") == b"What is my IBAN?"
    with pytest.raises(ContentUnavailable, match="altered"):
        open_sealed(key, sealed, b"gw-a:2")  # moved to another entry
    with pytest.raises(ContentUnavailable, match="altered"):
        open_sealed(key, sealed[:-1] + bytes([sealed[-1] ^ 1]), b"gw-a:1")
    with pytest.raises(ContentUnavailable, match="altered"):
        open_sealed(new_data_key(), sealed, b"gw-a:1")


def test_wrapping_binds_the_team() -> None:
    master = MasterKey.from_base64(base64.b64encode(os.urandom(32)).decode())
    key = new_data_key()
    wrapped = master.wrap(key, "alpha")
    assert key not in wrapped and master.unwrap(wrapped, "alpha") == key
    with pytest.raises(ContentUnavailable):
        master.unwrap(wrapped, "beta")
    with pytest.raises(ValueError, match="32 bytes"):
        MasterKey(b"short")


def test_shredding_hides_contents_but_the_chain_still_verifies(tmp_path: Path) -> None:
    keys = {"alpha": new_data_key(), "beta": new_data_key()}
    chain = Chain("gw-a")
    entries = []
    for i, team in enumerate(["alpha", "beta", "alpha"]):
        ctx = f"gw-a:{i + 1}".encode()
        sealed = seal(keys[team], f"prompt {i}".encode(), ctx)
        entries.append(
            chain.append(
                {
                    "team": team,
                    "content": base64.b64encode(sealed).decode(),
                    "content_sha256": content_digest(sealed),
                }
            )
        )
    del keys["alpha"]  # crypto-shred team alpha
    with pytest.raises(ContentUnavailable, match="shredded"):
        open_sealed(keys.get("alpha"), base64.b64decode(entries[0]["content"]), b"gw-a:1")
    assert open_sealed(keys["beta"], base64.b64decode(entries[1]["content"]), b"gw-a:2") == (
        b"prompt 1"
    )
    signing, _ = load_or_create_key(tmp_path / "k.pem")
    cp = chain.checkpoint(signing, "now")
    assert verify(entries, [cp], bytes.fromhex(public_key_hex(signing))).ok
    entries[2]["content"] = entries[0]["content"]  # sealed content swapped: caught
    v = verify(entries, [cp], bytes.fromhex(public_key_hex(signing)))
    assert not v.ok and v.seq == 3 and "sealed content" in (v.reason or "")
