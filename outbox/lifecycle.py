"""The state machine a delivery walks through: claim → outcome, fenced by a lease token.

Every transition is one conditional UPDATE, so two workers holding the same
message id (a duplicate or stale broker message) cannot both act: the second
claim updates zero rows and the caller does nothing. An outcome is recorded
only under the lease token it claimed; a worker whose lease expired (and whose
message was re-claimed) cannot overwrite the newer attempt.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, bindparam, insert, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.util import identity_key

from .clock import utcnow
from .decisions import LOST, Decision, Failure, decide
from .models import Attempt, AttemptOutcome, Message, MessageStatus
from .ordering import PARKED, is_head, wake_next
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
    ordering_key: str | None = None
    verify_first: bool = False   # ask the provider whether the last attempt took effect
    key_generation: int = 0

    @property
    def label(self) -> str:
        return f"{self.provider}.{self.operation} {self.id}"

    @property
    def provider_key(self) -> str:
        """The key the provider sees: the message's own, or after a spent key was verified
        not done, ``<key>~<generation>`` (a digest of the key stands in when that would pass
        the 255-character limit). Deterministic, so a send under it that was lost is
        deduplicated by the provider like any other."""
        return provider_key(self.idempotency_key, self.key_generation)


def provider_key(key: str, generation: int) -> str:
    """``Claim.provider_key`` for a key and generation."""
    if generation == 0:
        return key
    suffix = f"~{generation}"
    if len(key) + len(suffix) > MAX_KEY:
        key = hashlib.sha256(key.encode()).hexdigest()
    return key + suffix


MAX_KEY = 255


def claim(session: Session, message_id: str, lease: timedelta,
          now: datetime | None = None) -> Claim | None:
    """Take the message for delivery: pending/queued and due → in_flight, with a new lease token.

    Returns None (do nothing, acknowledge the broker message) when the row is
    missing, not due, already delivered, dead, in flight under another lease, or waiting
    behind an earlier message of its ordering key (such a row goes back to the relay,
    which publishes it when it is the key's head). Commits.
    """
    now = now or utcnow()
    rows = _execute(session, _CLAIM, {"m_id": message_id, "now": now, "expires": now + lease},
                    message_id)
    if not rows:
        session.execute(_BACK_TO_RELAY, {"m_id": message_id, "now": now})
    session.commit()
    if not rows:
        return None
    return Claim(**rows[0]._mapping, claimed_at=now)


def claim_many(session: Session | Connection, message_ids: Sequence[str], lease: timedelta,
               now: datetime) -> list[Claim | None]:
    """``claim`` for several ids in one statement (the group writer's batch): the claim of
    each id in order, None where ``claim`` would return None — and for every copy of an id
    after its first, so two broker messages for one row never both deliver. Does not
    commit."""
    ids = list(dict.fromkeys(message_ids))
    rows = session.execute(_CLAIM_MANY, {"ids": ids, "now": now, "expires": now + lease}).all()
    claimed = {row.id: Claim(**row._mapping, claimed_at=now) for row in rows}
    if len(claimed) < len(ids):
        session.execute(_BACK_TO_RELAY_MANY,
                        {"ids": [i for i in ids if i not in claimed], "now": now})
    return [claimed.pop(i, None) for i in message_ids]


def relay_due(now: datetime) -> datetime:
    """``next_attempt_at`` for a pending row the relay should publish at once, for a row no
    after-commit dispatch will send (the relay gives fresh rows, ``next_attempt_at ==
    updated_at``, a grace period first): just after ``now``."""
    return now + _RELAY_NOW


_RELAY_NOW = timedelta(microseconds=1)


def renew(session: Session, held: list[tuple[str, int, datetime]]) -> None:
    """Extend the leases of claims this process still works on: (id, lease token, new
    expiry). Fenced like every outcome: a lease the relay took over is not extended.
    Commits."""
    if not held:
        return
    session.execute(_RENEW, [{"m_id": mid, "token": token, "expires": expires}
                             for mid, token, expires in held])
    session.commit()


# The per-message statements, built once as Core statements on the tables with bound
# parameters: SQLAlchemy compiles each once, and no ORM bulk-update machinery runs per call.
_M = Message.__table__
_A = Attempt.__table__

def _claim_statement(which):
    """pending/queued-and-due → in_flight for the rows ``which`` selects (one id, or many)."""
    return (
        update(_M)
        .where(which,
               # A queued row was published because it was due (relay, after-commit
               # dispatch); checking it against this worker's clock again would drop it on
               # clock skew.
               or_(_M.c.status == MessageStatus.QUEUED,
                   and_(_M.c.status == MessageStatus.PENDING,
                        _M.c.next_attempt_at <= bindparam("now"))),
               is_head(_M.c))
        .values(status=MessageStatus.IN_FLIGHT, lease_token=_M.c.lease_token + 1,
                lease_expires_at=bindparam("expires"), updated_at=bindparam("now"))
        .returning(_M.c.id, _M.c.provider, _M.c.operation, _M.c.payload, _M.c.idempotency_key,
                   _M.c.correlation_id, _M.c.attempts, _M.c.rate_limited_count,
                   _M.c.lease_token, _M.c.budget_started_at, _M.c.ordering_key,
                   _M.c.verify_first, _M.c.key_generation)
    )


_ONE = _M.c.id == bindparam("m_id")
_MANY = _M.c.id.in_(bindparam("ids", expanding=True))
_CLAIM = _claim_statement(_ONE)
_CLAIM_MANY = _claim_statement(_MANY)

# A queued follower of an unfinished ordering-key head (published by after-commit dispatch,
# or a head that lost its place): pending again, for the relay to publish when it is head.
def _back_to_relay_statement(which):
    return (
        update(_M)
        .where(which, _M.c.status == MessageStatus.QUEUED, _M.c.ordering_key.is_not(None),
               ~is_head(_M.c))
        .values(status=MessageStatus.PENDING, queued_at=None, updated_at=bindparam("now"),
                next_attempt_at=PARKED)
    )


_BACK_TO_RELAY = _back_to_relay_statement(_ONE)
_BACK_TO_RELAY_MANY = _back_to_relay_statement(_MANY)

# Outcomes: only under the lease token this worker claimed, and only while still in flight.
_FENCED = update(_M).where(_M.c.id == bindparam("m_id"), _M.c.lease_token == bindparam("token"),
                           _M.c.status == MessageStatus.IN_FLIGHT)

_RENEW = _FENCED.values(lease_expires_at=bindparam("expires"))

# A success is recorded under our token even if the relay presumed us dead meanwhile
# (recovery leaves the token; only a new claim bumps it): dropping it would send again, and
# a dead letter it made (needs review, or its budget spent) did happen after all.
_DELIVERED = update(_M).where(
    _M.c.id == bindparam("m_id"), _M.c.lease_token == bindparam("token"),
    # Spelled out, not IN (…): an IN list is an "expanding" parameter, which executemany
    # (``apply_delivered_many``) refuses.
    or_(*(_M.c.status == status for status in (
        MessageStatus.IN_FLIGHT, MessageStatus.PENDING, MessageStatus.QUEUED,
        MessageStatus.DEAD))),
).values(
    status=MessageStatus.DELIVERED, delivered_at=bindparam("now"), updated_at=bindparam("now"),
    lease_expires_at=None, provider_ref=bindparam("ref"), last_status_code=bindparam("code"),
    attempts=_M.c.attempts + 1, dead_at=None, needs_review=False, verify_first=False,
    key_generation=bindparam("gen"))

_FAILED = {   # status → statement; the failure columns come from the Failure
    status: _FENCED.values(
        status=status, updated_at=bindparam("now"), lease_expires_at=None,
        attempts=bindparam("n_attempts"), rate_limited_count=bindparam("n_limited"),
        last_error_class=bindparam("error_class"), last_status_code=bindparam("code"),
        last_error=bindparam("error"), verify_first=bindparam("verify_first"),
        key_generation=bindparam("gen"),
        **({"next_attempt_at": bindparam("next_at")} if status == MessageStatus.PENDING
           else {"dead_at": bindparam("now"), "needs_review": bindparam("needs_review")}))
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


def _record_attempt(session: Session, message_id: str, token: int, started_at: datetime,
                    outcome: AttemptOutcome, now: datetime, worker: str | None,
                    failure: Failure | None = None, status_code: int | None = None,
                    next_attempt_at: datetime | None = None) -> None:
    session.execute(_INSERT_ATTEMPT, _attempt_params(
        message_id, token, started_at, outcome, now, worker, failure, status_code,
        next_attempt_at))


def _attempt_params(message_id: str, token: int, started_at: datetime, outcome: AttemptOutcome,
                    now: datetime, worker: str | None, failure: Failure | None = None,
                    status_code: int | None = None,
                    next_attempt_at: datetime | None = None) -> dict[str, Any]:
    return {
        "message_id": message_id, "lease_token": token, "started_at": started_at,
        "duration_ms": (now - started_at).total_seconds() * 1000, "outcome": outcome,
        "status_code": failure.status_code if failure else status_code,
        "error_class": failure.error_class if failure else None,
        "error": failure.detail if failure else None,
        "next_attempt_at": next_attempt_at, "worker": worker}


def mark_delivered(session: Session, claim: Claim, *, status_code: int,
                   provider_ref: str | None, now: datetime | None = None,
                   worker: str | None = None) -> bool:
    """Record a successful delivery. Commits. Returns False when a newer claim owns the row
    (the success is then history only)."""
    updated = apply_delivered(session, claim, status_code=status_code,
                              provider_ref=provider_ref, now=now or utcnow(), worker=worker)
    session.commit()
    return updated


def apply_delivered(session: Session, claim: Claim, *, status_code: int,
                    provider_ref: str | None, now: datetime, worker: str | None) -> bool:
    """``mark_delivered`` without the commit, in the caller's transaction."""
    updated = _execute(session, _DELIVERED, _delivered_params(claim, status_code, provider_ref,
                                                              now), claim.id)
    _record_attempt(session, claim.id, claim.lease_token, claim.claimed_at,
                    AttemptOutcome.DELIVERED, now, worker, status_code=status_code)
    if updated and claim.ordering_key is not None:
        wake_next(session, claim.provider, claim.ordering_key, now, relay_due(now))
    return updated == 1


@dataclass(frozen=True)
class Delivered:
    """One success for ``apply_delivered_many``."""

    claim: Claim
    status_code: int
    provider_ref: str | None
    now: datetime
    worker: str | None


def apply_delivered_many(session: Session | Connection,
                         items: Sequence[Delivered]) -> list[bool]:
    """``apply_delivered`` for many claims without an ordering key, as two executemany
    statements (the group writer's batch). Does not commit.

    Returns, per item, whether it was recorded under its lease token. The UPDATE's row
    count tells when all were; only when it falls short are the rows read back.
    """
    assert all(item.claim.ordering_key is None for item in items), "ordered: apply_delivered"
    if not items:
        return []
    updated = session.execute(_DELIVERED, [
        _delivered_params(i.claim, i.status_code, i.provider_ref, i.now) for i in items]).rowcount
    session.execute(_INSERT_ATTEMPT, [
        _attempt_params(i.claim.id, i.claim.lease_token, i.claim.claimed_at,
                        AttemptOutcome.DELIVERED, i.now, i.worker, status_code=i.status_code)
        for i in items])
    dialect = (session.dialect if isinstance(session, Connection)
               else session.get_bind().dialect)
    if updated == len(items) and dialect.supports_sane_multi_rowcount:
        return [True] * len(items)
    # Some lease was lost: a row is ours if it is delivered under our token now.
    states = dict(session.execute(
        select(_M.c.id, _M.c.lease_token).where(
            _M.c.id.in_([i.claim.id for i in items]),
            _M.c.status == MessageStatus.DELIVERED)).all())
    return [states.get(i.claim.id) == i.claim.lease_token for i in items]


def _delivered_params(claim: Claim, status_code: int, provider_ref: str | None,
                      now: datetime) -> dict[str, Any]:
    return {"m_id": claim.id, "token": claim.lease_token, "now": now, "ref": provider_ref,
            "code": status_code, "gen": claim.key_generation}


def record(session: Session, claim: Claim, failure: Failure, decision: Decision, *,
           now: datetime | None = None, worker: str | None = None) -> bool:
    """Apply a ``Decision`` (``outbox.decisions``) to a claimed message, under its lease
    token, and add the attempt row. Commits.

    Returns:
        False when our lease was lost (a newer claim owns the row): only the attempt row
        is written.
    """
    recorded = apply_record(session, claim, failure, decision, now=now or utcnow(),
                            worker=worker)
    session.commit()
    return recorded


def apply_record(session: Session, claim: Claim, failure: Failure, decision: Decision, *,
                 now: datetime, worker: str | None) -> bool:
    """``record`` without the commit, in the caller's transaction."""
    recorded = _apply(session, claim.id, claim.lease_token, failure, decision, now,
                      claim.key_generation)
    _record_attempt(session, claim.id, claim.lease_token, claim.claimed_at, decision.outcome,
                    now, worker, failure, next_attempt_at=_next_at(decision, now))
    return recorded


def _apply(session: Session, message_id: str, token: int, failure: Failure,
           decision: Decision, now: datetime, generation: int) -> bool:
    """The fenced UPDATE of a decided failure; True if the lease token still held."""
    dead = decision.outcome is AttemptOutcome.DEAD
    params = {"m_id": message_id, "token": token, "now": now, "n_attempts": decision.attempts,
              "gen": generation,
              "n_limited": decision.rate_limited, "error_class": failure.error_class,
              "code": failure.status_code, "verify_first": decision.verify_first,
              "error": f"{decision.reason}: {failure.detail}" if dead else failure.detail}
    if dead:
        params["needs_review"] = decision.needs_review
    else:
        params["next_at"] = _next_at(decision, now)
    statement = _FAILED[MessageStatus.DEAD if dead else MessageStatus.PENDING]
    return _execute(session, statement, params, message_id) == 1


_ADVANCE_KEY = update(_M).where(
    _M.c.id == bindparam("m_id"), _M.c.lease_token == bindparam("token"),
    _M.c.status == MessageStatus.IN_FLIGHT,
).values(key_generation=bindparam("gen"))


def advance_key(session: Session, claim: Claim) -> bool:
    """Record ``claim.key_generation`` (the next key, about to be sent under) before the
    send, under the lease token, keeping ``verify_first``: were the worker lost after the
    send, the next attempt verifies that key, not the spent one. Commits; False if the
    lease was lost."""
    updated = _execute(session, _ADVANCE_KEY, {"m_id": claim.id, "token": claim.lease_token,
                                               "gen": claim.key_generation}, claim.id)
    session.commit()
    return updated == 1


def _next_at(decision: Decision, now: datetime) -> datetime | None:
    """When a retried or deferred message is due: the decision's time, but always the
    relay's to publish, even one due at once (no grace for fresh rows)."""
    if decision.next_attempt_at is None:
        return None
    return max(decision.next_attempt_at, relay_due(now))


def recover_expired_leases(session: Session, *, idempotent: Callable[[str], bool],
                           policy_for: Callable[[str], RetryPolicy],
                           verify_after: Callable[[str], float | None] = lambda _: None,
                           now: datetime | None = None, limit: int = 500
                           ) -> list[tuple[str, Decision]]:
    """In-flight rows whose lease expired (worker killed or hung): decided as the ``LOST``
    failure (the call may have happened), then due again at once with the same idempotency
    key, or verified first (a provider without idempotency that can look the key up), or
    dead-lettered — "needs review" for a provider without either, "exhausted" for a
    message that kills every worker it reaches. Commits.

    Args:
        idempotent: provider name → whether it deduplicates retries (the composition layer
            knows; the core does not import the providers).
        policy_for: provider name → its retry policy.
        verify_after: provider name → seconds before its lookup can be trusted, or None
            when it cannot verify (``integrations.registry.verify_after``).

    Returns:
        (message id, decision) for each recovered row.
    """
    now = now or utcnow()
    query = (select(Message.id, Message.provider, Message.lease_token, Message.updated_at,
                    Message.attempts, Message.rate_limited_count, Message.budget_started_at,
                    Message.key_generation, Message.verify_first)
             .where(Message.status == MessageStatus.IN_FLIGHT, Message.lease_expires_at <= now)
             .order_by(Message.lease_expires_at).limit(limit)
             .with_for_update(skip_locked=True))
    recovered = []
    for row in session.execute(query).all():
        verify_after_s = verify_after(row.provider)
        decision = decide(LOST, attempts=row.attempts, rate_limited=row.rate_limited_count,
                          budget_started_at=row.budget_started_at,
                          policy=policy_for(row.provider), idempotent=idempotent(row.provider),
                          now=now, verify_after_s=verify_after_s)
        if row.verify_first and decision.outcome is AttemptOutcome.RETRY:
            # The lost attempt was to verify, or to send under a new key after "not done":
            # the question stands, asked once the lookup can be trusted again.
            wait = timedelta(seconds=verify_after_s or 0.0)
            decision = replace(decision, verify_first=True,
                               next_attempt_at=max(decision.next_attempt_at, now + wait))
        if _apply(session, row.id, row.lease_token, LOST, decision, now, row.key_generation):
            outcome = (AttemptOutcome.LOST if decision.outcome is AttemptOutcome.RETRY
                       else decision.outcome)
            # updated_at is the claim time: a claim is the row's last change while in flight.
            _record_attempt(session, row.id, row.lease_token, row.updated_at, outcome, now,
                            None, LOST, next_attempt_at=_next_at(decision, now))
            recovered.append((row.id, decision))
    session.commit()
    return recovered
