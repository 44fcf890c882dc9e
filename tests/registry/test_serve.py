"""`bastion models …` on the command line, and what `bastion serve` does with a deployment that
names a registry version: a real gateway process refuses to start on an unapproved, unknown or
tampered model (naming the model and the file), and with `registry.enforce: warn` starts and
says why in /readyz."""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa

from bastion.registry.cache import DigestCache
from bastion.registry.digests import digest_dir, mismatches
from bastion.store.db import open_database
from tests.conftest import TINY, Gateway, base_config, free_port
from tests.registry.helpers import DOCUMENTED, admin_trail, copy_model, flip_byte

FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in DOCUMENTED.items()]


def _models(url: str, model_path: Path, ref: str = "tiny-chat@1") -> dict[str, Any]:
    return {
        "tiny": {
            "deployments": [
                {"url": url, "served_name": TINY, "registry": ref, "model_path": str(model_path)}
            ]
        },
    }


def _refused(gw: Gateway) -> str:
    with pytest.raises(RuntimeError, match="gateway exited") as exc:
        gw.start()
    assert gw.proc is not None and gw.proc.returncode == 2
    return str(exc.value)


def _readyz(gw: Gateway) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(gw.url + "/readyz", timeout=5) as resp:
            return resp.status, orjson.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read())


def test_cli_lifecycle_and_refusals_at_serve_start(
    make_gateway: Callable[..., Gateway], tiny_model: Path, tmp_path: Path
) -> None:
    model = copy_model(tiny_model, tmp_path / "tiny-copy")
    db = f"sqlite:///{tmp_path}/b.db"
    nowhere = f"http://127.0.0.1:{free_port()}"  # no engine needed: the check runs first
    gw = make_gateway(base_config(db, _models(nowhere, model)), start=False)

    # Not registered at all.
    assert "tiny-chat@1 is not registered" in _refused(gw)

    out = gw.cli("models", "register", str(model), "--name", "tiny-chat", "--version", "1",
                 *FLAGS)  # fmt: skip
    assert "registered tiny-chat@1 (base, draft): 7 files" in out.stdout, out
    # Registered but a draft: refused, with the model and its state named.
    log = _refused(gw)
    assert "model tiny deployment 0: registry: tiny-chat@1 not approved (it is draft)" in log

    # Illegal on the command line: a clear error and exit 2.
    bad = gw.cli("models", "approve", "tiny-chat@1", "--evidence", "x", check=False)
    assert bad.returncode == 2
    assert "is draft: it cannot be approved (legal from draft: retire, validate)" in bad.stderr
    assert gw.cli("models", "validate", "tiny-chat@1", "--evidence", "eval #7").stdout == (
        "tiny-chat@1: draft -> validated\n"
    )
    assert (
        "validated -> approved"
        in gw.cli("models", "approve", "tiny-chat@1", "--evidence", "MRC 2026-11").stdout
    )
    listed = gw.cli("models", "list").stdout
    assert "tiny-chat@1" in listed and "approved" in listed
    shown = orjson.loads(gw.cli("models", "show", "tiny-chat@1").stdout)
    assert shown["history"][-1]["evidence"] == "MRC 2026-11"

    # Approved and unchanged: it starts and the registry has nothing to say in /readyz.
    gw.start()
    status, body = _readyz(gw)
    assert "reason" not in body["models"]["tiny"]  # not ready only because no engine runs
    gw.stop()

    # One flipped byte in the weights: refused, naming the model and the file.
    flip_byte(model / "model.safetensors")
    checked = gw.cli("models", "verify", "tiny-chat@1", "--path", str(model), check=False)
    assert checked.returncode == 1 and checked.stdout == "hash mismatch: model.safetensors\n"
    assert gw.cli("models", "verify", "tiny-chat@1", "--path", str(tiny_model)).returncode == 0
    log = _refused(gw)
    assert "model tiny deployment 0: hash mismatch: model.safetensors (tiny-chat@1 at" in log
    assert "registry.enforce: refuse" in log

    # warn: it starts, and /readyz says which model is not ready and why.
    warn = make_gateway(base_config(db, _models(nowhere, model), registry={"enforce": "warn"}))
    status, body = _readyz(warn)
    assert status == 503 and body["status"] == "not ready"
    tiny = body["models"]["tiny"]
    assert tiny["ready"] is False and tiny["reason"].startswith("hash mismatch: model.safetensors")
    assert tiny["deployments"][0]["reason"] == tiny["reason"]
    warn.stop()

    # Retired: never served again.
    gw.cli("models", "retire", "tiny-chat@1", "--reason", "superseded")
    flip_byte(model / "model.safetensors")  # as registered again
    assert "registry: tiny-chat@1 not approved (it is retired)" in _refused(gw)

    trail = [(e["actor"], e["action"], e.get("model")) for e in admin_trail(db)]
    verbs = [a for actor, a, m in trail if m == "tiny-chat@1" and actor.endswith("(cli)")]
    assert verbs == ["model.register", "model.validate", "model.approve", "model.retire"]


def test_four_eyes_approval_is_not_made_on_the_command_line(
    make_gateway: Callable[..., Gateway], tiny_model: Path, tmp_path: Path
) -> None:
    cfg = base_config(f"sqlite:///{tmp_path}/b.db", {}, registry={"approval": "four-eyes"})
    gw = make_gateway(cfg, start=False)
    gw.cli("models", "register", str(tiny_model), "--name", "t", "--version", "1", *FLAGS)
    gw.cli("models", "validate", "t@1", "--evidence", "eval")
    r = gw.cli("models", "approve", "t@1", "--evidence", "me", check=False)
    assert r.returncode == 2 and "four-eyes: approvals go through the admin API" in r.stderr


def test_digest_cache_reuses_only_files_the_kernel_says_are_unchanged(
    tiny_model: Path, tmp_path: Path
) -> None:
    model = copy_model(tiny_model, tmp_path / "m")
    db = open_database(f"sqlite:///{tmp_path}/c.db")
    files = [f.public() for f in digest_dir(model)]
    time.sleep(2.1)  # files changed in the last 2 s are never cached (racy timestamps)
    seed = DigestCache(db, reuse=False)
    assert mismatches(model, files, cache=seed) == []
    cache = DigestCache(db)
    assert mismatches(model, files, cache=cache) == []
    assert cache.reused_bytes == sum(f["size"] for f in files)  # nothing read again
    # Tamper, then put the old mtime back: the ctime the kernel set gives it away.
    weights = model / "model.safetensors"
    st = weights.stat()
    flip_byte(weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = DigestCache(db)
    assert mismatches(model, files, cache=again) == ["hash mismatch: model.safetensors"]
    assert again.reused_bytes == sum(f["size"] for f in files) - st.st_size
    with db.connect() as conn:
        assert conn.execute(sa.text("select count(*) from registry_digests")).scalar() == 7
    db.dispose()


@pytest.mark.engine
def test_an_approved_model_serves_and_an_altered_one_is_not_ready(
    make_gateway: Callable[..., Gateway], chat_engine: Any, tiny_model: Path, tmp_path: Path
) -> None:
    """Real serving: the approved tiny model answers through the gateway with the `openai` SDK;
    an alias whose files were altered starts in warn mode and /readyz names the file."""
    import openai

    altered = copy_model(tiny_model, tmp_path / "altered")
    db = f"sqlite:///{tmp_path}/b.db"
    models = _models(chat_engine.url, tiny_model) | {
        "altered": _models(chat_engine.url, altered, "tiny-chat@2")["tiny"]
    }
    gw = make_gateway(base_config(db, models, registry={"enforce": "warn"}), start=False)
    for version, path in (("1", tiny_model), ("2", altered)):
        gw.cli("models", "register", str(path), "--name", "tiny-chat", "--version", version,
               *FLAGS)  # fmt: skip
        gw.cli("models", "validate", f"tiny-chat@{version}", "--evidence", "eval")
        gw.cli("models", "approve", f"tiny-chat@{version}", "--evidence", "ok")
    (altered / "chat_template.jinja").write_text("{{ messages }}")  # a file nobody approved
    gw.start()
    deadline = time.monotonic() + 30
    while _readyz(gw)[1]["models"]["tiny"]["ready"] is not True:
        assert time.monotonic() < deadline, _readyz(gw)
        time.sleep(0.5)
    status, body = _readyz(gw)
    assert status == 503
    assert body["models"]["altered"]["ready"] is False
    assert body["models"]["altered"]["reason"].startswith("unrecorded file: chat_template.jinja")
    key = gw.create_key("alpha")
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=60) as c:
        r = c.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
    assert r.choices[0].message.content is not None
