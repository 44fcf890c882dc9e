"""The audit trail against the real gateway and the real vLLM engine: streamed answers put
back together, cancelled streams marked aborted, and kill -9 under load losing nothing."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa

from bastion.local.launcher import VllmProcess
from bastion.store.schema import audit_entries
from tests.audit_api import entries_of
from tests.conftest import ADMIN_KEY, Gateway, base_config, engine_models, pg_database

pytestmark = pytest.mark.engine


def _entries(db_url: str, **where: Any) -> list[dict[str, Any]]:
    engine = sa.create_engine(db_url)
    try:
        q = sa.select(audit_entries.c.doc).order_by(audit_entries.c.replica, audit_entries.c.seq)
        for k, v in where.items():
            q = q.where(audit_entries.c[k] == v)
        with engine.connect() as conn:
            return [orjson.loads(doc) for (doc,) in conn.execute(q)]
    finally:
        engine.dispose()


def _show(gw: Gateway, auditor: str, rid: str, want: int = 2) -> list[dict[str, Any]]:
    return entries_of(gw.url, auditor, rid, want)


def test_streams_are_recorded_as_assembled_answers(gateway: Gateway, api_key: str) -> None:
    import openai

    auditor = gateway.create_auditor_key("alpha", "carol")
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key=api_key, max_retries=0) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="tiny",
            messages=[{"role": "user", "content": "Tell me about audit trails."}],
            max_tokens=40,
            stream=True,
            logprobs=True,
            top_logprobs=2,
        )
        rid = raw.headers["x-request-id"]
        chunks = list(raw.parse())
    received = [
        t.token for c in chunks if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.content or ()
    ]  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = next(
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    )
    req, done = _show(gateway, auditor, rid)
    assert req["kind"] == "request" and req["content"]["stream"] is True
    assert req["content"]["messages"][0]["content"] == "Tell me about audit trails."
    (choice,) = done["content"]["response"]
    assert choice["text"] == text and text and choice["finish_reason"] == finish
    # Whatever the client received is in the trail, logprobs included, not only the text.
    assert [t["token"] for t in choice["logprobs"]["content"]] == received and received
    assert done["outcome"] == "ok" and done["aborted"] is False
    assert 0 < done["completion_tokens"] <= 40
    assert finish != "length" or done["completion_tokens"] == 40
    assert done["engine_model"] == "tiny-chat" and done["deployment"]


def test_a_cancelled_stream_is_marked_aborted_with_what_was_sent(
    gateway: Gateway, api_key: str
) -> None:
    auditor = gateway.create_auditor_key("alpha")
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Write a long story."}],
        # Far more than the engine can make before the client leaves: on a busy machine a
        # short answer could be generated, and written into the socket buffers, in full first.
        "max_tokens": 20000,
        "ignore_eos": True,
        "stream": True,
    }
    received = ""
    with httpx.stream(
        "POST",
        gateway.url + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {api_key}"},
        timeout=60,
    ) as r:
        rid = r.headers["x-request-id"]
        for line in r.iter_lines():
            if line.startswith("data: {"):
                received += orjson.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                if len(received) > 20:
                    break
    _req, done = _show(gateway, auditor, rid)
    assert done["aborted"] is True and done["outcome"] == "cancelled"
    (choice,) = done["content"]["response"]
    assert choice["text"].startswith(received) and choice["finish_reason"] is None


def _load(
    url: str, key: str, stop: threading.Event, log: dict[str, str], lock: threading.Lock
) -> None:
    """One client: long streams and short calls in turn; notes each request's fate."""
    headers = {"Authorization": f"Bearer {key}"}
    n = 0
    with httpx.Client(timeout=60, headers=headers) as client:
        while not stop.is_set():
            n += 1
            stream = n % 2 == 0
            body = {
                "model": "tiny",
                "messages": [{"role": "user", "content": f"request {n}"}],
                "max_tokens": 400 if stream else 8,
                "stream": stream,
                # vLLM's: a stream lasts its max_tokens, so some are mid-way at the kill. Without
                # it the tiny model can end streams early, and once in CI every request the test
                # saw in flight had been wholly sent before the kill landed.
                "ignore_eos": stream,
            }
            try:
                with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
                    if r.status_code != 200:
                        continue
                    rid = r.headers["x-request-id"]
                    with lock:
                        log[rid] = "accepted"
                    data = b"".join(r.iter_bytes())
                    if stream:
                        whole = data.rstrip().endswith(b"data: [DONE]")
                    else:
                        whole = bool(orjson.loads(data).get("choices"))
                    if whole:
                        with lock:
                            log[rid] = "finished"
            except (httpx.HTTPError, orjson.JSONDecodeError):
                time.sleep(0.05)


@pytest.fixture
def own_pg() -> Iterator[str]:
    """A database of its own: `verify` then sees only this test's chain and signing key."""
    with pg_database() as url:
        yield url


@pytest.mark.postgres
def test_kill_9_under_load_loses_no_accepted_request(
    make_gateway: Callable[..., Gateway],
    chat_engine: VllmProcess,
    embed_engine: VllmProcess,
    own_pg: str,
) -> None:
    pg_url = own_pg
    cfg = base_config(
        pg_url,
        engine_models(chat_engine, embed_engine),
        audit={"replica": "gw-crash", "checkpoint_entries": 50},
    )
    gw = make_gateway(cfg)
    gw.wait_ready()
    key = gw.create_key("alpha")
    stop, lock = threading.Event(), threading.Lock()
    log: dict[str, str] = {}
    clients = [
        threading.Thread(target=_load, args=(gw.url, key, stop, log, lock)) for _ in range(6)
    ]
    for t in clients:
        t.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # until work is both done and in flight
        with lock:
            states = list(log.values())
        if states.count("finished") >= 10 and states.count("accepted") >= 2:
            break
        time.sleep(0.05)
    assert gw.proc is not None
    gw.proc.send_signal(signal.SIGKILL)
    gw.proc.wait()
    stop.set()
    for t in clients:
        t.join(60)
    with lock:
        fates = dict(log)
    assert list(fates.values()).count("accepted") >= 1, "nothing was in flight at the kill"

    gw.start()  # same replica: recovers, ships, marks the interrupted requests aborted
    gw.wait_ready()
    deadline = time.monotonic() + 10
    while True:  # until the restart's own entries are shipped
        entries = _entries(pg_url, replica="gw-crash")
        if sum(e["kind"] == "start" for e in entries) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert [e["seq"] for e in entries] == list(range(1, len(entries) + 1))  # no gaps
    requests = {e["request_id"] for e in entries if e["kind"] == "request"}
    completions: dict[str, dict[str, Any]] = {}
    for e in entries:
        if e["kind"] == "completion":
            assert e["request_id"] not in completions, "two completions for one request"
            completions[e["request_id"]] = e
    for rid, fate in fates.items():
        assert rid in requests, f"accepted {rid} has no request entry"
        assert rid in completions, f"{rid} has no completion entry"
        if fate == "finished":
            assert completions[rid]["outcome"] == "ok", completions[rid]
    interrupted = [rid for rid, fate in fates.items() if fate == "accepted"]
    assert any(completions[rid].get("aborted") for rid in interrupted)
    assert [e for e in entries if e["kind"] == "start"][-1]["recovered"] >= 1
    verdict = gw.cli("audit", "verify", check=False)
    gw.stop()  # before its database goes
    assert verdict.returncode == 0 and verdict.stdout.startswith("OK"), verdict.stdout


def test_cli_reads_export_and_offline_verification(
    gateway: Gateway, api_key: str, tmp_path: Any
) -> None:
    import openai

    auditor = gateway.create_auditor_key("alpha", "dora")
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key=api_key, max_retries=0) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="tiny",
            messages=[{"role": "user", "content": "Where is my IBAN DE89 3704 0044 0532 0130 00?"}],
            max_tokens=5,
        )
    rid = raw.headers["x-request-id"]
    _show(gateway, auditor, rid)  # in the store
    read = ("--url", gateway.url, "--key", auditor)
    found = gateway.cli("audit", "search", *read, "--text", "DE89 3704", "--format", "json")
    assert rid in {e["request_id"] for e in orjson.loads(found.stdout)["data"]}
    shown = orjson.loads(gateway.cli("audit", "show", rid, *read).stdout)
    assert [e["kind"] for e in shown["entries"]] == ["request", "completion"]
    denied = gateway.cli("audit", "search", "--url", gateway.url, "--key", api_key, check=False)
    assert denied.returncode == 2 and "403" in denied.stderr

    export = tmp_path / "trail.jsonl"
    gateway.cli("audit", "export", *read, "--since", "1h", "-o", str(export))
    lines = [orjson.loads(line) for line in export.read_bytes().splitlines()]
    assert "export" in lines[0] and any("checkpoint" in line for line in lines)
    mine = next(line for line in lines if line.get("entry", {}).get("request_id") == rid)
    assert "DE89 3704" in mine["plaintext"]["messages"][0]["content"]
    ok = gateway.cli("audit", "verify", "--file", str(export))
    assert ok.stdout.startswith("OK"), ok.stdout
    mine["entry"]["user"] = "mallory"  # an export doctored after the fact
    export.write_bytes(b"\n".join(orjson.dumps(line) for line in lines) + b"\n")
    bad = gateway.cli("audit", "verify", "--file", str(export), check=False)
    assert bad.returncode == 1 and "(edited)" in bad.stdout
    # The reads above are in the trail, attributed to the auditor as authenticated: the key's
    # id, never the `user` label its creator typed.
    keys = orjson.loads(gateway.cli("keys", "list", "--format", "json").stdout)
    key_id = next(k["id"] for k in keys if k["prefix"] == auditor[:12])
    reads = [e for e in _entries(_db_url(gateway), kind="read") if e.get("actor") == key_id]
    assert {"search", "show", "export"} <= {e["action"] for e in reads}


def test_cli_places_holds_but_never_releases_or_shreds_alone(gateway: Gateway) -> None:
    """Releasing a hold and shredding need a second administrator, so the command line (one
    holder of the config and the database) only asks the API to; placing a hold is safe."""
    import httpx

    held = gateway.cli("audit", "hold", "--team", "beta", "--reason", "matter 7")
    assert orjson.loads(held.stdout)["placed"] is True
    for command in ("release", "shred"):
        refused = gateway.cli("audit", command, "--team", "beta", check=False)
        assert refused.returncode == 2 and "second administrator" in refused.stderr
    assert "matter 7" in gateway.cli("audit", "holds").stdout
    # Through the API: one administrator asks, another (a person) approves.
    asker = gateway.create_key("alpha", "--role", "admin")
    asked = httpx.delete(
        gateway.url + "/admin/audit/holds/beta", headers={"Authorization": f"Bearer {asker}"}
    )
    assert asked.status_code == 202 and asked.json()["status"] == "pending", asked.text
    assert "matter 7" in gateway.cli("audit", "holds").stdout  # not until approved
    approved = httpx.post(
        f"{gateway.url}/admin/approvals/{asked.json()['id']}/approve",
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert approved.status_code == 200 and approved.json()["result"]["released"] is True
    assert "matter 7" not in gateway.cli("audit", "holds").stdout
    actions = [e["action"] for e in _entries(_db_url(gateway), kind="admin")]
    assert [a for a in actions if a.startswith(("audit.", "approval."))][-4:] == [
        "audit.hold",
        "approval.request",
        "approval.approve",
        "audit.release.approved",
    ]


def _db_url(gw: Gateway) -> str:
    return str(gw.config["database"]["url"])
