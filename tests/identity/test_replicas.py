"""Two gateway replicas sharing one database: revocation is immediate on the replica that
revoked, and reaches the other within `identity.key_refresh_seconds`."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path

import orjson

from tests.conftest import ADMIN_KEY, base_config


def _status(url: str, key: str, method: str = "GET", path: str = "/v1/models") -> int:
    req = urllib.request.Request(
        url + path, method=method, headers={"Authorization": f"Bearer {key}"}
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_revocation_reaches_every_replica(make_gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = base_config(
        f"sqlite:///{tmp_path}/shared.db",
        {"m": {"deployments": [{"url": "http://127.0.0.1:9", "served_name": "m"}]}},
    )
    a, b = make_gateway(cfg), make_gateway(cfg)
    b.config_path.write_text(a.config_path.read_text())
    key = a.create_key("beta")  # made by the CLI: neither replica has it cached
    assert _status(a.url, key) == 200 and _status(b.url, key) == 200
    req = urllib.request.Request(
        a.url + "/admin/keys", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    with urllib.request.urlopen(req) as r:
        key_id = [k["id"] for k in orjson.loads(r.read()) if k["team"] == "beta"][0]
    assert _status(a.url, ADMIN_KEY, "POST", f"/admin/keys/{key_id}/revoke") == 200
    assert _status(a.url, key) == 401  # immediately on the replica that revoked
    deadline = time.monotonic() + 3.0  # refresh is 0.5 s in the test config
    while _status(b.url, key) != 401:
        assert time.monotonic() < deadline, "replica b still accepts a revoked key"
        time.sleep(0.1)
