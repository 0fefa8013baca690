"""The delivery task: claim the row, call the provider, record the outcome.

Task states in Flower mean what they say: SUCCESS is a delivery (or a
duplicate broker message that found nothing to do), RETRY is a failed attempt
with its error class and the time of the next one, FAILURE is a dead letter.
The retry itself is timed by the database (``next_attempt_at``) and published
by the relay; raising ``Retry`` here only reports the state.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from celery.exceptions import Retry
from sqlalchemy.orm import Session, sessionmaker

from integrations import errors as ierr
from integrations.registry import get_provider
from integrations.sanitize import sanitize
from outbox import config, lifecycle
from outbox.clock import utcnow
from outbox.lifecycle import Failure, FailureKind
from outbox.models import AttemptOutcome

from . import app, logcontext, runtime

log = logging.getLogger("tasks.delivery")

_KINDS = {
    ierr.Transient: FailureKind.RETRY,
    ierr.Ambiguous: FailureKind.RETRY,
    ierr.RateLimited: FailureKind.RATE_LIMITED,
    ierr.Deferred: FailureKind.DEFER,
    ierr.Permanent: FailureKind.PERMANENT,
}


class AttemptFailed(Retry):
    """Reported as RETRY. Flower shows its repr: ``AttemptFailed('transient 503: …; next …')``.

    Raising a ``Retry`` ourselves (instead of ``task.retry()``) reports the state
    without publishing a delayed message: the database holds the next attempt.
    """

    def __repr__(self) -> str:
        return f"AttemptFailed({self.message!r})"


class DeadLettered(Exception):
    """Raised so Flower shows FAILURE for a dead letter: ``payments.charge 01J… 402 card_declined``."""


def to_failure(exc: Exception, supports_idempotency: bool) -> Failure:
    """Translate an integration error (or an unexpected exception) into the core's terms."""
    if not isinstance(exc, ierr.IntegrationError):
        detail = sanitize(f"{type(exc).__name__}: {exc}")
        if not supports_idempotency:
            # e.g. a time limit firing mid-request: the call may have happened; without
            # provider-side idempotency a retry could act twice.
            return Failure(FailureKind.PERMANENT, "internal", f"needs review: {detail}")
        return Failure(FailureKind.RETRY, "internal", detail)
    kind = next(k for cls, k in _KINDS.items() if isinstance(exc, cls))
    detail = sanitize(str(exc))
    if isinstance(exc, ierr.Ambiguous) and not supports_idempotency:
        # Without provider-side idempotency a retry could act twice: a person decides.
        kind, detail = FailureKind.PERMANENT, f"needs review: {detail}"
    return Failure(kind, exc.error_class.value, detail, exc.status_code, exc.retry_after_s,
                   exc.code)


@dataclass(frozen=True)
class Result:
    """What ``deliver_message`` did, for the task to report."""

    outcome: AttemptOutcome | None          # None: nothing claimable (duplicate or stale)
    label: str
    summary: str
    next_attempt_at: datetime | None = None


def deliver_message(message_id: str, *, sessions: sessionmaker[Session], lease: timedelta,
                    provider_for: Callable = get_provider, worker: str | None = None,
                    on_dead: Callable[[str, str], None] | None = None,
                    clock: Callable[[], datetime] = utcnow,
                    rng: random.Random | None = None) -> Result:
    """Deliver one outbox row (no Celery here, so tests can call it directly).

    Args:
        message_id: the row id carried by the broker message.
        sessions: session factory for the outbox database.
        lease: how long the claim holds before the relay presumes us dead.
        provider_for: provider name → object with ``deliver(operation, payload, key)``.
        worker: recorded in the attempt row.
        on_dead: called with (id, label) after a dead-lettering is committed.
        clock, rng: injected time and randomness (jitter), for tests.
    """
    with sessions() as session:
        claim = lifecycle.claim(session, message_id, lease, now=clock())
        if claim is None:
            return Result(None, message_id, "nothing to do (duplicate or stale message)")
        with logcontext.bound(provider=claim.provider, message_id=claim.id,
                              attempt=claim.attempts + 1, correlation_id=claim.correlation_id):
            return _attempt(session, claim, provider_for, worker, on_dead, clock, rng)


def _attempt(session, claim, provider_for, worker, on_dead, clock, rng) -> Result:
    """Dead-letter a spent message, or call the provider once and record the outcome."""
    policy = config.current_retry_policy(claim.provider)
    spent = policy.exhausted(claim.attempts, claim.budget_started_at, claim.claimed_at)
    if spent:
        failure = Failure(FailureKind.PERMANENT, "exhausted", spent)
        lifecycle.dead_letter(session, claim, failure, spent, worker=worker, now=clock())
        return _dead(claim, failure, on_dead)

    supports_idempotency = True
    try:
        provider = provider_for(claim.provider)
        supports_idempotency = provider.adapter.supports_idempotency
        delivery = provider.deliver(claim.operation, claim.payload, claim.idempotency_key)
    except Exception as exc:
        failure = to_failure(exc, supports_idempotency)
        outcome = lifecycle.record_failure(session, claim, failure, policy, worker=worker,
                                           now=clock(), rng=rng)
        if outcome.outcome is AttemptOutcome.DEAD:
            return _dead(claim, failure, on_dead)
        return Result(outcome.outcome, claim.label, f"{failure.error_class} {failure.detail}",
                      outcome.next_attempt_at)
    lifecycle.mark_delivered(session, claim, status_code=delivery.status_code,
                             provider_ref=delivery.provider_ref, worker=worker, now=clock())
    return Result(AttemptOutcome.DELIVERED, claim.label, delivery.summary)


def _dead(claim, failure: Failure, on_dead) -> Result:
    summary = " ".join(str(p) for p in (failure.status_code, failure.code or failure.error_class)
                       if p)
    label = f"{claim.label} {summary}"
    if on_dead is not None:
        on_dead(claim.id, label)
    return Result(AttemptOutcome.DEAD, label, failure.detail)


def _publish_dead_letter(message_id: str, label: str) -> None:
    from .publisher import CeleryPublisher

    try:
        CeleryPublisher(app).publish_dead_letter(message_id, label)
    except Exception as exc:  # the row is dead in the database whatever the broker says
        log.error("dead letter %s recorded but its event could not be published: %s",
                  label, type(exc).__name__)


@app.task(name="outbox.deliver", bind=True)
def deliver(self, message_id: str) -> str:
    """Deliver outbox row ``message_id``; the state Flower shows is the delivery's outcome."""
    result = deliver_message(message_id, sessions=runtime.sessions(), lease=runtime.lease(),
                             worker=runtime.worker_name(), on_dead=_publish_dead_letter)
    if result.outcome in (AttemptOutcome.RETRY, AttemptOutcome.DEFERRED):
        when = result.next_attempt_at.isoformat(timespec="seconds") + "Z"
        raise AttemptFailed(f"{result.summary}; next attempt at {when}")
    if result.outcome is AttemptOutcome.DEAD:
        raise DeadLettered(result.label)
    return f"{result.label}: {result.summary}"
