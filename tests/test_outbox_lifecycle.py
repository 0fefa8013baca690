"""The delivery state machine: atomic claims, lease fencing, failure outcomes, with an injected clock."""

from __future__ import annotations

import random
import threading
from datetime import timedelta
from types import SimpleNamespace

import pytest
from sqlalchemy import select

from integrations.errors import ClientError, Deferred, RateLimited, Transient
from outbox import dispatch, enqueue
from outbox.clock import utcnow
from outbox.config import current_retry_policy
from outbox.decisions import decide, failure_from
from outbox.lifecycle import claim, mark_delivered, record, recover_expired_leases, relay_due
from outbox.models import Attempt, AttemptOutcome, Message, MessageStatus
from outbox.retry import RetryPolicy

LEASE = timedelta(seconds=60)
TRANSIENT = failure_from(Transient("Service Unavailable", status_code=503))
DECLINED = failure_from(ClientError("Your card was declined.", status_code=402,
                                    code="card_declined"))


@pytest.fixture
def message_id(sessions, publisher):
    """One committed payments.charge message, already handed to the (recording) broker."""
    with sessions() as session:
        message = enqueue(session, provider="payments", operation="charge",
                          payload={"amount": 1999, "currency": "usd"},
                          idempotency_key="order-42-charge")
        session.commit()
    dispatch.dispatcher().flush()
    return message.id


@pytest.fixture
def t0(message_id):
    """A moment safely after the message became due."""
    return utcnow() + timedelta(seconds=1)


def _row(sessions, message_id) -> Message:
    with sessions() as session:
        return session.get(Message, message_id)


def _attempts(sessions, message_id) -> list[Attempt]:
    with sessions() as session:
        return list(session.scalars(select(Attempt).where(Attempt.message_id == message_id)
                                    .order_by(Attempt.id)))


def _claim(sessions, message_id, now, lease=LEASE):
    with sessions() as session:
        return claim(session, message_id, lease, now=now)


def _fail(sessions, c, failure, policy=None, now=None, rng=None, idempotent=True, worker=None):
    """Decide (``outbox.decisions``) and record one failed attempt; the decision and whether
    it was recorded under our lease."""
    now = now or utcnow()
    decision = decide(failure, attempts=c.attempts, rate_limited=c.rate_limited_count,
                      budget_started_at=c.budget_started_at, policy=policy or RetryPolicy(),
                      idempotent=idempotent, now=now, rng=rng)
    with sessions() as session:
        recorded = record(session, c, failure, decision, now=now, worker=worker)
    return SimpleNamespace(**decision.__dict__, recorded=recorded)


def _recover(session, now, idempotent=lambda provider: True):
    """The relay's lease recovery; (id, dead-lettered?) per row."""
    recovered = recover_expired_leases(session, now=now, idempotent=idempotent,
                                       policy_for=current_retry_policy)
    return [(mid, d.outcome is AttemptOutcome.DEAD) for mid, d in recovered]


# ---- claim ---------------------------------------------------------------------------------

def test_claim_takes_the_row_in_flight_with_a_lease(sessions, message_id, t0):
    """A claim → in_flight, lease token 1, lease expiring at now + lease; the Claim carries the payload."""
    c = _claim(sessions, message_id, t0)
    assert c is not None
    assert (c.id, c.provider, c.operation, c.lease_token, c.attempts) == (
        message_id, "payments", "charge", 1, 0)
    assert c.payload == {"amount": 1999, "currency": "usd"}
    assert c.idempotency_key == "order-42-charge" and c.claimed_at == t0
    row = _row(sessions, message_id)
    assert row.status == MessageStatus.IN_FLIGHT
    assert row.lease_expires_at == t0 + LEASE
    assert row.lease_token == 1


def test_claim_is_atomic_across_20_threads(sessions, message_id, t0):
    """20 threads claiming one id at once: exactly one Claim, 19 None."""
    barrier = threading.Barrier(20)
    results, errors = [], []

    def worker():
        try:
            with sessions() as session:
                barrier.wait(10)
                results.append(claim(session, message_id, LEASE, now=t0))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    claims = [r for r in results if r is not None]
    assert len(results) == 20
    assert len(claims) == 1 and results.count(None) == 19
    assert claims[0].lease_token == 1
    assert _row(sessions, message_id).lease_token == 1


def test_claim_of_a_row_not_yet_due_returns_none(sessions, message_id, t0):
    """A pending row (e.g. a scheduled retry) is not claimed before next_attempt_at, and is
    left untouched — a stale broker message cannot start a retry early."""
    from sqlalchemy import update as sa_update

    with sessions() as session:
        session.execute(sa_update(Message).where(Message.id == message_id)
                        .values(status=MessageStatus.PENDING))
        session.commit()
    created = _row(sessions, message_id).next_attempt_at
    assert _claim(sessions, message_id, created - timedelta(microseconds=1)) is None
    row = _row(sessions, message_id)
    assert row.status == MessageStatus.PENDING and row.lease_token == 0


def test_claim_of_missing_delivered_or_in_flight_rows_returns_none(sessions, message_id, t0):
    """Unknown id, a row in flight, and a delivered row cannot be claimed."""
    assert _claim(sessions, "01NOSUCHMESSAGE00000000000", t0) is None
    c = _claim(sessions, message_id, t0)
    assert _claim(sessions, message_id, t0) is None              # in flight, lease still valid
    with sessions() as session:
        mark_delivered(session, c, status_code=200, provider_ref="pi_1", now=t0)
    assert _claim(sessions, message_id, t0 + timedelta(hours=1)) is None
    assert _row(sessions, message_id).lease_token == 1


# ---- fencing -------------------------------------------------------------------------------

def test_expired_lease_is_recovered_and_a_late_success_still_counts(sessions, message_id, t0):
    """Lease expiry → pending, attempts+1, a 'lost' attempt. If the presumed-dead worker then
    reports success before anyone re-claimed the row, the success is recorded (same token):
    dropping it would send the message again."""
    old = _claim(sessions, message_id, t0)
    with sessions() as session:
        assert _recover(session, now=t0 + LEASE - timedelta(seconds=1)) == []
    assert _row(sessions, message_id).status == MessageStatus.IN_FLIGHT

    later = t0 + LEASE + timedelta(seconds=1)
    with sessions() as session:
        assert _recover(session, now=later) == [(message_id, False)]
    row = _row(sessions, message_id)
    assert row.status == MessageStatus.PENDING
    assert row.attempts == 1
    # due again at once (for the relay, without its grace for fresh rows): a dead worker
    # says nothing about the provider
    assert row.next_attempt_at == relay_due(later)
    assert row.lease_expires_at is None and row.last_error_class == "ambiguous"
    [lost] = _attempts(sessions, message_id)
    assert lost.outcome == AttemptOutcome.LOST and lost.lease_token == 1
    assert lost.error_class == "ambiguous" and lost.next_attempt_at == row.next_attempt_at

    with sessions() as session:
        outcome = mark_delivered(session, old, status_code=200, provider_ref="pi_late",
                                 now=later + timedelta(seconds=1))
    assert outcome is True
    row = _row(sessions, message_id)
    assert row.status == MessageStatus.DELIVERED and row.provider_ref == "pi_late"
    assert _claim(sessions, message_id, later + timedelta(seconds=2)) is None


def test_lost_lease_on_a_provider_without_idempotency_needs_review(sessions, message_id, t0):
    """A retry could act twice where the provider has no idempotency: dead, 'needs review'."""
    _claim(sessions, message_id, t0)
    later = t0 + LEASE + timedelta(seconds=1)
    with sessions() as session:
        assert _recover(session, now=later,
                        idempotent=lambda provider: False) == [(message_id, True)]
    row = _row(sessions, message_id)
    assert row.status == MessageStatus.DEAD and row.dead_at == later
    assert row.last_error.startswith("needs review:") and row.attempts == 1
    assert row.needs_review is True
    [attempt] = _attempts(sessions, message_id)
    assert attempt.outcome == AttemptOutcome.DEAD and attempt.next_attempt_at is None


def test_a_queued_row_is_claimed_even_if_this_workers_clock_is_behind(sessions, message_id, t0):
    """Queued rows were published because they were due: a worker clock 50 ms behind still
    claims them (a pending row scheduled later is still refused)."""
    from sqlalchemy import update as sa_update

    with sessions() as session:
        session.execute(sa_update(Message).where(Message.id == message_id).values(
            status=MessageStatus.QUEUED, next_attempt_at=t0 + timedelta(milliseconds=50)))
        session.commit()
    assert _claim(sessions, message_id, t0) is not None


def test_stale_claim_cannot_overwrite_a_newer_claim(sessions, message_id, t0):
    """After re-claim (token 2), the old token's failure is not recorded and the row stays in flight."""
    old = _claim(sessions, message_id, t0)
    later = t0 + LEASE * 2
    with sessions() as session:
        _recover(session, now=later)
    new = _claim(sessions, message_id, relay_due(later))
    assert new.lease_token == 2 and new.attempts == 1
    outcome = _fail(sessions, old, DECLINED, now=later)
    assert outcome.recorded is False
    with sessions() as session:
        assert mark_delivered(session, old, status_code=200, provider_ref="pi_old",
                              now=later) is False
    row = _row(sessions, message_id)
    assert row.status == MessageStatus.IN_FLIGHT and row.lease_token == 2
    with sessions() as session:
        assert mark_delivered(session, new, status_code=200, provider_ref="pi_2",
                              now=later) is True
    row = _row(sessions, message_id)
    assert row.status == MessageStatus.DELIVERED and row.provider_ref == "pi_2"
    assert row.attempts == 2


# ---- failure outcomes ------------------------------------------------------------------------

def test_transient_failure_schedules_a_retry_per_the_policy(sessions, message_id, t0):
    """RETRY → pending, attempts 1, next_attempt_at = now + backoff(1) with the same seeded jitter."""
    now = t0 + timedelta(seconds=1)
    outcome = _fail(sessions, _claim(sessions, message_id, t0), TRANSIENT, now=now,
                    rng=random.Random(0), worker="w1")
    expected = now + RetryPolicy().backoff(1, random.Random(0))
    assert timedelta(seconds=1) <= expected - now <= timedelta(seconds=1.25)
    assert outcome.outcome == AttemptOutcome.RETRY and outcome.recorded
    assert outcome.next_attempt_at == expected
    row = _row(sessions, message_id)
    assert row.status == MessageStatus.PENDING and row.attempts == 1
    assert row.next_attempt_at == expected and row.lease_expires_at is None
    assert (row.last_error_class, row.last_status_code) == ("transient", 503)
    [attempt] = _attempts(sessions, message_id)
    assert attempt.outcome == AttemptOutcome.RETRY
    assert (attempt.error_class, attempt.status_code) == ("transient", 503)
    assert attempt.error == "503: Service Unavailable"
    assert attempt.next_attempt_at == expected
    assert attempt.started_at == t0 and attempt.duration_ms == pytest.approx(1000.0)
    assert attempt.worker == "w1" and attempt.lease_token == 1


def test_permanent_failure_dead_letters_at_once(sessions, message_id, t0):
    """PERMANENT → dead on the first attempt, with the reason and the error kept."""
    now = t0 + timedelta(seconds=1)
    outcome = _fail(sessions, _claim(sessions, message_id, t0), DECLINED, now=now)
    assert outcome.outcome == AttemptOutcome.DEAD
    assert outcome.reason == "not retryable" and outcome.needs_review is False
    row = _row(sessions, message_id)
    assert row.status == MessageStatus.DEAD and row.dead_at == now
    assert row.attempts == 1       # the provider was called once
    assert (row.last_error_class, row.last_status_code) == ("client_error", 402)
    [attempt] = _attempts(sessions, message_id)
    assert attempt.outcome == AttemptOutcome.DEAD and attempt.error_class == "client_error"


def test_rate_limited_waits_retry_after_and_is_free_up_to_the_cap(sessions, message_id, t0):
    """429 with Retry-After 2 s → next at now+2 s; the first 2 are free, the 3rd consumes an attempt."""
    policy = RetryPolicy(free_rate_limited=2)
    limited = failure_from(RateLimited("Too Many Requests", status_code=429, retry_after_s=2))
    now = t0
    seen = []
    for _ in range(3):
        outcome = _fail(sessions, _claim(sessions, message_id, now), limited, policy, now=now)
        assert outcome.outcome == AttemptOutcome.RETRY
        assert outcome.next_attempt_at == now + timedelta(seconds=2)
        row = _row(sessions, message_id)
        assert row.next_attempt_at == now + timedelta(seconds=2)
        seen.append((row.attempts, row.rate_limited_count))
        now = outcome.next_attempt_at
    assert seen == [(0, 1), (0, 2), (1, 3)]


def test_deferral_consumes_no_attempt(sessions, message_id, t0):
    """DEFER (breaker open) → pending after defer_delay or the given wait; attempts and 429s unchanged."""
    breaker = failure_from(Deferred("breaker open", code="breaker_open"))
    outcome = _fail(sessions, _claim(sessions, message_id, t0), breaker, now=t0)
    assert outcome.outcome == AttemptOutcome.DEFERRED
    assert outcome.next_attempt_at == t0 + timedelta(seconds=1)
    later = outcome.next_attempt_at
    quota = failure_from(Deferred("quota", code="quota_exhausted", retry_after_s=30))
    outcome = _fail(sessions, _claim(sessions, message_id, later), quota, now=later)
    assert outcome.next_attempt_at == later + timedelta(seconds=30)
    row = _row(sessions, message_id)
    assert row.status == MessageStatus.PENDING
    assert (row.attempts, row.rate_limited_count) == (0, 0)
    assert [a.outcome for a in _attempts(sessions, message_id)] == ["deferred", "deferred"]


def test_deferral_never_dead_letters_even_past_the_budget(sessions, message_id, t0):
    """A deferral beyond max_age still reschedules: deferrals are not failures."""
    policy = RetryPolicy(max_age=timedelta(minutes=1))
    now = t0 + timedelta(hours=2)
    outcome = _fail(sessions, _claim(sessions, message_id, now),
                    failure_from(Deferred("breaker open")), policy, now=now)
    assert outcome.outcome == AttemptOutcome.DEFERRED
    assert _row(sessions, message_id).status == MessageStatus.PENDING


def test_exhausting_max_attempts_dead_letters_with_reason(sessions, message_id, t0):
    """With max_attempts=3 the third transient failure dead-letters: 'attempts exhausted (3/3)'."""
    policy = RetryPolicy(max_attempts=3)
    now, outcomes = t0, []
    for _ in range(3):
        outcome = _fail(sessions, _claim(sessions, message_id, now), TRANSIENT, policy, now=now,
                        rng=random.Random(1))
        outcomes.append(outcome.outcome)
        now = outcome.next_attempt_at or now
    assert outcomes == ["retry", "retry", "dead"]
    assert outcome.reason == "attempts exhausted (3/3)"
    row = _row(sessions, message_id)
    assert row.status == MessageStatus.DEAD and row.attempts == 3
    assert row.last_error_class == "transient"


def test_max_age_dead_letters_even_with_attempts_left(sessions, message_id, t0):
    """A transient failure once max_age has passed since enqueue dead-letters: 'max age passed'."""
    policy = RetryPolicy(max_age=timedelta(hours=1))
    budget_start = _row(sessions, message_id).budget_started_at
    c = _claim(sessions, message_id, t0)
    outcome = _fail(sessions, c, TRANSIENT, policy, now=budget_start + timedelta(hours=1))
    assert outcome.outcome == AttemptOutcome.DEAD
    assert outcome.reason.startswith("max age passed")
    row = _row(sessions, message_id)
    assert row.status == MessageStatus.DEAD and row.attempts == 1


# ---- a full timeline ----------------------------------------------------------------------------

def test_five_transient_failures_then_delivery_timeline(sessions, message_id, t0):
    """5 transient failures then success: 6 attempt rows in order, each retry at now + jittered backoff."""
    policy = RetryPolicy()
    rng, mirror = random.Random(0), random.Random(0)
    now = t0
    expected_next, claim_times = [], []
    for n in range(1, 6):
        c = _claim(sessions, message_id, now)
        assert c is not None and c.attempts == n - 1 and c.lease_token == n
        claim_times.append(now)
        failed_at = now + timedelta(milliseconds=250)
        outcome = _fail(sessions, c, TRANSIENT, policy, now=failed_at, rng=rng)
        want = failed_at + policy.backoff(n, mirror)
        assert outcome.next_attempt_at == want
        expected_next.append(want)
        # not claimable a microsecond before it is due
        assert _claim(sessions, message_id, want - timedelta(microseconds=1)) is None
        now = want
    c = _claim(sessions, message_id, now)
    claim_times.append(now)
    with sessions() as session:
        done = mark_delivered(session, c, status_code=200, provider_ref="pi_123",
                              now=now + timedelta(milliseconds=300), worker="w2")
    assert done is True

    gaps = [(b - a).total_seconds() for a, b in zip(claim_times[:-1], claim_times[1:], strict=True)]
    for n, gap in enumerate(gaps, start=1):      # 0.25 s of work + 2**(n-1) s * (1 + 0..25 %)
        assert 0.25 + 2 ** (n - 1) <= gap <= 0.25 + 2 ** (n - 1) * 1.25 + 1e-6
    attempts = _attempts(sessions, message_id)
    assert [a.outcome for a in attempts] == ["retry"] * 5 + ["delivered"]
    assert [a.next_attempt_at for a in attempts] == expected_next + [None]
    assert [a.started_at for a in attempts] == claim_times
    assert [a.lease_token for a in attempts] == [1, 2, 3, 4, 5, 6]
    assert attempts[-1].status_code == 200 and attempts[-1].worker == "w2"
    row = _row(sessions, message_id)
    assert row.status == MessageStatus.DELIVERED and row.attempts == 6
    assert row.provider_ref == "pi_123" and row.delivered_at == now + timedelta(milliseconds=300)


def test_late_mark_queued_leaves_a_rescheduled_row_pending(sessions, publisher, engine):
    """A dispatch that marks its rows queued after a worker already claimed, failed and
    rescheduled one leaves that row pending, due at its retry time (not queued for the relay's
    requeue delay)."""
    with sessions() as session:
        message = enqueue(session, provider="payments", operation="charge",
                          payload={"amount": 1999, "currency": "usd"}, idempotency_key="late")
        session.commit()          # the recording publisher has it; mark_queued may not have run
    now = utcnow() + timedelta(seconds=1)
    with sessions() as session:
        c = claim(session, message.id, LEASE, now=now)
    outcome = _fail(sessions, c, TRANSIENT, now=now, rng=random.Random(1))
    dispatch.dispatcher().flush()
    dispatch.mark_queued(engine, [message.id])   # as if the dispatch thread were this late
    row = _row(sessions, message.id)
    assert (row.status, row.next_attempt_at) == (MessageStatus.PENDING, outcome.next_attempt_at)


def test_outcome_updates_a_copy_the_session_holds(sessions, message_id, t0):
    """A message loaded in the caller's session reads the new state after claim and outcome."""
    with sessions() as session:
        held = session.get(Message, message_id)
        c = claim(session, message_id, LEASE, now=t0)
        assert (held.status, held.lease_token) == (MessageStatus.IN_FLIGHT, c.lease_token)
        mark_delivered(session, c, status_code=200, provider_ref="pi_9", now=t0)
        assert (held.status, held.provider_ref, held.attempts) == (
            MessageStatus.DELIVERED, "pi_9", 1)


def test_a_late_success_after_recovery_dead_lettered_the_row_is_still_recorded(
        sessions, message_id, t0):
    """Recovery may dead-letter a row (needs review, or its budget spent) while the worker was
    only slow; its success under the same token then did happen: the row is delivered."""
    old = _claim(sessions, message_id, t0)
    later = t0 + LEASE + timedelta(seconds=1)
    with sessions() as session:
        assert _recover(session, now=later, idempotent=lambda provider: False) == [
            (message_id, True)]
        assert mark_delivered(session, old, status_code=200, provider_ref="pi_slow",
                              now=later) is True
    row = _row(sessions, message_id)
    assert (row.status, row.needs_review, row.dead_at) == (MessageStatus.DELIVERED, False, None)


def test_a_retry_setting_typo_does_not_stop_lease_recovery_for_anyone(engine, sessions,
                                                                        message_id, t0,
                                                                        monkeypatch):
    """The relay decides lost leases with each provider's policy; an invalid one falls back to
    the defaults (and `outbox relay` refuses to start on it) instead of failing every pass."""
    from outbox import dispatch as dispatch_module
    from outbox.config import RelaySettings
    from outbox.relay import run_once

    monkeypatch.setenv("OUTBOX_PAYMENTS_MAX_ATTEMPTS", "lots")
    with sessions() as session:
        claim(session, message_id, timedelta(0), now=utcnow() - timedelta(seconds=5))
    published = run_once(engine, dispatch_module.dispatcher(),
                         RelaySettings(grace_s=0, batch_size=10),
                         idempotent=lambda provider: True)
    assert published == 1
    assert _row(sessions, message_id).attempts == 1
