"""scripts/sbom: the CycloneDX SBOM lists every locked package with its version and hashes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.supply.conftest import REQ, ROOT, norm, parse_lock


@pytest.mark.parametrize("lock", ["gateway", "engine"])
def test_sbom_lists_every_locked_package(lock: str, supply_venv: Path, tmp_path: Path) -> None:
    env = {**os.environ, "BASTION_SBOM_DIR": str(tmp_path), "SOURCE_DATE_EPOCH": "1767225600"}
    out = subprocess.run(
        ["bash", str(ROOT / "scripts/sbom"), lock],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    path = Path(out.stdout.strip().splitlines()[-1])
    assert path.name == f"bastion-0.1.0-{lock}.cdx.json"
    bom = json.loads(path.read_text())
    assert bom["bomFormat"] == "CycloneDX"
    assert bom["specVersion"] == "1.6"
    assert bom["metadata"]["component"]["name"] == "bastion"
    assert bom["metadata"]["timestamp"].startswith("2026-01-01")
    listed = {}
    for comp in bom["components"]:
        hashes = {
            h["content"]
            for ref in comp.get("externalReferences", [])
            if ref["type"] == "distribution"
            for h in ref.get("hashes", [])
            if h["alg"] == "SHA-256"
        }
        listed[norm(comp["name"])] = (comp["version"], hashes, comp["purl"])
    pins = parse_lock(REQ / f"{lock}.txt")
    assert set(listed) == set(pins)
    for name, (version, hashes) in pins.items():
        assert listed[name][0] == version, name
        assert listed[name][1] == set(hashes), f"{name}: the SBOM's hashes differ from the lock"
        assert listed[name][2].startswith(f"pkg:pypi/{name}@"), listed[name][2]
    # Reproducible: the same lock and commit give the same bytes (a bank can diff releases).
    first = path.read_bytes()
    path.unlink()
    again = subprocess.run(
        ["bash", str(ROOT / "scripts/sbom"), lock], capture_output=True, env=env, timeout=600
    )
    assert again.returncode == 0
    assert Path(again.stdout.decode().split()[-1]).read_bytes() == first
