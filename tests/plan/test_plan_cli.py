"""`bastion plan` from the command line: a config file, a model directory, a registry version."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from bastion.cli import main
from tests.conftest import Gateway, base_config
from tests.registry.helpers import DOCUMENTED, copy_model, flip_byte

CONFIGS = Path(__file__).parent / "configs"
FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in DOCUMENTED.items()]


def test_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["plan", "--model", str(CONFIGS / "qwen2.5-7b.json"), "--gpu", "h100-80gb",
            "--context", "32768", "--concurrency", "64"]  # fmt: skip
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "GQA: 28 heads / 4 KV heads x 128" in table
    assert "56.0 KiB per token" in table and "1.75 GiB per 32,768-token sequence" in table
    assert "recommended: tp=" in table and "not a measurement" in table
    assert main([*args, "--format", "json", "--kv-dtype", "fp8"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kv_cache"]["bytes_per_token"] == 28 * 2 * 4 * 128 * 1
    assert {r["tp"] for r in out["layouts"]} == {1, 2, 4}
    rec = out["recommended"]
    assert rec["sequences"] * rec["replicas"] >= 64
    low, high = rec["decode_tokens_per_s"]["total"]
    assert 0 < low < high


def test_bad_input_is_a_clear_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    model = str(CONFIGS / "llama-3-8b.json")
    assert main(["plan", "--model", model, "--gpu", "h300"]) == 2
    assert "unknown GPU 'h300'; known: h100-80gb" in capsys.readouterr().err
    assert main(["plan", "--model", str(tmp_path)]) == 2
    assert "no config.json in this directory" in capsys.readouterr().err
    assert main(["plan", "--model", "nothing-here"]) == 2
    assert "neither a model directory nor a registry NAME@VERSION" in capsys.readouterr().err
    assert main(["plan", "--model", model, "--dtype", "fp9"]) == 2
    assert "unknown dtype 'fp9'" in capsys.readouterr().err


def test_a_registry_version_is_planned_from_its_checked_files(
    make_gateway: Callable[..., Gateway], tiny_model: Path, tmp_path: Path
) -> None:
    model = copy_model(tiny_model, tmp_path / "m")
    gw = make_gateway(base_config(f"sqlite:///{tmp_path}/r.db", {}), start=False)
    gw.cli("db", "upgrade")
    gw.cli("models", "register", str(model), "--name", "small", "--version", "1", *FLAGS)
    draft = gw.cli("plan", "--model", "small@1", check=False)
    assert draft.returncode == 2
    assert "'small@1' is draft; this needs it validated or approved" in draft.stderr
    gw.cli("models", "validate", "small@1", "--evidence", "capacity review")
    out = json.loads(gw.cli("plan", "--model", "small@1", "--format", "json").stdout)
    assert out["model"]["path"] == str(model)
    assert out["weights"]["source"] == "safetensors headers (1 file(s))"
    assert out["kv_cache"]["bytes_per_token"] == 512
    flip_byte(model / "model.safetensors")
    changed = gw.cli("plan", "--model", "small@1", check=False)
    assert changed.returncode == 2 and "is not what was registered" in changed.stderr
