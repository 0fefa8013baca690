"""Configuration from the environment, read through typed helpers that fail loudly.

Every helper names the variable in its error, so a bad Procfile line says what
to fix. Nothing here is read at import time: callers pass ``environ`` (tests)
or get ``os.environ``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache

from integrations.errors import ConfigurationError
from integrations.settings import get_float, get_int, get_str

from .retry import RetryPolicy

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_MAX_PAYLOAD_BYTES = 256 * 1024


def _read(getter, name: str, default, environ: Mapping[str, str] | None):
    """Read ``name`` with one of the typed readers that ``integrations.settings`` provides
    for provider settings, so both packages accept and refuse the same values."""
    return getter(os.environ if environ is None else environ, name, default)


def env_str(name: str, default: str, environ: Mapping[str, str] | None = None) -> str:
    """The variable's value, or ``default`` if it is unset or empty."""
    return _read(get_str, name, default, environ)


def env_float(name: str, default: float, environ: Mapping[str, str] | None = None) -> float:
    """A finite number > 0 (seconds and the like). Raises ConfigurationError."""
    return _read(get_float, name, default, environ)


def env_int(name: str, default: int, environ: Mapping[str, str] | None = None) -> int:
    """A whole number ≥ 1. Raises ConfigurationError."""
    return _read(get_int, name, default, environ)


# The pseudo-provider of inbound events (``outbox.inbound``): its queue, rate limit, retry
# policy and dead letters are configured like a provider's (``OUTBOX_INBOUND_…``).
INBOUND = "inbound"


def queues() -> list[str]:
    """Every queue the relay serves: one per provider with operation schemas, and the
    inbound events'."""
    import schemas

    return [*sorted(schemas.operations()), INBOUND]


def default_database_url(environ: Mapping[str, str] | None = None) -> str:
    """The embedded default: a SQLite file in the user's data folder,
    ``$XDG_DATA_HOME/integration-outbox/outbox.db`` (``~/.local/share/…`` when unset), so
    that every command finds the same database wherever it is run from."""
    env = os.environ if environ is None else environ
    data = env.get("XDG_DATA_HOME", "").strip() or os.path.join(os.path.expanduser("~"),
                                                                 ".local", "share")
    return f"sqlite:///{os.path.join(data, 'integration-outbox', 'outbox.db')}"


def database_url(environ: Mapping[str, str] | None = None) -> str:
    """``DATABASE_URL``, or ``default_database_url()``."""
    return env_str("DATABASE_URL", "", environ) or default_database_url(environ)


def redis_url(environ: Mapping[str, str] | None = None) -> str:
    return env_str("REDIS_URL", DEFAULT_REDIS_URL, environ)


def max_payload_bytes(environ: Mapping[str, str] | None = None) -> int:
    """``OUTBOX_MAX_PAYLOAD_BYTES``: cap on a payload's serialized size (default 256 KiB)."""
    return env_int("OUTBOX_MAX_PAYLOAD_BYTES", DEFAULT_MAX_PAYLOAD_BYTES, environ)


def retry_policy(provider: str, environ: Mapping[str, str] | None = None) -> RetryPolicy:
    """The provider's RetryPolicy from ``OUTBOX_<NAME>_MAX_ATTEMPTS``, ``_RETRY_BASE``
    (seconds), ``_RETRY_CAP`` (seconds), ``_MAX_AGE`` (seconds)."""
    prefix = f"OUTBOX_{provider.upper()}_"
    default = RetryPolicy()
    try:
        return RetryPolicy(
            base_delay=timedelta(seconds=env_float(prefix + "RETRY_BASE", 1.0, environ)),
            max_delay=timedelta(seconds=env_float(prefix + "RETRY_CAP", 300.0, environ)),
            max_attempts=env_int(prefix + "MAX_ATTEMPTS", default.max_attempts, environ),
            max_age=timedelta(seconds=env_float(
                prefix + "MAX_AGE", default.max_age.total_seconds(), environ)),
        )
    except (ValueError, OverflowError) as exc:   # timedelta overflows on huge seconds
        if isinstance(exc, ConfigurationError):
            raise
        raise ConfigurationError(f"{prefix}*: {exc}") from exc


_RETRY_SUFFIXES = ("RETRY_BASE", "RETRY_CAP", "MAX_ATTEMPTS", "MAX_AGE")


def current_retry_policy(provider: str) -> RetryPolicy:
    """``retry_policy(provider)`` for the current ``os.environ``, for per-delivery use.

    Reads the four variables on every call (a changed setting takes effect, as before)
    but parses and validates each distinct combination only once. Raises ConfigurationError.
    """
    prefix = f"OUTBOX_{provider.upper()}_"
    return _parsed_retry_policy(provider, tuple(os.environ.get(prefix + suffix)
                                                for suffix in _RETRY_SUFFIXES))


@lru_cache(maxsize=256)
def _parsed_retry_policy(provider: str, values: tuple[str | None, ...]) -> RetryPolicy:
    prefix = f"OUTBOX_{provider.upper()}_"
    environ = {prefix + suffix: value for suffix, value in zip(_RETRY_SUFFIXES, values, strict=True)
               if value is not None}
    return retry_policy(provider, environ)


@dataclass(frozen=True)
class RelaySettings:
    """How the relay and the lease behave.

    Attributes:
        poll_interval_s: sleep between relay passes when nothing was due.
        batch_size: rows published per pass and query.
        grace_s: a fresh row is left this long for its after-commit dispatch before the relay sends it.
        max_queued: per provider, the most messages handed to the broker and not yet claimed;
            the rest of a backlog waits in the database (``outbox.relay.take_due``).
        settle_s: a queued row younger than this is never presumed lost (its message may be
            on its way to the broker, or to a worker).
        requeue_after_s: only with a broker that cannot report its queue depth: a queued row
            not claimed within this is presumed lost and re-sent.
        lease_s: the longest one delivery may hold its row.
        lease_ttl_s: a claim lasts this long unless its worker renews it (every third of
            it, while the delivery runs, up to ``lease_s``): a killed worker's rows are
            recovered this soon.
    """

    poll_interval_s: float = 0.5
    batch_size: int = 500
    # Long enough for the after-commit dispatch to mark its rows queued even when it waits
    # for SQLite's write lock behind the application's transactions; it delays only a
    # dispatch that was lost (crash, broker down).
    grace_s: float = 10.0
    max_queued: int = 100
    settle_s: float = 5.0
    requeue_after_s: float = 300.0
    lease_s: float = 120.0
    lease_ttl_s: float = 15.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RelaySettings:
        d = cls()
        return cls(
            poll_interval_s=env_float("OUTBOX_RELAY_POLL_INTERVAL", d.poll_interval_s, environ),
            batch_size=env_int("OUTBOX_RELAY_BATCH_SIZE", d.batch_size, environ),
            grace_s=env_float("OUTBOX_RELAY_GRACE", d.grace_s, environ),
            max_queued=env_int("OUTBOX_RELAY_MAX_QUEUED", d.max_queued, environ),
            requeue_after_s=env_float("OUTBOX_RELAY_REQUEUE_AFTER", d.requeue_after_s, environ),
            lease_s=env_float("OUTBOX_LEASE", d.lease_s, environ),
            lease_ttl_s=env_float("OUTBOX_LEASE_TTL", d.lease_ttl_s, environ),
        )

    def claim_lease(self) -> timedelta:
        """How long a new claim lasts before its first renewal."""
        return timedelta(seconds=min(self.lease_ttl_s, self.lease_s))
