"""The guards around a provider call: one small hook per concern, run in a fixed order.

A guard's ``acquire`` may sleep (within the time budget it is given) and raises
``Deferred`` when the call must wait longer. ``try_into(batch, …)`` queues a try that
never waits, so that several guards are asked in one Redis round trip; its result then
goes to ``acquire_tried``, which decides (and waits, if it must) as ``acquire`` would. ``release_into(batch, ticket, health,
attempted)`` queues in a ``Batch`` whatever the guard must give back or record, so that
the releases of all guards take one Redis round trip; ``attempted=False`` means the call
was never made (a later guard deferred it): each guard then undoes what it took (the quota
is refunded, the permit returned).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from integrations.protection.breaker import CallHealth, CircuitBreaker
from integrations.protection.limiter import RateLimiter, Reservation
from integrations.protection.quota import DailyQuota
from integrations.protection.semaphore import Semaphore
from integrations.protection.store import Batch

Sleep = Callable[[float], None]


class Guard(Protocol):
    """One protection concern around a provider call."""

    name: str

    def acquire(self, operation: str, budget_s: float) -> Any:
        """Let the call proceed (sleeping at most ``budget_s``); return a ticket for
        ``release_into``. Raises ``Deferred`` (call later) or ``redis.RedisError``."""

    def try_into(self, batch: Batch, operation: str, budget_s: float) -> bool:
        """Queue in ``batch`` a try at ``acquire`` that never waits; False (nothing queued)
        when this guard must be asked on its own."""

    def acquire_tried(self, result: Any, operation: str, budget_s: float) -> Any:
        """``acquire``, given the result of the command ``try_into`` queued (a
        ``redis.RedisError`` included): returns the ticket or raises as ``acquire`` does."""

    def release_into(self, batch: Batch, ticket: Any, health: CallHealth,
                     attempted: bool) -> None:
        """Queue in ``batch`` the accounting for the finished (or never made) call; queue
        nothing when there is nothing to give back."""


class QuotaGuard:
    """Uses one request of the daily quota; refunds it if the call is never made."""

    name = "quota"

    def __init__(self, quota: DailyQuota):
        self.quota = quota

    def acquire(self, operation: str, budget_s: float) -> str:
        return self.quota.take()

    def try_into(self, batch: Batch, operation: str, budget_s: float) -> bool:
        return False   # first and alone: nothing else is taken for a call the quota refuses

    def release_into(self, batch: Batch, ticket: str, health: CallHealth,
                     attempted: bool) -> None:
        if not attempted:
            self.quota.refund_into(batch, ticket)


class BreakerGuard:
    """Refuses calls while the breaker is open; reports each call's health."""

    name = "breaker"

    def __init__(self, breaker: CircuitBreaker):
        self.breaker = breaker

    def acquire(self, operation: str, budget_s: float):
        return self.breaker.admit()

    def try_into(self, batch: Batch, operation: str, budget_s: float) -> bool:
        self.breaker.admit_into(batch)
        return True

    def acquire_tried(self, result, operation: str, budget_s: float):
        if isinstance(result, BaseException):   # Deferred (open, or every probe taken)
            raise result
        return result

    def release_into(self, batch: Batch, ticket, health: CallHealth, attempted: bool) -> None:
        self.breaker.record_into(batch, ticket, health if attempted else CallHealth.NEUTRAL)


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

    def release_into(self, batch: Batch, ticket: str, health: CallHealth,
                     attempted: bool) -> None:
        self.semaphore.release_into(batch, ticket)

    def try_into(self, batch: Batch, operation: str, budget_s: float) -> bool:
        self.semaphore.try_acquire_into(batch)
        return True

    def acquire_tried(self, result: str | None | BaseException, operation: str,
                      budget_s: float) -> str:
        if isinstance(result, BaseException):
            raise result
        if result is None:   # no permit was free: wait for one
            return self.acquire(operation, budget_s)
        return result


class RateGuard:
    """Sleeps until the call's reserved slot (pause and rate limits); nothing to release."""

    name = "rate"

    def __init__(self, limiter: RateLimiter, sleep: Sleep):
        self.limiter = limiter
        self.sleep = sleep

    def acquire(self, operation: str, budget_s: float) -> float:
        return self.limiter.wait_for_slot(operation, budget_s, self.sleep)

    def try_into(self, batch: Batch, operation: str, budget_s: float) -> bool:
        """Only when no rate limit applies to ``operation``: the reservation then only reads
        the pause and takes no slot, so a call that is refused by a guard in the same round
        trip, or then waits for a permit, has wasted nothing."""
        if not self.limiter.reserves_nothing(operation):
            return False
        self.limiter.reserve_into(batch, operation, budget_s)
        return True

    def acquire_tried(self, result: Reservation | BaseException, operation: str,
                      budget_s: float) -> float:
        if isinstance(result, BaseException):
            raise result
        return self.limiter.wait_for_slot(operation, budget_s, self.sleep, result)

    def release_into(self, batch: Batch, ticket: float, health: CallHealth,
                     attempted: bool) -> None:
        return None   # a slot in time is spent whatever happens
