"""Time in the outbox: naive UTC datetimes everywhere (SQLite and PostgreSQL agree on them)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta


def utcnow() -> datetime:
    """The current time as a naive UTC datetime, the form every timestamp column holds."""
    return datetime.now(UTC).replace(tzinfo=None)


def iso(moment: datetime | None) -> str | None:
    """Render a stored timestamp for people and JSON: ``2026-11-21T10:00:00.123Z``."""
    if moment is None:
        return None
    return moment.isoformat(timespec="milliseconds") + "Z"


def parse_since(text: str) -> datetime:
    """``30s``, ``30m``, ``2h``, ``7d`` (ago) or an ISO timestamp (UTC if no zone), as naive
    UTC. Raises ValueError with a message for people."""
    example = "use e.g. 30m, 2h, 7d or 2026-11-21T10:00:00Z"
    match = re.fullmatch(r"(\d{1,9})\s*([smhd])", text.strip())
    try:
        if match:
            unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[match[2]]
            return utcnow() - timedelta(**{unit: int(match[1])})
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        if moment.tzinfo is not None:
            moment = moment.astimezone(UTC).replace(tzinfo=None)
        return moment
    except (ValueError, OverflowError):
        raise ValueError(f"since {text[:40]!r}: {example}, within years 1-9999") from None
