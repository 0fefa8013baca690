"""Every row of the error table (README, "Error classification"), against the real sandbox over HTTP and a real database.

``deliver_message`` runs without Celery, with an injected clock and jitter, so
each row's outcome and retry time is asserted exactly.
"""

from __future__ import annotations

import random
import socket
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
import requests
from sqlalchemy import select

from integrations.http import RequestsTransport
from integrations.registry import build_provider
from outbox import Attempt, Message, MessageStatus, dispatch, enqueue
from outbox.config import retry_policy
from outbox.models import AttemptOutcome
from tasks.delivery import deliver_message
from tests.tls_servers import (
    answer_plain_http,
    close_during_handshake,
    old_protocol_context,
    read_request_then_answer_in_clear,
    read_request_then_drop,
    server_context,
    tls,
    trust,
)

T0 = datetime(2026, 11, 21, 12, 0, 0)
CHARGE = {"amount": 1999, "currency": "usd"}
EMAIL = {"to": "customer@example.com", "from": "shop@example.com", "subject": "Your order",
         "text": "Thank you."}
# What each provider's test message is: (operation, payload). email has no idempotency.
MESSAGES = {"payments": ("charge", CHARGE), "email": ("send", EMAIL)}
LEASE = timedelta(seconds=60)


class Clock:
    def __init__(self, now: datetime = T0):
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture(autouse=True)
def _no_broker(publisher):
    """Enqueued rows go to a recording publisher, not the test Redis: there, an unconsumed
    payments queue fills up, and past OUTBOX_RELAY_MAX_QUEUED after-commit dispatch hands
    new rows to the relay, due at the real time, which is later than these tests' clock."""


@pytest.fixture
def provider(sandbox):
    env = {"OUTBOX_PAYMENTS_BASE_URL": sandbox.url, "OUTBOX_PAYMENTS_API_KEY": "sk_test_outbox",
           "OUTBOX_PAYMENTS_TIMEOUT": "0.5", "OUTBOX_PAYMENTS_CONNECT_TIMEOUT": "0.5"}
    p = build_provider("payments", env)
    yield p
    p.close()


def fault(sandbox, **rule):
    requests.post(sandbox.url + "/_sandbox/faults", json=rule, timeout=5).raise_for_status()


def add(sessions, key, payload=CHARGE, at=T0 - timedelta(seconds=1), *, provider="payments",
        operation="charge"):
    with sessions() as s:
        m = enqueue(s, provider=provider, operation=operation, payload=payload,
                    idempotency_key=key)
        m.next_attempt_at = m.created_at = m.budget_started_at = m.updated_at = at
        s.commit()
        return m.id


def run(sessions, provider, message_id, clock, seed=7):
    return deliver_message(message_id, sessions=sessions, lease=LEASE,
                           provider_for=lambda _name: provider, clock=clock,
                           rng=random.Random(seed))


def row(sessions, message_id):
    with sessions() as s:
        return s.get(Message, message_id)


def effects(sandbox, key):
    return sandbox.state.stats(include_log=False)["effects_by_key"].get(key, 0)


@pytest.mark.parametrize("status", [502, 503, 504, 408])
def test_gateway_errors_are_transient_and_retry_with_backoff(sessions, provider, sandbox, status):
    """502/503/504/408 → transient: pending, attempt consumed, next = backoff(1) with jitter."""
    fault(sandbox, fault="error_before", status=status, count=1)
    mid = add(sessions, f"gw-{status}")
    result = run(sessions, provider, mid, Clock())
    m = row(sessions, mid)
    expected = T0 + retry_policy("payments").backoff(1, random.Random(7))
    assert (result.outcome, m.status, m.attempts) == (AttemptOutcome.RETRY, "pending", 1)
    assert (m.last_error_class, m.last_status_code) == ("transient", status)
    assert m.next_attempt_at == expected
    assert effects(sandbox, f"gw-{status}") == 0


def test_connect_refused_is_transient(sessions, sandbox):
    """Nothing listening (request never sent) → transient retry."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    closed = build_provider("payments", {"OUTBOX_PAYMENTS_BASE_URL": f"http://127.0.0.1:{port}",
                                         "OUTBOX_PAYMENTS_API_KEY": "sk_test_outbox"})
    mid = add(sessions, "refused")
    result = run(sessions, closed, mid, Clock())
    assert result.outcome is AttemptOutcome.RETRY
    assert row(sessions, mid).last_error_class == "transient"


def tls_provider(name, server, ca):
    """Provider ``name`` talking https to a loopback ``server``, trusting the test CA."""
    transport = RequestsTransport(pool_size=1)
    trust(transport, ca)
    prefix = f"OUTBOX_{name.upper()}_"
    return build_provider(name, {prefix + "BASE_URL": server.url,
                                 prefix + "API_KEY": "sk_test_outbox",
                                 prefix + "TIMEOUT": "0.5", prefix + "CONNECT_TIMEOUT": "0.5"},
                          transport=transport)


def through_tls(sessions, loopback, tls_certs, name, behaviour, key):
    """One message of ``name`` delivered once to a loopback server doing ``behaviour``;
    (result, its row, the server)."""
    srv = loopback(behaviour)
    provider = tls_provider(name, srv, tls_certs.ca)
    operation, payload = MESSAGES[name]
    mid = add(sessions, key, payload, provider=name, operation=operation)
    result = run(sessions, provider, mid, Clock())
    provider.close()
    return result, row(sessions, mid), srv


HANDSHAKE_FAILURES = {
    "not TLS": lambda certs: answer_plain_http,
    "closed mid-handshake": lambda certs: close_during_handshake,
    "untrusted certificate": lambda certs: tls(
        server_context(certs.untrusted_cert, certs.untrusted_key), read_request_then_drop),
    "TLS 1.1 only": lambda certs: tls(old_protocol_context(certs.cert, certs.key),
                                      read_request_then_drop),
}


@pytest.mark.parametrize("name", ["payments", "email"])
@pytest.mark.parametrize("case", list(HANDSHAKE_FAILURES))
def test_tls_handshake_failure_is_transient_even_without_idempotency(
        sessions, loopback, tls_certs, name, case):
    """TLS handshake failed (never sent: not TLS, closed, certificate rejected, no common
    protocol) → transient: pending, next = backoff(1); an e-mail too, not "needs review"."""
    result, m, srv = through_tls(sessions, loopback, tls_certs, name,
                                 HANDSHAKE_FAILURES[case](tls_certs), f"tls-{name}")
    assert (result.outcome, m.status, m.attempts, m.needs_review) == (
        AttemptOutcome.RETRY, "pending", 1, False)
    assert (m.last_error_class, m.last_status_code) == ("transient", None)
    assert m.last_error.startswith("tls_error: TLS ")
    assert m.next_attempt_at == T0 + retry_policy(name).backoff(1, random.Random(7))
    assert srv.requests == []


@pytest.mark.parametrize("name", ["payments", "email"])
@pytest.mark.parametrize("behaviour", [read_request_then_drop, read_request_then_answer_in_clear],
                         ids=["dropped after the request", "SSL error reading the response"])
def test_tls_failure_after_the_handshake_is_ambiguous(
        sessions, loopback, tls_certs, name, behaviour):
    """Handshake done and request read, then the connection drops or the response is not
    TLS (maybe sent) → ambiguous: payments retries (same key) after the backoff; e-mail
    (no idempotency) verifies first, once its activity search can be trusted (300 s)."""
    result, m, srv = through_tls(sessions, loopback, tls_certs, name,
                                 tls(server_context(tls_certs.cert, tls_certs.key), behaviour),
                                 f"tls-after-{name}")
    assert (result.outcome, m.status, m.attempts) == (AttemptOutcome.RETRY, "pending", 1)
    assert (m.last_error_class, m.needs_review) == ("ambiguous", False)
    assert m.verify_first == (name == "email")
    if name == "email":
        assert m.next_attempt_at == T0 + timedelta(seconds=300)
    assert len(srv.requests) == 1


def test_429_waits_retry_after_without_consuming_an_attempt(sessions, provider, sandbox):
    """429 + Retry-After (seconds) → next attempt exactly then; attempts stay 0."""
    fault(sandbox, fault="rate_limit", retry_after="2", count=1)
    mid = add(sessions, "rl")
    run(sessions, provider, mid, Clock())
    m = row(sessions, mid)
    assert (m.status, m.attempts, m.rate_limited_count) == ("pending", 0, 1)
    assert m.last_error_class == "rate_limited"
    assert m.next_attempt_at == T0 + timedelta(seconds=2)


def test_429_with_http_date_retry_after_is_parsed(sessions, provider, sandbox):
    """Retry-After as an HTTP date in the future → rate_limited with a wait > 0."""
    when = datetime.now(UTC) + timedelta(seconds=30)
    fault(sandbox, fault="rate_limit", retry_after=format_datetime(when, usegmt=True), count=1)
    mid = add(sessions, "rl-date")
    run(sessions, provider, mid, Clock())
    m = row(sessions, mid)
    wait = (m.next_attempt_at - T0).total_seconds()
    assert m.last_error_class == "rate_limited" and 25 <= wait <= 31


@pytest.mark.parametrize("kind", ["error_after", "drop_after", "slow_after"])
def test_ambiguous_failures_retry_with_same_key_and_the_effect_happens_once(
        sessions, provider, sandbox, kind):
    """500 after the effect / connection dropped / read timeout → ambiguous, exactly one
    effect in the end. Dropped or timed out: the retry with the same idempotency key gets
    the stored result. A 500: Stripe stores it under the key, so the same key would only
    replay it; the key is spent, and the next attempt, once the search is consistent
    (60 s), finds the charge by its metadata and records it delivered."""
    requests.post(sandbox.url + "/_sandbox/config", json={"search_lag_s": 0},
                  timeout=5).raise_for_status()   # this test's clock is not the sandbox's
    rule = {"fault": kind, "count": 1, "match_key": f"amb-{kind}"}
    if kind == "error_after":
        rule["status"] = 500
    if kind == "slow_after":
        rule["delay_s"] = 3
    fault(sandbox, **rule)
    mid = add(sessions, f"amb-{kind}")
    clock = Clock()
    first = run(sessions, provider, mid, clock)
    m = row(sessions, mid)
    assert (first.outcome, m.last_error_class, m.attempts) == (AttemptOutcome.RETRY, "ambiguous", 1)
    assert m.verify_first == (kind == "error_after")
    if kind == "error_after":
        assert m.next_attempt_at == T0 + timedelta(seconds=60)
    assert effects(sandbox, f"amb-{kind}") == 1
    clock.now = m.next_attempt_at
    second = run(sessions, provider, mid, clock)
    assert second.outcome is AttemptOutcome.DELIVERED
    assert second.summary.startswith("verified") == (kind == "error_after")
    assert row(sessions, mid).status == MessageStatus.DELIVERED
    assert sandbox.state.stats(include_log=False)["effects_total"] == 1


def test_409_key_in_progress_is_transient(sessions, provider, sandbox):
    """409 idempotency_key_in_use → transient retry (same key)."""
    fault(sandbox, fault="status", status=409, count=1, body={"error": {
        "type": "idempotency_error", "code": "idempotency_key_in_use",
        "message": "There is currently another in-progress request using this Idempotent Key"}})
    mid = add(sessions, "in-use")
    assert run(sessions, provider, mid, Clock()).outcome is AttemptOutcome.RETRY
    assert row(sessions, mid).last_error_class == "transient"


@pytest.mark.parametrize("status, code", [(400, "parameter_invalid"), (403, "forbidden"),
                                          (404, "resource_missing"), (410, "gone"),
                                          (422, "unprocessable")])
def test_client_errors_dead_letter_at_once(sessions, provider, sandbox, status, code):
    """400/403/404/410/422 → client_error: dead at once, no retry."""
    fault(sandbox, fault="status", status=status, count=1,
          body={"error": {"type": "invalid_request_error", "code": code, "message": "no"}})
    mid = add(sessions, f"client-{status}")
    result = run(sessions, provider, mid, Clock())
    m = row(sessions, mid)
    assert (result.outcome, m.status, m.last_error_class) == (AttemptOutcome.DEAD, "dead",
                                                             "client_error")
    assert code in result.summary


def test_card_declined_402_dead_letters_with_readable_label(sessions, provider, sandbox):
    """402 card_declined → dead at once; labelled with codes only:
    `payments.charge <id>` and `client_error 402 card_declined: not retryable`."""
    mid = add(sessions, "declined", {**CHARGE, "customer": "cus_declined"})
    result = run(sessions, provider, mid, Clock())
    assert result.outcome is AttemptOutcome.DEAD
    assert result.label == f"payments.charge {mid}"
    assert result.summary == "client_error 402 card_declined: not retryable"
    assert sandbox.state.stats(include_log=False)["requests_total"] == 1


def test_key_reused_with_different_parameters_is_a_client_error(sessions, provider, sandbox):
    """The provider already saw this key with other parameters → 400 idempotency_error → dead."""
    requests.post(sandbox.url + "/v1/payment_intents", data={"amount": 500, "currency": "eur"},
                  headers={"Authorization": "Bearer sk_test_outbox", "Idempotency-Key": "reused"},
                  timeout=5).raise_for_status()
    mid = add(sessions, "reused")
    assert run(sessions, provider, mid, Clock()).outcome is AttemptOutcome.DEAD
    m = row(sessions, mid)
    assert (m.last_error_class, m.last_status_code) == ("client_error", 400)


def test_401_refreshes_credentials_once_then_dead_letters_as_auth(sessions, sandbox):
    """401 → one credential refresh and one more request, then dead with class auth."""
    wrong = build_provider("payments", {"OUTBOX_PAYMENTS_BASE_URL": sandbox.url,
                                        "OUTBOX_PAYMENTS_API_KEY": "sk_test_wrong_key_12345"})
    mid = add(sessions, "auth")
    assert run(sessions, wrong, mid, Clock()).outcome is AttemptOutcome.DEAD
    assert row(sessions, mid).last_error_class == "auth"
    assert sandbox.state.stats(include_log=False)["requests_by_key"]["auth"] == 2


def test_retry_timeline_with_injected_clock(sessions, provider, sandbox):
    """Three 503s then success: attempt rows in order, each next_attempt_at = the policy's
    backoff for that attempt from the injected clock; one effect."""
    fault(sandbox, fault="error_before", status=503, count=3, match_key="timeline")
    mid = add(sessions, "timeline")
    clock, policy, expected = Clock(), retry_policy("payments"), []
    for n in range(1, 4):
        run(sessions, provider, mid, clock, seed=n)
        expected.append(clock.now + policy.backoff(n, random.Random(n)))
        clock.now = row(sessions, mid).next_attempt_at
        assert clock.now == expected[-1]
    assert run(sessions, provider, mid, clock).outcome is AttemptOutcome.DELIVERED
    with sessions() as s:
        attempts = s.query(Attempt).filter_by(message_id=mid).order_by(Attempt.id).all()
    assert [a.outcome for a in attempts] == ["retry", "retry", "retry", "delivered"]
    assert [a.next_attempt_at for a in attempts[:3]] == expected
    assert [a.status_code for a in attempts] == [503, 503, 503, 200]
    assert effects(sandbox, "timeline") == 1


def test_attempts_exhausted_dead_letters(sessions, provider, sandbox, monkeypatch):
    """With OUTBOX_PAYMENTS_MAX_ATTEMPTS=2, the second 503 dead-letters the message."""
    monkeypatch.setenv("OUTBOX_PAYMENTS_MAX_ATTEMPTS", "2")
    fault(sandbox, fault="error_before", status=503, match_key="exhaust")
    mid = add(sessions, "exhaust")
    clock = Clock()
    assert run(sessions, provider, mid, clock).outcome is AttemptOutcome.RETRY
    clock.now = row(sessions, mid).next_attempt_at
    result = run(sessions, provider, mid, clock)
    assert result.outcome is AttemptOutcome.DEAD
    assert row(sessions, mid).attempts == 2


def test_a_message_not_yet_due_is_not_delivered(sessions, provider, sandbox):
    """A stale broker message for a row scheduled later does nothing (no provider call)."""
    mid = add(sessions, "later", at=T0 + timedelta(minutes=5))
    # A row scheduled later is pending: wait out the after-commit dispatch, which marks the
    # fresh row queued (a queued row is claimed whatever its time), and undo its mark.
    dispatch.dispatcher().flush()
    with sessions() as s:
        s.get(Message, mid).status = MessageStatus.PENDING
        s.commit()
    assert run(sessions, provider, mid, Clock()).outcome is None
    assert sandbox.state.stats(include_log=False)["requests_total"] == 0


def test_log_lines_of_a_delivery_carry_its_identity(sessions, provider, sandbox, caplog):
    """Every record logged during a delivery has provider, message_id, attempt and the
    (sanitised) correlation id bound; the outcome is one line, no traceback; nothing is bound
    after it. (CR/LF in a correlation id are refused at enqueue.)"""
    import logging

    from outbox.logs import ContextFilter

    caplog.handler.addFilter(ContextFilter())   # what outbox.logs.configure installs
    with sessions() as s:
        m = enqueue(s, provider="payments", operation="charge", payload=CHARGE,
                    idempotency_key="ctx", correlation_id="req-7 token=abc123")
        m.next_attempt_at = m.created_at = m.budget_started_at = m.updated_at = T0
        s.commit()
        mid = m.id
    fault(sandbox, fault="error_before", status=503, count=1)
    with caplog.at_level(logging.DEBUG):
        run(sessions, provider, mid, Clock())
    during = [r for r in caplog.records if r.name == "integrations.http"]
    assert during, "the HTTP client logged nothing"
    for record in during:
        bound = record.outbox
        assert (bound["provider"], bound["message_id"], bound["attempt"]) == ("payments", mid, "1")
        assert bound["correlation_id"] == "req-7 token=***"   # sanitised when bound
        assert f" message_id={mid}" in record.context
    [outcome] = [r for r in caplog.records if r.name == "outbox.delivery"]
    assert outcome.getMessage().startswith(f"retry payments.charge {mid} transient 503 api_error; "
                                           "next attempt at 2026-11-21T12:00:01")
    assert outcome.exc_info is None and outcome.outbox["message_id"] == mid
    assert row(sessions, mid).last_error_class == "transient"   # logging did not break the call
    after = logging.getLogger("after").makeRecord("after", logging.INFO, "f", 1, "m", (), None)
    ContextFilter().filter(after)
    assert after.outbox == {} and after.context == ""


@pytest.mark.parametrize("idempotent, outcome", [(True, "retry"), (False, "dead")])
def test_an_unexpected_exception_mid_call_needs_review_without_idempotency(idempotent, outcome):
    """A non-integration exception (e.g. a time limit firing mid-request) is retried only where
    the provider deduplicates by key; otherwise it is dead-lettered as 'needs review'."""
    from celery.exceptions import SoftTimeLimitExceeded

    from outbox.decisions import decide, failure_from

    failure = failure_from(SoftTimeLimitExceeded("soft limit"))
    decision = decide(failure, attempts=0, rate_limited=0, budget_started_at=T0,
                      policy=retry_policy("payments"), idempotent=idempotent, now=T0)
    assert failure.error_class == "internal" and decision.outcome == outcome
    assert decision.needs_review == (not idempotent)


def test_personal_data_echoed_by_the_provider_stays_out_of_logs_and_labels(
        sessions, provider, sandbox, caplog):
    """A 400 whose message names the customer's e-mail and id: the attempt row and last_error
    keep the message with both masked; the outcome (Flower's text) and every log line carry
    codes only."""
    import logging

    fault(sandbox, fault="status", status=400, count=1, body={"error": {
        "type": "invalid_request_error", "code": "resource_missing",
        "message": "No such customer: 'cus_Q8xK2' (ann.smith@example.org)"}})
    mid = add(sessions, "pii")
    with caplog.at_level(logging.DEBUG):
        result = run(sessions, provider, mid, Clock())
    assert result.summary == "client_error 400 resource_missing: not retryable"
    m = row(sessions, mid)
    assert m.last_error == ("not retryable: 400 resource_missing: No such customer: "
                            "'cus_***' (***@example.org)")
    with sessions() as s:
        [attempt] = s.scalars(select(Attempt).where(Attempt.message_id == mid)).all()
    assert attempt.error == "400 resource_missing: No such customer: 'cus_***' (***@example.org)"
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "resource_missing" in logged
    for personal in ("cus_Q8xK2", "ann.smith", "No such customer"):
        assert personal not in logged and personal not in result.summary
