"""The baseline: a bare Celery task that makes the same provider call as ``outbox.deliver``.

Registered on ``tasks.app`` (same Celery settings: events, acks_late, prefetch 1);
the worker imports it with ``-I bench.baseline``. It posts the very form body and
headers that ``integrations.payments`` builds for ``payments.charge`` to
``/v1/payment_intents`` with a unique Idempotency-Key (``bench.charge.post_charge``),
through one shared ``requests.Session`` whose pool is sized to the worker concurrency —
and does nothing else: no database, no schema checks, no error classification.
"""

from __future__ import annotations

import os

from tasks import app

from .charge import lazy_session, post_charge

QUEUE = "payments"

_http = lazy_session(lambda: int(os.environ.get("OUTBOX_PAYMENTS_MAX_CONCURRENCY", "8")))


@app.task(name="bench.bare_charge")
def bare_charge(key: str, amount: int) -> str:
    """POST one charge to the sandbox; raise on a non-2xx answer."""
    return post_charge(_http(), key, amount)


def publish(key: str, amount: int) -> None:
    """What ``bare_charge.delay(key, amount)`` does, on the provider's queue (as the outbox
    publisher routes ``outbox.deliver``; the app's default queue is ``dead_letter``)."""
    bare_charge.apply_async(args=[key, amount], queue=QUEUE, routing_key=QUEUE)
