"""Which broker carries the Celery messages, from the environment (no Celery import).

``CELERY_BROKER_URL`` names the broker if set (e.g. ``amqp://…`` RabbitMQ with quorum
queues); otherwise it is ``REDIS_URL`` (default ``redis://localhost:6379/0``), which is the
limiter/breaker store whatever the broker is. ``celeryconfig`` configures Celery from
``broker_url()``; code that must behave differently on a Redis broker (a flushed or
restarted Redis loses its queued messages, RabbitMQ's quorum queues do not) asks
``redis_broker_url()``.
"""

from __future__ import annotations

from collections.abc import Mapping

from .config import env_str, redis_url

REDIS = "redis"
AMQP = "amqp"
_KINDS = {"redis": REDIS, "rediss": REDIS, "redis+socket": REDIS,
          "amqp": AMQP, "amqps": AMQP, "pyamqp": AMQP}


def broker_url(environ: Mapping[str, str] | None = None) -> str:
    """``CELERY_BROKER_URL`` if set, else ``REDIS_URL`` (else its default)."""
    return env_str("CELERY_BROKER_URL", "", environ) or redis_url(environ)


def broker_kind(url: str) -> str:
    """``"redis"`` (redis, rediss, redis+socket), ``"amqp"`` (amqp, amqps, pyamqp), or the
    URL's own scheme in lower case for any other broker."""
    scheme = url.split("://", 1)[0].strip().lower() if "://" in url else ""
    return _KINDS.get(scheme, scheme)


def redis_broker_url(environ: Mapping[str, str] | None = None) -> str | None:
    """The broker's URL when the broker is Redis; None when it is RabbitMQ (or another)."""
    url = broker_url(environ)
    return url if broker_kind(url) == REDIS else None
