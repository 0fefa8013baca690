"""Where protection state lives: one shared Redis client per process, and key names.

All state (rate-limit arrival times, pauses, permits, quotas, breaker state) is in Redis,
so every worker process shares it, and every script reads Redis ``TIME``: the server's
clock is the single clock, whatever the workers' clocks say.

Keys are namespaced ``outbox:<provider>:...`` (``outbox:payments:rate``).

The client is created lazily (creating it opens no connection), kept per URL, and
forgotten in a forked child so prefork workers never share sockets with their parent.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import redis

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
# Short timeouts: a Redis outage must turn into a quick deferral, not a hung worker.
CONNECT_TIMEOUT_S = 1.0
SOCKET_TIMEOUT_S = 2.0

_lock = threading.Lock()
_clients: dict[str, redis.Redis] = {}


def redis_url(environ=None) -> str:
    """``REDIS_URL`` from ``environ`` (default ``os.environ``), or the default URL."""
    env = os.environ if environ is None else environ
    return (env.get("REDIS_URL") or "").strip() or DEFAULT_REDIS_URL


def connect(url: str) -> redis.Redis:
    """A new client for ``url`` with the protection timeouts (no connection is opened yet)."""
    return redis.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT_S,
                                socket_timeout=SOCKET_TIMEOUT_S, health_check_interval=30)


def shared_redis(url: str | None = None) -> redis.Redis:
    """The process-wide client (and connection pool) for ``url`` (default ``REDIS_URL``)."""
    url = url or redis_url()
    client = _clients.get(url)
    if client is None:
        with _lock:
            client = _clients.setdefault(url, connect(url))
    return client


def reset() -> None:
    """Close and forget every shared client (the next ``shared_redis`` makes a new one)."""
    with _lock:
        clients = list(_clients.values())
        _clients.clear()
    for client in clients:
        try:
            client.close()
        except redis.RedisError:
            pass


def _forget_after_fork() -> None:
    # The parent still uses these sockets: forget them in the child, never close them.
    global _lock
    _lock = threading.Lock()
    _clients.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


@dataclass(frozen=True)
class Keys:
    """Key names of one provider: ``Keys("payments")("rate")`` → ``outbox:payments:rate``."""

    provider: str
    namespace: str = "outbox"

    def __call__(self, *parts: str) -> str:
        return ":".join((self.namespace, self.provider, *parts))


# Lua helpers shared by the scripts. Numbers go back to Redis through string.format:
# Lua's own number-to-string keeps 14 digits and would round microsecond timestamps.
LUA_NOW_US = """
-- Redis < 5 needs effects replication before writing after TIME; a no-op since.
if redis.replicate_commands then redis.replicate_commands() end
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function fmt(x) return string.format('%.0f', x) end
"""


def to_us(seconds: float) -> int:
    """Seconds → whole microseconds (rounded up, so limits never get looser)."""
    return int(-(-seconds * 1_000_000 // 1))


def from_us(microseconds) -> float:
    """Microseconds (int or numeric string from Redis) → seconds."""
    return int(microseconds) / 1_000_000


class Batch:
    """Redis commands of several guards sent in one round trip (a pipeline, not a
    transaction: Redis runs them in order, each on its own).

    ``execute`` returns one result per command, in order: the reply (passed through its
    ``convert`` function), or the ``redis.RedisError`` that command got. A script goes as
    ``EVALSHA``; if Redis no longer has it (restart, ``SCRIPT FLUSH``) that one call is made
    again through its ``Script``, which loads it.
    """

    def __init__(self, client: redis.Redis):
        self._client = client
        self._pipe = None
        self._calls: list = []

    def __len__(self) -> int:
        return len(self._calls)

    def _pipeline(self):
        if self._pipe is None:
            self._pipe = self._client.pipeline(transaction=False)
        return self._pipe

    def script(self, script, keys: list, args: list, convert=None) -> None:
        """Queue ``script(keys=keys, args=args)``."""
        self._pipeline().evalsha(script.sha, len(keys), *keys, *args)
        self._calls.append((script, keys, args, convert))

    def command(self, *args, convert=None) -> None:
        """Queue one command (``"ZREM", key, member``)."""
        self._pipeline().execute_command(*args)
        self._calls.append((None, None, None, convert))

    def execute(self) -> list:
        """Send the queued commands; results (or errors) in order. The batch is then empty.

        Raises:
            redis.RedisError: the round trip itself failed (nothing is known of any command).
        """
        calls, self._calls = self._calls, []
        if not calls:
            return []
        replies = self._pipe.execute(raise_on_error=False)
        results = []
        for (script, keys, args, convert), reply in zip(calls, replies, strict=True):
            try:
                if isinstance(reply, redis.exceptions.NoScriptError) and script is not None:
                    reply = script(keys=keys, args=args)
                if isinstance(reply, Exception):
                    raise reply
                results.append(convert(reply) if convert is not None else reply)
            except redis.RedisError as exc:
                results.append(exc)
        return results
