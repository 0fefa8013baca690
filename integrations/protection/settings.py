"""``ProtectionSettings``: one provider's limits, read once from the environment.

Variables for provider ``NAME`` (operation ``OP``, both upper case)::

    OUTBOX_<NAME>_RATE_LIMIT          provider-wide limit, "50/s" "600/m" "1000/h" "10/d"
    OUTBOX_<NAME>_<OP>_RATE_LIMIT     stricter limit for one operation (…_REFUND_RATE_LIMIT)
    OUTBOX_<NAME>_RATE_MARGIN         interval safety margin, "0.03" or "3%"     (default 3 %)
    OUTBOX_<NAME>_MAX_CONCURRENCY     global cap on calls in flight; enforced only when set
    OUTBOX_<NAME>_CONCURRENCY_LEASE   seconds a permit (or probe) lasts if never released
                                      (default: connect + read timeout + max wait + 5 s)
    OUTBOX_<NAME>_DAILY_QUOTA         requests per UTC day
    OUTBOX_<NAME>_BREAKER_FAILURES    failures in the window that open the breaker (20)
    OUTBOX_<NAME>_BREAKER_RATIO       failure ratio that opens it, in (0, 1]       (0.5)
    OUTBOX_<NAME>_BREAKER_MIN_CALLS   calls in the window before the ratio applies  (10)
    OUTBOX_<NAME>_BREAKER_WINDOW      sliding window, seconds                       (30)
    OUTBOX_<NAME>_BREAKER_OPEN        seconds open before half-open                 (15)
    OUTBOX_<NAME>_BREAKER_PROBES      trial calls at once while half-open           (1)
    OUTBOX_<NAME>_MAX_WAIT            seconds a worker may sleep for a slot or permit
                                      before deferring the message instead; 0 = never (2)

Every bad value raises ``ConfigurationError`` naming the variable (and quoting the value).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from integrations.errors import ConfigurationError
from integrations.protection.breaker import BreakerPolicy
from integrations.protection.limiter import DEFAULT_MARGIN
from integrations.protection.rates import RateSpec
from integrations.settings import env_name, get_float, get_int, get_str

DEFAULT_MAX_WAIT_S = 2.0


@dataclass(frozen=True)
class ProtectionSettings:
    """How one provider is protected. Immutable; ``from_env`` validates everything.

    Attributes:
        name: provider name.
        rate_limit: provider-wide limit, or None.
        operation_rate_limits: ``(operation, spec)`` pairs, sorted.
        rate_margin: fraction added to each paced interval.
        max_concurrency: global cap on calls in flight, or None (no cap).
        concurrency_lease_s: permit lease, or None for the default from the timeouts.
        daily_quota: requests per UTC day, or None.
        breaker: the breaker policy.
        max_wait_s: the longest a worker sleeps for a slot/permit before deferring.
    """

    name: str
    rate_limit: RateSpec | None = None
    operation_rate_limits: tuple[tuple[str, RateSpec], ...] = ()
    rate_margin: float = DEFAULT_MARGIN
    max_concurrency: int | None = None
    concurrency_lease_s: float | None = None
    daily_quota: int | None = None
    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)
    max_wait_s: float = DEFAULT_MAX_WAIT_S

    def operation_rate(self, operation: str) -> RateSpec | None:
        """The operation's own limit, or None."""
        return dict(self.operation_rate_limits).get(operation)

    @classmethod
    def from_env(cls, name: str, environ: Mapping[str, str] | None = None, *,
                 operations: Iterable[str] | None = None,
                 default_rate_limit: str | None = None,
                 default_operation_rate_limits: Mapping[str, str] | None = None,
                 ) -> ProtectionSettings:
        """Read provider ``name``'s protection settings from ``environ`` (default ``os.environ``).

        Args:
            name: provider name (``payments``).
            environ: the environment.
            operations: the provider's operations; per-operation variables are looked up
                for these. None: every ``OUTBOX_<NAME>_<OP>_RATE_LIMIT`` variable found.
            default_rate_limit, default_operation_rate_limits: the adapter's own limits,
                used where no variable is set.

        Raises:
            ConfigurationError: a value is malformed or out of range (names the variable).
        """
        env = os.environ if environ is None else environ
        rate = _rate(env, env_name(name, "RATE_LIMIT"), default_rate_limit)
        ops = _operation_rates(env, name, operations, default_operation_rate_limits or {})
        breaker = BreakerPolicy(
            failures=get_int(env, env_name(name, "BREAKER_FAILURES"), 20),
            ratio=_ratio(env, env_name(name, "BREAKER_RATIO"), 0.5),
            min_calls=get_int(env, env_name(name, "BREAKER_MIN_CALLS"), 10),
            window_s=get_float(env, env_name(name, "BREAKER_WINDOW"), 30.0),
            open_s=get_float(env, env_name(name, "BREAKER_OPEN"), 15.0),
            probes=get_int(env, env_name(name, "BREAKER_PROBES"), 1),
        )
        concurrency = get_str(env, env_name(name, "MAX_CONCURRENCY"), None)
        quota = get_str(env, env_name(name, "DAILY_QUOTA"), None)
        lease = get_str(env, env_name(name, "CONCURRENCY_LEASE"), None)
        return cls(
            name=name,
            rate_limit=rate,
            operation_rate_limits=ops,
            rate_margin=_margin(env, env_name(name, "RATE_MARGIN")),
            max_concurrency=(get_int(env, env_name(name, "MAX_CONCURRENCY"), 1)
                             if concurrency is not None else None),
            concurrency_lease_s=(get_float(env, env_name(name, "CONCURRENCY_LEASE"), 1.0)
                                 if lease is not None else None),
            daily_quota=(get_int(env, env_name(name, "DAILY_QUOTA"), 1)
                         if quota is not None else None),
            breaker=breaker,
            max_wait_s=_non_negative(env, env_name(name, "MAX_WAIT"), DEFAULT_MAX_WAIT_S),
        )


def _rate(env: Mapping[str, str], variable: str, default: str | None) -> RateSpec | None:
    raw = get_str(env, variable, default)
    if raw is None:
        return None
    try:
        return RateSpec.parse(raw)
    except ValueError as exc:
        raise ConfigurationError(f"{variable}: {exc}") from None


def _operation_rates(env, name, operations, defaults) -> tuple[tuple[str, RateSpec], ...]:
    pattern = re.compile(rf"^OUTBOX_{re.escape(name.upper())}_([A-Z0-9_]+)_RATE_LIMIT$")
    in_env = {m[1].lower(): m[0] for m in map(pattern.match, env) if m}
    if operations is None:
        operations = in_env
    else:
        operations = set(operations)
        for operation, variable in sorted(in_env.items()):
            if operation not in operations:   # a typo would silently leave it unlimited
                raise ConfigurationError(
                    f"{variable}: {name} has no operation {operation!r} "
                    f"(operations: {', '.join(sorted(operations))})")
    found = {}
    for operation in sorted(set(operations) | set(defaults)):
        spec = _rate(env, env_name(name, f"{operation.upper()}_RATE_LIMIT"),
                     defaults.get(operation))
        if spec is not None:
            found[operation] = spec
    return tuple(sorted(found.items()))


def _number(env: Mapping[str, str], variable: str) -> tuple[str, float] | None:
    raw = get_str(env, variable, None)
    if raw is None:
        return None
    try:
        value = float(raw.removesuffix("%")) / (100 if raw.endswith("%") else 1)
    except ValueError:
        raise ConfigurationError(f"{variable} must be a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise ConfigurationError(f"{variable} must be finite, got {raw!r}")
    return raw, value


def _non_negative(env: Mapping[str, str], variable: str, default: float) -> float:
    found = _number(env, variable)
    if found is None:
        return default
    raw, value = found
    if value < 0 or raw.endswith("%"):
        raise ConfigurationError(f"{variable} must be a number of seconds >= 0, got {raw!r}")
    return value


def _ratio(env: Mapping[str, str], variable: str, default: float) -> float:
    found = _number(env, variable)
    if found is None:
        return default
    raw, value = found
    if not 0 < value <= 1:
        raise ConfigurationError(f"{variable} must be in (0, 1] (e.g. 0.5 or 50%), got {raw!r}")
    return value


def _margin(env: Mapping[str, str], variable: str) -> float:
    found = _number(env, variable)
    if found is None:
        return DEFAULT_MARGIN
    raw, value = found
    if not 0 <= value < 0.5:
        raise ConfigurationError(f"{variable} must be in [0, 0.5) (e.g. 0.02 or 2%), got {raw!r}")
    return value
