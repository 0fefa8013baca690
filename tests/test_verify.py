"""Verify before retry (issue 10 §3): an ambiguous failure of a provider without
idempotency keys (e-mail), or one whose key is spent (payments: Stripe stores a 500 under
the key and replays it), is looked up at the provider before anything is sent again,
instead of becoming a "needs review" dead letter or a dead letter of replayed 500s.

Against the real sandbox over HTTP (its Email Activity search, ``GET /v3/messages``) and a
real database, with ``deliver_message``'s injected clock, as in ``test_classification``.
"""

from __future__ import annotations

import os
import random
from datetime import timedelta

import pytest
import requests
from sqlalchemy import select

from integrations.base import DONE, NOT_DONE
from integrations.errors import Ambiguous, Transient
from integrations.registry import build_provider
from outbox import Attempt, dispatch, lifecycle
from outbox.config import retry_policy
from outbox.decisions import LOST, decide
from outbox.models import AttemptOutcome, Message
from tests.test_classification import CHARGE, EMAIL, LEASE, T0, Clock, add, fault, row, run

SEND = "/v3/mail/send"
SEARCH = "/v3/messages"
VERIFY_AFTER = timedelta(seconds=300)   # the email adapter's default


@pytest.fixture(autouse=True)
def _no_broker(publisher):
    """Enqueued rows go to a recording publisher (see ``test_classification``)."""


@pytest.fixture
def email(sandbox):
    provider = build_provider("email", {"OUTBOX_EMAIL_BASE_URL": sandbox.url,
                                        "OUTBOX_EMAIL_API_KEY": "sk_test_outbox",
                                        "OUTBOX_EMAIL_TIMEOUT": "2"})
    yield provider
    provider.close()


def _add(sessions, key):
    return add(sessions, key, EMAIL, provider="email", operation="send")


def _sends(sandbox, key):
    return sum(1 for e in sandbox.state.stats()["request_log"]
               if e["path"] == SEND and e["key"] == key)


def _effects(sandbox, key):
    return sandbox.state.stats(include_log=False)["effects_by_key"].get(key, 0)


def _outcomes(sessions, message_id):
    with sessions() as s:
        return list(s.scalars(select(Attempt.outcome).where(Attempt.message_id == message_id)
                              .order_by(Attempt.id)))


def _through_a_worker(procs, sessions, sandbox, provider, path, key, env):
    """One message of ``provider`` through a real worker and relay (``env`` theirs), its
    first request answered 500 after the effect; the message once delivered."""
    from outbox import MessageStatus, enqueue
    from tests.harness import wait_until

    procs.worker("w1", queues=provider, **env)
    procs.relay(**env)
    fault(sandbox, fault="error_after", status=500, count=1, path=path)
    operation, payload = ("send", EMAIL) if provider == "email" else ("charge", CHARGE)
    with sessions() as s:
        enqueue(s, provider=provider, operation=operation, payload=payload,
                idempotency_key=key)
        s.commit()

    def delivered():
        with sessions() as s:
            return s.scalar(select(Message).where(Message.idempotency_key == key,
                                                  Message.status == MessageStatus.DELIVERED))

    return wait_until(delivered, 60, message=f"{provider} {key} to be verified and delivered")


def test_the_lookup_finds_a_sent_key_and_not_an_unsent_one(email, sandbox):
    key = 'order-7 "gift" \\ wrap'     # quotes and a backslash survive the query
    delivery = email.deliver("send", EMAIL, key)
    found = email.verify("send", EMAIL, key)
    assert (found.state, found.provider_ref) == (DONE, delivery.provider_ref)
    assert email.verify("send", EMAIL, "order-8").state == NOT_DONE
    assert email.verify("send", EMAIL, 'order-7 "gift"').state == NOT_DONE


def test_an_email_sent_before_its_500_is_found_and_delivered_without_a_second_send(
        sessions, email, sandbox):
    fault(sandbox, fault="error_after", status=500, count=1, path=SEND)
    mid = _add(sessions, "after-effect")
    clock = Clock()
    assert run(sessions, email, mid, clock).outcome is AttemptOutcome.RETRY
    m = row(sessions, mid)
    assert (m.status, m.attempts, m.verify_first, m.needs_review) == ("pending", 1, True, False)
    assert m.next_attempt_at == T0 + VERIFY_AFTER
    clock.now = m.next_attempt_at
    result = run(sessions, email, mid, clock)
    assert result.outcome is AttemptOutcome.DELIVERED
    assert result.summary.startswith("verified: the last attempt took effect")
    m = row(sessions, mid)
    assert m.status == "delivered" and m.provider_ref in sandbox.state.emails
    assert (_sends(sandbox, "after-effect"), _effects(sandbox, "after-effect")) == (1, 1)
    assert _outcomes(sessions, mid) == ["retry", "delivered"]


def test_an_email_whose_500_came_before_sending_is_sent_again_once(sessions, email, sandbox):
    fault(sandbox, fault="error_before", status=500, count=1, path=SEND)
    mid = _add(sessions, "before-effect")
    clock = Clock()
    assert run(sessions, email, mid, clock).outcome is AttemptOutcome.RETRY
    clock.now = row(sessions, mid).next_attempt_at
    result = run(sessions, email, mid, clock)
    assert result.outcome is AttemptOutcome.DELIVERED and not result.summary.startswith("verif")
    m = row(sessions, mid)
    assert (m.status, m.verify_first, m.needs_review) == ("delivered", False, False)
    assert (_sends(sandbox, "before-effect"), _effects(sandbox, "before-effect")) == (2, 1)


def test_a_lookup_this_key_may_not_make_needs_review(sessions, email, sandbox):
    """403 from the search (a key without the Email Activity add-on): it cannot tell, so
    a person decides, as without verification; nothing is sent again."""
    fault(sandbox, fault="error_after", status=500, count=1, path=SEND)
    fault(sandbox, fault="status", status=403, path=SEARCH)
    mid = _add(sessions, "no-access")
    clock = Clock()
    run(sessions, email, mid, clock)
    clock.now = row(sessions, mid).next_attempt_at
    assert run(sessions, email, mid, clock).outcome is AttemptOutcome.DEAD
    m = row(sessions, mid)
    assert (m.status, m.needs_review, m.verify_first) == ("dead", True, False)
    assert m.last_error.startswith("needs review: the provider may have acted and its lookup "
                                   "cannot tell: verification failed: ")
    assert _sends(sandbox, "no-access") == 1


def test_a_failing_lookup_waits_without_an_attempt_and_asks_again(sessions, email, sandbox):
    fault(sandbox, fault="error_after", status=500, count=1, path=SEND)
    fault(sandbox, fault="status", status=503, count=1, path=SEARCH)
    mid = _add(sessions, "search-down")
    clock = Clock()
    run(sessions, email, mid, clock)
    clock.now = row(sessions, mid).next_attempt_at
    assert run(sessions, email, mid, clock).outcome is AttemptOutcome.DEFERRED
    m = row(sessions, mid)
    assert (m.status, m.attempts, m.verify_first) == ("pending", 1, True)
    assert m.next_attempt_at == clock.now + retry_policy("email").defer_delay
    clock.now = m.next_attempt_at
    assert run(sessions, email, mid, clock).outcome is AttemptOutcome.DELIVERED
    assert (_sends(sandbox, "search-down"), _effects(sandbox, "search-down")) == (1, 1)
    assert _outcomes(sessions, mid) == ["retry", "deferred", "delivered"]


def test_a_lost_lease_on_email_verifies_instead_of_needing_review(sessions):
    mid = _add(sessions, "lost")
    dispatch.dispatcher().flush()   # its UPDATE of the fresh row would hide it from SKIP LOCKED
    with sessions() as s:
        assert lifecycle.claim(s, mid, LEASE, T0) is not None
        recovered = lifecycle.recover_expired_leases(
            s, idempotent=lambda _: False, policy_for=retry_policy,
            verify_after=lambda _: VERIFY_AFTER.total_seconds(), now=T0 + LEASE)
    [(_, decision)] = recovered
    assert decision.verify_first and decision.outcome is AttemptOutcome.RETRY
    m = row(sessions, mid)
    assert (m.status, m.verify_first, m.needs_review) == ("pending", True, False)
    assert m.next_attempt_at == T0 + LEASE + VERIFY_AFTER


def test_a_spent_budget_gets_one_last_lookup(sessions, email, sandbox):
    """An ambiguous failure with the budget (max age) spent, or spent by the time the
    lookup is due: the lookup sends nothing, so it is still made, before the budget check;
    found → delivered, not found → exhausted (not sent again, and not "needs review": it
    is known not to have gone out)."""
    policy = retry_policy("email")
    at = T0 + policy.max_age + timedelta(seconds=1)
    decision = decide(LOST, attempts=0, rate_limited=0, budget_started_at=T0, policy=policy,
                      idempotent=False, now=at, rng=random.Random(1), verify_after_s=300.0)
    assert (decision.outcome, decision.verify_first) == (AttemptOutcome.RETRY, True)
    for key, when, outcome, status in (("late-sent", "error_after", "delivered", "delivered"),
                                       ("late-unsent", "error_before", "dead", "dead")):
        fault(sandbox, fault=when, status=500, count=1, match_key=key)
        mid = _add(sessions, key)
        clock = Clock(T0 + policy.max_age - timedelta(seconds=2))   # its budget runs out
        assert run(sessions, email, mid, clock).outcome is AttemptOutcome.RETRY
        clock.now = row(sessions, mid).next_attempt_at
        assert run(sessions, email, mid, clock).outcome == outcome
        m = row(sessions, mid)
        assert (m.status, m.needs_review, _sends(sandbox, key)) == (status, False, 1)


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_worker_verifies_an_ambiguous_email_and_delivers_it_once(sessions, procs, sandbox,
                                                                   celery_publisher):
    """The same with a real worker and relay, the lookup 1 s after the ambiguous 500."""
    message = _through_a_worker(procs, sessions, sandbox, "email", SEND, "e2e",
                                {"OUTBOX_EMAIL_VERIFY_AFTER": "1"})
    assert (message.needs_review, message.provider_ref in sandbox.state.emails) == (False, True)
    assert (_sends(sandbox, "e2e"), _effects(sandbox, "e2e")) == (1, 1)
    assert _outcomes(sessions, message.id) == ["retry", "delivered"]



# --- payments: a 500 is stored under its key ----------------------------------------------

CHARGES = "/v1/payment_intents"


@pytest.fixture
def payments(sandbox):
    """The payments provider against a sandbox whose search has no lag: these tests' clock
    jumps the 60 s the outbox waits for it, the sandbox's does not."""
    requests.post(sandbox.url + "/_sandbox/config", json={"search_lag_s": 0},
                  timeout=5).raise_for_status()
    provider = build_provider("payments", {"OUTBOX_PAYMENTS_BASE_URL": sandbox.url,
                                           "OUTBOX_PAYMENTS_API_KEY": "sk_test_outbox"})
    yield provider
    provider.close()


def test_a_charge_whose_500_came_after_the_effect_is_found_and_delivered_once(
        sessions, payments, sandbox):
    fault(sandbox, fault="error_after", status=500, count=1, path=CHARGES)
    mid = add(sessions, "paid-then-500")
    clock = Clock()
    assert run(sessions, payments, mid, clock).outcome is AttemptOutcome.RETRY
    m = row(sessions, mid)
    assert (m.verify_first, m.needs_review, m.key_generation) == (True, False, 0)
    assert m.next_attempt_at == T0 + timedelta(seconds=60)
    clock.now = m.next_attempt_at
    result = run(sessions, payments, mid, clock)
    assert result.outcome is AttemptOutcome.DELIVERED and result.summary.startswith("verified")
    m = row(sessions, mid)
    assert m.provider_ref in sandbox.state.payment_intents and m.key_generation == 0
    stats = sandbox.state.stats(include_log=False)
    assert stats["effects_total"] == 1 and stats["requests_by_key"]["paid-then-500"] == 1


def test_a_charge_whose_500_came_before_the_effect_is_sent_under_the_next_key_once(
        sessions, payments, sandbox):
    """Nothing charged under the spent key: the next attempt charges under ``<key>~1``;
    the spent key would have replayed its 500 (``test_sandbox``)."""
    fault(sandbox, fault="error_before", status=500, count=1, path=CHARGES)
    mid = add(sessions, "500-first")
    clock = Clock()
    run(sessions, payments, mid, clock)
    clock.now = row(sessions, mid).next_attempt_at
    result = run(sessions, payments, mid, clock)
    assert result.outcome is AttemptOutcome.DELIVERED and not result.summary.startswith("verif")
    m = row(sessions, mid)
    assert (m.status, m.key_generation, m.verify_first) == ("delivered", 1, False)
    stats = sandbox.state.stats(include_log=False)
    assert stats["effects_total"] == 1 and stats["effects_by_key"] == {"500-first~1": 1}
    [pi] = sandbox.state.payment_intents.values()
    assert pi["metadata"]["outbox_key"] == "500-first~1"


def test_a_refund_whose_500_came_after_the_effect_is_found_in_the_refund_list(
        sessions, payments, sandbox):
    intent = payments.deliver("charge", CHARGE, "to-refund").provider_ref
    fault(sandbox, fault="error_after", status=500, count=1, path="/v1/refunds")
    mid = add(sessions, "refund-500", {"payment_intent": intent, "amount": 500},
              operation="refund")
    clock = Clock()
    run(sessions, payments, mid, clock)
    clock.now = row(sessions, mid).next_attempt_at
    assert run(sessions, payments, mid, clock).outcome is AttemptOutcome.DELIVERED
    assert row(sessions, mid).provider_ref in sandbox.state.refunds
    assert len(sandbox.state.refunds) == 1


def _stripe_error(status, headers=None):
    adapter = build_provider("payments", {"OUTBOX_PAYMENTS_BASE_URL": "http://127.0.0.1:9",
                                          "OUTBOX_PAYMENTS_API_KEY": "sk_test_x"}).adapter
    from integrations.base import Response
    return adapter.error_for(Response(status, headers or {}, {"error": {
        "type": "api_error", "message": "An unknown error occurred"}}, 0.0))


@pytest.mark.parametrize("status, headers, kind, spent", [
    (500, {}, Ambiguous, True),
    (500, {"Stripe-Should-Retry": "true"}, Transient, False),
    (503, {"Stripe-Should-Retry": "false"}, Ambiguous, True),
    (503, {}, Transient, False),
    (502, {}, Transient, False),
])
def test_stripe_should_retry_and_a_500_decide_whether_the_key_is_spent(status, headers, kind,
                                                                      spent):
    error = _stripe_error(status, headers)
    assert type(error) is kind and error.key_spent is spent


@pytest.mark.parametrize("key, generation, expected", [
    ("order-42", 0, "order-42"), ("order-42", 1, "order-42~1"), ("order-42", 12, "order-42~12"),
])
def test_the_provider_key_of_each_generation(key, generation, expected):
    assert lifecycle.provider_key(key, generation) == expected


def test_a_long_key_gets_a_digest_so_the_next_key_fits():
    key = "k" * 255
    derived = lifecycle.provider_key(key, 3)
    assert len(derived) <= 255 and derived.endswith("~3") and derived != lifecycle.provider_key(
        "j" * 255, 3)


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_worker_waits_out_the_search_lag_and_charges_once(sessions, procs, sandbox,
                                                          celery_publisher):
    """The sandbox's search shows a charge 1 s after it is made; the worker looks 2 s after
    the stored 500, finds it, and records it delivered: one charge. (Looking earlier would
    find nothing and charge again under the next key: why OUTBOX_PAYMENTS_VERIFY_AFTER
    defaults to Stripe's "up to a minute".)"""
    requests.post(sandbox.url + "/_sandbox/config", json={"search_lag_s": 1.0},
                  timeout=5).raise_for_status()
    message = _through_a_worker(procs, sessions, sandbox, "payments", CHARGES, "lagged",
                                {"OUTBOX_PAYMENTS_VERIFY_AFTER": "2"})
    assert message.provider_ref in sandbox.state.payment_intents
    assert sandbox.state.stats(include_log=False)["effects_total"] == 1
    assert _outcomes(sessions, message.id) == ["retry", "delivered"]


def test_a_second_spent_key_is_verified_and_the_third_key_charges_once(sessions, payments,
                                                                       sandbox):
    """500 before the effect twice: <key> and <key>~1 are both spent, each verified not
    done; <key>~2 charges. The generation is written before each send."""
    fault(sandbox, fault="error_before", status=500, count=2, path=CHARGES)
    mid = add(sessions, "twice")
    clock = Clock()
    for generation in (0, 1):
        assert run(sessions, payments, mid, clock).outcome is AttemptOutcome.RETRY
        m = row(sessions, mid)
        assert (m.key_generation, m.verify_first) == (generation, True)
        clock.now = m.next_attempt_at
    assert run(sessions, payments, mid, clock).outcome is AttemptOutcome.DELIVERED
    assert row(sessions, mid).key_generation == 2
    assert sandbox.state.stats(include_log=False)["effects_by_key"] == {"twice~2": 1}


def test_a_worker_lost_while_verifying_payments_keeps_the_question(sessions):
    """A lost lease on payments is normally retried at once under the same key; one whose
    message was to verify first keeps that, due once the search can be trusted again."""
    mid = add(sessions, "lost-verifying")
    dispatch.dispatcher().flush()
    with sessions() as s:
        s.get(Message, mid).verify_first = True
        s.commit()
        assert lifecycle.claim(s, mid, LEASE, T0) is not None
        [(_, decision)] = lifecycle.recover_expired_leases(
            s, idempotent=lambda _: True, policy_for=retry_policy,
            verify_after=lambda _: 60.0, now=T0 + LEASE)
    assert decision.verify_first
    m = row(sessions, mid)
    assert (m.status, m.verify_first) == ("pending", True)
    assert m.next_attempt_at == T0 + LEASE + timedelta(seconds=60)


def test_a_lookup_failing_past_the_max_age_needs_review(sessions, email, sandbox):
    fault(sandbox, fault="error_after", status=500, count=1, path=SEND)
    fault(sandbox, fault="status", status=503, path=SEARCH)
    mid = _add(sessions, "search-gone")
    clock = Clock()
    run(sessions, email, mid, clock)
    clock.now = T0 + retry_policy("email").max_age + timedelta(seconds=1)
    assert run(sessions, email, mid, clock).outcome is AttemptOutcome.DEAD
    assert row(sessions, mid).needs_review
    assert _sends(sandbox, "search-gone") == 1


def test_a_lookup_answered_401_reads_the_rotated_key_and_asks_again(sessions, tmp_path,
                                                                    sandbox):
    """As a delivery does: the key file was rotated, the first lookup gets 401, the
    credential is re-read and the lookup sent once more."""
    key_file = tmp_path / "email.key"
    key_file.write_text("sk_test_outbox")
    provider = build_provider("email", {"OUTBOX_EMAIL_BASE_URL": sandbox.url,
                                        "OUTBOX_EMAIL_API_KEY_FILE": str(key_file)})
    try:
        sent = provider.deliver("send", EMAIL, "rotated")
        requests.post(sandbox.url + "/_sandbox/config", json={"email_api_key": "sk_test_newkey"},
                      timeout=5).raise_for_status()
        before = key_file.stat()
        key_file.write_text("sk_test_newkey")   # same size and, below, the same mtime: the
        os.utime(key_file, ns=(before.st_atime_ns, before.st_mtime_ns))   # cache cannot tell
        found = provider.verify("send", EMAIL, "rotated")
    finally:
        provider.close()
    assert (found.state, found.provider_ref) == (DONE, sent.provider_ref)
    searches = [e["status"] for e in sandbox.state.stats()["request_log"] if e["path"] == SEARCH]
    assert searches == [401, 200]
