"""Eval suites: a YAML file (suite-level defaults + `cases:`) or a JSONL file (one case a line).

The format is the pydantic models below; `bastion eval schema` prints their JSON Schema. A bad
suite is refused as a whole before any call is made, with the file, the case id (or line) and
the field in the message, so a 300-case suite is not half-run on a typo.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

#: Shipped example suites, addressable by bare name (`bastion eval run banking-faq`).
BUILTIN_DIR = Path(__file__).parent / "suites"


class SuiteError(ValueError):
    """A suite that cannot be run; the message names the file, the case and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScorerSpec(_Strict):
    """One scorer applied to a case: a registered name or `module:Class`, with parameters."""

    name: str
    #: Scorer parameters (e.g. `pattern` for regex, `rubric` for judge, `schema` for json_schema).
    params: dict[str, Any] = Field(default_factory=dict)
    #: Is this scorer's `passed` part of the case's pass/fail? (latency is measured, not judged)
    gate: bool = True


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # tool_calls, name, tool_call_id pass through
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[Any] | None = None


class CaseInput(_Strict):
    """Chat `messages`, or `prompt` (+ `suffix` for fill-in-the-middle) on /v1/completions."""

    messages: list[Message] | None = None
    prompt: str | None = None
    suffix: str | None = None
    #: OpenAI tool definitions offered to the model (tool-call cases).
    tools: list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> CaseInput:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of 'messages' or 'prompt'")
        if self.suffix is not None and self.prompt is None:
            raise ValueError("'suffix' needs 'prompt' (fill-in-the-middle)")
        return self

    @property
    def endpoint(self) -> str:
        return "chat" if self.messages is not None else "completions"


class Case(_Strict):
    id: str = Field(min_length=1, max_length=128)
    input: CaseInput
    #: What a right answer is: a string (exact/contains/similarity reference), an object
    #: (json/tool-call), a list of acceptable strings. Scorers read it; some need none.
    expected: Any = None
    tags: list[str] = Field(default_factory=list)
    #: None: the suite's default scorers.
    scorers: list[ScorerSpec] | None = None
    #: Request parameters for this case over the suite's (temperature, max_tokens, ...).
    params: dict[str, Any] = Field(default_factory=dict)


class Defaults(_Strict):
    scorers: list[ScorerSpec] = Field(default_factory=list)
    #: Request parameters for every case: temperature 0 and a small ceiling, so runs are cheap
    #: and as repeatable as the engine allows.
    params: dict[str, Any] = Field(default_factory=lambda: {"temperature": 0, "max_tokens": 128})
    #: A system message put before every chat case's messages (unless the case has its own).
    system: str | None = None


class Suite(_Strict):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    version: str = "1"
    defaults: Defaults = Field(default_factory=Defaults)
    cases: list[Case] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_ids(self) -> Suite:
        seen: set[str] = set()
        for c in self.cases:
            if c.id in seen:
                raise ValueError(f"case id {c.id!r} appears twice")
            seen.add(c.id)
        return self

    def scorers_for(self, case: Case) -> list[ScorerSpec]:
        return case.scorers if case.scorers is not None else self.defaults.scorers

    def params_for(self, case: Case) -> dict[str, Any]:
        return {**self.defaults.params, **case.params}

    def messages_for(self, case: Case) -> list[dict[str, Any]]:
        msgs = [m.model_dump(exclude_none=True) for m in case.input.messages or []]
        if self.defaults.system and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": self.defaults.system})
        return msgs


def resolve_path(ref: str) -> Path:
    """A path, or the name of a shipped suite (`banking-faq`)."""
    p = Path(ref)
    if p.exists():
        return p
    for ext in (".yaml", ".yml", ".jsonl"):
        q = BUILTIN_DIR / (ref + ext)
        if q.exists():
            return q
    raise SuiteError(f"{ref}: no such suite file (shipped suites: {', '.join(builtin_names())})")


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def _where(err: ValidationError, data: dict[str, Any]) -> str:
    """'case 'q3', field input.messages.0.role: ...' for the first error pydantic reports."""
    e = err.errors()[0]
    loc = list(e["loc"])
    where = ""
    if len(loc) >= 2 and loc[0] == "cases" and isinstance(loc[1], int):
        raw = (data.get("cases") or [])[loc[1]]
        cid = raw.get("id") if isinstance(raw, dict) else None
        where = f"case {cid!r}" if cid else f"case #{loc[1] + 1}"
        loc = loc[2:]
    field = ".".join(str(x) for x in loc)
    parts = [p for p in (where, f"field {field}" if field else "") if p]
    return (", ".join(parts) + ": " if parts else "") + e["msg"]


def load_suite(ref: str | Path) -> tuple[Suite, str]:
    """The suite and the SHA-256 of its bytes (stored with each run: which suite text ran)."""
    path = resolve_path(str(ref))
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    try:
        data = _jsonl(path, raw.decode()) if path.suffix == ".jsonl" else yaml.safe_load(raw)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise SuiteError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise SuiteError(f"{path}: a suite is a mapping with 'name' and 'cases'")
    try:
        return Suite.model_validate(data), digest
    except ValidationError as exc:
        raise SuiteError(f"{path}: {_where(exc, data)}") from None


def _jsonl(path: Path, text: str) -> dict[str, Any]:
    """JSONL: one case a line; an optional first line `{"suite": {...}}` holds name/defaults."""
    head: dict[str, Any] = {"name": path.stem.replace(" ", "-")}
    cases: list[Any] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SuiteError(f"{path}: line {n}: not JSON: {exc.msg}") from None
        if isinstance(obj, dict) and "suite" in obj and not cases:
            head.update(obj["suite"])
        else:
            cases.append(obj)
    return {**head, "cases": cases}


def suite_json_schema() -> dict[str, Any]:
    return Suite.model_json_schema()
