"""Rate-limit specs: ``"50/s"``, ``"600/m"``, ``"1000/h"``, ``"10/d"`` as small immutable values."""

from __future__ import annotations

import re
from dataclasses import dataclass

PERIODS_S: dict[str, float] = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SPEC = re.compile(r"^\s*(?P<count>[+-]?\d+)\s*/\s*(?P<unit>[a-z]+)\s*$", re.IGNORECASE)
_FORM = "expected COUNT/UNIT with COUNT a whole number >= 1 and UNIT one of s, m, h, d (e.g. '50/s')"


@dataclass(frozen=True)
class RateSpec:
    """At most ``count`` requests per ``period_s`` seconds, evenly paced.

    Attributes:
        count: requests allowed per period, >= 1.
        period_s: the period in seconds (1, 60, 3600 or 86400 when parsed).
    """

    count: int
    period_s: float

    def __post_init__(self) -> None:
        if not isinstance(self.count, int) or isinstance(self.count, bool) or self.count < 1:
            raise ValueError(f"rate count must be an integer >= 1, got {self.count!r}")
        if not self.period_s > 0:
            raise ValueError(f"rate period must be > 0 seconds, got {self.period_s!r}")

    @property
    def interval_s(self) -> float:
        """Seconds between two requests at this rate (``period_s / count``)."""
        return self.period_s / self.count

    @classmethod
    def parse(cls, spec: str) -> RateSpec:
        """Parse ``"50/s"``, ``"600/m"``, ``"1000/h"`` or ``"10/d"``.

        Raises:
            ValueError: the message quotes ``spec`` and states the expected form, e.g.
                ``invalid rate limit 'fast': expected COUNT/UNIT ...``.
        """
        match = _SPEC.match(spec) if isinstance(spec, str) else None
        if match is None:
            raise ValueError(f"invalid rate limit {spec!r}: {_FORM}")
        count, unit = int(match["count"]), match["unit"].lower()
        if unit not in PERIODS_S:
            raise ValueError(f"invalid rate limit {spec!r}: unknown unit {unit!r}; {_FORM}")
        if count < 1:
            raise ValueError(f"invalid rate limit {spec!r}: count must be >= 1; {_FORM}")
        return cls(count, PERIODS_S[unit])

    def __str__(self) -> str:
        unit = next((u for u, p in PERIODS_S.items() if p == self.period_s), None)
        return f"{self.count}/{unit}" if unit else f"{self.count}/{self.period_s:g}s"
