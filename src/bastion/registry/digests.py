"""What a registry record pins: the SHA-256 of every file of a model directory, and one
manifest digest over them.

Every regular file under the directory is hashed, not only the weights: a tokenizer, a chat
template or a config changes what a model does as surely as its weights. Hidden files and
directories (`.git`, `.cache`) are skipped: they are tooling, never loaded by an engine.
Symbolic links are followed (the Hugging Face cache links snapshots to blobs); what is
recorded is the content reached.

The manifest digest is the SHA-256 of the sorted `sha256sum` lines (`<hex>  <path>\\n`), so
anyone can recompute it with coreutils: `sha256sum $(files) | sort -k2 | sha256sum`.

Files are streamed in 8 MiB blocks (a 100 GB shard never sits in memory) and several files are
hashed at once: hashlib releases the GIL while it hashes, so shards use every core given.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

BLOCK = 8 * 1024 * 1024
#: More files than any model has (the largest shard into a few hundred): a wrong directory.
MAX_FILES = 10_000
#: progress(file, bytes done in it, its size): called from hashing threads, serialised.
Progress = Callable[[str, int, int], None]

WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack", ".onnx")
CONFIGS = ("config.json", "generation_config.json", "adapter_config.json", "params.json")


class DigestError(Exception):
    """The directory cannot be hashed: missing, empty, unreadable."""


def role(rel: str) -> str:
    """What a file is to the model, for people reading a record (every file is hashed)."""
    name = rel.rsplit("/", 1)[-1].lower()
    if name.startswith("chat_template") or name.endswith(".jinja"):
        return "chat-template"
    if name.startswith("tokenizer") or name in (
        "vocab.json", "vocab.txt", "merges.txt", "special_tokens_map.json", "added_tokens.json",
    ) or name.endswith((".model", ".tiktoken")):  # fmt: skip
        return "tokenizer"
    if name.endswith(WEIGHTS):
        return "weights"
    if name in CONFIGS or name.endswith("config.json"):
        return "config"
    return "other"


def is_model_dir(root: Path) -> bool:
    """A Hugging Face model or PEFT adapter directory (a config at its top), or GGUF files."""
    try:
        if not root.is_dir():
            return False
        return any((root / name).is_file() for name in CONFIGS) or any(root.glob("*.gguf"))
    except OSError as exc:  # a name too long, a directory we may not list
        raise DigestError(f"{str(root)[:200]}: {exc.strerror or exc}") from None


def model_files(root: Path) -> list[str]:
    """Every regular file under `root` (relative, `/`-separated, sorted), hidden ones aside."""
    if not is_model_dir(root):
        raise DigestError(
            f"{str(root)[:200]} is not a model directory (no config.json, adapter_config.json "
            "or .gguf file at its top)"
        )
    found: list[str] = []
    seen: set[tuple[int, int]] = set()

    def unreadable(exc: OSError) -> None:  # never hash part of a model and call it the whole
        raise DigestError(f"cannot read {exc.filename}: {exc.strerror or exc}")

    for base, dirs, names in os.walk(root, onerror=unreadable, followlinks=True):
        here = os.stat(base)
        if (here.st_dev, here.st_ino) in seen:  # a symbolic link back up: walked already
            dirs[:] = []
            continue
        seen.add((here.st_dev, here.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if len(found) > MAX_FILES:
            raise DigestError(f"{root} holds more than {MAX_FILES} files: not one model")
        for name in names:
            if name.startswith("."):
                continue
            full = Path(base) / name
            if full.is_file():
                found.append(full.relative_to(root).as_posix())
    if not found:
        raise DigestError(f"{root} holds no files")
    return sorted(found)


def sha256_file(path: Path, progress: Progress | None = None, label: str = "") -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    done = 0
    with path.open("rb") as f:
        while block := f.read(BLOCK):
            h.update(block)
            done += len(block)
            if progress is not None:
                progress(label, done, size)
    return h.hexdigest()


class Cache(Protocol):
    """Digests verified before, by file identity (`registry/cache.py`)."""

    def lookup(self, path: Path, st: os.stat_result) -> str | None: ...
    def store(self, path: Path, before: os.stat_result, digest: str) -> None: ...


def file_digest(
    path: Path, progress: Progress | None = None, label: str = "", cache: Cache | None = None
) -> str:
    """The file's SHA-256: from `cache` if the file is unchanged since it was verified."""
    st = path.stat()
    if cache is not None and (known := cache.lookup(path, st)) is not None:
        return known
    digest = sha256_file(path, progress, label)
    if cache is not None:
        cache.store(path, st, digest)
    return digest


@dataclass(frozen=True)
class FileDigest:
    path: str
    sha256: str
    size: int
    role: str

    def public(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "size": self.size, "role": self.role}


def digest_dir(
    root: Path,
    progress: Progress | None = None,
    workers: int | None = None,
    cache: Cache | None = None,
) -> list[FileDigest]:
    """The digest of every file under `root`, sorted by path."""
    names = model_files(root)
    lock = threading.Lock()

    def report(label: str, done: int, size: int) -> None:
        if progress is not None:
            with lock:
                progress(label, done, size)

    def one(rel: str) -> FileDigest:
        full = root / rel
        try:
            digest = file_digest(full, report, rel, cache)
            return FileDigest(rel, digest, full.stat().st_size, role(rel))
        except OSError as exc:
            raise DigestError(f"cannot read {full}: {exc.strerror or exc}") from None

    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(one, names))


def manifest_digest(files: list[dict[str, Any]] | list[FileDigest]) -> str:
    rows = [f.public() if isinstance(f, FileDigest) else f for f in files]
    lines = "".join(f"{r['sha256']}  {r['path']}\n" for r in sorted(rows, key=lambda r: r["path"]))
    return hashlib.sha256(lines.encode()).hexdigest()


def mismatches(
    root: Path,
    recorded: list[dict[str, Any]],
    progress: Progress | None = None,
    workers: int | None = None,
    cache: Cache | None = None,
) -> list[str]:
    """What differs between the files at `root` and a record, one line each ("hash mismatch:
    model.safetensors", "missing file: …", "unrecorded file: …"); empty when they match.
    An extra file counts: a new chat template or shard changes what the engine loads."""
    try:
        present = set(model_files(root))
    except DigestError as exc:
        return [str(exc)]
    expected = {r["path"]: r for r in recorded}
    problems = [f"missing file: {p}" for p in sorted(set(expected) - present)]
    problems += [f"unrecorded file: {p}" for p in sorted(present - set(expected))]
    common = sorted(present & set(expected))
    # Sizes first: a changed size is a mismatch without reading a byte.
    same_size = []
    for p in common:
        try:
            size = (root / p).stat().st_size
        except OSError as exc:
            problems.append(f"unreadable file: {p} ({exc.strerror or exc})")
            continue
        if size != expected[p]["size"]:
            problems.append(f"hash mismatch: {p}")
        else:
            same_size.append(p)

    def check(p: str) -> str | None:
        try:
            ok = file_digest(root / p, progress, p, cache) == expected[p]["sha256"]
        except OSError as exc:
            return f"unreadable file: {p} ({exc.strerror or exc})"
        return None if ok else f"hash mismatch: {p}"

    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        problems += [p for p in pool.map(check, same_size) if p]
    return problems


def config_summary(root: Path) -> dict[str, Any]:
    """The few config facts a reviewer asks about (architecture, size, context, LoRA rank)."""
    import json

    keep = (
        "architectures", "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "vocab_size", "max_position_embeddings", "torch_dtype", "dtype", "quantization_config",
        "peft_type", "r", "lora_alpha", "target_modules", "base_model_name_or_path", "task_type",
    )  # fmt: skip
    summary: dict[str, Any] = {}
    for name in ("config.json", "adapter_config.json"):
        path = root / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise DigestError(f"{path} is not readable JSON: {exc}") from None
        if isinstance(data, dict):
            summary.update({k: data[k] for k in keep if k in data})
    return summary
