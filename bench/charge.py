"""The provider call of the bare benchmark tasks, built once for both of them.

``bench.baseline.bare_charge`` (on ``tasks.app``) and ``bench.ratelimit_celery`` (its own
app) post the very form body and headers that ``integrations.payments`` builds for
``payments.charge`` to ``/v1/payment_intents`` with a unique Idempotency-Key, and raise on a
non-2xx answer. This module imports nothing of ``tasks``, so ``bench.ratelimit_celery``'s
workers still run no outbox start-up checks; its constants are kept in step with
``integrations.payments`` by hand.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import requests
from requests.adapters import HTTPAdapter

STRIPE_VERSION = "2024-06-20"      # what integrations.payments pins
USER_AGENT = "integration-outbox/0.1"


def lazy_session(pool_size: Callable[[], int]) -> Callable[[], requests.Session]:
    """A getter of one shared ``requests.Session``, made on first use with a connection pool
    of ``pool_size()`` (sized to the worker concurrency), no retries and no proxies from
    the environment."""
    lock = threading.Lock()
    session: requests.Session | None = None

    def get() -> requests.Session:
        nonlocal session
        if session is None:
            with lock:
                if session is None:
                    made = requests.Session()
                    made.trust_env = False
                    made.mount("http://", HTTPAdapter(pool_maxsize=pool_size(), max_retries=0))
                    session = made
        return session

    return get


def charge_form(amount: int, currency: str = "usd") -> dict[str, str]:
    """The form ``PaymentsAdapter.build_request('charge', …)`` sends for ``{amount, currency}``."""
    return {"amount": str(amount), "currency": currency, "confirm": "true",
            "automatic_payment_methods[enabled]": "true",
            "automatic_payment_methods[allow_redirects]": "never"}


def post_charge(http: requests.Session, key: str, amount: int) -> str:
    """POST one charge to the sandbox at ``OUTBOX_PAYMENTS_BASE_URL`` with Idempotency-Key
    ``key``; raise on a non-2xx answer (a 429 included)."""
    base = os.environ["OUTBOX_PAYMENTS_BASE_URL"].rstrip("/")
    headers = {"User-Agent": USER_AGENT, "Accept": "application/json",
               "Idempotency-Key": key, "Stripe-Version": STRIPE_VERSION,
               "Authorization": f"Bearer {os.environ['OUTBOX_PAYMENTS_API_KEY']}"}
    response = http.post(base + "/v1/payment_intents", data=charge_form(amount),
                         headers=headers, timeout=(3.05, 10.0))
    if not 200 <= response.status_code < 300:
        raise RuntimeError(f"sandbox answered {response.status_code}")
    return "ok"
