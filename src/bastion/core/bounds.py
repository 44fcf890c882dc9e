"""Input types of the HTTP APIs, bounded to what the store and the counters can hold.

A value that validates here can be stored and read back: PostgreSQL refuses NUL characters and
lone surrogates in text and every column has a length, so a string the API accepted but the
database refused would be a 500, or half a change. The bounds are declared in the OpenAPI
document too, so what a client may send is what the schema says.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated, Any, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    WithJsonSchema,
    model_validator,
)

from bastion.core.settings import MAX_AMOUNT, NAME, LimitSettings


class Body(BaseModel):
    """A request body: JSON types as declared (no `false` read as 0, no "5" as 5), so what the
    schema rejects the API rejects too."""

    model_config = ConfigDict(strict=True)


class LimitsIn(LimitSettings):
    """Limits as a request body sets them: the config file's `LimitSettings`, typed as JSON.

    A count is a JSON integer (5.0 is one to JSON Schema: taken as 5; `true` and `"5"` are
    not). An amount is an integer or a decimal string (`"1.25"`): a fractional JSON number is a
    binary float, which money is never read from (`0.1 + 0.2` is not 0.3)."""

    model_config = ConfigDict(json_schema_extra=lambda schema, _cls: _amounts_as_documented(schema))

    @model_validator(mode="before")
    @classmethod
    def _as_json(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return {k: _json_value(k, v) for k, v in data.items()}


def _json_value(name: str, value: Any) -> Any:
    if value is None or (name not in _COUNTS and name not in _AMOUNTS):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if name in _COUNTS and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{name} must be an integer")
    if name in _AMOUNTS and isinstance(value, float):
        raise ValueError(f'{name}: write a fractional amount as a decimal string, e.g. "1.25"')
    if name in _AMOUNTS and isinstance(value, str) and not re.match(AMOUNT, value):
        raise ValueError(f'{name}: an amount like "1.25" (at most 10^9, 6 decimals)')
    return value


#: An amount as a string: at most 10⁹, at most 6 decimals (what `LimitSettings` accepts).
AMOUNT = r"^([0-9]{1,9}(\.[0-9]{1,6})?|1000000000(\.0{1,6})?)$"


def _amounts_as_documented(schema: dict[str, Any]) -> None:
    for name in _AMOUNTS:
        prop = schema["properties"][name]
        prop.pop("anyOf", None)
        prop["anyOf"] = [
            {"type": "integer", "minimum": 0, "maximum": MAX_AMOUNT},
            {"type": "string", "pattern": AMOUNT},
            {"type": "null"},
        ]


_COUNTS = frozenset(
    name for name, f in LimitSettings.model_fields.items() if int in get_args(f.annotation)
)
_AMOUNTS = frozenset(
    name for name, f in LimitSettings.model_fields.items() if Decimal in get_args(f.annotation)
)


#: One line of text: no control characters (NUL above all: PostgreSQL cannot store it).
LINE = r"^[^\x00-\x1f\x7f]*$"
#: A lifetime or a span back from now, as `parse_duration` reads it, within what a timestamp
#: can hold (5 digits: 99999 weeks is still a date).
DURATION = r"^[1-9][0-9]{0,4}[smhdw]$"


def _encodable(value: str) -> str:
    """Lone surrogates decode from JSON (`"\\ud800"`) but cannot be written as UTF-8."""
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text") from None
    return value


def Line(max_length: int, min_length: int = 0) -> Any:
    """A single-line string of at most `max_length` characters (the column's size)."""
    return Annotated[
        str,
        StringConstraints(min_length=min_length, max_length=max_length, pattern=LINE),
        AfterValidator(_encodable),
    ]


def Text(max_length: int, min_length: int = 0) -> Any:
    """Free text (newlines allowed), without NUL, of at most `max_length` characters."""
    return Annotated[
        str,
        StringConstraints(min_length=min_length, max_length=max_length, pattern=r"^[^\x00]*$"),
        AfterValidator(_encodable),
    ]


#: A team, cost center or model name (the names config and the store use, 128 characters).
Name = Annotated[str, Field(pattern=NAME, max_length=128)]
#: A user name as directories and the usage records hold it.
UserName = Line(256, min_length=1)
#: A label: a key's or a cost center's display name.
Label = Line(256)
#: A list of model aliases (a team's or a key's): bounded so a body cannot grow a JSON column
#: without end.
ModelList = Annotated[list[Name], Field(max_length=256)]
#: A lifetime (`30d`, `12h`).
Duration = Annotated[str, Field(pattern=DURATION, description="e.g. 30d, 12h, 90m, 2w.")]


def _time_spec(value: str) -> str:
    """The forms the schema documents, no others: a span of at most 5 digits, or ISO 8601."""
    from bastion.core.timeutil import parse_time

    if value[-1:] in "smhdw" and value[:-1].isdigit() and not re.match(DURATION, value):
        raise ValueError(f"not a span: {value!r} (at most 5 digits, e.g. 7d, 12h)")
    parse_time(value)  # ValueError names what is wrong: a 400
    return value


#: A point in time: a span back from now (`7d`) or an ISO 8601 / RFC 3339 date or date-time.
TimeSpec = Annotated[
    str,
    Field(max_length=64),
    AfterValidator(_time_spec),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": DURATION},
                {"type": "string", "format": "date"},
                {"type": "string", "format": "date-time"},
            ],
            "description": "e.g. 7d, 12h, 2026-11-01 or 2026-11-01T08:00:00Z.",
        }
    ),
]
