"""The guards around a provider call: one small hook per concern, run in a fixed order.

A guard's ``acquire`` may sleep (within the time budget it is given) and raises
``Deferred`` when the call must wait longer; ``release`` is told how the call went.
``attempted=False`` means the call was never made (a later guard deferred it): each
guard then undoes what it took (the quota is refunded, the permit returned).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from integrations.protection.breaker import CircuitBreaker, Outcome
from integrations.protection.limiter import RateLimiter
from integrations.protection.quota import DailyQuota
from integrations.protection.semaphore import Semaphore

Sleep = Callable[[float], None]


class Guard(Protocol):
    """One protection concern around a provider call."""

    name: str

    def acquire(self, operation: str, budget_s: float) -> Any:
        """Let the call proceed (sleeping at most ``budget_s``); return a ticket for
        ``release``. Raises ``Deferred`` (call later) or ``redis.RedisError``."""

    def release(self, ticket: Any, outcome: Outcome, attempted: bool) -> None:
        """Account for the finished (or never made) call. Raises ``redis.RedisError``."""


class QuotaGuard:
    """Uses one request of the daily quota; refunds it if the call is never made."""

    name = "quota"

    def __init__(self, quota: DailyQuota):
        self.quota = quota

    def acquire(self, operation: str, budget_s: float) -> str:
        return self.quota.take()

    def release(self, ticket: str, outcome: Outcome, attempted: bool) -> None:
        if not attempted:
            self.quota.refund(ticket)


class BreakerGuard:
    """Refuses calls while the breaker is open; reports each call's health outcome."""

    name = "breaker"

    def __init__(self, breaker: CircuitBreaker):
        self.breaker = breaker

    def acquire(self, operation: str, budget_s: float):
        return self.breaker.admit()

    def release(self, ticket, outcome: Outcome, attempted: bool) -> None:
        self.breaker.record(ticket, outcome if attempted else Outcome.NEUTRAL)


class ConcurrencyGuard:
    """Holds one of the provider's global permits for the duration of the call."""

    name = "concurrency"

    def __init__(self, semaphore: Semaphore, sleep: Sleep,
                 monotonic: Callable[[], float] = time.monotonic):
        self.semaphore = semaphore
        self.sleep = sleep
        self.monotonic = monotonic

    def acquire(self, operation: str, budget_s: float) -> str:
        return self.semaphore.acquire(budget_s, self.sleep, self.monotonic)

    def release(self, ticket: str, outcome: Outcome, attempted: bool) -> None:
        self.semaphore.release(ticket)


class RateGuard:
    """Sleeps until the call's reserved slot (pause and rate limits); nothing to release."""

    name = "rate"

    def __init__(self, limiter: RateLimiter, sleep: Sleep):
        self.limiter = limiter
        self.sleep = sleep

    def acquire(self, operation: str, budget_s: float) -> float:
        return self.limiter.wait_for_slot(operation, budget_s, self.sleep)

    def release(self, ticket: float, outcome: Outcome, attempted: bool) -> None:
        return None
