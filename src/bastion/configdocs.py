"""Renders the config reference (docs/config.md) from the settings models themselves."""

from __future__ import annotations

import re
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from bastion.config import Settings

HEADER = """# Configuration reference

Generated from the settings models (`src/bastion/config.py` and each capability's
`settings.py`) by `bastion config docs > docs/config.md`; a test fails when the two disagree.
Any string value may be written `${ENV_VAR}` to read it from the environment;
`BASTION_ADMIN_KEY` and `BASTION_DATABASE_URL` override the file outright.
A worked example is `examples/bastion.yaml`.
"""


def _type_name(tp: object) -> str:
    text = repr(tp) if not isinstance(tp, type) else tp.__name__
    text = re.sub(r"\bbastion(\.\w+)*\.(?=[A-Z])", "", text)  # settings models: bare names
    return (
        text.replace("typing.", "")
        .replace(
            "Annotated[str, FieldInfo(annotation=NoneType, required=True, "
            "metadata=[_PydanticGeneralMetadata(pattern='^[A-Za-z0-9][A-Za-z0-9._:/-]"
            "{0,127}$')])]",
            "name",
        )
        .replace(" | ", " or ")
    )


def _nested(tp: object) -> tuple[str, type[BaseModel]] | None:
    """(suffix, model) when a field holds a settings model, a list of them, or a map of them."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "", tp
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list and args and isinstance(args[0], type) and issubclass(args[0], BaseModel):
        return "[]", args[0]
    if (
        origin is dict
        and len(args) == 2
        and isinstance(args[1], type)
        and issubclass(args[1], BaseModel)
    ):
        return ".<name>", args[1]
    return None


def _sections(
    model: type[BaseModel], prefix: str, out: list[str], seen: dict[type, str] | None = None
) -> None:
    seen = {} if seen is None else seen
    if prefix and model in seen:
        out.append(
            f"\n## `{prefix}`\n\nThe same keys as [`{seen[model]}`](#{_anchor(seen[model])})."
        )
        return
    if prefix:
        seen[model] = prefix
    rows, children = [], []
    for name, field in model.model_fields.items():
        path = f"{prefix}.{name}" if prefix else name
        nested = _nested(field.annotation)
        if field.default is not PydanticUndefined:
            default = f"`{field.default!r}`" if field.default is not None else "none"
        elif field.default_factory is not None:
            default = "(see below)" if nested else "`{}`"
        else:
            default = "**required**"
        kind = "section" if nested and nested[0] == "" else _type_name(field.annotation)
        rows.append(f"| `{path}` | {kind} | {default} | {field.description or ''} |")
        if nested:
            children.append((path + nested[0], nested[1]))
    if prefix:
        out.append(f"\n## `{prefix}`\n")
    out.append("| key | type | default | meaning |\n|---|---|---|---|")
    out.extend(rows)
    for path, child in children:
        _sections(child, path, out, seen)


def _anchor(path: str) -> str:
    return "".join(c for c in path.lower() if c.isalnum() or c in "-_")


def render_config_reference() -> str:
    out = [HEADER]
    _sections(Settings, "", out)
    return "\n".join(out) + "\n"
