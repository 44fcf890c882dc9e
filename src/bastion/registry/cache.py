"""Digests already verified, so a restart does not re-read hundreds of gigabytes.

A file's digest is reused only while its identity and every timestamp the kernel keeps are
unchanged: (host, absolute path, device, inode, size, mtime_ns, ctime_ns). Why that is safe
enough for the serve-time check:

- **ctime cannot be set from user space.** `touch -d` and `utime()` restore an mtime, but
  every write, rename or metadata change sets ctime to the current time; only changing the
  system clock (root) or writing the block device underneath the filesystem (root) forges it.
  Whoever can do that can also replace the gateway itself.
- **Racy writes.** Timestamps are coarse (a few ms): a write in the same tick as the check
  could leave ctime unchanged. As git does for its index, a file changed less than
  `RACY_SECONDS` before it was looked at is never cached; and a digest is stored only if the
  file's stat is the same after hashing as before.
- **Where the cache lives.** In the database, next to the records: whoever can write it can
  already rewrite the recorded digests, so it adds no way in.
- **What it does not catch.** Silent media corruption (bit rot) changes no timestamp. Set
  `registry.verify: full` to hash every file at every start (see docs/models.md for timings).
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine, select

from bastion.store.schema import registry_digests

RACY_SECONDS = 2.0


def _stat_key(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


class DigestCache:
    """`reuse=False`: records what it hashes but reuses nothing (registration, validation)."""

    def __init__(self, db: Engine, reuse: bool = True):
        self.db = db
        self.reuse = reuse
        self.host = socket.gethostname()[:255]
        #: Bytes answered from the cache (not read) since it was made.
        self.reused_bytes = 0
        self._lock = threading.Lock()  # lookups run on several hashing threads

    def _id(self, path: Path) -> str:
        return hashlib.sha256(f"{self.host}\0{path.resolve()}".encode()).hexdigest()

    def lookup(self, path: Path, st: os.stat_result) -> str | None:
        if not self.reuse:
            return None
        with self.db.connect() as conn:
            row = conn.execute(
                select(registry_digests.c.stat, registry_digests.c.sha256).where(
                    registry_digests.c.id == self._id(path)
                )
            ).first()
        if row is None or row.stat != _stat_key(st):
            return None
        with self._lock:
            self.reused_bytes += st.st_size
        return row.sha256  # type: ignore[no-any-return]

    def store(self, path: Path, before: os.stat_result, digest: str) -> None:
        """Remembers `digest` if the file did not change while it was read, nor just before."""
        after = path.stat()
        if _stat_key(after) != _stat_key(before):
            return
        if time.time() - max(before.st_mtime, before.st_ctime) < RACY_SECONDS:
            return
        row = {
            "id": self._id(path),
            "host": self.host,
            "path": str(path.resolve()),
            "stat": _stat_key(before),
            "sha256": digest,
            "verified_at": datetime.now(UTC),
        }
        with self.db.begin() as conn:
            conn.execute(registry_digests.delete().where(registry_digests.c.id == row["id"]))
            conn.execute(registry_digests.insert(), row)
