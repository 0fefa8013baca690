"""The delivery decision (``outbox.decisions``), table-driven over every exception class.

Pure: no database, an injected clock and jitter. Every subclass of ``IntegrationError`` —
found by walking the class tree, so a new class cannot be forgotten — has an expected row
for a provider with and without idempotency keys.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta

import pytest

from integrations import errors as e
from outbox.decisions import (
    EXHAUSTED,
    LOST,
    before_attempt,
    decide,
    failure_from,
    unavailable,
)
from outbox.models import AttemptOutcome as O
from outbox.retry import RetryPolicy

NOW = datetime(2026, 12, 1, 12, 0, 0)
POLICY = RetryPolicy(jitter=0.0)


def _all_classes(cls=e.IntegrationError):
    found = [cls]
    for sub in cls.__subclasses__():
        found += _all_classes(sub)
    return found


# class → (outcome with idempotency, outcome without, needs review without, attempt spent)
TABLE = {
    e.IntegrationError: (O.RETRY, O.DEAD, True, True),        # unknown: treated as ambiguous
    e.Retryable: (O.RETRY, O.DEAD, True, True),               # "may succeed later": ambiguous
    e.Transient: (O.RETRY, O.RETRY, False, True),
    e.RateLimited: (O.RETRY, O.RETRY, False, False),          # free up to the policy's cap
    e.Ambiguous: (O.RETRY, O.DEAD, True, True),
    e.Deferred: (O.DEFERRED, O.DEFERRED, False, False),
    e.CredentialUnavailable: (O.DEFERRED, O.DEFERRED, False, False),
    e.Permanent: (O.DEAD, O.DEAD, False, True),
    e.ClientError: (O.DEAD, O.DEAD, False, True),
    e.AuthError: (O.DEAD, O.DEAD, False, True),
    e.InvalidResponse: (O.DEAD, O.DEAD, True, True),          # a 2xx we could not read
}


def test_the_table_covers_every_class():
    assert set(_all_classes()) == set(TABLE)


def _decide(failure, idempotent, attempts=0, rate_limited=0, policy=POLICY, now=NOW):
    return decide(failure, attempts=attempts, rate_limited=rate_limited,
                  budget_started_at=NOW - timedelta(minutes=1), policy=policy,
                  idempotent=idempotent, now=now, rng=random.Random(0))


@pytest.mark.parametrize("cls", list(TABLE), ids=lambda c: c.__name__)
@pytest.mark.parametrize("idempotent", [True, False], ids=["idempotent", "no-idempotency"])
def test_every_class_decides_as_the_table_says(cls, idempotent):
    with_key, without_key, review, spends = TABLE[cls]
    decision = _decide(failure_from(cls("detail", status_code=None)), idempotent)
    assert decision.outcome == (with_key if idempotent else without_key)
    assert decision.needs_review == (review and not idempotent)
    if decision.outcome is O.DEAD:
        assert decision.next_attempt_at is None and decision.reason
    else:
        assert decision.next_attempt_at > NOW and decision.reason is None
    assert decision.attempts == (1 if spends or decision.needs_review else 0)


def test_the_most_specific_class_wins():
    """Subclasses override what they mean: a CredentialUnavailable is a Deferred, an
    InvalidResponse a Permanent that may have acted, a RateLimited a Retryable that did not."""
    assert failure_from(e.CredentialUnavailable("x")).handling is e.Handling.DEFER
    assert failure_from(e.InvalidResponse("x")).maybe_acted is True
    assert failure_from(e.ClientError("x")).maybe_acted is False
    assert failure_from(e.RateLimited("x")).handling is e.Handling.RATE_LIMITED
    assert failure_from(e.Transient("x")).outage_evidence is True
    assert failure_from(e.RateLimited("x")).outage_evidence is False


def test_a_bare_retryable_is_decided_not_a_crash():
    """It used to raise StopIteration (no entry in a class → kind table)."""
    assert _decide(failure_from(e.Retryable("?")), True).outcome is O.RETRY


def test_backoff_and_retry_after():
    first = _decide(failure_from(e.Transient("503", status_code=503)), True)
    assert first.next_attempt_at == NOW + timedelta(seconds=1)
    later = _decide(failure_from(e.Transient("503")), True, attempts=4)
    assert later.next_attempt_at == NOW + timedelta(seconds=16)
    told = _decide(failure_from(e.RateLimited("429", retry_after_s=7)), True)
    assert told.next_attempt_at == NOW + timedelta(seconds=7)


def test_rate_limited_is_free_up_to_the_cap_then_spends_attempts():
    policy = RetryPolicy(free_rate_limited=2)
    limited = failure_from(e.RateLimited("429"))
    assert _decide(limited, True, rate_limited=1, policy=policy).attempts == 0
    over = _decide(limited, True, rate_limited=2, policy=policy)
    assert (over.attempts, over.rate_limited) == (1, 3)


def test_deferral_waits_retry_after_or_the_defer_delay_and_never_dead_letters():
    assert _decide(failure_from(e.Deferred("open")), True).next_attempt_at == (
        NOW + POLICY.defer_delay)
    assert _decide(failure_from(e.Deferred("q", retry_after_s=30)), True).next_attempt_at == (
        NOW + timedelta(seconds=30))
    spent = _decide(failure_from(e.Deferred("open")), True, attempts=POLICY.max_attempts)
    assert spent.outcome is O.DEFERRED


def test_a_failed_probe_defers_when_it_is_outage_evidence():
    """The breaker is open again: that says nothing about this message (no attempt spent).
    A 4xx probe is not outage evidence; an ambiguous probe without idempotency still needs
    review (the call may have acted)."""
    for exc in (e.Transient("503", status_code=503), e.Ambiguous("500", status_code=500)):
        exc.probe = True
        decision = _decide(failure_from(exc), True)
        assert (decision.outcome, decision.attempts) == (O.DEFERRED, 0)
    declined = e.ClientError("402", status_code=402)
    declined.probe = True
    assert _decide(failure_from(declined), True).outcome is O.DEAD
    maybe = e.Ambiguous("500", status_code=500)
    maybe.probe = True
    assert _decide(failure_from(maybe), False).needs_review


def test_exhaustion_and_max_age():
    last = _decide(failure_from(e.Transient("503")), True, attempts=POLICY.max_attempts - 1)
    assert (last.outcome, last.reason) == (O.DEAD, "attempts exhausted (25/25)")
    old = decide(failure_from(e.Transient("503")), attempts=0, rate_limited=0,
                 budget_started_at=NOW - timedelta(days=2), policy=POLICY, idempotent=True,
                 now=NOW)
    assert old.outcome is O.DEAD and old.reason.startswith("max age passed")
    assert before_attempt(attempts=25, rate_limited=3, budget_started_at=NOW, policy=POLICY,
                          now=NOW).reason == "attempts exhausted (25/25)"
    assert before_attempt(attempts=0, rate_limited=0, budget_started_at=NOW, policy=POLICY,
                          now=NOW) is None
    assert EXHAUSTED.handling is e.Handling.DEAD


def test_a_lost_lease_and_an_unexpected_exception_may_have_acted():
    assert _decide(LOST, True).outcome is O.RETRY
    assert _decide(LOST, False).needs_review
    bug = failure_from(RuntimeError("boom sk_live_abc123"))
    assert (bug.error_class, bug.label) == ("internal", "RuntimeError")
    assert "sk_live_abc123" not in bug.detail
    assert _decide(bug, False).needs_review


def test_a_provider_that_cannot_be_set_up_waits():
    decision = _decide(unavailable("ConfigurationError: OUTBOX_X_BASE_URL", 30), False)
    assert (decision.outcome, decision.attempts) == (O.DEFERRED, 0)
    assert decision.next_attempt_at == NOW + timedelta(seconds=30)


def test_labels_carry_codes_only():
    declined = e.ClientError("Your card was declined, ann@example.com", status_code=402,
                             code="card_declined")
    failure = failure_from(declined)
    assert failure.label == "402 card_declined"
    assert "ann@" not in failure.detail and "***@example.com" in failure.detail
    assert failure_from(e.Transient("refused", code="connect_error")).label == "connect_error"
    assert failure_from(e.Transient("Service Unavailable", status_code=503)).label == "503"
