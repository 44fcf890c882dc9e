"""Process logs: plain text for a terminal, or one JSON object per line for a log shipper.

Every line written while a request is served carries its request id (and its team and model
once known): the pipeline binds the request's usage record to a context variable at the start,
and the formatter reads it when a line is written, so it is always the record's current state.
Nothing reads the request body: prompts never reach a log line from here.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from bastion.observability.settings import LoggingSettings


class RequestFacts(Protocol):
    """What a log line may say about the request being served (a usage record has these)."""

    request_id: str
    team: str | None
    model: str | None
    key_id: str | None


#: The request being served in this task (each ASGI request runs in a task of its own, so
#: binding here never leaks into another request).
current_request: ContextVar[RequestFacts | None] = ContextVar("bastion_request", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: LogRecord's own attributes: anything else on a record came from `extra=` and is written.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}


def bind_request(facts: RequestFacts) -> None:
    current_request.set(facts)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, request fields, extras, and the
    exception's traceback as one string."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        facts = current_request.get()
        if facts is not None:
            out["request_id"] = facts.request_id
            for name in ("team", "model", "key_id"):
                if (value := getattr(facts, name, None)) is not None:
                    out[name] = value
        if record.name == "uvicorn.access" and isinstance(record.args, tuple):
            out.update(_access_fields(record.args))
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in out:
                out[key] = value if isinstance(value, str | int | float | bool) else repr(value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.stack_info:
            out["stack"] = record.stack_info
        return json.dumps(out, ensure_ascii=False, default=str)


def _access_fields(args: tuple[Any, ...]) -> dict[str, Any]:
    """uvicorn's access line args: (client, method, path, http version, status)."""
    if len(args) != 5:
        return {}
    client, method, path, _version, status = args
    return {"client": client, "method": method, "path": path, "status": status}


#: The format, for processes this one starts (the audit shipper), which log to the same stream.
FORMAT_ENV = "BASTION_LOG_FORMAT"


def configure_logging(
    settings: LoggingSettings, stream: Any = None, *, children: bool = True
) -> None:
    """Replaces the root logger's handlers with one in the configured format; uvicorn's
    loggers (started with `log_config=None`) write through it too, and so do the processes
    started from here on (`children`: through the environment they inherit)."""
    if children:
        os.environ[FORMAT_ENV] = settings.format
    handler = logging.StreamHandler(stream or sys.stderr)
    fmt = JsonFormatter() if settings.format == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(fmt)
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


def configure_child_logging() -> None:
    """In a process the gateway started: the gateway's format, warnings and worse."""
    from bastion.observability.settings import LoggingSettings

    fmt = "json" if os.environ.get(FORMAT_ENV) == "json" else "text"
    configure_logging(LoggingSettings(format=fmt, level="WARNING"), children=False)
