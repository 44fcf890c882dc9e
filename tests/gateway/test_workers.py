"""`bastion serve --workers 2` in front of the real vLLM: limits exact across the workers, a
killed worker restarted on its own audit chain, SIGTERM drains a running stream with every
usage record and audit entry written, and `audit verify` passes for every chain.

The tests share one supervisor and run in file order: the last one stops it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from bastion.store.schema import audit_entries, usage
from tests.conftest import REDIS_URL, TINY, Gateway, base_config, free_port, pg_database

REPLICA = "wk"
CHAINS = {f"{REPLICA}-w0", f"{REPLICA}-w1"}


class Served:
    """The supervisor and every request id it answered 200 for."""

    def __init__(self, gw: Gateway, db_url: str):
        self.gw, self.db_url = gw, db_url
        self.ok: list[str] = []


@pytest.fixture(scope="module")
def served(make_gateway, chat_engine):  # type: ignore[no-untyped-def]
    with pg_database() as db_url:
        cfg = base_config(
            db_url,
            {"tiny": {"deployments": [{"url": chat_engine.url, "served_name": TINY}]}},
            limits={"backend": "redis", "redis_url": REDIS_URL},
            audit={"replica": REPLICA},  # files under the gateway's working directory
        )
        gw = make_gateway(cfg, start=False)
        gw.serve_args = ["--workers", "2"]
        gw.start(timeout=120)
        gw.wait_ready()
        yield Served(gw, db_url)
        gw.stop()


def _workers(supervisor: int) -> set[int]:
    """The supervisor's worker processes (not multiprocessing's resource tracker)."""
    found = set()
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    for pid in map(int, children):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"spawn_main" in cmdline:
            found.add(pid)
    return found


def _chat(url: str, key: str, **extra: Any) -> httpx.Response:
    """One request on a connection of its own, so the kernel may hand it to either worker."""
    body = {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}
    with httpx.Client(timeout=60) as c:
        return c.post(
            url + "/v1/chat/completions",
            json={**body, **extra},
            headers={"Authorization": f"Bearer {key}"},
        )


def _entries(db_url: str, **where: Any) -> list[dict[str, Any]]:
    engine = sa.create_engine(db_url)
    try:
        q = sa.select(audit_entries.c.replica, audit_entries.c.doc)
        for k, v in where.items():
            q = q.where(audit_entries.c[k] == v)
        q = q.order_by(audit_entries.c.replica, audit_entries.c.seq)
        with engine.connect() as conn:
            return [{**orjson.loads(doc), "replica": r} for r, doc in conn.execute(q)]
    finally:
        engine.dispose()


def _serving_chains(db_url: str, request_ids: list[str], timeout: float = 15) -> set[str]:
    """The chains whose request entries hold these requests, once all are shipped."""
    deadline = time.monotonic() + timeout
    while True:
        found = {e["request_id"]: e["replica"] for e in _entries(db_url, kind="request")}
        if all(r in found for r in request_ids):
            return {found[r] for r in request_ids}
        assert time.monotonic() < deadline, "request entries not shipped"
        time.sleep(0.2)


def test_rpm_exact_across_workers(served: Served) -> None:
    chains: set[str] = set()
    for _round in range(6):  # until the passes have been spread over both workers
        while time.time() % 60 > 50:  # one round inside one minute's window
            time.sleep(0.5)
        key = served.gw.create_key("alpha", "--rpm", "5")
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(_chat, [served.gw.url] * 8, [key] * 8))
        codes = sorted(a.status_code for a in answers)
        assert codes == [200] * 5 + [429] * 3, codes  # exactly the limit, whichever worker
        ok = [a.headers["x-request-id"] for a in answers if a.status_code == 200]
        served.ok += ok
        chains |= _serving_chains(served.db_url, ok)
        if chains == CHAINS:
            break
    assert chains == CHAINS


def _requests_by_status(url: str) -> dict[str, float]:
    """bastion_requests_total for the tiny model by status, as one scrape (one worker) says."""
    with httpx.Client(timeout=10) as c:  # a connection of its own: either worker answers
        text = c.get(url + "/metrics").text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "bastion_requests_total" and sample.labels["model"] == "tiny":
                status = sample.labels["status"]
                out[status] = out.get(status, 0) + sample.value
    return out


def test_metrics_count_every_worker(served: Served) -> None:
    """Whichever worker a scrape reaches, it counts the requests all of them served (the rpm
    test spread them over both): 200s as recorded, and three 429s per round of eight."""
    rounds = len(served.ok) // 5
    want = {"200": float(len(served.ok)), "429": float(3 * rounds)}
    for _ in range(8):
        assert _requests_by_status(served.gw.url) == want


def test_killed_worker_is_restarted_on_its_own_chain(served: Served) -> None:
    sup = served.gw.proc.pid  # type: ignore[union-attr]
    before = _workers(sup)
    assert len(before) == 2
    victim = min(before)
    starts = [e for e in _entries(served.db_url, kind="start") if e["pid"] == victim]
    assert len(starts) == 1
    chain = starts[0]["replica"]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 90
    while True:  # its successor: same chain, a new start entry
        now = _entries(served.db_url, kind="start", replica=chain)
        if now[-1]["pid"] not in (victim, *before):
            break
        assert time.monotonic() < deadline, "the killed worker was not restarted"
        time.sleep(0.5)
    after = _workers(sup)
    assert len(after) == 2 and victim not in after and now[-1]["pid"] in after
    assert {e["replica"] for e in _entries(served.db_url, kind="start")} == CHAINS
    key = served.gw.create_key("alpha")
    seen: set[str] = set()
    for _ in range(40):  # both workers serve again
        r = _chat(served.gw.url, key)
        assert r.status_code == 200, r.text
        served.ok.append(r.headers["x-request-id"])
        seen |= _serving_chains(served.db_url, [r.headers["x-request-id"]])
        if seen == CHAINS:
            break
    assert seen == CHAINS
    # The dead worker's counts stay in the sums, next to its successor's.
    deadline = time.monotonic() + 10
    while _requests_by_status(served.gw.url).get("200") != len(served.ok):
        assert time.monotonic() < deadline, (_requests_by_status(served.gw.url), len(served.ok))
        time.sleep(0.2)


def test_sigterm_drains_a_stream_and_loses_no_record(served: Served) -> None:
    gw = served.gw
    key = gw.create_key("alpha")
    lines: list[str] = []
    last_line_at: list[float] = []
    first = threading.Event()
    request_id: list[str] = []

    def stream() -> None:
        body = {
            "model": "tiny",
            "max_tokens": 400,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,  # vLLM's: the stream lasts its max_tokens
            "messages": [{"role": "user", "content": "Count slowly."}],
        }
        headers = {"Authorization": f"Bearer {key}"}
        with (
            httpx.Client(timeout=120) as c,
            c.stream("POST", gw.url + "/v1/chat/completions", json=body, headers=headers) as r,
        ):
            assert r.status_code == 200
            request_id.append(r.headers["x-request-id"])
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                    last_line_at[:] = [time.monotonic()]
                    first.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert first.wait(60)
    gw.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    term_at = time.monotonic()
    reader.join(120)
    assert gw.proc.wait(150) == 0  # type: ignore[union-attr]
    assert lines[-1] == "data: [DONE]", lines[-3:]
    assert last_line_at[0] > term_at  # the stream was still running when the drain began
    chunks = [orjson.loads(x.removeprefix("data: ")) for x in lines[:-1]]
    assert chunks[-1]["usage"]["completion_tokens"] == 400  # finished, not cut
    served.ok += request_id

    engine = sa.create_engine(served.db_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(usage.c.request_id, usage.c.completion_tokens)).all()
    engine.dispose()
    recorded = {r.request_id: r.completion_tokens for r in rows}
    assert set(served.ok) <= set(recorded), set(served.ok) - set(recorded)
    assert recorded[request_id[0]] == 400
    entries = _entries(served.db_url)
    done = {e["request_id"]: e for e in entries if e["kind"] == "completion"}
    for rid in served.ok:
        assert done[rid]["outcome"] == "ok", done[rid]
    assert {e["replica"] for e in entries if e["kind"] == "stop"} == CHAINS
    verdict = gw.cli("audit", "verify", check=False)
    assert verdict.returncode == 0 and verdict.stdout.startswith("OK"), verdict.stdout


def test_more_workers_need_redis_limits(tmp_path: Path) -> None:
    cfg = tmp_path / "bastion.yaml"
    cfg.write_text(orjson.dumps(base_config(f"sqlite:///{tmp_path}/b.db", {})).decode())
    run = subprocess.run(
        [sys.executable, "-m", "bastion.cli", "serve", "--config", str(cfg), "--workers", "3"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert run.returncode == 2
    assert "--workers 3 needs limits.backend: redis" in run.stderr
    assert not (tmp_path / "b.db").exists()  # refused before anything was opened


def test_a_worker_that_cannot_start_stops_the_server(tmp_path: Path) -> None:
    """It would fail the same way on every restart: exit 1 instead of a restart loop."""
    db = "postgresql+psycopg://postgres@127.0.0.1:5432/bastion_no_such_database"
    cfg = base_config(db, {}, limits={"backend": "redis", "redis_url": REDIS_URL})
    path = tmp_path / "bastion.yaml"
    path.write_text(orjson.dumps(cfg).decode())
    argv = ["serve", "--config", str(path), "--workers", "2", "--port", str(free_port())]
    run = subprocess.run(
        [sys.executable, "-m", "bastion.cli", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert run.returncode == 1, run.stderr[-2000:]
    assert "worker 0 failed to start (exit status 1): stopping" in run.stderr
    assert "worker 1 started" not in run.stderr  # never started after worker 0 failed
