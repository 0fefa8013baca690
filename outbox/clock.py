"""Time in the outbox: naive UTC datetimes everywhere (SQLite and PostgreSQL agree on them)."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    """The current time as a naive UTC datetime, the form every timestamp column holds."""
    return datetime.now(UTC).replace(tzinfo=None)


def iso(moment: datetime | None) -> str | None:
    """Render a stored timestamp for people and JSON: ``2026-11-21T10:00:00.123Z``."""
    if moment is None:
        return None
    return moment.isoformat(timespec="milliseconds") + "Z"
