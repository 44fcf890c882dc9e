"""Audit entries written by the command line (admin changes made straight in the database).

The CLI keeps its own chain per host (`cli-<hostname>`), written through the same durable log
and shipped into the store at once, so `bastion keys revoke` or `bastion audit shred` leave
the same evidence as the admin API does.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import socket
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from bastion.audit import store
from bastion.audit.keys import load_master_key, load_signing_key
from bastion.audit.shipper import Shipper
from bastion.audit.wal import AuditLog, AuditLogError
from bastion.config import Settings
from bastion.core.changes import Record


def cli_actor() -> str:
    """`user@host (cli)`, the user being the OS account the process runs as. Not
    `getpass.getuser()`: it believes $LOGNAME/$USER first, so anyone could record their change
    under another person's name by setting a variable."""
    uid = os.getuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:  # an account without a passwd entry (some containers): its number
        user = f"uid-{uid}"
    return f"{user}@{socket.gethostname()} (cli)"


def record_event(
    settings: Settings,
    db: Engine,
    kind: str,
    action: str,
    *,
    actor: str | None = None,
    **fields: Any,
) -> None:
    """Appends one entry to this host's CLI chain and ships it; raises AuditLogError if not."""
    a = settings.audit
    if not a.enabled:
        return
    replica = f"cli-{socket.gethostname()}"[:128]
    # A CLI host never invents keys on a shared database: its checkpoints must be signed by
    # the deployment's key, which `audit verify` trusts (docs/deploy.md).
    create = settings.database.embedded
    key, _created = load_signing_key(a, load_master_key(a, create=create), create=create)
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
        entry = {"kind": kind, "actor": actor or cli_actor(), "action": action, **fields}
        asyncio.run(wal.append(entry))
        Shipper(
            db, directory, replica, lambda: wal.durable
        ).ship_once()  # under the lock: never a live segment
    finally:
        wal.close()


def cli_recorder(settings: Settings, db: Engine) -> Record | None:
    """How the CLI records its changes (`bastion.core.changes`): on this host's CLI chain."""
    if not settings.audit.enabled:
        return None

    def record(actor: str, action: str, fields: dict[str, Any]) -> None:
        record_event(settings, db, "admin", action, actor=actor, **fields)

    return record
