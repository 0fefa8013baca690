"""Parse the ``Retry-After`` header: delay-seconds or an HTTP date (RFC 9110 §10.2.3)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

DEFAULT_MAX_S = 86_400.0
_SECONDS = re.compile(r"^\d+(?:\.\d+)?$")


def parse_retry_after(value: str | None, now: datetime | None = None,
                      max_s: float = DEFAULT_MAX_S) -> float | None:
    """Return how many seconds ``Retry-After: value`` asks us to wait.

    Args:
        value: the header value (``"2"``, ``"1.5"`` or ``"Wed, 21 Oct 2015 07:28:00 GMT"``).
        now: the current time for dates (default: now, UTC); naive means UTC.
        max_s: clamp the result to this many seconds (default one day), so a bogus
            header cannot park a message for years.

    Returns:
        Seconds >= 0 (a date in the past gives 0), or None when the header is absent
        or unparseable. Never raises.
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if _SECONDS.match(value):
        return min(float(value), max_s)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:
        return None
    now = now or datetime.now(UTC)
    when = when if when.tzinfo else when.replace(tzinfo=UTC)
    now = now if now.tzinfo else now.replace(tzinfo=UTC)
    return min(max((when - now).total_seconds(), 0.0), max_s)
