"""The delivery task: claim the row, call the provider once, record what ``outbox.decisions``
decides. This module only adapts that to Celery.

Task states in Flower mean what they say: SUCCESS is a delivery (or a duplicate broker
message that found nothing to do), RETRY is a failed attempt with its error class, code
and the time of the next one, FAILURE is a dead letter. Flower and the logs get codes and
labels only (``402 card_declined``); the provider's own text, personal data masked, is
kept in the attempt row (``outbox show``). The retry itself is timed by the database
(``next_attempt_at``) and published by the relay; raising ``Retry`` here only reports the
state.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from celery.exceptions import Retry
from sqlalchemy.orm import Session, sessionmaker

from integrations.base import DONE, NOT_DONE
from integrations.errors import Deferred, Handling, IntegrationError
from integrations.registry import get_provider, supports_idempotency
from integrations.registry import verify_after as registry_verify_after
from integrations.webhooks import endpoints as webhook_endpoints
from outbox import config, decisions, dispatch, inbound, logs
from outbox.clock import iso, utcnow
from outbox.decisions import Decision, Failure
from outbox.endpoints import SqlEndpointStore
from outbox.leases import LeaseKeeper
from outbox.lifecycle import Claim
from outbox.models import AttemptOutcome
from outbox.writer import Direct, Writer

from . import app, runtime

log = logging.getLogger("outbox.delivery")

# The webhooks provider reads its endpoints from the outbox database through this store
# (integrations may not import the outbox): installed here, which every process that
# delivers imports, on the worker's own lazily created, fork-safe sessions.
webhook_endpoints.install(SqlEndpointStore(runtime.sessions))

# A provider whose settings cannot be loaded: nothing is sent, the message waits this long
# (``outbox status`` names the problem; workers refuse to start with it).
PROVIDER_UNAVAILABLE_RETRY_S = 30.0
LEASE_LOST = "not recorded: the lease was lost to a newer claim, which owns the message"


class AttemptFailed(Retry):
    """Reported as RETRY. Flower shows its repr: ``AttemptFailed('transient 503; next …')``.

    Raising a ``Retry`` ourselves (instead of ``task.retry()``) reports the state
    without publishing a delayed message: the database holds the next attempt.
    """

    def __repr__(self) -> str:
        return f"AttemptFailed({self.message!r})"


class DeadLettered(Exception):
    """Raised so Flower shows FAILURE: ``payments.charge 01J… client_error 402 card_declined``.
    Declared in the task's ``throws``: an expected outcome, logged without a traceback."""


@dataclass(frozen=True)
class Result:
    """What ``deliver_message`` did, for the task to report (codes and labels only).

    Attributes:
        outcome: None when there was nothing to claim (a duplicate or stale message), or
            when our lease was lost to a newer claim before the outcome was recorded.
        label: the message's label (``payments.charge 01J…``).
        summary: ``200 pi_… succeeded``, or ``client_error 402 card_declined: not retryable``.
        next_attempt_at: when a retried or deferred message is due again.
    """

    outcome: AttemptOutcome | None
    label: str
    summary: str
    next_attempt_at: datetime | None = None


def deliver_message(message_id: str, *, sessions: sessionmaker[Session] | None = None,
                    lease: timedelta, writer: Writer | None = None,
                    provider_for: Callable = get_provider,
                    idempotent: Callable[[str], bool] = supports_idempotency,
                    verify_after: Callable[[str], float | None] = registry_verify_after,
                    worker: str | None = None,
                    on_dead: Callable[[str, str], None] | None = None,
                    keeper: LeaseKeeper | None = None,
                    clock: Callable[[], datetime] = utcnow,
                    rng: random.Random | None = None) -> Result:
    """Deliver one outbox row (no Celery here, so tests can call it directly).

    Args:
        message_id: the row id carried by the broker message.
        sessions: session factory for the outbox database (each write in its own
            transaction, in this thread), unless ``writer`` is given.
        writer: writes the claim and the outcome (the worker's ``GroupWriter``, which
            batches them with its other threads').
        lease: how long the claim holds before the relay presumes us dead (unless renewed).
        provider_for: provider name → object with
            ``deliver(operation, payload, key, *, message_id)``.
        idempotent: provider name → whether it deduplicates retries by idempotency key.
        verify_after: provider name → seconds before its lookup of an ambiguous attempt can
            be trusted, or None when it cannot verify.
        worker: recorded in the attempt row.
        on_dead: called with (id, label) after a dead-lettering is committed.
        keeper: renews the lease while the delivery runs (the worker's ``LeaseKeeper``).
        clock, rng: injected time and randomness (jitter), for tests.
    """
    if writer is None:
        if sessions is None:
            raise TypeError("deliver_message needs sessions or a writer")
        writer = Direct(sessions)
    claim = writer.claim(message_id, lease, clock())
    if claim is None:
        # A duplicate or stale broker message (redelivered, or the row already moved on).
        log.info("duplicate or stale broker message %s: nothing to do", message_id)
        return Result(None, message_id, "nothing to do (duplicate or stale message)")
    with (logs.bound(provider=claim.provider, message_id=claim.id,
                     attempt=claim.attempts + 1, correlation_id=claim.correlation_id),
          keeper.hold(claim) if keeper is not None else nullcontext()):
        if claim.provider == inbound.INBOUND:
            if sessions is None:
                raise TypeError("an inbound event needs sessions: its handler runs in a "
                                "transaction of its own")
            result = _process_inbound(sessions, claim, worker, clock, rng)
        else:
            result = _attempt(writer, claim, provider_for, idempotent, verify_after, worker,
                              clock, rng)
        _log(result)
        if result.outcome is AttemptOutcome.DEAD and on_dead is not None:
            on_dead(claim.id, f"{claim.label} {result.summary}")
        return result


def _process_inbound(sessions, claim: Claim, worker, clock, rng) -> Result:
    """An inbound event: its handler and the processed mark in one transaction
    (``outbox.inbound``), behind the inbound rate limit."""
    try:
        permit = runtime.inbound_protection().admit(claim.operation)
    except Deferred as exc:
        failure = decisions.failure_from(exc)
        decision = decisions.decide(failure, attempts=claim.attempts,
                                    rate_limited=claim.rate_limited_count,
                                    budget_started_at=claim.budget_started_at,
                                    policy=config.current_retry_policy(claim.provider),
                                    idempotent=True, now=clock(), rng=rng)
        return _record(Direct(sessions), claim, failure, decision, worker, clock)
    error = None
    try:
        done = inbound.process(sessions, claim, worker=worker, clock=clock, rng=rng)
    except BaseException as exc:
        error = exc
        raise
    finally:
        permit.release(error)
    summary = done.summary + ("" if done.outcome is not None else f"; {LEASE_LOST}")
    return Result(done.outcome, claim.label, summary, done.next_attempt_at)


def _attempt(writer: Writer, claim: Claim, provider_for, idempotent, verify_after, worker,
             clock, rng) -> Result:
    """Verify the last attempt if it has to be, dead-letter a spent message, or call the
    provider once and record the outcome."""
    policy = config.current_retry_policy(claim.provider)
    try:
        provider = provider_for(claim.provider)
    except Exception as exc:   # bad settings: nothing was sent
        provider, failure = None, decisions.unavailable(f"{type(exc).__name__}: {exc}",
                                                        PROVIDER_UNAVAILABLE_RETRY_S)
    if claim.verify_first:
        # Before the budget check: a spent message whose last attempt took effect is
        # delivered, and one that cannot be told is a "needs review", not "exhausted".
        if provider is None:   # it cannot be asked now: wait, keeping the question
            return _record(writer, claim, failure, Decision(
                AttemptOutcome.DEFERRED, claim.attempts, claim.rate_limited_count,
                clock() + timedelta(seconds=PROVIDER_UNAVAILABLE_RETRY_S), verify_first=True),
                worker, clock)
        verified = _verify(writer, claim, provider, policy, worker, clock)
        if verified is not None:
            return verified
        if provider.adapter.supports_idempotency:
            # Not done under a key the provider answers with a stored error: the next key,
            # recorded before the send (with verify_first kept), so that a worker lost after
            # it leaves the next attempt to verify this key, not the spent one.
            claim = replace(claim, key_generation=claim.key_generation + 1)
            if not writer.advance_key(claim):
                return Result(None, claim.label, f"not sent: {LEASE_LOST}")
    spent = decisions.before_attempt(attempts=claim.attempts,
                                     rate_limited=claim.rate_limited_count,
                                     budget_started_at=claim.budget_started_at, policy=policy,
                                     now=claim.claimed_at)
    if spent is not None:
        return _record(writer, claim, decisions.EXHAUSTED, spent, worker, clock)
    if provider is not None:
        try:
            delivery = provider.deliver(claim.operation, claim.payload, claim.provider_key,
                                        message_id=claim.id)
        except Exception as exc:
            failure = decisions.failure_from(exc)
        else:
            if not writer.mark_delivered(claim, status_code=delivery.status_code,
                                         provider_ref=delivery.provider_ref, worker=worker,
                                         now=clock()):
                return Result(None, claim.label, f"{delivery.summary}; {LEASE_LOST}")
            return Result(AttemptOutcome.DELIVERED, claim.label, delivery.summary)
    decision = decisions.decide(failure, attempts=claim.attempts,
                                rate_limited=claim.rate_limited_count,
                                budget_started_at=claim.budget_started_at, policy=policy,
                                idempotent=idempotent(claim.provider), now=clock(), rng=rng,
                                verify_after_s=verify_after(claim.provider))
    return _record(writer, claim, failure, decision, worker, clock)


def _verify(writer: Writer, claim: Claim, provider, policy, worker, clock) -> Result | None:
    """The last attempt may have taken effect: ask the provider before sending again.

    Found: delivered, with the provider's reference (nothing is sent). Not found: None, and
    the caller sends. The lookup cannot tell (or is refused: 401/403, e.g. a key without
    the Email Activity add-on; or raises what is not an ``IntegrationError``): dead letter,
    "needs review". The lookup fails for now (timeout, 5xx, 429, breaker open): deferred,
    no attempt consumed, asked again later — until the message's max age, then "needs
    review" too.
    """
    try:
        found = provider.verify(claim.operation, claim.payload, claim.provider_key)
    except Exception as exc:
        failure = decisions.failure_from(exc)
        failure = replace(failure, detail=f"verification failed: {failure.detail}",
                          maybe_acted=False)
        # Refused, an adapter bug, or failing past the message's max age: a person decides.
        if (failure.handling is Handling.DEAD or not isinstance(exc, IntegrationError)
                or policy.exhausted(claim.attempts, claim.budget_started_at, clock())):
            return _cannot_tell(writer, claim, failure, worker, clock)
        wait = (timedelta(seconds=failure.retry_after_s) if failure.retry_after_s is not None
                else policy.defer_delay)
        decision = Decision(AttemptOutcome.DEFERRED, claim.attempts, claim.rate_limited_count,
                            clock() + wait, verify_first=True)
        return _record(writer, claim, failure, decision, worker, clock)
    if found.state == DONE:
        summary = f"verified: the last attempt took effect, {found.summary}"
        if not writer.mark_delivered(claim, status_code=200, provider_ref=found.provider_ref,
                                     worker=worker, now=clock()):
            return Result(None, claim.label, f"{summary}; {LEASE_LOST}")
        return Result(AttemptOutcome.DELIVERED, claim.label, summary)
    if found.state == NOT_DONE:
        log.info("%s verified: the last attempt did not take effect (%s); sending again",
                 claim.label, found.summary)
        return None
    return _cannot_tell(writer, claim, replace(decisions.UNVERIFIED, detail=(
        f"verification could not tell: {found.summary or 'no answer'}")), worker, clock)


def _cannot_tell(writer: Writer, claim: Claim, failure: Failure, worker, clock) -> Result:
    decision = Decision(AttemptOutcome.DEAD, claim.attempts, claim.rate_limited_count,
                        reason="needs review: the provider may have acted and its lookup "
                               "cannot tell", needs_review=True)
    return _record(writer, claim, failure, decision, worker, clock)


def _record(writer: Writer, claim: Claim, failure: Failure, decision: Decision, worker,
            clock) -> Result:
    summary = (failure.label if failure.label == failure.error_class
               else f"{failure.error_class} {failure.label}")
    if decision.reason:
        summary += f": {decision.reason}"
    if not writer.record(claim, failure, decision, worker=worker, now=clock()):
        return Result(None, claim.label, f"{summary}; {LEASE_LOST}")
    return Result(decision.outcome, claim.label, summary, decision.next_attempt_at)


def _log(result: Result) -> None:
    """One line per outcome: label, class and reason; never a traceback or provider text."""
    if result.outcome is None:
        log.info("%s %s", result.label, result.summary)
    elif result.outcome is AttemptOutcome.DEAD:
        log.warning("dead letter %s %s", result.label, result.summary)
    elif result.outcome is AttemptOutcome.DELIVERED:
        log.info("delivered %s %s", result.label, result.summary)
    else:
        log.info("%s %s %s; next attempt at %s", result.outcome, result.label, result.summary,
                 iso(result.next_attempt_at))


@app.task(name="outbox.deliver", bind=True, throws=(DeadLettered,))
def deliver(self, message_id: str) -> str:
    """Deliver outbox row ``message_id``; the state Flower shows is the delivery's outcome."""
    result = deliver_message(message_id, writer=runtime.writer(), sessions=runtime.sessions(),
                             lease=runtime.lease(),
                             keeper=runtime.lease_keeper(), worker=runtime.worker_name(),
                             on_dead=dispatch.dispatcher().announce_dead_letter)
    if result.outcome in (AttemptOutcome.RETRY, AttemptOutcome.DEFERRED):
        raise AttemptFailed(f"{result.summary}; next attempt at {iso(result.next_attempt_at)}")
    if result.outcome is AttemptOutcome.DEAD:
        raise DeadLettered(f"{result.label} {result.summary}")
    return f"{result.label}: {result.summary}"
