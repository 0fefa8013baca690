"""Retry policy: a small immutable value per provider.

Exponential backoff ``base * multiplier**(n-1)`` capped at ``max_delay``, plus
0–``jitter`` (fraction) of itself so that workers do not retry in lock-step, and
``Retry-After`` honoured when the provider gives one. The defaults (1 s doubling
to a 5 min cap, 25 attempts, 24 h max age) keep retrying for at least 83.5 minutes
before dead-lettering, so a one-hour provider outage loses nothing.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from datetime import datetime, timedelta


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry one provider's messages.

    Attributes:
        base_delay: delay before the second attempt.
        multiplier: growth factor per attempt (≥ 1).
        max_delay: cap on one delay (before jitter).
        jitter: extra random delay as a fraction of the delay, 0 ≤ jitter ≤ 1 (0.25 = up to +25 %).
        max_attempts: attempts consumed before dead-lettering.
        max_age: dead-letter once the budget started longer ago than this.
        free_rate_limited: 429s that do not consume an attempt; beyond this they do.
        defer_delay: wait used for a deferral that names no time.
    """

    base_delay: timedelta = timedelta(seconds=1)
    multiplier: float = 2.0
    max_delay: timedelta = timedelta(minutes=5)
    jitter: float = 0.25
    max_attempts: int = 25
    max_age: timedelta = timedelta(hours=24)
    free_rate_limited: int = 50
    defer_delay: timedelta = timedelta(seconds=1)

    def __post_init__(self):
        if self.base_delay <= timedelta(0) or self.max_delay < self.base_delay:
            raise ValueError("retry policy: need 0 < base_delay <= max_delay")
        if self.multiplier < 1:
            raise ValueError("retry policy: multiplier must be >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("retry policy: jitter must be within 0..1")
        if self.max_attempts < 1:
            raise ValueError("retry policy: max_attempts must be >= 1")
        if self.max_age <= timedelta(0):
            raise ValueError("retry policy: max_age must be positive")

    def backoff(self, attempts: int, rng: random.Random | None = None) -> timedelta:
        """Delay after the ``attempts``-th failed attempt (1-based), jitter included."""
        exponent = max(attempts - 1, 0)
        raw_s = self.base_delay.total_seconds() * self.multiplier ** min(exponent, 64)
        delay_s = min(raw_s, self.max_delay.total_seconds())
        spread = (rng or random).uniform(0, self.jitter)
        return timedelta(seconds=delay_s * (1 + spread))

    def next_attempt_at(self, now: datetime, attempts: int, retry_after_s: float | None = None,
                        rng: random.Random | None = None) -> datetime:
        """When to try again: ``Retry-After`` if the provider said, else the backoff."""
        if retry_after_s is not None:
            return now + timedelta(seconds=max(retry_after_s, 0.0))
        return now + self.backoff(attempts, rng)

    def exhausted(self, attempts: int, budget_started_at: datetime, now: datetime) -> str | None:
        """Return why the budget is spent ("attempts exhausted"/"max age passed"), or None."""
        if attempts >= self.max_attempts:
            return f"attempts exhausted ({attempts}/{self.max_attempts})"
        if now - budget_started_at >= self.max_age:
            return f"max age passed ({self.max_age})"
        return None

    def patience(self) -> timedelta:
        """Shortest total wait across all attempts (no jitter): how long an outage it survives."""
        no_jitter = replace(self, jitter=0.0)
        total = sum((no_jitter.backoff(n) for n in range(1, self.max_attempts)), timedelta(0))
        return min(total, self.max_age)
