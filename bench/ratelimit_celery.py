"""Celery's side of the rate-limit benchmark: a bare task with ``rate_limit="50/s"``.

Its own Celery app, configured from ``celeryconfig`` (the same settings as ``tasks.app``:
JSON, acks_late, prefetch 1, events, the same queues), so nothing here is registered
on the project's app. Workers run it with ``celery -A bench.ratelimit_celery worker``.

The task posts the very form body and headers that ``bench.baseline.bare_charge`` (and
``integrations.payments`` for ``payments.charge``) sends to ``/v1/payment_intents`` with
a unique Idempotency-Key, and raises on a non-2xx answer — as a plain Celery task would:
a 429 is a failed task, not retried (Celery has no notion of the provider's limit).

This module imports nothing of ``tasks`` (so the worker runs no outbox start-up checks)
and keeps its constants in step with ``bench.baseline`` by hand.
"""

from __future__ import annotations

import os
import threading

import requests
from celery import Celery
from requests.adapters import HTTPAdapter

RATE = os.environ.get("BENCH_CELERY_RATE_LIMIT", "50/s")
QUEUE = "payments"
STRIPE_VERSION = "2024-06-20"      # as bench.baseline / integrations.payments
USER_AGENT = "integration-outbox/0.1"
POOL = int(os.environ.get("BENCH_CELERY_POOL", "16"))

app = Celery("bench_ratelimit")
app.config_from_object("celeryconfig")

_lock = threading.Lock()
_session: requests.Session | None = None


def _http() -> requests.Session:
    global _session
    if _session is None:
        with _lock:
            if _session is None:
                session = requests.Session()
                session.trust_env = False
                session.mount("http://", HTTPAdapter(pool_maxsize=POOL, max_retries=0))
                _session = session
    return _session


def charge_form(amount: int, currency: str = "usd") -> dict[str, str]:
    """The form ``PaymentsAdapter.build_request('charge', …)`` sends for ``{amount, currency}``."""
    return {"amount": str(amount), "currency": currency, "confirm": "true",
            "automatic_payment_methods[enabled]": "true",
            "automatic_payment_methods[allow_redirects]": "never"}


@app.task(name="bench.ratelimited_charge", rate_limit=RATE)
def ratelimited_charge(key: str, amount: int) -> str:
    """POST one charge to the sandbox; raise on a non-2xx answer (a 429 included)."""
    base = os.environ["OUTBOX_PAYMENTS_BASE_URL"].rstrip("/")
    headers = {"User-Agent": USER_AGENT, "Accept": "application/json",
               "Idempotency-Key": key, "Stripe-Version": STRIPE_VERSION,
               "Authorization": f"Bearer {os.environ['OUTBOX_PAYMENTS_API_KEY']}"}
    response = _http().post(base + "/v1/payment_intents", data=charge_form(amount),
                            headers=headers, timeout=(3.05, 10.0))
    if not 200 <= response.status_code < 300:
        raise RuntimeError(f"sandbox answered {response.status_code}")
    return "ok"


def publish_many(items: list[tuple[str, int]]) -> None:
    """Publish ``(key, amount)`` tasks on the provider's queue through one pooled producer."""
    with app.producer_or_acquire() as producer:
        for key, amount in items:
            ratelimited_charge.apply_async(args=[key, amount], queue=QUEUE, routing_key=QUEUE,
                                           producer=producer)
