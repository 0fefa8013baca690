"""The state machine a delivery walks through: claim → outcome, fenced by a lease token.

Every transition is one conditional UPDATE, so two workers holding the same
message id (a duplicate or stale broker message) cannot both act: the second
claim updates zero rows and the caller does nothing. An outcome is recorded
only under the lease token it claimed; a worker whose lease expired (and whose
message was re-claimed) cannot overwrite the newer attempt.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import and_, bindparam, insert, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.util import identity_key

from .clock import utcnow
from .models import Attempt, AttemptOutcome, Message, MessageStatus
from .retry import RetryPolicy


@dataclass(frozen=True)
class Claim:
    """A message this worker holds until ``lease_expires_at``, under ``lease_token``."""

    id: str
    provider: str
    operation: str
    payload: dict[str, Any]
    idempotency_key: str
    correlation_id: str | None
    attempts: int
    rate_limited_count: int
    lease_token: int
    budget_started_at: datetime
    claimed_at: datetime

    @property
    def label(self) -> str:
        return f"{self.provider}.{self.operation} {self.id}"


class FailureKind(StrEnum):
    RETRY = "retry"                 # transient / ambiguous: backoff, consumes an attempt
    RATE_LIMITED = "rate_limited"   # 429: Retry-After, free up to the policy's cap
    DEFER = "defer"                 # not attempted: no attempt consumed
    PERMANENT = "permanent"         # dead-letter now


@dataclass(frozen=True)
class Failure:
    """A classified failure, in the core's own terms (it knows no integration exceptions)."""

    kind: FailureKind
    error_class: str
    detail: str                       # sanitised, safe to store and show
    status_code: int | None = None
    retry_after_s: float | None = None
    code: str | None = None           # the provider's error code, for labels (card_declined)


@dataclass(frozen=True)
class Outcome:
    """What became of an attempt."""

    outcome: AttemptOutcome
    next_attempt_at: datetime | None = None
    reason: str | None = None          # why it was dead-lettered
    recorded: bool = True               # False: our lease was lost, a newer claim owns the row


def claim(session: Session, message_id: str, lease: timedelta,
          now: datetime | None = None) -> Claim | None:
    """Take the message for delivery: pending/queued and due → in_flight, with a new lease token.

    Returns None (do nothing, acknowledge the broker message) when the row is
    missing, not due, already delivered, dead, or in flight under another lease.
    Commits.
    """
    now = now or utcnow()
    rows = _execute(session, _CLAIM, {"m_id": message_id, "now": now, "expires": now + lease},
                    message_id)
    session.commit()
    if not rows:
        return None
    return Claim(*rows[0], claimed_at=now)


# The per-message statements, built once as Core statements on the tables with bound
# parameters: SQLAlchemy compiles each once, and no ORM bulk-update machinery runs per call.
_M = Message.__table__
_A = Attempt.__table__

_CLAIM = (
    update(_M)
    .where(_M.c.id == bindparam("m_id"),
           # A queued row was published because it was due (relay, after-commit dispatch);
           # checking it against this worker's clock again would drop it on clock skew.
           or_(_M.c.status == MessageStatus.QUEUED,
               and_(_M.c.status == MessageStatus.PENDING,
                    _M.c.next_attempt_at <= bindparam("now"))))
    .values(status=MessageStatus.IN_FLIGHT, lease_token=_M.c.lease_token + 1,
            lease_expires_at=bindparam("expires"), updated_at=bindparam("now"))
    .returning(_M.c.id, _M.c.provider, _M.c.operation, _M.c.payload, _M.c.idempotency_key,
               _M.c.correlation_id, _M.c.attempts, _M.c.rate_limited_count, _M.c.lease_token,
               _M.c.budget_started_at)
)

# Outcomes: only under the lease token this worker claimed, and only while still in flight.
_FENCED = update(_M).where(_M.c.id == bindparam("m_id"), _M.c.lease_token == bindparam("token"),
                           _M.c.status == MessageStatus.IN_FLIGHT)

# A success is recorded under our token even if the relay presumed us dead meanwhile
# (recovery leaves the token; only a new claim bumps it): dropping it would send again.
_DELIVERED = update(_M).where(
    _M.c.id == bindparam("m_id"), _M.c.lease_token == bindparam("token"),
    _M.c.status.in_([MessageStatus.IN_FLIGHT, MessageStatus.PENDING, MessageStatus.QUEUED]),
).values(
    status=MessageStatus.DELIVERED, delivered_at=bindparam("now"), updated_at=bindparam("now"),
    lease_expires_at=None, provider_ref=bindparam("ref"), last_status_code=bindparam("code"),
    attempts=_M.c.attempts + 1)

_FAILED = {   # status → statement; the failure columns come from the Failure
    status: _FENCED.values(
        status=status, updated_at=bindparam("now"), lease_expires_at=None,
        attempts=bindparam("n_attempts"), rate_limited_count=bindparam("n_limited"),
        last_error_class=bindparam("error_class"), last_status_code=bindparam("code"),
        last_error=bindparam("error"),
        **({"next_attempt_at": bindparam("next_at")} if status == MessageStatus.PENDING
           else {"dead_at": bindparam("now")}))
    for status in (MessageStatus.PENDING, MessageStatus.DEAD)
}

_INSERT_ATTEMPT = insert(_A)


def _execute(session: Session, statement, params: dict[str, Any], message_id: str):
    """Run a prepared UPDATE on one message with the ORM's manners; returns its RETURNING rows,
    or the number of rows updated.

    Autoflush first; afterwards a copy of the message that ``session`` holds (never in the
    worker's fresh sessions) is refreshed, as the ORM update's session synchronisation
    would have brought it up to date.
    """
    if session.autoflush:
        session.flush()
    result = session.execute(statement, params)
    outcome = result.all() if result.returns_rows else result.rowcount
    if session.identity_map:
        held = session.identity_map.get(identity_key(Message, message_id))
        if held is not None:
            session.refresh(held)
    return outcome


def _record_attempt(session: Session, claim: Claim, outcome: AttemptOutcome, now: datetime,
                    worker: str | None, failure: Failure | None = None,
                    status_code: int | None = None, next_attempt_at: datetime | None = None):
    session.execute(_INSERT_ATTEMPT, {
        "message_id": claim.id, "lease_token": claim.lease_token, "started_at": claim.claimed_at,
        "duration_ms": (now - claim.claimed_at).total_seconds() * 1000, "outcome": outcome,
        "status_code": failure.status_code if failure else status_code,
        "error_class": failure.error_class if failure else None,
        "error": failure.detail if failure else None,
        "next_attempt_at": next_attempt_at, "worker": worker})


def _failed(session: Session, claim: Claim, status: MessageStatus, failure: Failure,
            now: datetime, attempts: int, rate_limited: int,
            next_at: datetime | None = None) -> bool:
    """The fenced UPDATE of a failed attempt; True if our lease still held."""
    params = {"m_id": claim.id, "token": claim.lease_token, "now": now, "n_attempts": attempts,
              "n_limited": rate_limited, "error_class": failure.error_class,
              "code": failure.status_code, "error": failure.detail}
    if next_at is not None:
        params["next_at"] = next_at
    return _execute(session, _FAILED[status], params, claim.id) == 1


def mark_delivered(session: Session, claim: Claim, *, status_code: int,
                   provider_ref: str | None, now: datetime | None = None,
                   worker: str | None = None) -> Outcome:
    """Record a successful delivery. Commits."""
    now = now or utcnow()
    updated = _execute(session, _DELIVERED, {"m_id": claim.id, "token": claim.lease_token,
                                             "now": now, "ref": provider_ref,
                                             "code": status_code}, claim.id)
    _record_attempt(session, claim, AttemptOutcome.DELIVERED, now, worker, status_code=status_code)
    session.commit()
    return Outcome(AttemptOutcome.DELIVERED, recorded=updated == 1)


def record_failure(session: Session, claim: Claim, failure: Failure, policy: RetryPolicy, *,
                   now: datetime | None = None, worker: str | None = None,
                   rng: random.Random | None = None) -> Outcome:
    """Record a failed (or deferred) attempt and decide: retry at a time, defer, or dead-letter.

    Deferrals and the first ``policy.free_rate_limited`` 429s consume no attempt.
    Commits.
    """
    now = now or utcnow()
    attempts, rate_limited = claim.attempts, claim.rate_limited_count
    if failure.kind in (FailureKind.RETRY, FailureKind.PERMANENT):   # the provider was called
        attempts += 1
    elif failure.kind is FailureKind.RATE_LIMITED:
        rate_limited += 1
        if rate_limited > policy.free_rate_limited:
            attempts += 1

    reason = None
    if failure.kind is FailureKind.PERMANENT:
        reason = f"{failure.error_class}: not retryable"
    elif failure.kind is not FailureKind.DEFER:
        reason = policy.exhausted(attempts, claim.budget_started_at, now)

    if reason:
        return _dead(session, claim, failure, reason, attempts, rate_limited, now, worker)

    if failure.kind is FailureKind.DEFER:
        next_at = now + (timedelta(seconds=failure.retry_after_s)
                         if failure.retry_after_s is not None else policy.defer_delay)
        outcome = AttemptOutcome.DEFERRED
    else:
        next_at = policy.next_attempt_at(now, max(attempts, 1), failure.retry_after_s, rng)
        outcome = AttemptOutcome.RETRY
    recorded = _failed(session, claim, MessageStatus.PENDING, failure, now, attempts,
                       rate_limited, next_at)
    _record_attempt(session, claim, outcome, now, worker, failure, next_attempt_at=next_at)
    session.commit()
    return Outcome(outcome, next_attempt_at=next_at, recorded=recorded)


def dead_letter(session: Session, claim: Claim, failure: Failure, reason: str, *,
                now: datetime | None = None, worker: str | None = None) -> Outcome:
    """Dead-letter a claimed message without another attempt (e.g. its budget ran out). Commits."""
    now = now or utcnow()
    return _dead(session, claim, failure, reason, claim.attempts, claim.rate_limited_count,
                 now, worker)


def _dead(session, claim, failure, reason, attempts, rate_limited, now, worker) -> Outcome:
    recorded = _failed(session, claim, MessageStatus.DEAD, failure, now, attempts, rate_limited)
    _record_attempt(session, claim, AttemptOutcome.DEAD, now, worker, failure)
    session.commit()
    return Outcome(AttemptOutcome.DEAD, reason=reason, recorded=recorded)


LOST = "worker lost: lease expired before an outcome was recorded"


def recover_expired_leases(session: Session, *, now: datetime | None = None, limit: int = 500,
                           idempotent: Callable[[str], bool] = lambda provider: True
                           ) -> list[tuple[str, bool]]:
    """In-flight rows whose lease expired (worker killed or hung): pending again, due now.

    The lost attempt is recorded and consumes an attempt: the provider may have
    acted, so the next try re-uses the idempotency key; a message that kills
    every worker it reaches eventually dead-letters instead of looping. For a
    provider without idempotency (``idempotent(provider)`` False) a retry could act
    twice, so the message is dead-lettered "needs review" instead. Commits.

    Returns:
        (message id, dead-lettered?) for each recovered row.
    """
    now = now or utcnow()
    query = (select(Message.id, Message.provider, Message.lease_token, Message.updated_at)
             .where(Message.status == MessageStatus.IN_FLIGHT, Message.lease_expires_at <= now)
             .order_by(Message.lease_expires_at).limit(limit)
             .with_for_update(skip_locked=True))
    recovered = []
    for message_id, provider, token, claimed_at in session.execute(query).all():
        dead = not idempotent(provider)
        error = f"needs review: {LOST}" if dead else LOST
        values = (dict(status=MessageStatus.DEAD, dead_at=now) if dead
                  else dict(status=MessageStatus.PENDING, next_attempt_at=now))
        updated = session.execute(
            update(Message)
            .where(Message.id == message_id, Message.lease_token == token,
                   Message.status == MessageStatus.IN_FLIGHT)
            .values(**values, updated_at=now, lease_expires_at=None,
                    attempts=Message.attempts + 1, last_error_class="ambiguous",
                    last_error=error)
        ).rowcount
        if updated:
            session.execute(insert(Attempt).values(
                message_id=message_id, lease_token=token, started_at=claimed_at,
                duration_ms=(now - claimed_at).total_seconds() * 1000,
                outcome=AttemptOutcome.DEAD if dead else AttemptOutcome.LOST,
                error_class="ambiguous", error=error, next_attempt_at=None if dead else now))
            recovered.append((message_id, dead))
    session.commit()
    return recovered


def due_filter(now: datetime, grace: timedelta, requeue_after: timedelta):
    """Rows the relay must publish.

    * pending and due: a scheduled retry at once (it was set pending for a later
      time); a fresh or re-driven row only after ``grace``, which leaves its
      after-commit dispatch time to mark it queued;
    * queued for longer than ``requeue_after``: the broker seems to have lost it.
    """
    return or_(
        and_(Message.status == MessageStatus.PENDING, Message.next_attempt_at <= now,
             or_(Message.next_attempt_at > Message.updated_at,
                 Message.updated_at <= now - grace)),
        and_(Message.status == MessageStatus.QUEUED, Message.queued_at <= now - requeue_after),
    )
