"""Celery's side of the rate-limit benchmark: a bare task with ``rate_limit="50/s"``.

Its own Celery app, configured from ``celeryconfig`` (the same settings as ``tasks.app``:
JSON, acks_late, prefetch 1, events, the same queues), so nothing here is registered
on the project's app. Workers run it with ``celery -A bench.ratelimit_celery worker``.

The task makes the very request ``bench.baseline.bare_charge`` makes (``bench.charge``:
the form body and headers ``integrations.payments`` sends for ``payments.charge``, to
``/v1/payment_intents`` with a unique Idempotency-Key), and raises on a non-2xx answer — as
a plain Celery task would: a 429 is a failed task, not retried (Celery has no notion of the
provider's limit).

This module imports nothing of ``tasks`` (so the worker runs no outbox start-up checks);
neither does ``bench.charge``.
"""

from __future__ import annotations

import os

from celery import Celery

from .charge import lazy_session, post_charge

RATE = os.environ.get("BENCH_CELERY_RATE_LIMIT", "50/s")
QUEUE = "payments"
POOL = int(os.environ.get("BENCH_CELERY_POOL", "16"))

app = Celery("bench_ratelimit")
app.config_from_object("celeryconfig")

_http = lazy_session(lambda: POOL)


@app.task(name="bench.ratelimited_charge", rate_limit=RATE)
def ratelimited_charge(key: str, amount: int) -> str:
    """POST one charge to the sandbox; raise on a non-2xx answer (a 429 included)."""
    return post_charge(_http(), key, amount)


def publish_many(items: list[tuple[str, int]]) -> None:
    """Publish ``(key, amount)`` tasks on the provider's queue through one pooled producer."""
    with app.producer_or_acquire() as producer:
        for key, amount in items:
            ratelimited_charge.apply_async(args=[key, amount], queue=QUEUE, routing_key=QUEUE,
                                           producer=producer)
