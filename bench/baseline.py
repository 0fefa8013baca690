"""The baseline: a bare Celery task that makes the same provider call as ``outbox.deliver``.

Registered on ``tasks.app`` (same Celery settings: events, acks_late, prefetch 1);
the worker imports it with ``-I bench.baseline``. It posts the very form body and
headers that ``integrations.payments`` builds for ``payments.charge`` to
``/v1/payment_intents`` with a unique Idempotency-Key, through one shared
``requests.Session`` whose pool is sized to the worker concurrency — and does
nothing else: no database, no schema checks, no error classification.
"""

from __future__ import annotations

import os
import threading

import requests
from requests.adapters import HTTPAdapter

from tasks import app

QUEUE = "payments"
STRIPE_VERSION = "2024-06-20"      # what integrations.payments pins
USER_AGENT = "integration-outbox/0.1"

_lock = threading.Lock()
_session: requests.Session | None = None


def _http() -> requests.Session:
    global _session
    if _session is None:
        with _lock:
            if _session is None:
                pool = int(os.environ.get("OUTBOX_PAYMENTS_MAX_CONCURRENCY", "8"))
                session = requests.Session()
                session.trust_env = False
                session.mount("http://", HTTPAdapter(pool_maxsize=pool, max_retries=0))
                _session = session
    return _session


def charge_form(amount: int, currency: str = "usd") -> dict[str, str]:
    """The form ``PaymentsAdapter.build_request('charge', …)`` sends for ``{amount, currency}``."""
    return {"amount": str(amount), "currency": currency, "confirm": "true",
            "automatic_payment_methods[enabled]": "true",
            "automatic_payment_methods[allow_redirects]": "never"}


@app.task(name="bench.bare_charge")
def bare_charge(key: str, amount: int) -> str:
    """POST one charge to the sandbox; raise on a non-2xx answer."""
    base = os.environ["OUTBOX_PAYMENTS_BASE_URL"].rstrip("/")
    headers = {"User-Agent": USER_AGENT, "Accept": "application/json",
               "Idempotency-Key": key, "Stripe-Version": STRIPE_VERSION,
               "Authorization": f"Bearer {os.environ['OUTBOX_PAYMENTS_API_KEY']}"}
    response = _http().post(base + "/v1/payment_intents", data=charge_form(amount),
                            headers=headers, timeout=(3.05, 10.0))
    if not 200 <= response.status_code < 300:
        raise RuntimeError(f"sandbox answered {response.status_code}")
    return "ok"


def publish(key: str, amount: int) -> None:
    """What ``bare_charge.delay(key, amount)`` does, on the provider's queue (as the outbox
    publisher routes ``outbox.deliver``; the app's default queue is ``dead_letter``)."""
    bare_charge.apply_async(args=[key, amount], queue=QUEUE, routing_key=QUEUE)
