"""`bastion keys create --rpm …`, `bastion keys limits`, `bastion limits status`."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.conftest import base_config


def test_cli(make_gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = base_config(
        f"sqlite:///{tmp_path}/cli.db",
        {"m": {"deployments": [{"url": "http://127.0.0.1:9", "served_name": "m"}]}},
        prices={"m": {"prompt": 1}},  # a budgeted team may only reach priced models
    )
    cfg["teams"]["alpha"]["limits"] = {"rpm": 100, "budget_day": 5.0}
    gw = make_gateway(cfg)
    cfg["server"] = {"port": gw.port}  # `limits status` finds the gateway through the config
    gw.config_path.write_text(json.dumps(cfg))
    gw.create_key("alpha", "--rpm", "7", "--tpm", "1000")
    keys = json.loads(gw.cli("keys", "list", "--format", "json").stdout)
    assert keys[0]["limits"] == {"rpm": 7, "tpm": 1000}
    key_id = keys[0]["id"]

    out = gw.cli("keys", "limits", key_id, "--concurrent", "2").stdout
    assert "'concurrent': 2" in out
    assert json.loads(gw.cli("keys", "list", "--format", "json").stdout)[0]["limits"] == {
        "concurrent": 2
    }
    bad = gw.cli("keys", "limits", key_id, "--rpm", "-1", check=False)
    assert bad.returncode == 2 and "error" in bad.stderr

    # The gateway picks the change up on its next key refresh (0.5 s in tests).
    time.sleep(1.0)
    rows = json.loads(gw.cli("limits", "status", "--team", "alpha", "--format", "json").stdout)
    kinds = {(r["level"], r["limit_kind"]): r for r in rows}
    assert kinds[("team 'alpha'", "rpm")]["limit"] == 100
    assert kinds[("team 'alpha'", "budget_day")]["limit"] == "5.000000"
    assert kinds[(f"key '{key_id}'", "concurrent")]["remaining"] == 2
    table = gw.cli("limits", "status").stdout
    assert "team 'alpha'" in table and "remaining" in table
    down = gw.cli("limits", "status", "--url", "http://127.0.0.1:9", check=False)
    assert down.returncode == 2 and "cannot reach" in down.stderr
