"""The delivery decision, in one place: what a failed (or lost) attempt means for its message.

    exception ──failure_from()──▶ Failure ──decide()──▶ Decision: retry at T | defer to T | dead

The exception classes say what a failure *is* (``integrations.errors``: its class, its
handling, whether the provider may have acted, whether the breaker counts it); this
module adds what only the outbox knows — the provider's idempotency, the retry budget,
the breaker probe — and applies these rules, first match wins:

1. The provider **may have acted** and **cannot deduplicate** a retry (no idempotency
   keys, e.g. email; or the key is **spent**: the provider stored this very answer under
   it, as Stripe does a 500, so the same key would replay it): if it can **verify** (look the key up: ``Adapter.verify_request``),
   the next attempt is due once the lookup can be trusted (``verify_after_s``) and
   **verifies first** — found: delivered; not found: sent again (under the next key, for a
   provider with keys: ``lifecycle.Claim.provider_key``), or dead-lettered as exhausted if
   the budget is spent — consuming this attempt; otherwise, dead letter, **needs review**
   — a person decides, because a retry could act twice. (Ambiguous errors, lost leases and unexpected
   exceptions on such a provider end here.)
2. **Dead** handling (client error, auth after a refresh, unreadable 2xx): dead letter now.
3. **Defer** handling (breaker open, throttled, quota, credential unavailable): reschedule
   at ``Retry-After`` or the policy's defer delay; no attempt consumed.
4. A failed **half-open probe** that the breaker counts as outage evidence: the breaker is
   open again, which says nothing about this message — defer, no attempt consumed
   (otherwise the message that happens to be the probe again and again would be
   dead-lettered by an outage the defaults promise to survive).
5. **Backoff** handling consumes an attempt; **rate-limited** (429) consumes one only
   beyond the policy's free 429s.
6. The budget is spent (attempts or max age): dead letter.
7. Otherwise: retry at ``Retry-After`` or the exponential backoff with jitter.

Everything here is pure: no database, no clock, no randomness of its own.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from integrations.errors import Handling, IntegrationError
from integrations.sanitize import sanitize

from .models import AttemptOutcome
from .retry import RetryPolicy

INTERNAL = "internal"   # error class of an exception that is not an IntegrationError


@dataclass(frozen=True)
class Failure:
    """One failed attempt, in the outbox's terms.

    Attributes:
        error_class: stored label (``transient``, ``client_error``, ``internal`` …).
        handling: what the failure calls for before the outbox's rules (``Handling``).
        maybe_acted: the provider may have acted on the request.
        outage_evidence: the circuit breaker counts it as a failure.
        detail: sanitised text (credentials and personal data masked), stored in the
            attempt row and ``last_error``.
        label: status and code only (``402 card_declined``), for logs and Flower.
        status_code, code, retry_after_s: from the provider's response, when there was one.
        probe: the call was a half-open breaker probe.
        key_spent: the provider stored this answer under the key; the same key replays it.
    """

    error_class: str
    handling: Handling
    maybe_acted: bool
    outage_evidence: bool
    detail: str
    label: str
    status_code: int | None = None
    code: str | None = None
    retry_after_s: float | None = None
    probe: bool = False
    key_spent: bool = False


LOST_DETAIL = "worker lost: lease expired before an outcome was recorded"
# A worker that held the message died or hung past its lease: the call may have happened.
# It says nothing about the provider, so the retry is due at once (Retry-After 0), not after
# a backoff; it still spends an attempt, so a message that kills every worker it reaches
# ends as a dead letter instead of looping.
LOST = Failure("ambiguous", Handling.BACKOFF, maybe_acted=True, outage_evidence=False,
               detail=LOST_DETAIL, label="worker_lost", retry_after_s=0.0)


def failure_from(exc: BaseException) -> Failure:
    """Describe ``exc`` as a Failure. An exception that is not an ``IntegrationError`` (a bug,
    a time limit firing mid-request) is ``internal``: retried with backoff, and treated as
    possibly acted on, since it may have struck after the request was sent."""
    if isinstance(exc, IntegrationError):
        return Failure(exc.error_class.value, exc.handling, exc.maybe_acted,
                       exc.outage_evidence, sanitize(str(exc)), exc.label(), exc.status_code,
                       exc.code, exc.retry_after_s, exc.probe, exc.key_spent)
    name = type(exc).__name__
    return Failure(INTERNAL, Handling.BACKOFF, maybe_acted=True, outage_evidence=False,
                   detail=sanitize(f"{name}: {exc}"), label=name)


def unavailable(reason: str, retry_after_s: float) -> Failure:
    """The provider could not even be set up (bad settings): nothing was sent; wait."""
    return Failure(INTERNAL, Handling.DEFER, maybe_acted=False, outage_evidence=False,
                   detail=sanitize(reason), label="provider_unavailable",
                   retry_after_s=retry_after_s)


@dataclass(frozen=True)
class Decision:
    """What becomes of the message.

    Attributes:
        outcome: ``RETRY``, ``DEFERRED`` or ``DEAD`` (the attempt row's outcome).
        attempts: attempts consumed, this one included when it counts.
        rate_limited: 429s received so far.
        next_attempt_at: when to try again (None for a dead letter).
        reason: why it was dead-lettered (None otherwise): our words, no provider text.
        needs_review: dead-lettered because re-sending may act twice.
        verify_first: the next attempt asks the provider whether this one took effect
            before it sends anything.
    """

    outcome: AttemptOutcome
    attempts: int
    rate_limited: int
    next_attempt_at: datetime | None = None
    reason: str | None = None
    needs_review: bool = False
    verify_first: bool = False


def decide(failure: Failure, *, attempts: int, rate_limited: int, budget_started_at: datetime,
           policy: RetryPolicy, idempotent: bool, now: datetime,
           rng: random.Random | None = None, verify_after_s: float | None = None) -> Decision:
    """Apply the module's rules to one failed attempt.

    Args:
        failure: what went wrong.
        attempts, rate_limited: the message's counts before this attempt.
        budget_started_at: start of its retry budget (enqueue or last re-drive).
        policy: the provider's retry policy.
        idempotent: the provider deduplicates retries by idempotency key.
        now: the time of the decision.
        rng: jitter source (tests inject one).
        verify_after_s: how long after an ambiguous failure the provider's lookup can be
            trusted; None: the provider cannot verify.
    """
    if failure.maybe_acted and (not idempotent or failure.key_spent):
        if verify_after_s is not None:
            # Even with the budget spent: the lookup sends nothing, and the next attempt
            # asks before its budget check (found: delivered; not found: "exhausted").
            return Decision(AttemptOutcome.RETRY, attempts + 1, rate_limited,
                            now + timedelta(seconds=verify_after_s), verify_first=True)
        return Decision(AttemptOutcome.DEAD, attempts + 1, rate_limited,
                        reason="needs review: the provider may have acted and cannot "
                               "deduplicate a retry" if not idempotent else
                               "needs review: the provider may have acted and keeps "
                               "answering this key with the same error",
                        needs_review=True)
    if failure.handling is Handling.DEAD:
        return Decision(AttemptOutcome.DEAD, attempts + 1, rate_limited,
                        reason="not retryable")
    if failure.handling is Handling.DEFER or (failure.probe and failure.outage_evidence):
        wait = (timedelta(seconds=failure.retry_after_s) if failure.retry_after_s is not None
                else policy.defer_delay)
        return Decision(AttemptOutcome.DEFERRED, attempts, rate_limited, now + wait)
    if failure.handling is Handling.RATE_LIMITED:
        rate_limited += 1
        if rate_limited > policy.free_rate_limited:
            attempts += 1
    else:
        attempts += 1
    spent = policy.exhausted(attempts, budget_started_at, now)
    if spent:
        return Decision(AttemptOutcome.DEAD, attempts, rate_limited, reason=spent)
    return Decision(AttemptOutcome.RETRY, attempts, rate_limited,
                    policy.next_attempt_at(now, max(attempts, 1), failure.retry_after_s, rng))


# The provider's lookup of an ambiguous attempt could not tell whether it took effect.
UNVERIFIED = Failure("ambiguous", Handling.DEAD, maybe_acted=True, outage_evidence=False,
                     detail="verification could not tell", label="unverified")

EXHAUSTED = Failure("exhausted", Handling.DEAD, maybe_acted=False, outage_evidence=False,
                    detail="retry budget spent before the attempt", label="exhausted")


def before_attempt(*, attempts: int, rate_limited: int, budget_started_at: datetime,
                   policy: RetryPolicy, now: datetime) -> Decision | None:
    """Dead-letter a claimed message whose budget is already spent (its max age passed
    while it waited, or ``MAX_ATTEMPTS`` was lowered), without calling the provider; it is
    recorded with the ``EXHAUSTED`` failure. None: go ahead."""
    spent = policy.exhausted(attempts, budget_started_at, now)
    if spent is None:
        return None
    return Decision(AttemptOutcome.DEAD, attempts, rate_limited, reason=spent)
