"""The sandbox's side of webhooks, against the real receiver on a real server: signed events
after each effect, and each switchable fault — duplicates (stored once), out-of-order
(both stored), delays, bad signatures and old timestamps (refused, nothing stored; the
poller then finds them)."""

from __future__ import annotations

import time

import pytest
import requests
from sqlalchemy import select

from integrations.polling import StripeEvents
from integrations.registry import build_provider
from outbox import inbound, polling
from outbox.models import Message
from tests.harness import served, wait_until
from web.inbound import create_receiver, sources_from_env

SECRET = "whsec_test_sandbox_hooks_42"
AUTH = {"Authorization": "Bearer sk_test_outbox"}


@pytest.fixture(autouse=True)
def _recorded(publisher):
    return publisher


@pytest.fixture
def db_url(sqlite_url):
    return sqlite_url   # the sandbox's behaviour is under test, not the database's


@pytest.fixture
def receiver_url(sessions, sandbox):
    app = create_receiver(sessions, sources_from_env({"OUTBOX_PAYMENTS_WEBHOOK_SECRET": SECRET}))
    with served(app) as base:
        url = f"{base}/webhooks/payments"
        sandbox.state.webhooks.configure({"payments": {"url": url, "secret": SECRET}})
        yield url


def charge(sandbox, key, customer=None):
    data = {"amount": 700, "currency": "usd", "confirm": "true",
            **({"customer": customer} if customer else {})}
    return requests.post(sandbox.url + "/v1/payment_intents", data=data, timeout=5,
                         headers={**AUTH, "Idempotency-Key": key})


def faults(sandbox, **switches):
    assert requests.post(sandbox.url + "/_sandbox/webhooks", json={"faults": switches},
                         timeout=5).ok


def stored(sessions) -> list[Message]:
    with sessions() as s:
        return list(s.scalars(select(Message).where(Message.provider == inbound.INBOUND)
                              .order_by(Message.created_at, Message.id)))


def hooks(sandbox) -> dict:
    return requests.get(sandbox.url + "/_sandbox/webhooks", timeout=5).json()


def test_each_effect_sends_a_signed_event(sandbox, receiver_url, sessions):
    sandbox.state.configure(declined_customers=["cus_declined"])
    charge(sandbox, "k1")
    charge(sandbox, "k2", customer="cus_declined")
    wait_until(lambda: len(stored(sessions)) == 2, 10, message="two events")
    assert [m.operation for m in stored(sessions)] == [
        "payments.payment_intent.succeeded", "payments.payment_intent.payment_failed"]
    assert hooks(sandbox)["sent"] == 2


def test_duplicates_are_stored_once(sandbox, receiver_url, sessions):
    faults(sandbox, duplicate=True)
    for i in range(3):
        charge(sandbox, f"d{i}")
    wait_until(lambda: hooks(sandbox)["sent"] == 6, 10, message="six deliveries")
    assert len(stored(sessions)) == 3


def test_out_of_order_delivery_stores_both(sandbox, receiver_url, sessions):
    faults(sandbox, out_of_order=True)
    charge(sandbox, "o1")
    charge(sandbox, "o2")
    wait_until(lambda: len(stored(sessions)) == 2, 10, message="both events")
    first, second = (m.payload["event_id"] for m in stored(sessions))
    assert first > second   # the newer event arrived first


def test_a_delay_holds_the_event(sandbox, receiver_url, sessions):
    faults(sandbox, delay_s=0.6)
    started = time.monotonic()
    charge(sandbox, "late")
    wait_until(lambda: len(stored(sessions)) == 1, 10, message="the delayed event")
    assert time.monotonic() - started >= 0.6


@pytest.mark.parametrize("fault", ["bad_signature", "old_timestamp"])
def test_bad_signatures_and_old_timestamps_are_refused_and_polling_recovers(
        sandbox, receiver_url, sessions, redis_url, fault):
    faults(sandbox, **{fault: True})
    sandbox.state.webhooks.retry_base_s = 0.01   # give up quickly
    charge(sandbox, f"refused-{fault}")
    wait_until(lambda: hooks(sandbox)["failed"] == 1, 20, message="the sender to give up")
    assert stored(sessions) == []
    provider = build_provider("payments", {"OUTBOX_PAYMENTS_BASE_URL": sandbox.url,
                                           "OUTBOX_PAYMENTS_API_KEY": "sk_test_outbox"},
                              redis=redis_url)
    try:
        found, _ = polling.poll_once(sessions, "payments", StripeEvents(provider),
                                     polling.PollSettings())
    finally:
        provider.close()
    assert found == 1 and len(stored(sessions)) == 1
