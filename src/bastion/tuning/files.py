"""Digests and atomic writes shared by datasets, jobs and model cards (standard library only)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def combined_digest(files: dict[str, str]) -> str:
    """One digest over named file digests, exactly as the model registry computes a version's
    manifest digest (`sha256  path` lines in path order, as `sha256sum` prints them): a card's
    base digest is the registry's `manifest_sha256` of that base."""
    lines = "".join(f"{files[name]}  {name}\n" for name in sorted(files))
    return hashlib.sha256(lines.encode()).hexdigest()


def dir_digests(directory: Path, *, exclude: frozenset[str] = frozenset()) -> dict[str, str]:
    """SHA-256 of every file under `directory` (relative POSIX paths), hidden ones aside and
    links followed, as the registry hashes a model directory."""
    out: dict[str, str] = {}
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory).as_posix()
        if (
            p.is_file()
            and rel not in exclude
            and not any(x.startswith(".") for x in rel.split("/"))
        ):
            out[rel] = sha256_file(p)
    return out


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename): readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


@contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """A private sibling directory renamed to `out` when the block succeeds; removed if not."""
    out = out.resolve()
    if out.exists():
        raise FileExistsError(f"{out} already exists")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
