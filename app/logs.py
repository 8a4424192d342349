"""Logging set-up: readable text by default, one JSON object per line with LOG_FORMAT=json.

Every line written while a request is served carries its request id (`request_id`, the X-Request-ID the response
has): the middleware sets REQUEST_ID for the request, and a filter on the handler copies it onto each record.

Logged values come from clients too (a request's path): in both formats control characters (C0, DEL, C1) and the
Unicode line and paragraph separators are written as escapes (`\\x0a`), so no value can start a line of its own,
forge a record, or put a NUL or a terminal escape into the log.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

# Attributes every LogRecord has; anything else was passed with `extra=` and belongs in the JSON.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName", "color_message"}
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
# The id of the request being served. Each request runs in a task of its own (the server's), whose context ends
# with it: the id stays set until then, so the server's own lines about the request (a traceback) carry it too.
REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)


class RequestIdFilter(logging.Filter):
    """Puts the current request's id on each record (unless the record names one itself); none outside requests."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "request_id" not in record.__dict__:
            request_id = REQUEST_ID.get()
            if request_id is not None:
                record.request_id = request_id
        return True


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """The text with its unsafe characters escaped; the same object when it has none (one scan, no copy)."""
    return _UNSAFE.sub(_escape, text)


def _escape_lines(text: str) -> list[str]:
    """A traceback's own lines, each escaped: its line breaks are structure, anything else is data."""
    return [escape_controls(line) for line in text.split("\n")]


class TextFormatter(logging.Formatter):
    """One line per record whatever it holds; a traceback follows on lines indented under it."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        request_id = record.__dict__.get("request_id")
        return escape_controls(f"{line} request_id={request_id}" if request_id else line)

    def formatException(self, ei: Any) -> str:
        return "\n".join(f"    {line}" for line in _escape_lines(super().formatException(ei)))

    def formatStack(self, stack_info: str) -> str:
        return "\n".join(f"    {line}" for line in _escape_lines(stack_info))


def _json_default(value: Any) -> str:
    return escape_controls(str(value))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": escape_controls(record.getMessage()),
        }
        entry.update(
            (key, escape_controls(value) if isinstance(value, str) else value)
            for key, value in record.__dict__.items()
            if key not in _STANDARD
        )
        if record.exc_info:
            entry["exception"] = "\n".join(_escape_lines(self.formatException(record.exc_info)))
        return json.dumps(entry, default=_json_default)


def configure_logging(log_format: str, level: str) -> None:
    # Our formats use none of these, and collecting them (the caller's frame, thread, process) costs more
    # than the rest of a request's log line: skip them (the logging HOWTO's "Optimization").
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Our request log replaces the server's access log; the servers' own loggers go through ours.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "gunicorn.error"):
        server_logger = logging.getLogger(name)
        server_logger.handlers[:] = []
        server_logger.propagate = True
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
