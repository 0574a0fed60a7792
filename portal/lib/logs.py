"""Logging: plain text or one JSON line per event, with secrets redacted on every handler.

Contract:
- ``logging_config(log_format, level)`` is settings.LOGGING: a ``console`` handler (stderr) in
  the ``text`` or ``json`` format, and Django's ``mail_admins`` handler (errors mailed to
  ADMINS when DEBUG is False). Every handler carries ``RedactFilter``. It also takes over the
  ``django`` and ``uvicorn`` loggers, whose own handlers (Django's console and mail handlers,
  uvicorn's console, set before the app loads) would write records unredacted.
- ``RedactFilter`` rewrites a record before any formatter sees it: the message with its args
  merged in, string extras (also inside dicts, lists and tuples), the exception's traceback
  (rendered to ``exc_text``, which every ``logging.Formatter`` prints instead of rendering
  ``exc_info`` again) and the stack, each through ``portal.lib.redact.redact``. ``exc_info``
  stays for handlers that render their own report, and the mail handler redacts what it sends.
  Extras that are objects (say a request) are left as they are: a formatter that prints them
  must redact what it prints, as ``JsonFormatter`` does.
- ``JsonFormatter`` writes ``{"time": "...Z" (UTC, ms), "level", "logger", "message", extras...,
  "exc_info": traceback text, "stack_info"}`` on one line; values JSON cannot hold are written
  as their redacted ``str()``.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from django.utils.log import AdminEmailHandler

from portal.lib.redact import redact

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# A LogRecord's own attributes: anything else on a record came as ``extra``.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}
_NOT_WRITTEN = frozenset({"color_message"})  # uvicorn's copy of the message with ANSI colours
_DONE = "_hermit_redacted"
_traceback_formatter = logging.Formatter()


def logging_config(log_format: str, level: str) -> dict[str, Any]:
    """Return the dictConfig for ``log_format`` ("text" or "json") at root level ``level``."""
    if log_format not in FORMATS:
        raise ValueError(f"LOG_FORMAT must be one of {', '.join(FORMATS)}, not {log_format!r}")
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {
            "redact": {"()": "portal.lib.logs.RedactFilter"},
            "require_debug_false": {"()": "django.utils.log.RequireDebugFalse"},
        },
        "formatters": {
            "text": {"format": TEXT_FORMAT},
            "json": {"()": "portal.lib.logs.JsonFormatter"},
        },
        "handlers": {
            "console": {
                "class": "logging.StreamHandler",
                "formatter": log_format,
                "filters": ["redact"],
            },
            "mail_admins": {
                "class": "portal.lib.logs.RedactingAdminEmailHandler",
                "level": "ERROR",
                "filters": ["require_debug_false", "redact"],
            },
        },
        "root": {"handlers": ["console"], "level": level},
        "loggers": {
            # Replacing Django's defaults: its records reach the console through the root.
            "django": {"handlers": ["mail_admins"], "level": "INFO"},
            "django.server": {"handlers": [], "level": "INFO"},
            # uvicorn (the AI gateway) puts handlers of its own on these before the app loads.
            # Its access log stays off, as bin/run asks (--no-access-log): each model call is
            # a usage record already.
            "uvicorn": {"handlers": [], "level": "INFO", "propagate": True},
            "uvicorn.error": {"handlers": [], "propagate": True},
            "uvicorn.access": {"handlers": [], "propagate": False},
            "httpx": {"level": "WARNING"},
            "httpcore": {"level": "WARNING"},
        },
    }


def _redacted(value: Any) -> Any:
    """Return value with its strings redacted (through dicts, lists and tuples)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_redacted(v) for v in value)
    return value


class RedactFilter(logging.Filter):
    """Redact secrets from a record's message, extras, traceback and stack (see module doc)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, _DONE, False):  # a second handler of the same record
            return True
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # args that do not fit: keep both, as text
            message = f"{record.msg} {record.args!r}"
        record.msg, record.args = redact(message), ()
        for key, value in list(vars(record).items()):
            if key not in _RECORD_FIELDS:
                setattr(record, key, _redacted(value))
        if record.exc_info and record.exc_info[0] is not None:
            record.exc_text = _traceback_formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        setattr(record, _DONE, True)
        return True


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    return redact(str(value))


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (see module doc)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key in _RECORD_FIELDS or key in _NOT_WRITTEN or key.startswith("_"):
                continue
            if key not in entry:
                entry[key] = _jsonable(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False)


class RedactingAdminEmailHandler(AdminEmailHandler):
    """Django's error mail, with secrets redacted from its subject and bodies: the report it
    renders from ``exc_info`` holds the exception's message and the request's headers."""

    def send_mail(self, subject: Any, message: Any, *args: Any, **kwargs: Any) -> None:
        html = kwargs.get("html_message")
        if html:
            kwargs["html_message"] = redact(str(html))
        super().send_mail(redact(str(subject)), redact(str(message)), *args, **kwargs)
