"""Logging through the standard dictConfig that uvicorn takes: text or JSON lines.

The service logs one line per request (`service.requests`, written by the request guard) with the
request id, method, route template, status, latency and bundle id; never image bytes, file names,
metadata values, query strings or keys, and the client address only when asked. uvicorn's own
access log (client address, full path with query string) is switched off.

One event is one line, whatever it carries: both formats escape control characters and lone
surrogates (a value with a newline cannot start a forged line of its own), and an exception is
logged as its type and the places it was raised at, never as a traceback with its message (which
may quote request data).
"""

from __future__ import annotations

import json
import logging
import re
import traceback
from types import TracebackType
from typing import Any

from service.api.settings import Settings

RECORD_FIELDS = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}
UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%dT%H:%M:%S%z"


def printable(text: str, limit: int | None = None) -> str:
    """`text` with control characters, line separators and lone surrogates written as escapes
    (\\n, \\x1b, \\ud800), cut to `limit` characters: safe in a log line and in UTF-8 JSON."""
    out = UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape", "backslashreplace").decode("ascii"), text)
    return out if limit is None or len(out) <= limit else out[: limit - 1] + "…"


ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]


def exception_summary(exc: BaseException | ExcInfo) -> str:
    """An exception as one line: its type and the innermost frames it passed (file:line in function)."""
    error = exc[1] if isinstance(exc, tuple) else exc
    if error is None:
        return "no exception"
    frames = traceback.extract_tb(error.__traceback__)[-4:]
    where = " < ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno} in {f.name}" for f in reversed(frames))
    return f"{type(error).__name__} at {where or 'unknown'} (message not logged)"


class TextLines(logging.Formatter):
    """`time level logger: message`, escaped onto one line; exceptions as `exception_summary`."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT, DATE_FORMAT)

    def formatException(self, ei: Any) -> str:
        return exception_summary(ei)

    def format(self, record: logging.LogRecord) -> str:
        record.exc_text = None  # never a traceback cached by another formatter
        return printable(super().format(record))


class JsonLines(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self.formatTime(record, DATE_FORMAT),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update({k: v for k, v in record.__dict__.items() if k not in RECORD_FIELDS})
        if record.exc_info:
            out["exception"] = exception_summary(record.exc_info)
        return json.dumps(out, default=str)  # ASCII: every control character and surrogate escaped


def log_config(settings: Settings) -> dict:
    formatter = {"()": JsonLines if settings.log_json else TextLines}
    level = settings.log_level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stderr"}
        },
        "loggers": {
            "service": {"handlers": ["stderr"], "level": level, "propagate": False},
            "uvicorn": {"handlers": ["stderr"], "level": level, "propagate": False},
            "uvicorn.error": {"level": level},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
        },
        # libraries' own warnings (python-multipart's about a malformed body, ...) in the same format
        "root": {"handlers": ["stderr"], "level": "WARNING"},
    }
