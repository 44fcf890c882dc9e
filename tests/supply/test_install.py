"""The install path of scripts/install.sh, for real with pip: a file is taken only when its
sha256 is in the lock, and a requirement without a hash is refused. One small locked package
(idna) stands for all: downloaded as the air-gapped wheelhouse is (docs/supply-chain.md), then
installed from that folder alone into a new venv."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.supply.conftest import REQ


def _block(lock: Path, name: str) -> str:
    """The lines of one package in a lock: `name==version \\` and its `--hash=` lines."""
    m = re.search(rf"^{name}==.*?(?=\n\S|\n\s*#)", lock.read_text(), re.M | re.S)
    assert m, f"{name} not in {lock}"
    return m.group(0) + "\n"


def _pip(venv: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    # Nothing but the wheelhouse: no index, no machine-wide links or constraints.
    env |= {"PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull}
    cmd = [str(venv / "bin/python"), "-m", "pip", "install", "--disable-pip-version-check"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=300)


def test_wheelhouse_install_checks_every_hash(tmp_path: Path) -> None:
    lock = tmp_path / "lock.txt"
    lock.write_text(_block(REQ / "gateway.txt", "idna"))
    house = tmp_path / "wheelhouse"
    # The download checks the lock's hashes against PyPI's file as it arrives.
    download = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check"]
    subprocess.run(
        [*download, "--require-hashes", "--no-deps", "-r", str(lock), "-d", str(house)],
        check=True,
        timeout=300,
    )
    (wheel,) = house.glob("idna-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    flags = ["--require-hashes", "--no-deps", "--find-links", str(house), "-r", str(lock)]

    # One byte changed in the wheel: refused before anything is unpacked.
    good = wheel.read_bytes()
    wheel.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    bad = _pip(venv, *flags)
    assert bad.returncode != 0
    assert "DO NOT MATCH THE HASHES" in bad.stderr
    assert not list((venv / "lib").glob("python*/site-packages/idna"))

    # A requirement without a hash (an unpinned extra, a hand edit): refused as well.
    wheel.write_bytes(good)
    unhashed = tmp_path / "unhashed.txt"
    unhashed.write_text(lock.read_text().split(" \\")[0] + "\n")  # idna==X, no hash
    refused = _pip(venv, *flags[:-1], str(unhashed))
    assert refused.returncode != 0
    assert "Hashes are required in --require-hashes mode" in refused.stderr

    # The genuine file installs.
    ok = _pip(venv, *flags)
    assert ok.returncode == 0, ok.stderr
    assert list((venv / "lib").glob("python*/site-packages/idna"))
