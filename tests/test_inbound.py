"""Inbound webhooks: the receiver (signatures, refusals, duplicates, rotation, fuzzing) and
the processing of stored events on the outbox's lifecycle (handlers in the event's
transaction, ignored types, a raising handler retried, dead-lettered and re-driven).

Signatures are checked against the official libraries' (``stripe``, ``standardwebhooks``;
test-only dependencies), and through the real app (FastAPI's TestClient; a real uvicorn
server for the concurrent duplicates)."""

from __future__ import annotations

import json
import math
import random
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
import requests
import standardwebhooks
import stripe
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Column, Integer, MetaData, String, Table, func, select

from outbox import deadletters, inbound
from outbox.models import Attempt, Message, MessageStatus
from tasks.delivery import deliver_message
from tests.harness import run_cli, served
from web.inbound import create_receiver, sources_from_env

STRIPE_SECRET = "whsec_test_stripe_0123456789abcdef"
STANDARD_SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"   # base64 of 24 bytes
NEW_STANDARD_SECRET = "whsec_" + "c2Vjb25kLXNlY3JldC0wMTIzNDU2Nzg5YWI="
ENV = {"OUTBOX_PAYMENTS_WEBHOOK_SECRET": STRIPE_SECRET,
       "OUTBOX_EMAIL_WEBHOOK_SECRET": f"{STANDARD_SECRET},{NEW_STANDARD_SECRET}"}
LEASE = timedelta(seconds=60)
# Tests of the receiver itself, not of the database's part: SQLite only.
app_only = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


# Publishes recorded, the inbound limits in the test's Redis (conftest).
pytestmark = pytest.mark.usefixtures("publisher", "inbound_redis")


@pytest.fixture
def receiver(sessions):
    app = create_receiver(sessions, sources_from_env(ENV))
    with TestClient(app) as client:
        yield client


def stripe_event(event_id="evt_1", event_type="payment_intent.succeeded", **data) -> str:
    return json.dumps({"id": event_id, "object": "event", "type": event_type,
                       "data": {"object": {"id": "pi_1", "status": "succeeded", **data}}})


def stripe_headers(body: str, secret=STRIPE_SECRET, timestamp=None) -> dict:
    return {"Stripe-Signature": stripe.WebhookSignature.generate_signature_header(
        body, secret, timestamp), "Content-Type": "application/json"}


def standard_headers(body: str, msg_id="msg_1", secret=STANDARD_SECRET, at=None) -> dict:
    at = at or datetime.now(UTC)
    signature = standardwebhooks.Webhook(secret).sign(msg_id, at, body)
    return {"webhook-id": msg_id, "webhook-timestamp": str(int(at.timestamp())),
            "webhook-signature": signature, "Content-Type": "application/json"}


def events(sessions) -> list[Message]:
    with sessions() as s:
        return list(s.scalars(select(Message).where(Message.provider == inbound.INBOUND)
                              .order_by(Message.created_at)))


# ---- the receiver -------------------------------------------------------------------------

def test_official_stripe_and_standard_webhooks_signatures_are_accepted(receiver, sessions,
                                                                       publisher):
    body = stripe_event()
    r = receiver.post("/webhooks/payments", content=body, headers=stripe_headers(body))
    assert r.status_code == 200 and r.json() == {"received": True, "duplicate": False}
    mail = json.dumps({"type": "email.delivered", "data": {"message_id": "m1"}})
    r = receiver.post("/webhooks/email", content=mail, headers=standard_headers(mail))
    assert r.status_code == 200
    stored = events(sessions)
    assert [(m.operation, m.idempotency_key, m.status) for m in stored] == [
        ("payments.payment_intent.succeeded", "payments:evt_1", MessageStatus.PENDING),
        ("email.email.delivered", "email:msg_1", MessageStatus.PENDING)]
    assert stored[0].payload["body"] == body   # the raw body, exactly
    assert set(stored[1].payload["headers"]) == {"webhook-id", "webhook-timestamp",
                                                 "webhook-signature"}
    # The receiver holds no broker: the relay publishes them on its next pass.
    assert publisher.published == []
    assert all(m.next_attempt_at > m.updated_at for m in stored)   # due without a grace


@app_only
def test_several_v1_signatures_and_both_secrets_of_a_rotation_verify(receiver, sessions):
    body = stripe_event("evt_multi")
    good = stripe.WebhookSignature.generate_signature_header(body, STRIPE_SECRET)
    t = good.split(",")[0]
    header = f"{t},v1={'0' * 64},{good.split(',')[1]}"   # a stale signature first
    assert receiver.post("/webhooks/payments", content=body,
                         headers={"Stripe-Signature": header}).status_code == 200
    for n, secret in enumerate((STANDARD_SECRET, NEW_STANDARD_SECRET)):
        mail = json.dumps({"type": "email.bounce"})
        r = receiver.post("/webhooks/email", content=mail,
                          headers=standard_headers(mail, f"msg_rot{n}", secret))
        assert r.status_code == 200, r.text
    assert len(events(sessions)) == 3


def _refusals():
    body = stripe_event("evt_bad")
    now = int(time.time())
    good = stripe_headers(body)
    yield "tampered body", body.replace("succeeded", "failed"), good
    yield "wrong secret", body, stripe_headers(body, "whsec_wrong")
    yield "timestamp 301 s old", body, stripe_headers(body, timestamp=now - 301)
    # Rounded up: a timestamp rounded down would be under 301 s ahead by the time it is
    # checked.
    yield "timestamp 301 s ahead", body, stripe_headers(body, timestamp=math.ceil(time.time())
                                                        + 301)
    yield "no header", body, {}
    yield "truncated header", body, {"Stripe-Signature": good["Stripe-Signature"][:20]}
    yield "garbage header", body, {"Stripe-Signature": "x" * 300}
    yield "no v1", body, {"Stripe-Signature": f"t={now},v0=abc"}
    yield "not hex", body, {"Stripe-Signature": f"t={now},v1=zz"}
    yield "not JSON", "not json", stripe_headers("not json")
    yield "JSON but no id", "[1]", stripe_headers("[1]")


@pytest.mark.parametrize("case", [c for c, _, _ in _refusals()])
@app_only
def test_stripe_refusals_are_400_and_store_nothing(receiver, sessions, case):
    body, headers = next((b, h) for c, b, h in _refusals() if c == case)   # signed now
    r = receiver.post("/webhooks/payments", content=body, headers=headers)
    assert r.status_code == 400, (case, r.text)
    assert r.json()["error"]
    assert events(sessions) == []


@app_only
def test_standard_webhooks_refusals(receiver, sessions):
    mail = json.dumps({"type": "email.delivered"})
    old = datetime.now(UTC) - timedelta(seconds=301)
    good = standard_headers(mail)
    cases = [
        standard_headers(mail, secret="whsec_" + "d3Jvbmctc2VjcmV0LTAwMDAwMDAw"),
        standard_headers(mail, at=old),
        {k: v for k, v in good.items() if k != "webhook-id"},
        {k: v for k, v in good.items() if k != "webhook-timestamp"},
        {k: v for k, v in good.items() if k != "webhook-signature"},
        good | {"webhook-signature": "v1,notbase64!"},
        good | {"webhook-id": "msg_other"},   # the id is signed
    ]
    for headers in cases:
        assert receiver.post("/webhooks/email", content=mail, headers=headers).status_code == 400
    assert receiver.post("/webhooks/email", content=mail + " ", headers=good).status_code == 400
    assert events(sessions) == []


@app_only
def test_unknown_provider_is_404_and_an_oversized_body_413_before_anything(receiver, sessions):
    assert receiver.post("/webhooks/nope", content="{}").status_code == 404
    assert receiver.post("/webhooks/crm", content="{}").status_code == 404   # no secret
    big = b"x" * (1024 * 1024 + 1)
    r = receiver.post("/webhooks/payments", content=big, headers=stripe_headers("x"))
    assert r.status_code == 413
    assert events(sessions) == []


@app_only
@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.binary(max_size=300),
       headers=st.dictionaries(st.sampled_from(["Stripe-Signature", "webhook-id",
                                                "webhook-timestamp", "webhook-signature",
                                                "Content-Type"]),
                               st.text(st.characters(min_codepoint=32, max_codepoint=126),
                                       max_size=120)),
       provider=st.sampled_from(["payments", "email"]))
def test_fuzzed_requests_never_error_and_never_store(receiver, sessions, body, headers,
                                                     provider):
    r = receiver.post(f"/webhooks/{provider}", content=body, headers=headers)
    assert r.status_code in (400, 413), (r.status_code, r.text)
    assert events(sessions) == []


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)   # the concurrent database
def test_a_thousand_concurrent_deliveries_of_one_event_store_it_once(sessions, publisher):
    """A real server (uvicorn, threads of requests): every answer is 200, one row."""
    body = stripe_event("evt_dup")
    headers = stripe_headers(body)
    with (served(create_receiver(sessions, sources_from_env(ENV))) as base,
          requests.Session() as http, ThreadPoolExecutor(32) as pool):
        http.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=32))
        url = f"{base}/webhooks/payments"
        answers = list(pool.map(lambda _: http.post(url, data=body, headers=headers,
                                                    timeout=30).json(), range(1000)))
    assert all(a["received"] for a in answers)
    assert sum(not a["duplicate"] for a in answers) == 1
    assert len(events(sessions)) == 1


# ---- processing -----------------------------------------------------------------------------

METADATA = MetaData()
PAID = Table("test_paid_orders", METADATA, Column("id", Integer, primary_key=True),
             Column("intent", String(64), unique=True))


@pytest.fixture
def handlers(engine):
    METADATA.create_all(engine)
    calls = {"fail": 0}

    @inbound.handler("payments", "payment_intent.succeeded")
    def paid(session, event):
        if calls["fail"]:
            calls["fail"] -= 1
            session.execute(PAID.insert().values(intent="written-then-rolled-back"))
            raise RuntimeError("the shop's database said no")
        session.execute(PAID.insert().values(intent=event.data["data"]["object"]["id"]))

    yield calls
    inbound._handlers.clear()


def store(sessions, event_id, event_type="payment_intent.succeeded", intent="pi_1"):
    with sessions() as s:
        message_id, _ = inbound.store(s, source="payments", event_id=event_id,
                                      event_type=event_type,
                                      body=stripe_event(event_id, event_type, id=intent),
                                      headers={})
        s.commit()
    return message_id


def process(sessions, message_id, at=None):
    at = at or datetime.now(UTC).replace(tzinfo=None) + timedelta(seconds=1)
    return deliver_message(message_id, sessions=sessions, lease=LEASE, clock=lambda: at,
                           rng=random.Random(3))


def paid_intents(sessions):
    with sessions() as s:
        return sorted(s.scalars(select(PAID.c.intent)))


def test_a_handler_runs_in_the_events_transaction(sessions, handlers):
    m = store(sessions, "evt_p1", intent="pi_42")
    result = process(sessions, m)
    assert result.outcome == "delivered" and result.summary == "handled"
    assert paid_intents(sessions) == ["pi_42"]
    assert process(sessions, m).outcome is None   # processed: a second message finds nothing
    assert paid_intents(sessions) == ["pi_42"]
    with sessions() as s:
        assert inbound.status_of(s.get(Message, m)) == "processed"


def test_an_event_without_a_handler_is_ignored(sessions, handlers):
    m = store(sessions, "evt_i1", "customer.created")
    assert process(sessions, m).summary == "ignored (no handler)"
    with sessions() as s:
        assert inbound.status_of(s.get(Message, m)) == "ignored"


def test_a_raising_handler_is_retried_then_dead_lettered_then_redriven(
        sessions, handlers, monkeypatch):
    monkeypatch.setenv("OUTBOX_INBOUND_MAX_ATTEMPTS", "2")
    handlers["fail"] = 2
    m = store(sessions, "evt_r1", intent="pi_7")
    first = process(sessions, m)
    assert first.outcome == "retry" and "handler_error RuntimeError" in first.summary
    assert paid_intents(sessions) == []   # the handler's write was rolled back with it
    second = process(sessions, m, at=first.next_attempt_at + timedelta(seconds=1))
    assert second.outcome == "dead"
    with sessions() as s:
        dead = s.get(Message, m)
        assert dead.status == MessageStatus.DEAD and not dead.needs_review
        assert dead.last_error_class == "handler_error"
        deadletters.redrive(s, reason="shop database fixed", actor="ops", ids=[m])
    assert process(sessions, m).outcome == "delivered"
    assert paid_intents(sessions) == ["pi_7"]
    with sessions() as s:
        outcomes = list(s.scalars(select(Attempt.outcome).where(Attempt.message_id == m)
                                  .order_by(Attempt.id)))
    assert outcomes == ["retry", "dead", "delivered"]


def test_cli_lists_and_shows_events(sessions, handlers, capsys, monkeypatch, db_url):
    monkeypatch.setenv("DATABASE_URL", db_url)
    m = store(sessions, "evt_c1")
    store(sessions, "evt_c2", "customer.created")
    process(sessions, m)
    code, out, _ = run_cli(capsys, "inbound", "list", "--json")
    rows = json.loads(out)
    assert code == 0 and {r["event_id"]: r["event_status"] for r in rows} == {
        "evt_c1": "processed", "evt_c2": "pending"}
    code, out, _ = run_cli(capsys, "inbound", "list", "--status", "processed")
    assert code == 0 and "evt_c1" in out and "evt_c2" not in out
    code, out, _ = run_cli(capsys, "inbound", "show", m)
    assert code == 0 and "delivered" in out


def test_duplicate_events_count(sessions):
    with sessions() as s:
        for _ in range(3):
            inbound.store(s, source="payments", event_id="evt_same", event_type="x",
                          body="{}", headers={})
        s.commit()
        assert s.scalar(select(func.count()).select_from(Message)) == 1


def test_the_shop_marks_an_order_paid_or_failed_from_its_events(sessions, engine):
    """The demo's handlers (``examples/handlers.py``): succeeded → paid; a decline → failed,
    and a later success (the card fixed, the charge re-driven) wins, in either order."""
    import importlib

    from examples import handlers
    from examples.shop import ShopBase, payment_status

    importlib.reload(handlers)   # registers the shop's handlers (again, after a clear)

    ShopBase.metadata.create_all(engine)
    try:
        def arrive(event_id, event_type, order):
            with sessions() as s:
                body = json.dumps({"id": event_id, "type": event_type, "data": {"object": {
                    "id": f"pi_{event_id}", "metadata": {"order": order}}}})
                message_id, _ = inbound.store(s, source="payments", event_id=event_id,
                                              event_type=event_type, body=body, headers={})
                s.commit()
            assert process(sessions, message_id).outcome == "delivered"

        arrive("e1", "payment_intent.succeeded", "A-1")
        arrive("e2", "payment_intent.payment_failed", "A-2")
        arrive("e3", "payment_intent.succeeded", "A-2")        # re-driven after the decline
        arrive("e4", "payment_intent.succeeded", "A-3")
        arrive("e5", "payment_intent.payment_failed", "A-3")   # the decline arrives late
        with sessions() as s:
            assert [payment_status(s, r) for r in ("A-1", "A-2", "A-3", "A-4")] == [
                "paid", "paid", "paid", "awaiting payment"]
    finally:
        inbound._handlers.clear()


@app_only
def test_non_ascii_signature_headers_are_400_not_500(receiver, sessions):
    """"²" is a digit to str.isdigit and "é" is not base64: both are refusals, not crashes."""
    mail = json.dumps({"type": "email.delivered"}).encode()
    now = str(int(time.time()))
    cases = [("email", {"webhook-id": "m1", "webhook-timestamp": now,
                        "webhook-signature": "v1,\u00e9".encode("latin-1")}),
             ("email", {"webhook-id": "m1", "webhook-timestamp": "1\u00b2".encode("latin-1"),
                        "webhook-signature": "v1,AAAA"}),
             ("payments", {"Stripe-Signature": "t=\u00b2,v1=00".encode("latin-1")})]
    for provider, headers in cases:
        r = receiver.post(f"/webhooks/{provider}", content=mail, headers=headers)
        assert r.status_code == 400, (headers, r.text)
    assert events(sessions) == []


def test_cli_status_filter_counts_toward_the_limit(sessions, handlers, capsys, monkeypatch,
                                                  db_url):
    monkeypatch.setenv("DATABASE_URL", db_url)
    m = store(sessions, "evt_l1")
    process(sessions, m)
    store(sessions, "evt_l2", "customer.created")   # newer, still pending
    code, out, _ = run_cli(capsys, "inbound", "list", "--status", "processed", "--limit", "1",
                           "--json")
    assert code == 0 and [r["event_id"] for r in json.loads(out)] == ["evt_l1"]
