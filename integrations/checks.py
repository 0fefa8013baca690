"""Synthetic health checks: a cheap, side-effect-free call per provider on a schedule, to
know a credential is rejected or a provider is down before a customer's message finds out.

Each adapter may define ``check_request`` (payments: ``GET /v1/balance``; email:
``GET /v3/scopes``, which must grant ``mail.send``). The relay runs them every
``OUTBOX_CHECK_INTERVAL`` seconds (default 120, from 60 to 300; ``OUTBOX_CHECKS=off``
turns them off) in a thread of its own, so a provider that hangs until its timeout
never delays publishing. A check goes through the provider's shared protection like a
delivery: it takes a rate-limit slot, and an open breaker skips it (the breaker already
says the provider is down). With several relays, a Redis lock lets one of them check
each provider per interval.

The last result of each provider is kept in Redis (``outbox:check:<provider>``, expiring
after three intervals), so every process reads the same one: ``outbox status``,
``/health`` and ``/metrics``. A rejected credential (401/403, or a key without the
scope) is critical, "credentials rejected"; any other failure is a warning.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import redis

from .classify import classify
from .errors import ConfigurationError, Deferred, IntegrationError

log = logging.getLogger("outbox.checks")

DEFAULT_INTERVAL_S = 120
INTERVAL_RANGE_S = (60, 300)
REJECTED = "credentials rejected"
OPERATION = "health_check"   # the name a check's rate-limit slot is taken under


@dataclass(frozen=True)
class CheckResult:
    """One check: ``ok``, why not (``reason``), when (epoch seconds), how long it took."""

    ok: bool
    reason: str
    at: float
    duration_ms: float
    status_code: int | None = None
    rejected: bool = False   # the credential was refused: critical

    def to_dict(self) -> dict:
        return asdict(self)


def interval_s(environ: Mapping[str, str] | None = None) -> int | None:
    """The check interval, or None when checks are off. Raises ConfigurationError."""
    env = os.environ if environ is None else environ
    if env.get("OUTBOX_CHECKS", "").strip().lower() in ("0", "off", "false", "no"):
        return None
    raw = env.get("OUTBOX_CHECK_INTERVAL", "").strip() or str(DEFAULT_INTERVAL_S)
    low, high = INTERVAL_RANGE_S
    if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
        raise ConfigurationError(f"OUTBOX_CHECK_INTERVAL={raw[:20]!r}: a whole number of "
                                 f"seconds from {low} to {high}")
    return int(raw)


def run_check(provider, clock: Callable[[], float] = time.time) -> CheckResult | None:
    """Check ``provider`` (an ``integrations.registry.Provider``) once; None when it has no
    check, or when its protection said wait (an open breaker, a full rate limit)."""
    request = provider.adapter.check_request()
    if request is None:
        return None
    at, started = clock(), time.perf_counter()
    permit = None
    if provider.protection is not None:
        try:
            permit = provider.protection.admit(OPERATION)
        except Deferred as exc:
            log.info("%s: health check skipped (%s)", provider.name, exc.label())
            return None
    error: BaseException | None = None
    try:
        response = provider.client.send(request, auth=provider.adapter.auth)
        if provider.protection is not None:
            provider.protection.observe(response)
        error = classify(response)   # the breaker hears of a 503 as of a delivery's
    except Deferred as exc:   # no credential to send (e.g. an OAuth2 grant to connect)
        log.info("%s: health check skipped (%s)", provider.name, exc.label())
        return None
    except IntegrationError as exc:
        error = exc
        return CheckResult(False, f"check failed: {exc.error_class.value} {exc.label()}", at,
                           _ms(started), exc.status_code)
    finally:
        if permit is not None:
            permit.release(error)
    code = response.status_code
    if code in (401, 403):
        return CheckResult(False, f"{REJECTED} ({code})", at, _ms(started), code, True)
    if not 200 <= code < 300:
        return CheckResult(False, f"check failed: HTTP {code}", at, _ms(started), code)
    problem = provider.adapter.check_problem(response)
    if problem is not None:
        return CheckResult(False, problem, at, _ms(started), code,
                           rejected=problem.startswith(REJECTED))
    return CheckResult(True, "ok", at, _ms(started), code)


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)


def _key(name: str) -> str:
    return f"outbox:check:{name}"


def save(client: redis.Redis, name: str, result: CheckResult, interval: int) -> None:
    client.set(_key(name), json.dumps(result.to_dict()), ex=3 * interval)


def load(client: redis.Redis, name: str) -> dict | None:
    """The provider's last check result (as a dict), or None: never checked, expired, or
    Redis unreachable (which health reports on its own)."""
    try:
        raw = client.get(_key(name))
    except redis.RedisError:
        return None
    return json.loads(raw) if raw else None


class CheckRunner:
    """Runs every provider's check every ``interval`` seconds in a daemon thread."""

    def __init__(self, providers: Callable[[], Mapping[str, object]], client: redis.Redis,
                 interval: int):
        self._providers = providers
        self._client = client
        self._interval = interval

    def start(self, stop: threading.Event) -> threading.Thread:
        thread = threading.Thread(target=self._loop, args=(stop,), name="outbox-checks",
                                  daemon=True)
        thread.start()
        return thread

    def _loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.run_once()
            stop.wait(self._interval)

    def run_once(self) -> dict[str, CheckResult]:
        """Check each provider this process wins the lock for; never raises."""
        done = {}
        try:
            providers = self._providers()
        except Exception as exc:  # noqa: BLE001  (bad settings: outbox status says which)
            log.warning("health checks: providers unavailable (%s)", type(exc).__name__)
            return done
        for name, provider in providers.items():
            try:
                if not self._client.set(f"{_key(name)}:lock", "1", nx=True,
                                        ex=max(1, self._interval - 5)):
                    continue   # another relay checks it this interval
                result = run_check(provider)
                if result is None:
                    continue
                save(self._client, name, result, self._interval)
                done[name] = result
                (log.info if result.ok else log.warning)(
                    "health check %s: %s (%.0f ms)", name, result.reason, result.duration_ms)
            except Exception as exc:  # noqa: BLE001  (Redis down, a bug: next interval)
                log.warning("health check %s could not run (%s)", name, type(exc).__name__)
        return done
