"""Settings, declared once: the strict base every section shares, and the section registry.

Each capability declares its own part of the YAML file in its `settings.py` and registers it
with `section()`: name, type, help text, environment overrides and the cross-references it
checks. `bastion.config` assembles the one settings tree from the registered sections (for
validation), and `bastion config docs` renders `docs/config.md` from the same declarations.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

NAME = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


#: Marks a field whose value is a secret (`Field(..., json_schema_extra=SECRET)`): never shown
#: by `bastion config show`, and flagged in the config reference. A URL keeps all but its
#: password.
SECRET: dict[str, Any] = {"secret": True}


def is_secret(field: Any) -> bool:
    extra = getattr(field, "json_schema_extra", None)
    return isinstance(extra, dict) and extra.get("secret") is True


#: The largest count and amount a limit may hold: counters are 64-bit integers (budgets in
#: millionths of the currency), so anything larger could be stored but never counted.
MAX_COUNT = 10**12
MAX_AMOUNT = 10**9
CURRENCY = r"^[A-Z]{3}$"


class LimitSettings(Strict):
    """Limits at one level (key, user, team, cost center, model, team x model); unset = none."""

    rpm: int | None = Field(None, ge=0, le=MAX_COUNT, description="Requests per minute.")
    tpm: int | None = Field(
        None,
        ge=0,
        le=MAX_COUNT,
        description="Tokens per minute (prompt + completion; reserved up front).",
    )
    concurrent: int | None = Field(
        None, ge=0, le=MAX_COUNT, description="Requests in flight at once."
    )
    budget_day: Decimal | None = Field(
        None,
        ge=0,
        le=MAX_AMOUNT,
        decimal_places=6,
        allow_inf_nan=False,
        description="Spend per UTC day, in `currency` (exact decimal, to the millionth).",
    )
    budget_month: Decimal | None = Field(
        None,
        ge=0,
        le=MAX_AMOUNT,
        decimal_places=6,
        allow_inf_nan=False,
        description="Spend per UTC calendar month, in `currency`.",
    )
    currency: str | None = Field(
        None,
        pattern=CURRENCY,
        description="ISO 4217 code the budgets are kept in (default: `metering.currency`); "
        "only amounts in this currency count against them.",
    )

    def is_empty(self) -> bool:
        """No limit set (a currency alone limits nothing)."""
        return all(v is None for k, v in self.model_dump().items() if k != "currency")

    def has_budget(self) -> bool:
        return self.budget_day is not None or self.budget_month is not None

    def tightened(self, other: LimitSettings | None) -> LimitSettings:
        """These limits with `other`'s where they are stricter: each the smaller of the two.
        Budgets are compared only in one currency (ValueError otherwise)."""
        if other is None:
            return self
        if self.has_budget() and other.has_budget() and self.currency != other.currency:
            raise ValueError(
                f"budgets in {other.currency or 'the default currency'} cannot tighten budgets "
                f"in {self.currency or 'the default currency'}: use the same currency"
            )
        merged: dict[str, Any] = {
            name: min((v for v in (getattr(self, name), getattr(other, name)) if v is not None),
                      default=None)
            for name in type(self).model_fields
            if name != "currency"
        }  # fmt: skip
        merged["currency"] = other.currency if other.has_budget() else self.currency
        return type(self).model_validate(merged)


#: Cross-reference check of a section: given the whole settings tree, one message per problem.
Check = Callable[[Any], list[str]]


@dataclass(frozen=True)
class Section:
    name: str
    #: The type of the section's value: a settings model, or a map or list of them.
    annotation: Any
    description: str
    default_factory: Callable[[], Any]
    #: Environment variables that override a key of the file: {"key": "BASTION_ADMIN_KEY"}.
    env: dict[str, str] = field(default_factory=dict)
    check: Check | None = None
    #: The module that declared it.
    module: str = ""


_SECTIONS: dict[str, Section] = {}


def section(
    name: str,
    annotation: Any,
    description: str,
    *,
    default_factory: Callable[[], Any] | None = None,
    env: dict[str, str] | None = None,
    check: Check | None = None,
) -> None:
    """Declares the top-level key `name` of the config file (once; its module owns it)."""
    if name in _SECTIONS:
        raise ValueError(f"settings section {name!r} is declared twice")
    if default_factory is None:
        default_factory = annotation
    module = sys._getframe(1).f_globals.get("__name__", "")
    _SECTIONS[name] = Section(
        name, annotation, description, default_factory, env or {}, check, module
    )


def sections() -> list[Section]:
    """Every registered section, in registration order."""
    return list(_SECTIONS.values())
