"""``Protection``: the ordered guards around every call to one provider.

Order: quota → breaker → concurrency → rate limit. Each step is cheaper to refuse, or
more scarce, than the next, and only the last one decides *when* the call starts:

1. **quota** first: when it is used up the message waits hours for midnight UTC; no
   other guard is consulted or held for it (one ``INCR``, refunded if a later guard defers).
2. **breaker** next: while open nothing else is kept; a half-open probe permit is
   scarce, so it is only taken by a call that the quota allows.
3. **concurrency** before the rate limit: the permit is held while sleeping for the
   slot, so the slot is never reserved by a call that then waits for a permit.
4. **rate limit** last: it reserves the exact moment of the call and the worker sleeps
   until it and calls at once. Anything between reservation and call would add jitter
   (N+1 requests in one window) or waste the slot if it then deferred.

One round trip for the usual call: the breaker, the permit and (when no rate limit applies
to the operation, so that nothing is reserved) the pause are asked together, in one Redis
pipeline (``Guard.try_into``), and their answers are then taken in the order above. A
permit taken in that round trip by a call the breaker refuses is given back at once with
the other releases (one more round trip, only while the breaker is open). The quota, when
there is one, is asked alone before them; a slot of a rate limit is reserved alone after
them, once the permit is held.

Redis down: a guard that cannot reach Redis raises ``Deferred`` (retry in
``REDIS_DOWN_RETRY_S``, logged): the message waits in the outbox without using an attempt.
The provider is never called unprotected — a fleet of workers bypassing a global limit
is exactly the 429 storm (or the duplicate load on a failing provider) this prevents.
After the call, Redis errors while releasing are logged and swallowed: the call has
happened and its result must be recorded; leases return permits and probes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from integrations.errors import Deferred
from integrations.protection.breaker import CallHealth, CircuitBreaker, call_health
from integrations.protection.guards import (
    BreakerGuard,
    ConcurrencyGuard,
    Guard,
    QuotaGuard,
    RateGuard,
)
from integrations.protection.limiter import RateLimiter
from integrations.protection.pause import Pause, pause_from_headers
from integrations.protection.quota import DailyQuota
from integrations.protection.semaphore import Semaphore
from integrations.protection.settings import ProtectionSettings
from integrations.protection.store import Batch, Keys

REDIS_DOWN_RETRY_S = 5.0
DEFAULT_LEASE_S = 30.0
DEFAULT_429_PAUSE_S = 1.0

log = logging.getLogger("integrations.protection")


@dataclass
class Permit:
    """Leave to make one call. ``release(error)`` exactly once afterwards (in ``finally``).

    Attributes:
        operation: the operation admitted.
        waited_s: seconds slept in ``admit`` (for a slot or a permit).
        probe: the call is a half-open breaker probe.
    """

    protection: Protection
    operation: str
    tickets: list[tuple[Guard, Any]] = field(default_factory=list)
    waited_s: float = 0.0
    released: bool = False

    @property
    def probe(self) -> bool:
        return any(ticket.probe for guard, ticket in self.tickets
                   if isinstance(guard, BreakerGuard))

    def release(self, error: BaseException | None = None) -> None:
        """Record the call's outcome and give back permits; a second call does nothing.

        Args:
            error: what the call raised, or None for success. ``Transient``/``Ambiguous``
                count as breaker failures; a ``Deferred`` means no call was made.

        Never raises (Redis errors are logged).
        """
        if self.released:
            return
        self.released = True
        attempted = not isinstance(error, Deferred)
        self.protection._release(self.tickets, call_health(error), attempted)

    def __enter__(self) -> Permit:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release(exc)


class Protection:
    """Rate limits, 429 pauses, concurrency cap, daily quota and circuit breaker of one
    provider, shared through Redis by every worker process."""

    def __init__(self, settings: ProtectionSettings, client: redis.Redis, *,
                 lease_s: float = DEFAULT_LEASE_S, namespace: str = "outbox",
                 sleep: Callable[[float], None] = time.sleep,
                 monotonic: Callable[[], float] = time.monotonic):
        """Build the guards ``settings`` asks for.

        Args:
            settings: the provider's limits.
            client: Redis client (shared per process in production).
            lease_s: permit/probe lease when ``settings.concurrency_lease_s`` is unset;
                must outlast the longest call.
            namespace: first part of every key (``outbox``).
            sleep, monotonic: injected for tests.
        """
        self.settings = settings
        self.provider = settings.name
        self.keys = Keys(settings.name, namespace)
        self.lease_s = settings.concurrency_lease_s or lease_s
        self.max_wait_s = settings.max_wait_s
        self.monotonic = monotonic
        self.pauses = Pause(client, self.keys)
        self.limiter = RateLimiter(client, self.keys, settings.rate_limit,
                                   dict(settings.operation_rate_limits),
                                   margin=settings.rate_margin, pause=self.pauses)
        self.breaker = CircuitBreaker(client, self.keys, settings.breaker, self.lease_s)
        self.quota = (DailyQuota(client, self.keys, settings.daily_quota)
                      if settings.daily_quota else None)
        self.semaphore = (Semaphore(client, self.keys, settings.max_concurrency, self.lease_s)
                          if settings.max_concurrency else None)
        guards: list[Guard] = []
        if self.quota:
            guards.append(QuotaGuard(self.quota))
        guards.append(BreakerGuard(self.breaker))
        if self.semaphore:
            guards.append(ConcurrencyGuard(self.semaphore, sleep, monotonic))
        guards.append(RateGuard(self.limiter, sleep))
        self.guards: tuple[Guard, ...] = tuple(guards)
        self.client = client
        # The guards from this one on are first asked together (see ``admit``); the quota
        # before them is asked alone.
        self._together_from = 1 if self.quota else 0

    def admit(self, operation: str) -> Permit:
        """Pass every guard in order; may sleep up to ``max_wait_s`` in total.

        Returns:
            The ``Permit``; call ``permit.release(error)`` when the call is over.

        Raises:
            Deferred: a guard says wait (quota, breaker, cap, rate limit, pause) or Redis
                is unreachable; nothing is held afterwards and no call may be made.
        """
        started = self.monotonic()
        permit = Permit(self, operation)
        tried: dict[Guard, Any] = {}   # guard → the answer to its try in the shared round trip
        try:
            for index, guard in enumerate(self.guards):
                budget = max(self.max_wait_s - (self.monotonic() - started), 0.0)
                if index == self._together_from:
                    tried = self._try_together(self.guards[index:], operation, budget)
                if guard in tried:
                    result = tried.pop(guard)
                    if result is None and isinstance(guard, ConcurrencyGuard):
                        # No permit was free: it waits for one; the pause read with it is
                        # stale by then, so the rate guard asks again once the permit is held.
                        tried.clear()
                    ticket = guard.acquire_tried(result, operation, budget)
                else:
                    ticket = guard.acquire(operation, budget)
                permit.tickets.append((guard, ticket))
        except Deferred:
            self._release(permit.tickets + _held(tried), CallHealth.NEUTRAL, attempted=False)
            raise
        except redis.RedisError as exc:
            self._release(permit.tickets + _held(tried), CallHealth.NEUTRAL, attempted=False)
            log.warning("%s: protection state unreachable (%s); deferring, not calling "
                        "unprotected", self.provider, type(exc).__name__,
                        extra={"provider": self.provider})
            raise Deferred(f"{self.provider} protection unavailable (Redis: "
                           f"{type(exc).__name__})", code="protection_unavailable",
                           retry_after_s=REDIS_DOWN_RETRY_S) from exc
        permit.waited_s = self.monotonic() - started
        return permit

    def _try_together(self, guards: tuple[Guard, ...], operation: str,
                      budget_s: float) -> dict[Guard, Any]:
        """Ask ``guards`` (from the first, as long as each can be asked without waiting) in
        one round trip; their answers by guard. Raises ``redis.RedisError`` (nothing known)."""
        batch = Batch(self.client)
        asked = []
        for guard in guards:
            if not guard.try_into(batch, operation, budget_s):
                break
            asked.append(guard)
        return dict(zip(asked, batch.execute(), strict=True))

    def pace(self, operation: str) -> None:
        """Wait for one more rate-limit slot (a second request inside one admitted call,
        such as the retry after a 401).

        Raises:
            Deferred: the slot is too far away, or Redis is unreachable.
        """
        rate = next(g for g in self.guards if isinstance(g, RateGuard))
        try:
            rate.acquire(operation, self.max_wait_s)
        except redis.RedisError as exc:
            raise Deferred(f"{self.provider} protection unavailable (Redis: "
                           f"{type(exc).__name__})", code="protection_unavailable",
                           retry_after_s=REDIS_DOWN_RETRY_S) from exc

    def _release(self, tickets: list[tuple[Guard, Any]], health: CallHealth,
                 attempted: bool) -> None:
        # In reverse order of acquisition, as one round trip.
        batch = Batch(self.client)
        queued: list[Guard] = []
        for guard, ticket in reversed(tickets):
            before = len(batch)
            guard.release_into(batch, ticket, health, attempted)
            queued.extend([guard] * (len(batch) - before))
        if not queued:
            return
        try:
            results = batch.execute()
        except redis.RedisError as exc:
            for guard in dict.fromkeys(queued):
                self._not_released(guard, exc)
            return
        for guard, result in zip(queued, results, strict=True):
            if isinstance(result, redis.RedisError):
                self._not_released(guard, result)

    def _not_released(self, guard: Guard, exc: BaseException) -> None:
        log.warning("%s: could not release %s (%s); its lease will expire",
                    self.provider, guard.name, type(exc).__name__,
                    extra={"provider": self.provider})

    def pause(self, seconds: float) -> float:
        """Pause every worker's calls to this provider for ``seconds`` (keeps a longer
        existing pause). Returns the pause now in force, 0.0 if Redis is unreachable.

        Never raises: called after a 429, whose handling must not be replaced by a
        Redis error.
        """
        try:
            remaining = self.pauses.pause(seconds)
        except redis.RedisError as exc:
            log.warning("%s: could not store a %.1fs pause (%s)", self.provider, seconds,
                        type(exc).__name__, extra={"provider": self.provider})
            return 0.0
        log.info("%s: paused for %.2fs", self.provider, remaining,
                 extra={"provider": self.provider, "pause_s": round(remaining, 3)})
        return remaining

    def observe(self, response) -> float | None:
        """Slow down before a 429: pause until ``X-RateLimit-Reset`` when the response
        says ``X-RateLimit-Remaining: 0``. Returns the pause set, or None. Never raises."""
        try:
            seconds = pause_from_headers(getattr(response, "headers", None) or {})
        except Exception:   # a hook never stops delivery
            log.exception("%s: could not read rate-limit headers", self.provider)
            return None
        return self.pause(seconds) if seconds else None

    def snapshot(self) -> dict:
        """Limits and live state for ``outbox status``.

        Returns:
            ``provider``, ``rate_limit`` (and ``rate_limit_per_s``), ``operation_rate_limits``,
            ``max_wait_s``,
            ``paused_for_s``, ``max_concurrency``, ``permits_in_use``, ``daily_quota``,
            ``quota_used``, ``quota_remaining``, ``quota_resets_in_s``, ``breaker`` (see
            ``CircuitBreaker.state``); ``error`` instead of live values when Redis is
            unreachable. Never raises.
        """
        s = self.settings
        snap: dict[str, Any] = {
            "provider": self.provider,
            "rate_limit": str(s.rate_limit) if s.rate_limit else None,
            "rate_limit_per_s": round(1 / s.rate_limit.interval_s, 6) if s.rate_limit else None,
            "operation_rate_limits": {op: str(spec) for op, spec in s.operation_rate_limits},
            "max_wait_s": s.max_wait_s,
            "max_concurrency": s.max_concurrency,
            "daily_quota": s.daily_quota,
        }
        try:
            snap["paused_for_s"] = round(self.pauses.remaining_s(), 3)
            snap["permits_in_use"] = self.semaphore.in_use() if self.semaphore else None
            usage = self.quota.usage() if self.quota else None
            snap["quota_used"] = usage.used if usage else None
            snap["quota_remaining"] = usage.remaining if usage else None
            snap["quota_resets_in_s"] = round(usage.resets_in_s, 1) if usage else None
            snap["breaker"] = self.breaker.state()
        except redis.RedisError as exc:
            snap["error"] = f"Redis unreachable ({type(exc).__name__})"
        return snap


def _held(tried: dict[Guard, Any]) -> list[tuple[Guard, Any]]:
    """Of the answers of a shared round trip not yet taken when a guard refused, those that
    hold something to give back: the breaker's ticket (a probe permit) and a permit."""
    return [(guard, result) for guard, result in tried.items()
            if result is not None and not isinstance(result, BaseException)
            and not isinstance(guard, RateGuard)]
