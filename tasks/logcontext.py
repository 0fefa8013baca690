"""Bound log context: every line logged while a delivery runs carries its identity.

``bound(provider=..., message_id=..., attempt=..., correlation_id=...)`` sets fields in a
context variable (per thread, so the threads pool is safe); a log-record factory puts
them on every record as one dict, ``record.outbox`` (for structured handlers and tests),
and as one ``outbox_context`` string that the worker's log format prints. They live under
one namespaced attribute because ``logging`` raises if a call's ``extra`` names an
attribute the record already has (the HTTP client logs ``extra={"provider": ...}``). Values are sanitised:
a correlation id comes from the caller's request and must not inject lines into logs.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from contextvars import ContextVar

from integrations.sanitize import sanitize

_fields: ContextVar[tuple[tuple[str, str], ...]] = ContextVar("outbox_log_context", default=())
_base_factory = logging.getLogRecordFactory()


@contextmanager
def bound(**fields):
    """Bind ``fields`` (None values are skipped) to log records for the ``with`` block."""
    clean = tuple((k, sanitize(str(v), max_length=255)) for k, v in fields.items() if v is not None)
    token = _fields.set(_fields.get() + clean)
    try:
        yield
    finally:
        _fields.reset(token)


def _record_factory(*args, **kwargs) -> logging.LogRecord:
    record = _base_factory(*args, **kwargs)
    fields = _fields.get()
    record.outbox = dict(fields)
    record.outbox_context = " ".join(f"{k}={v}" for k, v in fields)
    return record


def install() -> None:
    """Make every log record of this process carry the bound context (idempotent)."""
    if logging.getLogRecordFactory() is not _record_factory:
        logging.setLogRecordFactory(_record_factory)
