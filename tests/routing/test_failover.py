"""Two real vLLM deployments behind one alias; one is killed mid-test."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import openai
import orjson
import pytest

from bastion.local.launcher import EngineSpec, VllmProcess, free_port
from tests.conftest import TINY, base_config, usage_rows

pytestmark = pytest.mark.engine


def _readyz(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=5) as r:
            return r.status, orjson.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, orjson.loads(e.read())


def _wait_healthy(gw, model: str, expected: list[bool], timeout: float = 20) -> None:  # type: ignore[no-untyped-def]
    """Until /readyz reports the model's deployments so (a busy machine can fail one check)."""
    deadline = time.monotonic() + timeout
    while True:
        _, body = _readyz(gw.url)
        seen = [d["healthy"] for d in body["models"][model]["deployments"]]
        if seen == expected or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert seen == expected, body


def test_two_deployments_one_killed(
    make_gateway,
    chat_engine,
    tiny_model: Path,  # type: ignore[no-untyped-def]
    engine_logs: Path,
    tmp_path: Path,
) -> None:
    second = VllmProcess(
        EngineSpec(tiny_model, TINY, free_port(), gpu_memory_utilization=0.05, max_model_len=2048),
        log_path=engine_logs / "second.log",
    )
    second.start()
    try:
        second.wait_ready(timeout=420)
        db = f"sqlite:///{tmp_path}/f.db"
        gw = make_gateway(
            base_config(
                db,
                {
                    "pair": {
                        "deployments": [
                            {"url": chat_engine.url, "served_name": TINY},
                            {"url": second.url, "served_name": TINY},
                        ]
                    },
                    "lonely": {"deployments": [{"url": second.url, "served_name": TINY}]},
                },
            )
        )
        gw.wait_ready()
        _wait_healthy(gw, "pair", [True, True])
        key = gw.create_key("alpha")
        with openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0) as c:
            # Both replicas take traffic: each `user` is a session the ring places, so the
            # first 40 fall on one replica only with probability 2**-39.
            used: Counter[str] = Counter()
            for i in range(40):
                c.chat.completions.create(
                    model="pair",
                    max_tokens=2,
                    user=f"before-{i}",
                    messages=[{"role": "user", "content": "hi"}],
                )
                used[usage_rows(db, client_user=f"before-{i}")[0].deployment] += 1
                if len(used) == 2:
                    break
            assert set(used) == {"pair[0]", "pair[1]"}, used

            second.kill()  # SIGKILL: a crashed engine
            for i in range(10):  # every request still succeeds, on the surviving replica
                r = c.chat.completions.create(
                    model="pair",
                    max_tokens=2,
                    user=f"after-{i}",
                    messages=[{"role": "user", "content": "hi"}],
                )
                assert r.choices[0].message is not None
            after = {usage_rows(db, client_user=f"after-{i}")[0].deployment for i in range(10)}
            assert after == {"pair[0]"}
            with pytest.raises(openai.InternalServerError) as info:
                c.chat.completions.create(
                    model="lonely", max_tokens=2, messages=[{"role": "user", "content": "hi"}]
                )
            assert info.value.status_code == 503

        deadline = time.monotonic() + 15  # the active health check notices too
        status, body = _readyz(gw.url)
        while status != 503 and time.monotonic() < deadline:
            time.sleep(0.5)
            status, body = _readyz(gw.url)
        assert status == 503 and body["models"]["pair"]["ready"] is True
        assert body["models"]["lonely"]["ready"] is False
        assert [d["healthy"] for d in body["models"]["pair"]["deployments"]] == [True, False]
    finally:
        second.stop()
