"""Provider protection shared by every worker process through Redis.

::

    Protection(settings, redis)                     one per provider per process
      admit(operation) -> Permit                    quota → breaker → concurrency → rate limit
      Permit.release(error)                         breaker outcome, permits back
      pause(seconds) / observe(response)            429 and X-RateLimit-* feedback
      snapshot() -> dict                            for ``outbox status``

Modules, one concern each: ``rates`` (``RateSpec``), ``limiter`` (GCRA with reservation),
``pause`` (shared 429 pause), ``semaphore`` (lease-based concurrency cap), ``quota`` (daily,
midnight UTC), ``breaker`` (circuit breaker), ``guards`` (the hooks), ``core`` (their
order, and why), ``settings`` (``OUTBOX_<NAME>_*`` variables), ``store`` (the Redis client).

Everything that says "wait" raises ``integrations.errors.Deferred`` with
``retry_after_s``: the message is rescheduled without consuming an attempt.
"""

from integrations.protection.breaker import BreakerPolicy, BreakerState, CallHealth, CircuitBreaker
from integrations.protection.core import DEFAULT_429_PAUSE_S, Permit, Protection
from integrations.protection.limiter import RateLimiter, Reservation
from integrations.protection.pause import Pause, pause_from_headers
from integrations.protection.quota import DailyQuota, QuotaUse
from integrations.protection.rates import RateSpec
from integrations.protection.semaphore import Semaphore
from integrations.protection.settings import ProtectionSettings
from integrations.protection.store import shared_redis

__all__ = [
    "DEFAULT_429_PAUSE_S", "BreakerPolicy", "BreakerState", "CircuitBreaker", "DailyQuota",
    "CallHealth", "Pause", "Permit", "Protection", "ProtectionSettings", "QuotaUse", "RateLimiter",
    "RateSpec", "Reservation", "Semaphore", "pause_from_headers", "shared_redis",
]
