"""`bastion up` (README's first command) starts the engine, serves, and stops it on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
import yaml

from bastion.local.launcher import free_port

pytestmark = pytest.mark.engine


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_up_serves_and_cleans_up(tiny_model: Path, tmp_path: Path) -> None:
    gw_port, engine_port = free_port(), free_port()
    cfg = tmp_path / "bastion.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "server": {"port": gw_port},
                "database": {"url": f"sqlite:///{tmp_path}/q.db"},
                "cost_centers": {"cc": {}},
                "teams": {"demo": {"cost_center": "cc"}},
                "models": {
                    "tiny": {
                        "deployments": [
                            {
                                "url": f"http://127.0.0.1:{engine_port}",
                                "served_name": "tiny-chat",
                                "launch": "builtin:tiny-chat",
                            }
                        ]
                    }
                },
            }
        )
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "bastion.cli", "up", "-c", str(cfg)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "BASTION_LOG_LEVEL": "WARNING"},
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()  # type: ignore[union-attr]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{gw_port}/readyz", timeout=2):
                    break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "bastion up never became ready"
                time.sleep(0.5)
        key = (tmp_path / "var/quickstart-key").read_text().strip()
        assert (tmp_path / "var/quickstart-key").stat().st_mode & 0o077 == 0
        with openai.OpenAI(
            base_url=f"http://127.0.0.1:{gw_port}/v1", api_key=key, max_retries=0
        ) as c:
            r = c.chat.completions.create(
                model="tiny", max_tokens=3, messages=[{"role": "user", "content": "hi"}]
            )
            assert r.model == "tiny" and r.usage and r.usage.completion_tokens > 0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert not _port_open(engine_port), "the engine outlived `bastion up`"
