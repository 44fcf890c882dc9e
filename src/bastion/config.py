"""Settings: one YAML file declares the world; every key is declared once, by its capability.

Each capability declares its sections in its own `settings.py` (`bastion.core.settings.section`);
this module loads them like plugins, assembles the one settings tree, and validates a file
against it. A wrong key, type or reference stops the start with the exact path in the file,
e.g. `models.fast.deployments[0].url: not a URL`. `docs/config.md` is generated from the same
declarations (`bastion config docs`) and a test checks the two agree.

Secrets never need to live in the file: any string value may hold `${ENV_VAR}` (whole or inside
it, e.g. `postgresql://bastion:${PGPASSWORD}@db/bastion`), `${ENV_VAR:-default}`, and `$${`
for a literal `${`; the environment variables a section declares (`BASTION_ADMIN_KEY`,
`BASTION_DATABASE_URL`) override the file outright.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model, model_validator

from bastion.core.settings import Strict, is_secret, sections

__all__ = [
    "ConfigError",
    "Settings",
    "load_settings",
    "parse_settings",
    "redacted",
    "settings_model",
]

DEFAULT_CONFIG_PATHS = ("bastion.yaml", "/etc/bastion/bastion.yaml")
#: `$${` (escape), `${NAME}` / `${NAME:-default}`, or any other `${` (malformed: an error, not
#: silently kept, so a typo cannot leave a literal `${PGPASWORD}` in a database URL).
ENV_REF = re.compile(r"\$\$\{|\$\{(?:([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\})?")
#: The modules declaring the built-in sections, in the order of the config reference. They are
#: imported on first use, the way Datasette loads its default plugins: nothing here depends on
#: a capability, and another package can declare a section the same way.
SECTION_MODULES = (
    "bastion.gateway.settings",
    "bastion.store.settings",
    "bastion.admin.settings",
    "bastion.identity.settings",
    "bastion.limits.settings",
    "bastion.audit.settings",
    "bastion.routing.settings",
    "bastion.metering.settings",
    "bastion.metering.tco_settings",
    "bastion.registry.settings",
    "bastion.observability.settings",
)


class ConfigError(Exception):
    """The configuration cannot be used; the message names every offending path."""


class Settings(Strict):
    """The whole settings tree: one attribute per registered section (`settings.limits`, …).

    Each section's type lives with its capability; `settings_model()` is the assembled class.
    """

    if TYPE_CHECKING:

        def __getattr__(self, name: str) -> Any: ...

    @model_validator(mode="after")
    def _references(self) -> Settings:
        errors = [e for sec in sections() if sec.check is not None for e in sec.check(self)]
        if errors:
            raise ValueError("; ".join(errors))
        return self


@functools.cache
def settings_model() -> type[Settings]:
    """The settings class, built from every registered section (loaded on first call)."""
    for module in SECTION_MODULES:
        importlib.import_module(module)
    # In the order of SECTION_MODULES, whichever module happened to be imported first.
    rank = {m: i for i, m in enumerate(SECTION_MODULES)}
    ordered = sorted(sections(), key=lambda sec: rank.get(sec.module, len(rank)))
    fields: dict[str, Any] = {
        sec.name: (
            sec.annotation,
            Field(default_factory=sec.default_factory, description=sec.description),
        )
        for sec in ordered
    }
    return create_model("Settings", __base__=Settings, **fields)


def redacted(settings: Settings) -> dict[str, Any]:
    """The effective settings, as `bastion config show` prints them: secrets masked."""
    return _redact(settings)  # type: ignore[no-any-return]


def _redact(value: Any) -> Any:
    if isinstance(value, BaseModel):
        out = {}
        for name, field in type(value).model_fields.items():
            v = getattr(value, name)
            out[name] = _mask(v) if is_secret(field) and v is not None else _redact(v)
        return out
    if isinstance(value, dict):
        return {k: _redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact(v) for v in value]
    return value


def _mask(value: Any) -> str:
    """`***` for a secret; a URL keeps everything but its password."""
    parts = urlsplit(str(value))
    if not parts.scheme or "@" not in parts.netloc:
        return "***" if "://" not in str(value) else str(value)
    user, _, host = parts.netloc.rpartition("@")
    name = user.split(":", 1)[0]
    netloc = f"{name}:***@{host}" if ":" in user else parts.netloc
    return urlunsplit(parts._replace(netloc=netloc))


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in ("function-after[_is_url()]",):
            out += f".{part}" if out else str(part)
    return out


def _interpolate(node: Any, path: str) -> Any:
    """Replaces `${VAR}` references in strings by the environment's value; unset is an error."""
    if isinstance(node, dict):
        return {k: _interpolate(v, f"{path}.{k}" if path else str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, f"{path}[{i}]") for i, v in enumerate(node)]
    if isinstance(node, str) and "${" in node:
        return ENV_REF.sub(lambda m: _substitute(m, path or "(top level)"), node)
    return node


def _substitute(m: re.Match[str], path: str) -> str:
    if m.group(0) == "$${":
        return "${"
    name, default = m.group(1), m.group(2)
    if name is None:
        raise ConfigError(
            f"{path}: malformed variable reference at {m.string[m.start() :][:20]!r}; write "
            "${NAME} or ${NAME:-default}, or $${ for a literal ${"
        )
    value = os.environ.get(name)
    # As in the shell, `:-` also covers a variable set to the empty string.
    if default is not None and not value:
        return default
    if value is None:
        raise ConfigError(
            f"{path}: environment variable {name} is not set "
            f"(set it, or write ${{{name}:-default}})"
        )
    return value


def _env_overrides(raw: dict[str, Any]) -> dict[str, Any]:
    for sec in sections():
        for key, var in sec.env.items():
            if value := os.environ.get(var):
                raw.setdefault(sec.name, {})[key] = value
    return raw


def parse_settings(raw: Any, source: str = "<config>") -> Settings:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of settings")
    model = settings_model()  # every section registered before the overrides are read
    raw = _env_overrides(_interpolate(raw, ""))
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = _format_loc(err["loc"]) or "(top level)"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown setting"
            lines.append(f"{where}: {msg}")
        raise ConfigError(f"{source}: invalid configuration\n  " + "\n  ".join(lines)) from None


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Reads the config file: `path`, else $BASTION_CONFIG, else ./bastion.yaml; none → defaults."""
    chosen = path or os.environ.get("BASTION_CONFIG")
    if chosen is None:
        chosen = next((p for p in DEFAULT_CONFIG_PATHS if Path(p).is_file()), None)
    if chosen is None:
        return parse_settings({}, "<defaults>")
    file = Path(chosen)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read config file: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {exc}") from None
    return parse_settings(raw, str(file))
