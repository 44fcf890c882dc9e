"""The gateway image (Containerfile). Always: a lint of the file for what the image promises
(non-root, no compilers in the final stage, nothing fetched from arbitrary URLs, a build context
of pyproject.toml, README.md and src/ only). With buildah on the machine and the base image
already in its local store (nothing is pulled), also the build itself (its apt and pip steps
need the Debian and Python package indexes), then the built image is inspected and run."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
CONTAINERFILE = ROOT / "Containerfile"
COMPILERS = re.compile(r"^(gcc|g\+\+|cc|clang|make|build-essential|.*-dev|python3-venv|cargo)$")


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comment lines dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue  # a comment inside a continued instruction is removed by the parser
        current += " " + line.removesuffix("\\").strip()
        if not line.endswith("\\"):
            word, _, args = current.strip().partition(" ")
            out.append((word.upper(), args.strip()))
            current = ""
    assert not current, "the Containerfile ends inside a continued line"
    return out


def stages(text: str) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions(text):
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def installed_packages(stage: list[tuple[str, str]]) -> set[str]:
    pkgs: set[str] = set()
    for word, args in stage:
        for m in re.finditer(r"apt-get install ([^;&|]+)", args if word == "RUN" else ""):
            pkgs |= {p for p in m.group(1).split() if not p.startswith("-")}
    return pkgs


def test_containerfile_lint() -> None:
    text = CONTAINERFILE.read_text()
    all_stages = stages(text)
    assert len(all_stages) == 2, "a build stage and a run stage"
    final = all_stages[-1]
    # Non-root, by number (Kubernetes' runAsNonRoot can only check a numeric user).
    users = [args for word, args in final if word == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1]), users
    # No compiler or headers in what runs; the build stage has them.
    assert not {p for p in installed_packages(final) if COMPILERS.match(p)}
    assert {"gcc", "libldap2-dev"} <= installed_packages(all_stages[0])
    for stage in all_stages:
        for word, args in stage:
            assert word != "ADD", "COPY only: ADD fetches URLs and unpacks archives"
            assert not re.search(r"\b(curl|wget)\b", args), f"downloads in {word} {args[:60]}"
            if word == "RUN" and "apt-get install" in args:
                assert "--no-install-recommends" in args and "rm -rf /var/lib/apt/lists" in args
    # The venv comes from the build stage; the gateway is the entrypoint, in exec form.
    assert ("COPY", "--from=build /opt/bastion /opt/bastion") in final
    entry = [json.loads(args) for word, args in final if word == "ENTRYPOINT"]
    assert entry == [["bastion"]]
    env = " ".join(args for word, args in final if word == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env  # the root filesystem is read-only
    # What the build copies exists, and the context holds nothing else (no var/, no keys).
    for word, args in all_stages[0]:
        if word == "COPY":
            for src in args.split()[:-1]:
                assert (ROOT / src).exists(), src
    for ignore in (".containerignore", ".dockerignore"):
        lines = (ROOT / ignore).read_text().splitlines()
        rules = [ln for ln in lines if ln and not ln.startswith("#")]
        assert rules[0] == "*" and set(rules[1:4]) == {"!pyproject.toml", "!README.md", "!src/"}


BASE = os.environ.get("BASTION_IMAGE_BASE", "docker.io/library/debian:bookworm-slim")


def _can_build() -> str | None:
    """Why the image cannot be built here, or None."""
    if not shutil.which("buildah"):
        return "no image builder (buildah) on this machine: the Containerfile is linted only"
    probe = subprocess.run(["buildah", "inspect", "--type", "image", BASE], capture_output=True)
    if probe.returncode != 0:
        return f"base image {BASE} is not in the local store (set BASTION_IMAGE_BASE)"
    return None


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    if reason := _can_build():
        pytest.skip(reason)
    tag = "localhost/bastion:test"
    # chroot isolation: no cgroup setup needed, so it also works inside a VM or a container.
    cmd = ["buildah", "bud", "--isolation=chroot"]
    cmd += ["--network=host", "--build-arg", f"BASE={BASE}", "-t", tag, "-f", str(CONTAINERFILE)]
    ca = Path("/etc/ssl/certs/ca-certificates.crt")
    if ca.exists():  # the machine's trust store, for a TLS-inspecting proxy (never in a layer)
        cmd += ["--secret", f"id=ca-bundle,src={ca}"]
    log = tmp_path_factory.mktemp("image") / "build.log"
    with log.open("w") as f:
        done = subprocess.run([*cmd, str(ROOT)], stdout=f, stderr=subprocess.STDOUT, timeout=1800)
    assert done.returncode == 0, log.read_text()[-4000:]
    return tag


def test_image_builds_non_root_without_compilers(image: str) -> None:
    cfg = json.loads(subprocess.check_output(["buildah", "inspect", "--type", "image", image]))
    config = cfg["OCIv1"]["config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["bastion"]
    with _container(image) as run:
        probe = "import shutil; print([t for t in ('gcc', 'cc', 'make', 'pip') if shutil.which(t)])"
        found = subprocess.check_output([*run, "/opt/bastion/bin/python", "-c", probe], text=True)
        assert found.strip() == "[]"
        # Nothing but var/ and /tmp is writable for the gateway's user.
        writable = subprocess.run(
            [*run, "sh", "-c", "find / -xdev -writable -type d 2>/dev/null | grep -v ^/proc"],
            capture_output=True,
            text=True,
        ).stdout.split()
        assert set(writable) <= {"/var/lib/bastion/var", "/tmp", "/var/tmp", "/run/lock"}, writable


def test_image_serves(image: str, tmp_path: Path) -> None:
    """The gateway starts in the image as user 10001 (migrations, audit keys from the
    environment), answers /healthz, and /readyz says 503 while its engine is absent."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "bastion.yaml").write_text(
        "database: {url: 'sqlite:///var/bastion.db'}\naudit: {anchor_dir: null}\n"
        "models: {tiny: {deployments: [{url: 'http://127.0.0.1:9', served_name: tiny}]}}\n"
    )
    tmp_path.chmod(0o755)  # read by user 10001 in the container
    env = [f"--env=BASTION_{k}={base64.b64encode(os.urandom(32)).decode()}" for k in KEYS]
    log_file = tmp_path / "serve.log"
    with (
        _container(image, ["-v", f"{tmp_path}:/etc/bastion:ro", *env]) as run,
        log_file.open("w") as log_out,
    ):
        gateway = subprocess.Popen(
            [*run, "bastion", "serve", "--host", "127.0.0.1", "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=log_out,
        )
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                    break
                except httpx.TransportError:
                    log = log_file.read_text()[-3000:]
                    assert gateway.poll() is None and time.monotonic() < deadline, log
                    time.sleep(0.5)
            assert health.json() == {"status": "ok"}
            ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
            assert ready.status_code == 503 and ready.json()["models"]["tiny"]["ready"] is False
        finally:
            gateway.terminate()
            gateway.wait(timeout=60)


KEYS = ("SESSION_KEY", "AUDIT_MASTER_KEY", "AUDIT_SIGNING_KEY")


@contextlib.contextmanager
def _container(image: str, options: list[str] | None = None) -> Iterator[list[str]]:
    """A working container of the image; yields the command prefix that runs in it as 10001."""
    ctr = subprocess.check_output(["buildah", "from", image], text=True).strip()
    try:
        run = ["buildah", "run", "--isolation=chroot", "--user", "10001:10001"]
        yield [*run, *(options or []), ctr, "--"]
    finally:
        subprocess.run(["buildah", "rm", ctr], capture_output=True)
