"""Structured logs: a real `bastion serve` with `logging.format: json` writes only JSON lines,
its own and uvicorn's, and every line written while a request is served names it."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from bastion.config import ConfigError, parse_settings
from bastion.local.launcher import free_port
from bastion.observability.logs import bind_request, configure_logging
from bastion.observability.settings import LoggingSettings
from tests.conftest import Gateway, base_config, pg_database
from tests.stub_engine import StubEngine

SECRET_PROMPT = "never-log-this-prompt-7731"


class VerboseGateway(Gateway):
    """`bastion serve` at INFO (the shared fixture's runs at WARNING), so uvicorn's start-up
    and access lines are written too."""

    @property
    def env(self) -> dict[str, str]:
        env = dict(super().env)
        env.pop("BASTION_LOG_LEVEL")
        return env

    def start(self, timeout: float = 30) -> Gateway:
        args = ["serve", "--config", str(self.config_path), "--port", str(self.port)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bastion.cli", *args, "--log-level", "info"],
            stdout=self.log_path.open("ab"),
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.workdir,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()[-3000:]
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1):
                    return self
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        raise AssertionError("gateway did not start in time")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VerboseGateway]:
    stub = StubEngine().start()
    models = {
        "stub": {"deployments": [{"url": stub.url, "served_name": "stub-served"}]},
        # Nothing listens there: the request logs a warning, then answers 503.
        "down": {"deployments": [{"url": f"http://127.0.0.1:{free_port()}", "served_name": "x"}]},
    }
    logging_cfg = {"format": "json", "level": "info", "access_log": True}
    with pg_database() as db:
        cfg = base_config(db, models, logging=logging_cfg)
        gw = VerboseGateway(cfg, tmp_path_factory.mktemp("logs"))
        try:
            yield gw.start()
        finally:
            gw.stop()
            stub.stop()


def _lines(gw: Gateway) -> list[dict[str, Any]]:
    text = gw.log_path.read_text()
    assert SECRET_PROMPT not in text
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_every_line_is_json_and_request_lines_carry_the_request(gateway: VerboseGateway) -> None:
    key = gateway.create_key("alpha")
    auth = {"Authorization": f"Bearer {key}"}
    msgs = [{"role": "user", "content": SECRET_PROMPT}]
    ok = httpx.post(
        gateway.url + "/v1/chat/completions", json={"model": "stub", "messages": msgs}, headers=auth
    )
    assert ok.status_code == 200, ok.text
    down = httpx.post(
        gateway.url + "/v1/chat/completions", json={"model": "down", "messages": msgs}, headers=auth
    )
    assert down.status_code == 503, down.text
    ok_id, down_id = ok.headers["x-request-id"], down.headers["x-request-id"]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = _lines(gateway)  # every line parses: nothing is written in another format
        if any(r.get("request_id") == down_id for r in lines):
            break
        time.sleep(0.1)
    for r in lines:
        assert {"ts", "level", "logger", "message"} <= r.keys(), r
    # uvicorn's own lines, in the same format.
    assert any(r["logger"] == "uvicorn.error" and "startup" in r["message"] for r in lines)
    # The access line of the served request names it, its team and model.
    (access,) = [
        r for r in lines if r["logger"] == "uvicorn.access" and r.get("request_id") == ok_id
    ]
    assert access["team"] == "alpha" and access["model"] == "stub"
    assert (access["method"], access["path"], access["status"]) == (
        "POST",
        "/v1/chat/completions",
        200,
    )
    # The gateway's warning while serving the other, too.
    (warning,) = [r for r in lines if r["level"] == "WARNING" and r.get("request_id") == down_id]
    assert warning["logger"] == "bastion.gateway" and "unreachable" in warning["message"]
    assert warning["model"] == "down" and warning["team"] == "alpha"
    # Lines outside any request carry none.
    assert "request_id" not in next(r for r in lines if r["logger"] == "uvicorn.error")


class Facts:
    request_id, team, model, key_id = "req_1", "risk", "fast", None


def test_the_formatter_writes_extras_and_tracebacks_and_the_text_format_stays() -> None:
    out = io.StringIO()
    configure_logging(LoggingSettings(format="json", level="DEBUG"), stream=out, children=False)
    log = logging.getLogger("bastion.test")
    try:
        bind_request(Facts())  # type: ignore[arg-type]
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed %s", "here", extra={"deployment": "d1", "attempt": 2})
        (line,) = [json.loads(x) for x in out.getvalue().splitlines()]
        assert line["message"] == "failed here" and line["level"] == "ERROR"
        assert (line["request_id"], line["team"], line["model"]) == ("req_1", "risk", "fast")
        assert "key_id" not in line
        assert (line["deployment"], line["attempt"]) == ("d1", 2)
        assert "ValueError: boom" in line["exception"]
        assert line["ts"].endswith("+00:00")
        text = io.StringIO()
        configure_logging(LoggingSettings(), stream=text, children=False)
        log.warning("plain")
        assert text.getvalue().rstrip().endswith("WARNING bastion.test: plain")
    finally:
        from bastion.observability.logs import current_request

        current_request.set(None)
        configure_logging(LoggingSettings(level="WARNING"), children=False)


def test_logging_settings() -> None:
    assert parse_settings({"logging": {"level": "debug"}}).logging.level == "DEBUG"
    with pytest.raises(ConfigError, match=r"logging\.format"):
        parse_settings({"logging": {"format": "xml"}})
    with pytest.raises(ConfigError, match=r"logging\.level"):
        parse_settings({"logging": {"level": "loud"}})
