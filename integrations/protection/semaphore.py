"""Global concurrency cap: a lease-based semaphore in Redis.

The permits in use are a sorted set of tokens scored by lease expiry. Acquiring is one
Lua call that first drops expired tokens, then adds ours if fewer than ``limit`` remain;
releasing is ``ZREM``. A worker killed with SIGKILL never releases, so its permit comes
back when its lease runs out: the lease must outlast the longest call (timeouts included).
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable

import redis

from integrations.errors import Deferred
from integrations.protection.store import LUA_NOW_US, Batch, Keys, to_us

POLL_MIN_S = 0.02
POLL_MAX_S = 0.05
# When no permit came within max_wait_s: how soon the message should come back.
RETRY_AFTER_S = 1.0

_ACQUIRE = LUA_NOW_US + """
-- KEYS[1] permits zset; ARGV[1] token, ARGV[2] limit, ARGV[3] lease (us).
-- Returns {acquired 0/1, permits in use}.
local now = now_us()
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', fmt(now))
local used = redis.call('ZCARD', KEYS[1])
if used >= tonumber(ARGV[2]) then return {0, used} end
redis.call('ZADD', KEYS[1], fmt(now + tonumber(ARGV[3])), ARGV[1])
redis.call('PEXPIRE', KEYS[1], fmt(math.ceil(tonumber(ARGV[3]) / 1000) + 1000))
return {1, used + 1}
"""

_IN_USE = LUA_NOW_US + """
-- KEYS[1] permits zset. Returns the number of unexpired permits.
return redis.call('ZCOUNT', KEYS[1], '(' .. fmt(now_us()), '+inf')
"""


class Semaphore:
    """At most ``limit`` calls to one provider at once, across every worker process."""

    def __init__(self, client: redis.Redis, keys: Keys, limit: int, lease_s: float):
        """Args: client; keys: the provider's key names; limit: permits (>= 1);
        lease_s: how long a permit lasts if never released (> the longest call)."""
        if limit < 1 or lease_s <= 0:
            raise ValueError("limit must be >= 1 and lease_s > 0")
        self.client = client
        self.key = keys("permits")
        self.provider = keys.provider
        self.limit = limit
        self.lease_s = lease_s
        self._acquire = client.register_script(_ACQUIRE)
        self._in_use = client.register_script(_IN_USE)

    def try_acquire(self) -> str | None:
        """Take a permit if one is free (one round trip); return its token, else None.

        Raises:
            redis.RedisError: Redis is unreachable.
        """
        token = uuid.uuid4().hex
        acquired, _used = self._acquire(keys=[self.key], args=[token, self.limit,
                                                               to_us(self.lease_s)])
        return token if int(acquired) else None

    def try_acquire_into(self, batch: Batch) -> None:
        """``try_acquire``, queued in ``batch``: its result is the token or None."""
        token = uuid.uuid4().hex
        batch.script(self._acquire, [self.key], [token, self.limit, to_us(self.lease_s)],
                     lambda reply: token if int(reply[0]) else None)

    def acquire(self, max_wait_s: float, sleep: Callable[[float], None] = time.sleep,
                monotonic: Callable[[], float] = time.monotonic) -> str:
        """Take a permit, polling every 20–50 ms for up to ``max_wait_s``; return its token.

        Raises:
            Deferred: no permit came free in time (``retry_after_s`` 1 s).
            redis.RedisError: Redis is unreachable.
        """
        deadline = monotonic() + max_wait_s
        while True:
            token = self.try_acquire()
            if token is not None:
                return token
            left = deadline - monotonic()
            if left <= 0:
                raise Deferred(f"{self.provider} concurrency cap {self.limit} reached",
                               code="concurrency", retry_after_s=RETRY_AFTER_S)
            sleep(min(left, random.uniform(POLL_MIN_S, POLL_MAX_S)))

    def release(self, token: str) -> None:
        """Return the permit ``token`` (a no-op if its lease already ran out).

        Raises:
            redis.RedisError: Redis is unreachable.
        """
        self.client.zrem(self.key, token)

    def release_into(self, batch: Batch, token: str) -> None:
        """``release``, queued in ``batch``."""
        batch.command("ZREM", self.key, token)

    def in_use(self) -> int:
        """Permits currently held (unexpired), for status.

        Raises:
            redis.RedisError: Redis is unreachable.
        """
        return int(self._in_use(keys=[self.key]))
