"""Training sets from a folder of internal documents and code, or from a JSONL file.

`build_from_folder` reads every file under SRC, keeps UTF-8 text, redacts it with the audit
trail's detectors (the same `Redactor` that protects stored prompts: a card number must not be
learnt by a model any more than kept in a log), chunks it with the base model's tokenizer,
drops exact and normalised duplicates, splits train/validation deterministically and writes
`train.jsonl`, `validation.jsonl` and `manifest.json` into a directory that appears atomically.
Every file that is not used is in the report with the reason: nothing is skipped silently.
`build_from_jsonl` validates a chat (`messages`), completion (`prompt`/`completion`) or plain
(`text`) JSONL file line by line and writes the same layout.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bastion.audit.redact import DETECTORS, Redactor
from bastion.tuning.files import atomic_dir, combined_digest, sha256_file, write_json

MANIFEST_VERSION = 1
DEFAULT_MAX_TOKENS = 512
DEFAULT_MAX_FILE_BYTES = 10 * 1024 * 1024
#: Bytes looked at to call a file binary (NUL bytes never occur in text a person wrote).
_SNIFF = 8192
#: Tokens per chat message added by a ChatML-like template (role line and markers): an
#: estimate, since the template itself is Jinja that only the ML side renders.
_CHAT_OVERHEAD = 4
_ROLES = frozenset({"system", "user", "assistant"})


class DataError(Exception):
    """Nothing usable, or invalid input: carries the per-file/per-line report."""

    def __init__(self, message: str, report: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.report = report or []


def load_tokenizer(path: Path) -> tuple[Any, str]:
    """The `tokenizers` tokenizer of a model directory (or a tokenizer.json) and its SHA-256."""
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:  # the gateway's optional `tokenizers` extra
        raise DataError(
            "the `tokenizers` package is needed: pip install 'bastion[tokenizers]'"
        ) from exc
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise DataError(f"no tokenizer.json at {path}")
    return Tokenizer.from_file(str(file)), sha256_file(file)


def normalise(text: str) -> str:
    """What counts as 'the same text' for near-duplicates: case, Unicode forms, whitespace."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def in_validation(key: str, seed: int, fraction: float) -> bool:
    """Seeded, order-independent split: adding a file never moves another file's samples."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big")
    return h / 2**64 < fraction


@dataclass
class _Collector:
    """Deduplicates samples and keeps the counters the manifest reports."""

    seed: int
    val_fraction: float
    samples: list[dict[str, Any]] = field(default_factory=list)
    exact: dict[str, str] = field(default_factory=dict)
    normal: dict[str, str] = field(default_factory=dict)
    dup_exact: int = 0
    dup_normal: int = 0

    def add(self, record: dict[str, Any], text: str, tokens: int, origin: str) -> str | None:
        """Keep the sample, or return what it duplicates ('exact'/'normalised' of ORIGIN)."""
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest in self.exact:
            self.dup_exact += 1
            return f"exact duplicate of {self.exact[digest]}"
        ndigest = hashlib.sha256(normalise(text).encode()).hexdigest()
        if ndigest in self.normal:
            self.dup_normal += 1
            return f"normalised duplicate of {self.normal[ndigest]}"
        self.exact[digest] = self.normal[ndigest] = origin
        self.samples.append({"record": record, "sha": digest, "tokens": tokens})
        return None

    def write(self, out: Path) -> dict[str, Any]:
        if not self.samples:
            raise DataError("nothing usable remains")
        train: list[dict[str, Any]] = []
        val: list[dict[str, Any]] = []
        for s in self.samples:
            (val if in_validation(s["sha"], self.seed, self.val_fraction) else train).append(s)
        # A split with an empty side is useless: move one sample across.
        if not val and len(train) > 1 and self.val_fraction > 0:
            val.append(train.pop(len(train) - 1))
        elif not train and val:
            train.append(val.pop())
        files = {}
        for name, part in (("train.jsonl", train), ("validation.jsonl", val)):
            with (out / name).open("w", encoding="utf-8") as f:
                for s in part:
                    f.write(json.dumps(s["record"], ensure_ascii=False, sort_keys=True) + "\n")
            files[name] = sha256_file(out / name)
        return {
            "files": files,
            "data_digest": combined_digest(files),
            "samples_train": len(train),
            "samples_validation": len(val),
            "tokens_train": sum(s["tokens"] for s in train),
            "tokens_validation": sum(s["tokens"] for s in val),
            "duplicates_exact": self.dup_exact,
            "duplicates_normalised": self.dup_normal,
        }


def _chunks(tok: Any, text: str, max_tokens: int) -> list[tuple[str, int]]:
    """Split at token boundaries into pieces of at most `max_tokens`, preferring line ends."""
    enc = tok.encode(text, add_special_tokens=False)
    offsets = enc.offsets
    out: list[tuple[str, int]] = []
    start = 0
    while start < len(offsets):
        end = min(start + max_tokens, len(offsets))
        if end < len(offsets):
            # Back off to the last token ending a line, if that keeps at least half a chunk.
            for i in range(end - 1, start + max_tokens // 2, -1):
                if text[offsets[i][0] : offsets[i][1]].endswith("\n"):
                    end = i + 1
                    break
        a = offsets[start][0]
        b = offsets[end - 1][1] if end < len(offsets) else len(text)
        piece = text[a:b]
        if piece.strip():
            # Token boundaries can shift when a piece is encoded alone; count it again.
            out.append((piece, len(tok.encode(piece, add_special_tokens=False).ids)))
        start = end
    return out


def _read_text(path: Path, max_bytes: int) -> tuple[str | None, str | None]:
    """(text, None) or (None, why not)."""
    size = path.stat().st_size
    if size > max_bytes:
        return None, f"too large: {size} bytes > {max_bytes}"
    data = path.read_bytes()
    if b"\0" in data[:_SNIFF]:
        return None, "binary file (NUL bytes)"
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 text (invalid byte at offset {exc.start})"
    if not text.strip():
        return None, "empty file" if not data else "only whitespace"
    return text, None


def build_from_folder(
    src: Path,
    out: Path,
    tokenizer: Path,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    val_fraction: float = 0.1,
    seed: int = 0,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> dict[str, Any]:
    if not src.is_dir():
        raise DataError(f"{src} is not a directory")
    tok, tok_sha = load_tokenizer(tokenizer)
    redactor = Redactor(DETECTORS)
    coll = _Collector(seed, val_fraction)
    report: list[dict[str, Any]] = []
    redacted: dict[str, int] = {}
    paths = sorted(src.rglob("*"))
    hidden = {p for p in paths if any(part.startswith(".") for part in p.relative_to(src).parts)}
    for path in paths:
        rel = path.relative_to(src).as_posix()
        if path in hidden:
            # Report the hidden directory or file itself once, not each file inside it.
            if path.parent == src or path.parent not in hidden:
                report.append({"path": rel, "status": "skipped", "reason": "hidden"})
            continue
        if path.is_symlink():
            report.append({"path": rel, "status": "skipped", "reason": "symbolic link"})
            continue
        if not path.is_file():
            continue
        entry: dict[str, Any] = {"path": rel, "sha256": sha256_file(path)}
        report.append(entry)
        try:
            text, why = _read_text(path, max_file_bytes)
        except OSError as exc:
            text, why = None, f"unreadable: {exc.strerror or exc}"
        if text is None:
            entry.update(status="skipped", reason=why)
            continue
        text, counts = redactor.text(text)
        for k, n in counts.items():
            redacted[k] = redacted.get(k, 0) + n
        entry.update(status="used", redacted=counts, samples=0, duplicates=[])
        for i, (piece, n) in enumerate(_chunks(tok, text, max_tokens)):
            dup = coll.add({"text": piece, "source": f"{rel}#{i}"}, piece, n, f"{rel}#{i}")
            if dup:
                entry["duplicates"].append(f"#{i}: {dup}")
            else:
                entry["samples"] += 1
        if entry["samples"] == 0:
            entry.update(status="skipped", reason="every chunk duplicates earlier text")
    if not report:
        raise DataError(f"{src} is empty")
    return _finish(
        out, coll, report, redacted, "folder", src, tok_sha, max_tokens, seed, val_fraction
    )


def _check_record(rec: Any) -> tuple[list[str], str]:
    """Problems with one JSONL record, and the text it carries (for tokens and dedup)."""
    if not isinstance(rec, dict):
        return ["not a JSON object"], ""
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            return ["`messages` must be a non-empty list"], ""
        errors = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in _ROLES:
                errors.append(f"messages[{i}].role must be one of {sorted(_ROLES)}")
            elif not isinstance(m.get("content"), str) or not m["content"].strip():
                errors.append(f"messages[{i}].content must be a non-empty string")
        if not errors and not any(m["role"] == "assistant" for m in msgs):
            errors.append("no assistant message: nothing to learn")
        text = "\n".join(f"{m['role']}\n{m['content']}" for m in msgs if not errors)
        return errors, text
    if "prompt" in rec or "completion" in rec:
        bad = [k for k in ("prompt", "completion") if not isinstance(rec.get(k), str)]
        if bad:
            return [f"`{k}` must be a string" for k in bad], ""
        if not rec["completion"].strip():
            return ["`completion` is empty: nothing to learn"], ""
        return [], rec["prompt"] + rec["completion"]
    if "text" in rec:
        if not isinstance(rec["text"], str) or not rec["text"].strip():
            return ["`text` must be a non-empty string"], ""
        return [], rec["text"]
    return ["needs `messages`, `prompt`+`completion`, or `text`"], ""


def _count_tokens(tok: Any, rec: dict[str, Any]) -> int:
    if "messages" in rec:
        return sum(
            len(tok.encode(m["content"], add_special_tokens=False).ids) + _CHAT_OVERHEAD
            for m in rec["messages"]
        )
    parts = [rec["text"]] if "text" in rec else [rec["prompt"], rec["completion"]]
    return sum(len(tok.encode(p, add_special_tokens=False).ids) for p in parts)


def build_from_jsonl(
    src: Path,
    out: Path,
    tokenizer: Path,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    val_fraction: float = 0.1,
    seed: int = 0,
    allow_invalid: bool = False,
) -> dict[str, Any]:
    tok, tok_sha = load_tokenizer(tokenizer)
    redactor = Redactor(DETECTORS)
    coll = _Collector(seed, val_fraction)
    report: list[dict[str, Any]] = []
    redacted: dict[str, int] = {}
    try:
        raw = src.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise DataError(f"cannot read {src}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{src} is not UTF-8 text (invalid byte at offset {exc.start})") from exc
    lines = raw.splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            report.append({"line": n, "status": "invalid", "errors": ["empty line"]})
            continue
        try:
            rec = json.loads(line)
        except ValueError as exc:
            report.append({"line": n, "status": "invalid", "errors": [f"not JSON: {exc}"]})
            continue
        errors, text = _check_record(rec)
        if not errors and (count := _count_tokens(tok, rec)) > max_tokens:
            errors = [f"over-long: {count} tokens > max {max_tokens}"]
        if errors:
            report.append({"line": n, "status": "invalid", "errors": errors})
            continue
        rec, counts = redactor.json(rec)
        for k, c in counts.items():
            redacted[k] = redacted.get(k, 0) + c
        dup = coll.add(rec, redactor.text(text)[0], _count_tokens(tok, rec), f"line {n}")
        entry = {"line": n, "status": "duplicate" if dup else "used", "redacted": counts}
        if dup:
            entry["reason"] = dup
        report.append(entry)
    if not lines:
        raise DataError(f"{src} is empty")
    invalid = [r for r in report if r["status"] == "invalid"]
    if invalid and not allow_invalid:
        raise DataError(f"{len(invalid)} of {len(lines)} lines invalid", report)
    return _finish(
        out, coll, report, redacted, "jsonl", src, tok_sha, max_tokens, seed, val_fraction
    )


def _finish(
    out: Path,
    coll: _Collector,
    report: list[dict[str, Any]],
    redacted: dict[str, int],
    kind: str,
    src: Path,
    tok_sha: str,
    max_tokens: int,
    seed: int,
    val_fraction: float,
) -> dict[str, Any]:
    if not coll.samples:
        raise DataError("nothing usable remains", report)
    with atomic_dir(out) as tmp:
        counts = coll.write(tmp)
        manifest = {
            "version": MANIFEST_VERSION,
            "kind": kind,
            "source": str(src.resolve()),
            "tokenizer_sha256": tok_sha,
            "max_tokens": max_tokens,
            "seed": seed,
            "val_fraction": val_fraction,
            "redacted": dict(sorted(redacted.items())),
            "report": report,
            **counts,
        }
        if kind == "folder":
            manifest["files_seen"] = len(report)
            manifest["files_used"] = sum(r.get("status") == "used" for r in report)
            manifest["files_skipped"] = sum(r.get("status") == "skipped" for r in report)
        write_json(tmp / "manifest.json", manifest)
    return manifest


def load_manifest(data: Path) -> dict[str, Any]:
    """A built dataset's manifest, after checking its files against the recorded digests."""
    try:
        manifest = json.loads((data / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{data} is not a dataset built by `bastion tune data`: {exc}") from exc
    for name, digest in manifest["files"].items():
        if not (data / name).is_file() or sha256_file(data / name) != digest:
            raise DataError(f"{data / name} does not match its manifest digest")
    return manifest
