"""Circuit breaker per provider, its state shared in Redis, one Lua script.

::

    closed ──(N failures in the window, or ratio >= R over >= M calls)──▶ open
    open ──(open_s elapsed)──▶ half_open: at most `probes` trial calls at once
    half_open ──probe succeeds──▶ closed        half_open ──probe fails──▶ open

Only ``Transient`` and ``Ambiguous`` failures (connect errors, 5xx, timeouts) count as
failures. A 4xx, an auth error or an unreadable 2xx shows the provider is up and counts
as a success; a 429 or an internal error counts as nothing.

Probe permits have a lease (a crashed probe does not block half-open forever). While open
(or half-open with every probe taken) ``admit`` raises ``Deferred`` and no call is made.
Transitions are logged on ``integrations.breaker`` at WARNING.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from enum import StrEnum

import redis

from integrations.errors import Deferred, IntegrationError, Permanent
from integrations.protection.store import LUA_NOW_US, Batch, Keys, from_us, to_us

log = logging.getLogger("integrations.breaker")

# Half-open with every probe taken: come back soon, a probe's answer is due.
BUSY_RETRY_S = 1.0


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CallHealth(StrEnum):
    """What a call told the breaker about the provider's health."""

    SUCCESS = "success"     # the provider answered (2xx, or a 4xx about our request)
    FAILURE = "failure"     # transient, ambiguous, timeout
    NEUTRAL = "neutral"     # says nothing (429, our own bug) or the call was never made


def call_health(error: BaseException | None) -> CallHealth:
    """What a call's result says about the provider's health (None = success): a failure
    the error classes mark as outage evidence (``integrations.errors``: transient and
    ambiguous ones) counts against it; any answer that proves it works (a 2xx, a 4xx)
    counts for it; anything else says nothing."""
    if error is None:
        return CallHealth.SUCCESS
    if isinstance(error, IntegrationError) and error.outage_evidence:
        return CallHealth.FAILURE
    if isinstance(error, Permanent):
        return CallHealth.SUCCESS
    return CallHealth.NEUTRAL


@dataclass(frozen=True)
class BreakerPolicy:
    """When the breaker opens and for how long.

    Attributes:
        failures: failures in the window that open it (>= 1).
        ratio: failure ratio in the window that opens it, in (0, 1] ...
        min_calls: ... once the window holds at least this many calls.
        window_s: the sliding window, seconds.
        open_s: how long it stays open before half-open, seconds.
        probes: trial calls allowed at once while half-open.
    """

    failures: int = 20
    ratio: float = 0.5
    min_calls: int = 10
    window_s: float = 30.0
    open_s: float = 15.0
    probes: int = 1

    def __post_init__(self) -> None:
        if min(self.failures, self.min_calls, self.probes) < 1:
            raise ValueError("failures, min_calls and probes must be >= 1")
        if not 0 < self.ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio!r}")
        if self.window_s <= 0 or self.open_s <= 0:
            raise ValueError("window_s and open_s must be > 0")


_SCRIPT = LUA_NOW_US + """
-- KEYS: state hash, calls zset, failures zset, probes zset.
-- ARGV: action (admit|record|state), token, health, failures, ratio, min_calls,
--       window_us, open_us, probes, probe_lease_us, keep_us.
local H, CALLS, FAILS, PROBES = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local action, token, health = ARGV[1], ARGV[2], ARGV[3]
local max_failures, ratio, min_calls = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local window, open_for = tonumber(ARGV[7]), tonumber(ARGV[8])
local max_probes, lease, keep = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
local now = now_us()
local state = redis.call('HGET', H, 'state') or 'closed'
local until_ = tonumber(redis.call('HGET', H, 'until') or '0')
local moves = {}

local function move(to)
  table.insert(moves, state .. '>' .. to)
  state = to
  redis.call('DEL', PROBES)
  if to == 'closed' then
    redis.call('DEL', H, CALLS, FAILS)
    until_ = 0
    return
  end
  if to == 'open' then
    until_ = now + open_for
    redis.call('HSET', H, 'opened_at', fmt(now), 'until', fmt(until_))
    redis.call('DEL', CALLS, FAILS)
  end
  redis.call('HSET', H, 'state', to)
  redis.call('PEXPIRE', H, fmt(math.ceil((open_for + keep) / 1000)))
end

if state == 'open' and now >= until_ then move('half_open') end
redis.call('ZREMRANGEBYSCORE', CALLS, '-inf', fmt(now - window))
redis.call('ZREMRANGEBYSCORE', FAILS, '-inf', fmt(now - window))
redis.call('ZREMRANGEBYSCORE', PROBES, '-inf', fmt(now))

if action == 'admit' then
  if state == 'open' then return {'deny', fmt(until_ - now), moves} end
  if state == 'half_open' then
    if redis.call('ZCARD', PROBES) >= max_probes then return {'busy', '0', moves} end
    redis.call('ZADD', PROBES, fmt(now + lease), token)
    redis.call('PEXPIRE', PROBES, fmt(math.ceil(lease / 1000) + 1000))
    return {'probe', '0', moves}
  end
  return {'allow', '0', moves}
end

if action == 'record' then
  local was_probe = redis.call('ZREM', PROBES, token) == 1
  if state == 'half_open' and was_probe then
    if health == 'success' then move('closed') elseif health == 'failure' then move('open') end
  elseif state == 'closed' and (health == 'success' or health == 'failure') then
    redis.call('ZADD', CALLS, fmt(now), token)
    redis.call('PEXPIRE', CALLS, fmt(math.ceil(window / 1000) + 1000))
    if health == 'failure' then
      redis.call('ZADD', FAILS, fmt(now), token)
      redis.call('PEXPIRE', FAILS, fmt(math.ceil(window / 1000) + 1000))
      local f, c = redis.call('ZCARD', FAILS), redis.call('ZCARD', CALLS)
      if f >= max_failures or (c >= min_calls and f / c >= ratio) then move('open') end
    end
  end
  -- a call that started before the breaker opened (or a non-probe in half-open) is stale
  return {state, '0', moves}
end

-- state
return {state, fmt(until_ > now and until_ - now or 0), moves,
        redis.call('ZCARD', FAILS), redis.call('ZCARD', CALLS), redis.call('ZCARD', PROBES),
        redis.call('HGET', H, 'opened_at') or '0', fmt(until_)}
"""


@dataclass(frozen=True)
class Ticket:
    """An admitted call: its token and whether it is a half-open probe."""

    token: str
    probe: bool


class CircuitBreaker:
    """The shared circuit breaker of one provider."""

    def __init__(self, client: redis.Redis, keys: Keys, policy: BreakerPolicy,
                 probe_lease_s: float):
        """Args: client; keys: the provider's key names; policy: thresholds and times;
        probe_lease_s: how long a probe permit lasts if its worker never reports back."""
        self.provider = keys.provider
        self.policy = policy
        self.probe_lease_s = probe_lease_s
        self._keys = [keys("breaker"), keys("breaker", "calls"), keys("breaker", "failures"),
                      keys("breaker", "probes")]
        self._script = client.register_script(_SCRIPT)

    def _args(self, action: str, token: str = "", health: str = "") -> list:
        p = self.policy
        return [action, token, health, p.failures, repr(p.ratio), p.min_calls,
                to_us(p.window_s), to_us(p.open_s), p.probes, to_us(self.probe_lease_s),
                to_us(max(p.window_s, 3600))]

    def _run(self, action: str, token: str = "", health: str = "") -> list:
        return self._reply(self._script(keys=self._keys, args=self._args(action, token, health)))

    def _reply(self, reply: list) -> list:
        reply = [_text(r) for r in reply]
        for move in reply[2]:
            old, new = _text(move).split(">")
            log.warning("breaker %s: %s -> %s", self.provider, old, new,
                        extra={"provider": self.provider, "breaker_from": old, "breaker_to": new})
        return reply

    def admit(self) -> Ticket:
        """Let a call through (closed, or as a half-open probe) and return its ticket.

        Raises:
            Deferred: open (``retry_after_s`` = time until half-open) or half-open with
                every probe taken (``retry_after_s`` 1 s, at most ``open_s``).
            redis.RedisError: Redis is unreachable.
        """
        token = uuid.uuid4().hex
        verdict = self._verdict(token, self._run("admit", token))
        if isinstance(verdict, Deferred):
            raise verdict
        return verdict

    def admit_into(self, batch: Batch) -> None:
        """``admit``, queued in ``batch``: its result is the ``Ticket``, or the ``Deferred``
        that ``admit`` would raise (returned, not raised, so the batch's other results —
        a permit taken in the same round trip — still reach the caller to be given back)."""
        token = uuid.uuid4().hex
        batch.script(self._script, self._keys, self._args("admit", token),
                     lambda reply: self._verdict(token, self._reply(reply)))

    def _verdict(self, token: str, reply: list) -> Ticket | Deferred:
        verdict, wait_us = reply[0], reply[1]
        if verdict == "allow":
            return Ticket(token, probe=False)
        if verdict == "probe":
            return Ticket(token, probe=True)
        if verdict == "deny":
            wait_s = from_us(wait_us)
            return Deferred(f"{self.provider} circuit breaker open; half-open in {wait_s:.1f}s",
                            code="breaker_open", retry_after_s=wait_s)
        return Deferred(f"{self.provider} circuit breaker half-open, probe in progress",
                        code="breaker_half_open",
                        retry_after_s=min(BUSY_RETRY_S, self.policy.open_s))

    def record_into(self, batch: Batch, ticket: Ticket, health: CallHealth) -> None:
        """Report how the call of ``ticket`` went (and return its probe permit, if any),
        queued in ``batch`` (sent with the other guards' releases)."""
        if health is CallHealth.NEUTRAL and not ticket.probe:
            return
        batch.script(self._script, self._keys, self._args("record", ticket.token, health.value),
                     self._reply)

    def state(self) -> dict:
        """The breaker as ``outbox status`` shows it.

        Returns:
            ``{"state", "failures", "calls", "probes_in_flight", "opened_at", "until",
            "half_open_in_s"}``; times are epoch seconds (Redis clock) or None.

        Raises:
            redis.RedisError: Redis is unreachable.
        """
        state, wait_us, _, failures, calls, probes, opened_at, until = self._run("state")
        return {"state": state, "failures": int(failures), "calls": int(calls),
                "probes_in_flight": int(probes),
                "opened_at": from_us(opened_at) if int(opened_at) else None,
                "until": from_us(until) if int(until) else None,
                "half_open_in_s": from_us(wait_us) if state == BreakerState.OPEN else None}


def _text(value):
    return value.decode() if isinstance(value, bytes) else value
