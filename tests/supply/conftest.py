"""The supply-chain tools' own venv (scripts/supply-tools.sh), built once per session: the SBOM
and audit tests run the real cyclonedx-py and the real audit script, as a release does."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REQ = ROOT / "requirements"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+?)\s*(\\)?$")
HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_lock(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name → (version, sha256 hashes), read the way pip reads a hashed requirements file."""
    pins: dict[str, tuple[str, list[str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        m = PIN.match(line)
        if m:
            current = norm(m.group(1))
            pins[current] = (m.group(2), [])
        elif current and (h := HASH.search(line)):
            pins[current][1].append(h.group(1))
        elif not line.startswith(" "):
            current = None
    return pins


@pytest.fixture(scope="session")
def supply_venv() -> Path:
    out = subprocess.run(
        ["bash", str(ROOT / "scripts/supply-tools.sh")],
        capture_output=True,
        text=True,
        check=True,
        timeout=900,
    )
    return Path(out.stdout.strip().splitlines()[-1])
