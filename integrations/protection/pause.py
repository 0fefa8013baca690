"""429 feedback: a provider-wide pause shared by every worker.

``Pause.pause(seconds)`` stores "paused until T" (``SET ... PX``, keeping the later of the
existing and the new time). The limiter script reads the same key first, so while the
pause lasts no worker is granted a slot, and afterwards slots resume evenly paced from T.

``pause_from_headers`` reads ``X-RateLimit-Remaining``/``X-RateLimit-Reset`` (and the IETF
draft's ``RateLimit-Remaining``/``RateLimit-Reset``): remaining 0 means the next request
would be refused, so pause until the reset instead of collecting a 429.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

import redis

from integrations.protection.store import LUA_NOW_US, Keys, from_us, to_us

# A reset value above this is an epoch timestamp, not a number of seconds (2001-09-09).
EPOCH_THRESHOLD = 1_000_000_000
# Above this it is an epoch in milliseconds.
EPOCH_MS_THRESHOLD = 100_000_000_000
MAX_PAUSE_S = 86_400.0

_PAUSE = LUA_NOW_US + """
-- KEYS[1] pause key; ARGV[1] pause length in microseconds.
-- Keeps the later of the stored and the new end. Returns {changed, remaining_us}.
local now = now_us()
local new_end = now + tonumber(ARGV[1])
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if cur >= new_end then return {0, fmt(cur - now)} end
redis.call('SET', KEYS[1], fmt(new_end), 'PX', fmt(math.ceil(tonumber(ARGV[1]) / 1000) + 1))
return {1, fmt(new_end - now)}
"""

_REMAINING = LUA_NOW_US + """
-- KEYS[1] pause key. Returns the microseconds the pause still lasts (0 if none).
local now = now_us()
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if cur > now then return fmt(cur - now) end
return '0'
"""


class Pause:
    """The shared "do not call this provider until" time of one provider."""

    def __init__(self, client: redis.Redis, keys: Keys):
        """Args: client: the Redis client; keys: the provider's key names."""
        self.key = keys("pause")
        self._pause = client.register_script(_PAUSE)
        self._remaining = client.register_script(_REMAINING)

    def pause(self, seconds: float) -> float:
        """Pause the provider for ``seconds`` (capped at one day) unless already paused longer.

        Returns:
            Seconds the pause now lasts (the later of the existing and the new one).

        Raises:
            redis.RedisError: Redis is unreachable.
        """
        seconds = min(max(float(seconds), 0.0), MAX_PAUSE_S)
        if seconds <= 0:
            return self.remaining_s()
        _changed, remaining = self._pause(keys=[self.key], args=[to_us(seconds)])
        return from_us(remaining)

    def remaining_s(self) -> float:
        """Seconds the current pause still lasts, 0.0 when not paused.

        Raises:
            redis.RedisError: Redis is unreachable.
        """
        return from_us(self._remaining(keys=[self.key]))


def pause_from_headers(headers: Mapping[str, str], now_s: float | None = None) -> float | None:
    """How long the rate-limit headers of a response say to hold off, or None.

    ``X-RateLimit-Remaining: 0`` (or ``RateLimit-Remaining: 0``) with a reset gives a pause
    until the reset. The reset may be seconds until reset (``30``), epoch seconds
    (``1700000000``) or epoch milliseconds; values above 10^9 are read as epochs and
    compared with ``now_s`` (default ``time.time()``). Remaining > 0, a missing or
    unreadable reset, or a reset in the past give None. Never raises.

    Args:
        headers: a case-insensitive mapping of response headers.
        now_s: the current epoch time, for tests.
    """
    lower = {str(k).lower(): v for k, v in headers.items()}
    for prefix in ("x-ratelimit-", "ratelimit-"):
        remaining = _number(lower.get(prefix + "remaining"))
        if remaining is None:
            continue
        if remaining > 0:
            return None
        reset = _number(lower.get(prefix + "reset"))
        if reset is None:
            return None
        if reset >= EPOCH_THRESHOLD:
            epoch = reset / 1000 if reset >= EPOCH_MS_THRESHOLD else reset
            reset = epoch - (time.time() if now_s is None else now_s)
        return min(reset, MAX_PAUSE_S) if reset > 0 else None
    return None


def _number(value) -> float | None:
    if value is None:
        return None
    try:
        number = float(str(value).strip())
    except ValueError:
        return None
    return number if math.isfinite(number) else None
