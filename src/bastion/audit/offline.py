"""Audit entries written by the command line (admin changes made straight in the database).

The CLI keeps its own chain per host (`cli-<hostname>`), written through the same durable log
and shipped into the store at once, so `bastion keys revoke` or `bastion audit shred` leave
the same evidence as the admin API does.
"""

from __future__ import annotations

import asyncio
import getpass
import socket
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from bastion.audit import store
from bastion.audit.chain import load_or_create_key
from bastion.audit.shipper import Shipper
from bastion.audit.wal import AuditLog, AuditLogError
from bastion.config import Settings


def cli_actor() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()} (cli)"


def record_event(settings: Settings, db: Engine, kind: str, action: str, **fields: Any) -> None:
    """Appends one entry to this host's CLI chain and ships it; raises AuditLogError if not."""
    a = settings.audit
    if not a.enabled:
        return
    replica = f"cli-{socket.gethostname()}"[:128]
    key, _created = load_or_create_key(Path(a.signing_key))
    directory = Path(a.wal_dir)
    deadline = time.monotonic() + 15
    while True:  # another CLI command on this host may hold the chain for a moment
        try:
            wal = AuditLog(
                directory,
                replica,
                signing_key=key,
                checkpoint_entries=1,
                stored_head=store.last_entry(db, replica),
            )
            break
        except AuditLogError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    try:
        asyncio.run(wal.append({"kind": kind, "actor": cli_actor(), "action": action, **fields}))
        Shipper(
            db, directory, replica, lambda: wal.durable
        ).ship_once()  # under the lock: never a live segment
    finally:
        wal.close()
