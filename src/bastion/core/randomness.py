"""Random bytes for the request path, from the kernel's CSPRNG a page at a time.

`os.urandom` lets go of the interpreter lock for its system call, and on a busy gateway a
thread waiting for the lock then takes it: a request paid tens of microseconds for 12 bytes
(measured: docs/benchmarks.md). The bytes are the kernel's own, each handed out once; a forked
child starts with an empty pool, so parent and child never share a byte (a shared AES-GCM
nonce would be a catastrophe).
"""

from __future__ import annotations

import os
import threading

PAGE = 4096
_lock = threading.Lock()
_pool = b""
_used = 0


def random_bytes(n: int) -> bytes:
    """`n` bytes from the kernel's CSPRNG (as `os.urandom`), never handed out twice."""
    global _pool, _used
    if n > PAGE:
        return os.urandom(n)
    with _lock:
        if _used + n > len(_pool):
            _pool, _used = os.urandom(PAGE), 0
        out = _pool[_used : _used + n]
        _used += n
    return out


def token_hex(n: int) -> str:
    """As `secrets.token_hex(n)`."""
    return random_bytes(n).hex()


def _forget() -> None:
    global _pool, _used
    _pool, _used = b"", 0


os.register_at_fork(after_in_child=_forget)
