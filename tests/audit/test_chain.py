"""Tamper evidence: every kind of tampering is found, at the right sequence number."""

from __future__ import annotations

import copy
import stat
from pathlib import Path
from typing import Any

import pytest

from bastion.audit.chain import Chain, load_or_create_key, public_key_hex, verify


def _trail(tmp_path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], bytes]:
    key, created = load_or_create_key(tmp_path / "audit.key")
    assert created
    chains = {"gw-a": Chain("gw-a"), "gw-b": Chain("gw-b")}
    entries, checkpoints = [], []
    for i in range(40):
        chain = chains["gw-a" if i % 3 else "gw-b"]
        entries.append(
            chain.append(
                {"kind": "request", "request_id": f"req_{i}", "team": "alpha", "body": {"n": i}}
            )
        )
        if i % 10 == 9:
            checkpoints += [c.checkpoint(key, f"t{i}") for c in chains.values()]
    return entries, checkpoints, bytes.fromhex(public_key_hex(key))


def test_intact_trail_verifies(tmp_path: Path) -> None:
    entries, cps, pub = _trail(tmp_path)
    v = verify(entries, cps, pub)
    assert v.ok and v.entries == 40 and v.checkpoints == 8


def test_key_is_private_and_reused(tmp_path: Path) -> None:
    key, _ = load_or_create_key(tmp_path / "audit.key")
    again, created = load_or_create_key(tmp_path / "audit.key")
    assert not created and public_key_hex(again) == public_key_hex(key)
    assert stat.S_IMODE((tmp_path / "audit.key").stat().st_mode) == 0o600


def _of(entries: list[dict[str, Any]], replica: str) -> list[int]:
    return [i for i, e in enumerate(entries) if e["replica"] == replica]


@pytest.mark.parametrize(
    "tamper", ["edited", "deleted", "inserted", "reordered", "signature", "truncated"]
)
def test_tampering_is_detected(tmp_path: Path, tamper: str) -> None:
    entries, cps, pub = _trail(tmp_path)
    entries = copy.deepcopy(entries)
    a = _of(entries, "gw-a")
    victim = entries[a[5]]
    if tamper == "edited":
        victim["body"]["n"] = 999
        expect_seq, why = victim["seq"], "edited"
    elif tamper == "deleted":
        del entries[a[5]]
        expect_seq, why = victim["seq"], "deleted"
    elif tamper == "inserted":
        forged = dict(entries[a[4]], request_id="req_forged")
        entries.insert(a[5], forged)
        expect_seq, why = forged["seq"], "inserted"
    elif tamper == "reordered":
        entries[a[5]], entries[a[6]] = entries[a[6]], entries[a[5]]
        expect_seq, why = victim["seq"], "reordered"
    elif tamper == "signature":
        cps[0]["head"] = entries[a[0]]["hash"]
        expect_seq, why = cps[0]["seq"], "signature"
    else:  # the last entries removed and the chain re-hashed to look whole
        kept = [e for e in entries if not (e["replica"] == "gw-a" and e["seq"] > 10)]
        entries = kept
        expect_seq, why = None, "signed chain head"
    v = verify(entries, cps, pub)
    assert not v.ok and why in v.reason  # type: ignore[operator]
    if expect_seq is not None:
        assert v.seq == expect_seq
    assert v.replica == "gw-a" or tamper == "signature"


def test_the_unsigned_tail_is_bounded(tmp_path: Path) -> None:
    """Entries no trusted key ever signed may trail the newest entry only briefly: an old
    unsigned run is a forged chain or a replica whose tail was never signed."""
    key, _ = load_or_create_key(tmp_path / "audit.key")
    pub = bytes.fromhex(public_key_hex(key))
    a, b = Chain("gw-a"), Chain("gw-b")
    entries = [a.append({"ts": f"2026-11-01T10:00:0{i}+00:00"}) for i in range(5)]
    cps = [a.checkpoint(key, "t")]
    entries += [a.append({"ts": "2026-11-01T10:00:10+00:00"})]  # seq 6, never signed
    entries += [b.append({"ts": "2026-11-01T11:00:00+00:00"})]
    cps.append(b.checkpoint(key, "t"))
    late = verify(entries, cps, pub, max_unsigned_seconds=60)
    assert (
        not late.ok
        and (late.replica, late.seq) == ("gw-a", 6)
        and "never signed" in str(late.reason)
    )
    ok = verify(entries, cps, pub, max_unsigned_seconds=7200)
    assert ok.ok and ok.unsigned == 1
