import json
from pathlib import Path

import pytest

from bastion.config import ConfigError, load_settings, parse_settings
from bastion.configdocs import render_config_reference

ROOT = Path(__file__).resolve().parent.parent
DEP = {"url": "http://127.0.0.1:8001", "served_name": "m"}


def _err(raw: object) -> str:
    with pytest.raises(ConfigError) as info:
        parse_settings(raw, "bastion.yaml")
    return str(info.value)


def test_defaults_work_on_one_machine() -> None:
    s = parse_settings({})
    assert s.server.port == 8080 and s.server.host == "127.0.0.1"
    assert s.database.url.startswith("sqlite:")


def test_errors_name_the_exact_path() -> None:
    msg = _err({"models": {"fast": {"deployments": [{"url": "nope", "served_name": "x"}]}}})
    assert "models.fast.deployments[0].url: not a URL" in msg
    assert "unknown setting" in _err({"server": {"prot": 1}})
    assert "server.prot" in _err({"server": {"prot": 1}})
    assert "server.port" in _err({"server": {"port": "eighty"}})
    assert "models.fast.deployments" in _err({"models": {"fast": {"deployments": []}}})


def test_references_are_checked() -> None:
    msg = _err({"teams": {"t": {"cost_center": "nope"}}})
    assert "teams.t.cost_center: unknown cost center 'nope'" in msg
    msg = _err({"cost_centers": {"c": {}}, "teams": {"t": {"cost_center": "c", "models": ["x"]}}})
    assert "teams.t.models[0]: unknown model 'x'" in msg
    assert "prices.x: unknown model" in _err({"prices": {"x": {"prompt": 1}}})


def test_env_interpolation_and_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENGINE_TOKEN", "s3cret")
    s = parse_settings({"models": {"m": {"deployments": [{**DEP, "api_key": "${ENGINE_TOKEN}"}]}}})
    assert s.models["m"].deployments[0].api_key == "s3cret"
    assert "MISSING_VAR is not set" in _err({"admin": {"key": "${MISSING_VAR}"}})
    monkeypatch.setenv("BASTION_ADMIN_KEY", "x" * 20)
    monkeypatch.setenv("BASTION_DATABASE_URL", "postgresql+psycopg://u@h/db")
    s = parse_settings({})
    assert s.admin.key == "x" * 20 and s.database.url == "postgresql+psycopg://u@h/db"


def test_env_references_inside_strings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGPASSWORD", "p@ss")
    monkeypatch.setenv("DBHOST", "db")
    monkeypatch.delenv("UNSET_PORT", raising=False)
    monkeypatch.setenv("EMPTY_VAR", "")
    url = "postgresql+psycopg://bastion:${PGPASSWORD}@${DBHOST}:${UNSET_PORT:-5432}/bastion"
    s = parse_settings({"database": {"url": url}})
    assert s.database.url == "postgresql+psycopg://bastion:p@ss@db:5432/bastion"
    # `:-` covers an empty variable too (as in the shell); an empty default is allowed.
    s = parse_settings({"database": {"url": "sqlite:///${EMPTY_VAR:-var/b.db}${UNSET_PORT:-}"}})
    assert s.database.url == "sqlite:///var/b.db"
    # `$${` is a literal `${`; a lone `$` (common in passwords) is kept as written.
    s = parse_settings({"admin": {"key": "pa$$word-$${NOT_A_VAR}-x" + "y" * 12}})
    assert s.admin.key == "pa$$word-${NOT_A_VAR}-x" + "y" * 12
    msg = _err({"database": {"url": "postgresql://u:${NO_SUCH_PASSWORD}@db/b"}})
    assert "database.url: environment variable NO_SUCH_PASSWORD is not set" in msg
    assert "models.m.deployments[0].api_key: environment variable" in _err(
        {"models": {"m": {"deployments": [{**DEP, "api_key": "Bearer ${NO_SUCH_TOKEN}"}]}}}
    )
    for bad in ("x${PGPASSWORD", "x${1ABC}", "x${}", "${A-b}"):
        assert "database.url: malformed variable reference" in _err({"database": {"url": bad}})


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad)


def test_example_config_is_valid() -> None:
    s = load_settings(ROOT / "examples/bastion.yaml")
    assert set(s.models) == {"tiny", "minilm"}


def test_config_reference_is_current() -> None:
    """docs/config.md is generated from the settings; regenerate with `bastion config docs`."""
    assert (ROOT / "docs/config.md").read_text() == render_config_reference()


def test_identity_providers_are_checked_at_start() -> None:
    idp = {"issuer": "https://idp.bank.test", "audience": "bastion"}
    assert "algorithm 'none' is never allowed" in _err(
        {"identity": {"oidc": [{**idp, "algorithms": ["none"]}]}}
    )
    assert "do not mix HS* with asymmetric" in _err(
        {"identity": {"oidc": [{**idp, "algorithms": ["HS256", "RS256"], "jwks_file": "k"}]}}
    )
    assert "identity.group_mappings[0].team: unknown team 'ghost'" in _err(
        {"identity": {"group_mappings": [{"group": "g", "team": "ghost"}]}}
    )
    ok = parse_settings(
        {
            "identity": {"oidc": [idp], "group_mappings": [{"group": "g", "team": "t"}]},
            "cost_centers": {"cc": {}},
            "teams": {"t": {"cost_center": "cc"}},
        }
    )
    assert ok.identity.oidc[0].algorithms == ["RS256"]


def test_reference_order_does_not_depend_on_import_order() -> None:
    import subprocess
    import sys

    first = "import bastion.metering.settings, bastion.identity.settings; "
    code = "from bastion.configdocs import render_config_reference as r; print(r(), end='')"
    out = subprocess.run(
        [sys.executable, "-c", first + code], capture_output=True, text=True, check=True
    )
    assert out.stdout == render_config_reference()


def test_show_masks_every_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    from bastion.cli import main

    cfg = tmp_path / "b.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "database": {"url": "postgresql+psycopg://app:db-pw-1@db.bank/bastion"},
                "limits": {"redis_url": "redis://:redis-pw-2@cache:6379/0"},
                "models": {"m": {"deployments": [{**DEP, "api_key": "engine-key-3"}]}},
            }
        )
    )
    monkeypatch.setenv("BASTION_ADMIN_KEY", "admin-key-4-0123456789")
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["config", "show", "--config", str(cfg), "--format", "json"]) == 0
    text = out.getvalue()
    for secret in ("db-pw-1", "redis-pw-2", "engine-key-3", "admin-key-4"):
        assert secret not in text
    shown = json.loads(text)
    assert shown["database"]["url"] == "postgresql+psycopg://app:***@db.bank/bastion"
    assert shown["limits"]["redis_url"] == "redis://:***@cache:6379/0"
    assert shown["admin"]["key"] == "***" and shown["server"]["port"] == 8080
    assert shown["models"]["m"]["deployments"][0]["api_key"] == "***"
    assert "**Secret:**" in render_config_reference()


def test_key_limits_only_tighten_and_keep_currencies_apart() -> None:
    from decimal import Decimal

    from bastion.core.settings import LimitSettings

    default = LimitSettings(rpm=2, budget_day=Decimal("10"), currency="EUR")
    merged = default.tightened(LimitSettings(rpm=50, tpm=7))
    assert (merged.rpm, merged.tpm, merged.budget_day, merged.currency) == (2, 7, 10, "EUR")
    tighter = default.tightened(LimitSettings(budget_day=Decimal("3.5"), currency="EUR"))
    assert tighter.budget_day == Decimal("3.5")
    with pytest.raises(ValueError, match="same currency"):
        default.tightened(LimitSettings(budget_day=Decimal("1"), currency="USD"))
