"""Logging for every outbox process: one line per event, sanitised, with bound context.

``configure()`` is called once per process (the CLI, and Celery workers through the
``setup_logging`` signal, which stops Celery from configuring logging itself). It installs
one handler on the root logger that:

* masks credentials, card numbers and personal data and strips CR/LF
  (``integrations.sanitize.SanitizingFilter``);
* adds the context bound with ``bound(provider=..., message_id=..., attempt=...,
  correlation_id=...)`` — per thread and task, through a context variable — to every
  record: ``record.outbox`` (a dict) and ``record.context`` (`` provider=payments …``);
* writes text (default) or, with ``OUTBOX_LOG_FORMAT=json``, one JSON object per line
  for log shippers (python-json-logger), the context fields at the top level.

The context is added by a filter on our handler, not by the log format, so a process
that loads ``celeryconfig`` without this module (a benchmark's own Celery app) still logs.
Celery's per-task chatter ("Received task", "succeeded in", "retry:") is turned down to
WARNING: the delivery task logs each outcome itself, once.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from pythonjsonlogger.json import JsonFormatter

from integrations.sanitize import SanitizingFilter, sanitize

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s%(context)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s"
# Celery's own per-task lines, each repeated by the outcome line the delivery task writes.
QUIET = {"celery.app.trace": logging.WARNING, "celery.worker.strategy": logging.WARNING,
         "alembic": logging.WARNING}

_context: ContextVar[tuple[tuple[str, str], ...]] = ContextVar("outbox_log_context", default=())


@contextmanager
def bound(**fields: object) -> Iterator[None]:
    """Bind ``fields`` (None values skipped; values sanitised, at most 255 characters) to
    every record logged in this thread or task within the ``with`` block."""
    clean = tuple((k, sanitize(str(v), max_length=255)) for k, v in fields.items() if v is not None)
    token = _context.set(_context.get() + clean)
    try:
        yield
    finally:
        _context.reset(token)


def current() -> dict[str, str]:
    """The fields bound in this thread or task right now."""
    return dict(_context.get())


def _clean(value):
    """``value`` with every string in it sanitised (containers kept, anything else as text)."""
    if isinstance(value, str):
        return sanitize(value, None)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return sanitize(repr(value), None)


class ContextFilter(logging.Filter):
    """Puts the bound context on each record: ``record.outbox`` and ``record.context``."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = _context.get()
        record.outbox = dict(fields)
        record.context = "".join(f" {k}={v}" for k, v in fields)
        return True


class _Json(JsonFormatter):
    """python-json-logger's formatter, with the bound context as top-level fields, and every
    other field sanitised too: a library's ``extra`` (Celery adds the exception and its
    traceback to failures) would otherwise reach the line as it is."""

    def add_fields(self, log_record, record, message_dict) -> None:
        super().add_fields(log_record, record, message_dict)
        log_record.pop("context", None)
        log_record.update(log_record.pop("outbox", None) or {})
        for key, value in list(log_record.items()):
            if key not in ("time", "level", "logger", "message"):
                log_record[key] = _clean(value)

    def formatException(self, ei) -> str:
        # This formatter renders tracebacks itself (not from the sanitised record.exc_text).
        return "\n".join(sanitize(line, None) for line in super().formatException(ei).splitlines())


def configure(level: str | int | None = None, fmt: str | None = None, stream=None) -> logging.Handler:
    """Install the process's log handler on the root logger (replacing any other).

    Args:
        level: root level; default ``OUTBOX_LOG_LEVEL`` or INFO.
        fmt: ``text`` or ``json``; default ``OUTBOX_LOG_FORMAT`` or text.
        stream: default stderr.

    Returns:
        The handler (tests capture from it).

    Raises:
        ValueError: an unknown format or level (the message names the variable).
    """
    fmt = (fmt or os.environ.get("OUTBOX_LOG_FORMAT") or "text").strip().lower()
    if fmt not in ("text", "json"):
        raise ValueError(f"OUTBOX_LOG_FORMAT must be text or json, got {fmt!r}")
    level = level or os.environ.get("OUTBOX_LOG_LEVEL") or "INFO"
    if isinstance(level, str) and not isinstance(logging.getLevelName(level.upper()), int):
        raise ValueError(f"OUTBOX_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {level!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(SanitizingFilter())
    handler.addFilter(ContextFilter())
    handler.setFormatter(_Json(JSON_FIELDS, rename_fields={"levelname": "level",
                                                           "name": "logger",
                                                           "asctime": "time"})
                         if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    for name, quiet in QUIET.items():
        logging.getLogger(name).setLevel(quiet)
    return handler
