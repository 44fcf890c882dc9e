"""Shared by the registry tests: a copy of the tiny model to alter, and the admin trail."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa

from bastion.store.schema import audit_entries

DOCUMENTED = {
    "license": "apache-2.0",
    "owner": "ml-platform",
    "intended_use": "Gateway tests: produces random text.",
    "risk_tier": "low",
}


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def flip_byte(path: Path, offset: int = 4096) -> None:
    """Tampering that keeps the size (a size change would be caught without hashing)."""
    with path.open("r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def admin_trail(db_url: str) -> list[dict[str, Any]]:
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            docs = [orjson.loads(r.doc) for r in conn.execute(sa.select(audit_entries.c.doc))]
    finally:
        engine.dispose()
    return [d for d in docs if d.get("kind") == "admin"]
