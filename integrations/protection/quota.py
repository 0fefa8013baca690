"""Daily quotas that reset at midnight UTC.

One counter per provider per UTC date (``outbox:payments:quota:2025-01-31``), incremented
by a Lua script that takes the date from Redis ``TIME``. When the increment goes past
the quota it is rolled back in the same script, so refused requests never use quota,
and the caller defers the message until the next midnight UTC.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from integrations.errors import Deferred
from integrations.protection.store import LUA_NOW_US, Batch, Keys, from_us

# The counter outlives its day by this much, so status can still read yesterday's use.
KEEP_AFTER_DAY_S = 3600

_LUA_DAY = LUA_NOW_US + """
local now = now_us()
local day = math.floor(now / 86400000000)
-- civil date from days since 1970-01-01 (H. Hinnant's algorithm)
local z = day + 719468
local era = math.floor(z / 146097)
local doe = z - era * 146097
local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
                        - math.floor(doe / 146096)) / 365)
local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
local mp = math.floor((5 * doy + 2) / 153)
local d = doy - math.floor((153 * mp + 2) / 5) + 1
local m = mp < 10 and mp + 3 or mp - 9
local y = yoe + era * 400
if m <= 2 then y = y + 1 end
local key = KEYS[1] .. ':' .. string.format('%04d-%02d-%02d', y, m, d)
local next_midnight = (day + 1) * 86400
local reset_us = next_midnight * 1000000 - now
"""

_TAKE = _LUA_DAY + """
-- KEYS[1] key prefix; ARGV[1] quota, ARGV[2] seconds kept after the day. Returns {taken 0/1, used, reset_us, key}.
local used = redis.call('INCR', key)
if used > tonumber(ARGV[1]) then
  redis.call('DECR', key)
  return {0, used - 1, fmt(reset_us), key}
end
redis.call('EXPIREAT', key, next_midnight + tonumber(ARGV[2]))
return {1, used, fmt(reset_us), key}
"""

_PEEK = _LUA_DAY + """
-- KEYS[1] key prefix. Returns {used, reset_us, key}.
return {tonumber(redis.call('GET', key) or '0'), fmt(reset_us), key}
"""

_REFUND = """
-- KEYS[1] the dated counter. Gives one back, never below 0 and never to another day.
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
if used > 0 then return redis.call('DECR', KEYS[1]) end
return 0
"""


@dataclass(frozen=True)
class QuotaUse:
    """Today's use of a quota: ``used`` of ``limit``, resetting in ``resets_in_s``."""

    limit: int
    used: int
    resets_in_s: float
    key: str

    @property
    def remaining(self) -> int:
        """Requests left today."""
        return max(self.limit - self.used, 0)


class DailyQuota:
    """At most ``limit`` requests per UTC day to one provider, across every worker."""

    def __init__(self, client: redis.Redis, keys: Keys, limit: int):
        """Args: client; keys: the provider's key names; limit: requests per day (>= 1)."""
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self.prefix = keys("quota")
        self.provider = keys.provider
        self.limit = limit
        self._take = client.register_script(_TAKE)
        self._peek = client.register_script(_PEEK)
        self._refund = client.register_script(_REFUND)

    def take(self) -> str:
        """Use one request of today's quota; return the dated key (for ``refund_into``).

        Raises:
            Deferred: the quota is exhausted; ``retry_after_s`` is the time until the next
                midnight UTC. Nothing was used.
            redis.RedisError: Redis is unreachable.
        """
        taken, used, reset_us, key = self._take(keys=[self.prefix],
                                                args=[self.limit, KEEP_AFTER_DAY_S])
        if not int(taken):
            reset_s = from_us(reset_us)
            raise Deferred(f"{self.provider} daily quota of {self.limit} used up; "
                           f"resets at midnight UTC in {reset_s:.0f}s",
                           code="quota_exhausted", retry_after_s=reset_s)
        return key.decode() if isinstance(key, bytes) else key

    def refund_into(self, batch: Batch, key: str) -> None:
        """Give back one request taken by ``take`` (the call was never made), queued in
        ``batch`` (sent with the other guards' releases)."""
        batch.script(self._refund, [key], [])

    def usage(self) -> QuotaUse:
        """Today's use, for status.

        Raises:
            redis.RedisError: Redis is unreachable.
        """
        used, reset_us, key = self._peek(keys=[self.prefix])
        return QuotaUse(self.limit, int(used), from_us(reset_us),
                        key.decode() if isinstance(key, bytes) else key)

    def remaining(self) -> int:
        """Requests left today.

        Raises:
            redis.RedisError: Redis is unreachable.
        """
        return self.usage().remaining
