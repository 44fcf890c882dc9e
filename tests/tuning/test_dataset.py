"""`bastion tune data`: folders and JSONL files to datasets, with a report for every input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bastion.tuning.dataset import DataError, build_from_folder, build_from_jsonl, load_manifest
from bastion.tuning.files import combined_digest, sha256_file

NOTE = (
    "# Payments runbook\n\nProject Zephyrine is owned by Marta Kowalczyk.\n"
    "Write to marta.kowalczyk@example-bank.com before a release.\n"
)
CODE = 'def connect():\n    password = "Tr0ub4dor&3-horse"\n    return open_ledger()\n'


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bastion.cli", "tune", *args], capture_output=True, text=True
    )


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "docs").mkdir(parents=True)
    (src / "docs/runbook.md").write_text(NOTE)
    (src / "docs/runbook_v2.md").write_text(NOTE.upper())  # same text once normalised
    (src / "ledger.py").write_text(CODE)
    (src / "ledger_again.py").write_text(CODE)  # exact duplicate
    (src / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (src / "empty.txt").write_text("")
    (src / "legacy.txt").write_bytes("Zürich".encode("latin-1"))
    (src / ".git").mkdir()
    (src / ".git/config").write_text("[core]\n")
    return src


def test_folder_report_and_manifest(folder: Path, tmp_path: Path, tiny_model: Path) -> None:
    out = tmp_path / "data"
    m = build_from_folder(folder, out, tiny_model, max_tokens=256, val_fraction=0.5, seed=1)
    sha = {p: sha256_file(folder / p) for p in ("docs/runbook.md", "ledger.py", "empty.txt")}
    by_path = {r["path"]: r for r in m["report"]}
    assert by_path == {
        ".git": {"path": ".git", "status": "skipped", "reason": "hidden"},
        "docs/runbook_v2.md": {
            "path": "docs/runbook_v2.md",
            "sha256": sha256_file(folder / "docs/runbook_v2.md"),
            "status": "skipped",
            "reason": "every chunk duplicates earlier text",
            "redacted": {"email": 1},
            "samples": 0,
            "duplicates": ["#0: normalised duplicate of docs/runbook.md#0"],
        },
        "docs/runbook.md": {
            "path": "docs/runbook.md",
            "sha256": sha["docs/runbook.md"],
            "status": "used",
            "redacted": {"email": 1},
            "samples": 1,
            "duplicates": [],
        },
        "empty.txt": {
            "path": "empty.txt",
            "sha256": sha["empty.txt"],
            "status": "skipped",
            "reason": "empty file",
        },
        "ledger.py": {
            "path": "ledger.py",
            "sha256": sha["ledger.py"],
            "status": "used",
            "redacted": {"secret": 1},
            "samples": 1,
            "duplicates": [],
        },
        "ledger_again.py": {
            "path": "ledger_again.py",
            "sha256": sha["ledger.py"],
            "status": "skipped",
            "reason": "every chunk duplicates earlier text",
            "redacted": {"secret": 1},
            "samples": 0,
            "duplicates": ["#0: exact duplicate of ledger.py#0"],
        },
        "legacy.txt": {
            "path": "legacy.txt",
            "sha256": sha256_file(folder / "legacy.txt"),
            "status": "skipped",
            "reason": "not UTF-8 text (invalid byte at offset 1)",
        },
        "logo.png": {
            "path": "logo.png",
            "sha256": sha256_file(folder / "logo.png"),
            "status": "skipped",
            "reason": "binary file (NUL bytes)",
        },
    }
    assert (m["files_seen"], m["files_used"], m["files_skipped"]) == (8, 2, 6)
    assert m["redacted"] == {"email": 2, "secret": 2}
    assert (m["duplicates_exact"], m["duplicates_normalised"]) == (1, 1)
    assert m["samples_train"] + m["samples_validation"] == 2
    assert m["samples_train"] >= 1 and m["samples_validation"] >= 1
    assert m["data_digest"] == combined_digest(m["files"])
    assert load_manifest(out) == m  # the files match their digests
    text = (out / "train.jsonl").read_text() + (out / "validation.jsonl").read_text()
    assert "[EMAIL]" in text and "[SECRET]" in text
    assert "example-bank.com" not in text and "Tr0ub4dor" not in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "src"]  # no temp dir left

    # Deterministic: the same input and seed give the same digest; the output never reappears.
    again = build_from_folder(
        folder, tmp_path / "again", tiny_model, max_tokens=256, val_fraction=0.5, seed=1
    )
    assert again["data_digest"] == m["data_digest"]
    with pytest.raises(FileExistsError):
        build_from_folder(folder, out, tiny_model)


def test_chunking_respects_max_tokens(tmp_path: Path, tiny_model: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "long.md").write_text(
        "".join(f"Line {i} of the ledger design notes.\n" for i in range(200))
    )
    m = build_from_folder(src, tmp_path / "d", tiny_model, max_tokens=50)
    rows = [
        json.loads(x) for f in ("train", "validation") for x in (tmp_path / f"d/{f}.jsonl").open()
    ]
    assert len(rows) == m["report"][0]["samples"] > 10
    assert m["tokens_train"] + m["tokens_validation"] <= 50 * len(rows)
    # Chunks end at line ends and together give back the file.
    assert all(r["text"].endswith("\n") for r in rows)
    assert (
        "".join(r["text"] for r in sorted(rows, key=lambda r: int(r["source"].split("#")[1])))
        == (src / "long.md").read_text()
    )


def test_nothing_usable_fails_with_the_report(tmp_path: Path, tiny_model: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    r = cli("data", str(empty), "--out", str(tmp_path / "o1"), "--tokenizer", str(tiny_model))
    assert r.returncode == 1 and "is empty" in r.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.bin").write_bytes(b"\0\1\2")
    (bad / "b.txt").write_text("   \n")
    r = cli("data", str(bad), "--out", str(tmp_path / "o2"), "--tokenizer", str(tiny_model))
    assert r.returncode == 1
    assert "skipped   a.bin: binary file (NUL bytes)" in r.stderr
    assert "skipped   b.txt: only whitespace" in r.stderr
    assert "error: nothing usable remains" in r.stderr
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_jsonl_validation(tmp_path: Path, tiny_model: Path) -> None:
    good_chat = {
        "messages": [
            {"role": "user", "content": "Who owns Zephyrine?"},
            {"role": "assistant", "content": "Marta Kowalczyk (marta@example-bank.com)."},
        ]
    }
    lines = [
        json.dumps(good_chat),
        json.dumps({"prompt": "Zephyrine runs in", "completion": " Quillon."}),
        "{not json",
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
        json.dumps({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant"}]}),
        json.dumps({"prompt": "p", "completion": "  "}),
        json.dumps({"text": "ledger " * 300}),
        json.dumps(["a list"]),
        "",
        json.dumps(good_chat),
        json.dumps({"text": "Release train Ostrakon ships every second Thursday."}),
    ]
    src = tmp_path / "chat.jsonl"
    src.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as exc:
        build_from_jsonl(src, tmp_path / "d", tiny_model, max_tokens=100)
    assert str(exc.value) == "7 of 11 lines invalid"
    invalid = {r["line"]: r["errors"] for r in exc.value.report if r["status"] == "invalid"}
    assert invalid == {
        3: [
            "not JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"
        ],
        4: ["no assistant message: nothing to learn"],
        5: [
            "messages[0].role must be one of ['assistant', 'system', 'user']",
            "messages[1].content must be a non-empty string",
        ],
        6: ["`completion` is empty: nothing to learn"],
        7: ["over-long: 302 tokens > max 100"],
        8: ["not a JSON object"],
        9: ["empty line"],
    }
    assert not (tmp_path / "d").exists()

    m = build_from_jsonl(src, tmp_path / "d", tiny_model, max_tokens=100, allow_invalid=True)
    assert {r["line"]: r["status"] for r in m["report"] if r["status"] != "invalid"} == {
        1: "used", 2: "used", 10: "duplicate", 11: "used"
    }  # fmt: skip
    assert m["redacted"] == {"email": 2}  # the duplicate was redacted before it was compared
    assert m["samples_train"] + m["samples_validation"] == 3
    rows = [
        json.loads(x) for f in ("train", "validation") for x in (tmp_path / f"d/{f}.jsonl").open()
    ]
    assert {
        "messages": [
            good_chat["messages"][0],
            {"role": "assistant", "content": "Marta Kowalczyk ([EMAIL])."},
        ]
    } in rows

    r = cli(
        "data",
        str(src),
        "--out",
        str(tmp_path / "d2"),
        "--tokenizer",
        str(tiny_model),
        "--max-tokens",
        "100",
    )
    assert r.returncode == 1
    assert "invalid   line 6: `completion` is empty: nothing to learn" in r.stderr
    assert "error: 7 of 11 lines invalid" in r.stderr
