"""`bastion tune run --base NAME@VERSION`: a base from the model registry, only once it is
validated or approved and only while its files match the record."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Gateway, base_config
from tests.registry.helpers import DOCUMENTED, copy_model, flip_byte

FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in DOCUMENTED.items()]


def test_a_registry_base_resolves_to_its_checked_directory(
    make_gateway: Callable[..., Gateway], tiny_model: Path, tmp_path: Path
) -> None:
    model = copy_model(tiny_model, tmp_path / "base")
    gw = make_gateway(base_config(f"sqlite:///{tmp_path}/r.db", {}), start=False)
    gw.cli("db", "upgrade")
    gw.cli("models", "register", str(model), "--name", "base", "--version", "1", *FLAGS)
    run = ("tune", "run", "--base", "base@1", "--data", str(tmp_path / "no-data"))
    draft = gw.cli(*run, "--jobs-dir", str(tmp_path / "jobs"), check=False)
    assert draft.returncode != 0
    assert "error: base base@1: 'base@1' is draft; this needs it validated or approved" in (
        draft.stderr
    ), draft.stderr
    missing = gw.cli("tune", "run", "--base", "nope@1", "--data", "x", check=False)
    assert "No registered model 'nope@1'" in missing.stderr
    gw.cli("models", "validate", "base@1", "--evidence", "model review 12")

    from bastion.tuning.cli import _base_path

    assert _base_path("base@1", str(gw.config_path)) == model
    flip_byte(next(model.glob("*.safetensors")))
    with pytest.raises(SystemExit, match="is not what was registered"):
        _base_path("base@1", str(gw.config_path))


def test_a_cards_base_digest_is_the_registrys_manifest_digest(tiny_model: Path) -> None:
    """One identity for a base model: what training writes in the adapter's card is what the
    registry records, so registering an adapter can check the base it names."""
    from bastion.registry.digests import digest_dir, manifest_digest
    from bastion.tuning.jobs import describe_base

    assert describe_base(tiny_model)["digest"] == manifest_digest(digest_dir(tiny_model))
