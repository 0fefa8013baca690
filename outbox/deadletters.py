"""Dead letters: list, re-drive and discard by hand, each change written to the audit trail.

Re-drive restores the attempt budget and keeps the idempotency key, so a
message that did reach the provider before it was dead-lettered is not done
twice. Each transition is a conditional UPDATE (``WHERE status = 'dead'``):
two operators re-driving the same message at once produce one re-drive.

Safety rules for re-drive, enforced here so that every front end (CLI, admin page, API)
gets them:

* name message ids *or* a filter, never both (a filter beside ids would be ignored);
* a filter must name a provider, or say ``all_providers=True`` (``--any-provider``):
  "everything dead" is rarely what an operator fixed;
* a message marked ``needs_review`` (the provider may have acted and cannot deduplicate
  a retry) is skipped unless ``accept_duplicate_risk=True`` (``--accept-duplicate-risk``):
  re-sending it may act twice, so a person must have checked first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, insert, or_, select, update
from sqlalchemy.orm import Session

from . import ordering
from .clock import utcnow
from .dispatch import MessageRef, dispatch_after_commit
from .errors import InvalidMessage
from .lifecycle import relay_due
from .models import AuditEntry, Message, MessageStatus


@dataclass(frozen=True)
class DeadFilter:
    """Which dead letters an operator means. An empty filter lists all of them; re-drive
    needs a provider or ``all_providers`` (see the module docstring)."""

    provider: str | None = None
    error_class: str | None = None
    since: datetime | None = None
    operation: str | None = None
    text: str | None = None   # a message id, idempotency key or correlation id, exactly

    def where(self):
        clauses = [Message.status == MessageStatus.DEAD]
        if self.provider:
            clauses.append(Message.provider == self.provider)
        if self.operation:
            clauses.append(Message.operation == self.operation)
        if self.error_class:
            clauses.append(Message.last_error_class == self.error_class)
        if self.since:
            clauses.append(Message.dead_at >= self.since)
        if self.text:
            clauses.append(or_(Message.id == self.text, Message.idempotency_key == self.text,
                               Message.correlation_id == self.text))
        return clauses


@dataclass(frozen=True)
class ActionResult:
    """What happened to one message: ``done`` False means it was no longer dead (or missing)."""

    id: str
    label: str | None
    done: bool
    note: str


def list_dead(session: Session, where: DeadFilter = DeadFilter(), limit: int = 1000,
              offset: int = 0) -> list[Message]:
    """Dead letters matching ``where``, oldest first."""
    return list(session.scalars(
        select(Message).where(*where.where()).order_by(Message.dead_at, Message.id)
        .limit(limit).offset(offset)))


def count_dead(session: Session, where: DeadFilter = DeadFilter()) -> int:
    """How many dead letters match ``where``."""
    return session.execute(select(func.count()).select_from(Message)
                           .where(*where.where())).scalar_one()


def _require_reason(reason: str) -> str:
    if not reason or not reason.strip():
        raise InvalidMessage("a reason is required (it goes to the audit trail)")
    return reason.strip()


def _targets(session: Session, ids: Sequence[str] | None, where: DeadFilter | None,
             all_providers: bool) -> list[str]:
    if ids and where is not None:
        raise InvalidMessage("name message ids or a filter, not both")
    if ids:
        return list(dict.fromkeys(ids))
    if where is None:
        raise InvalidMessage("name message ids, or use a filter (--all --provider P)")
    if not where.provider and not all_providers:
        raise InvalidMessage("a filter must name a provider (--provider P), or say "
                             "--any-provider to act on every provider's dead letters")
    return [m.id for m in list_dead(session, where, limit=100_000)]


NEEDS_REVIEW_NOTE = ("needs review: the provider may already have acted and cannot "
                     "deduplicate a retry; check, then re-drive with --accept-duplicate-risk")


def redrive(session: Session, *, reason: str, actor: str, ids: Sequence[str] | None = None,
            where: DeadFilter | None = None, all_providers: bool = False,
            accept_duplicate_risk: bool = False, dry_run: bool = False,
            now: datetime | None = None) -> list[ActionResult]:
    """Send dead letters again: dead → pending with a fresh attempt budget, same idempotency key.

    Dispatched after ``session`` commits (this function commits unless ``dry_run``).

    Args:
        ids: the messages, or
        where: a filter; it must name a provider unless ``all_providers``.
        accept_duplicate_risk: also re-drive messages marked ``needs_review``.

    Raises:
        InvalidMessage: no reason, both ids and a filter, or a filter without a provider.
    """
    return _transition(session, MessageStatus.PENDING, "redrive", reason, actor,
                       _targets(session, ids, where, all_providers), dry_run, now,
                       accept_duplicate_risk)


def discard(session: Session, *, reason: str, actor: str, ids: Sequence[str] | None = None,
            where: DeadFilter | None = None, all_providers: bool = False,
            dry_run: bool = False, now: datetime | None = None) -> list[ActionResult]:
    """Give up on dead letters for good: dead → discarded. Commits unless ``dry_run``.

    Args:
        ids: the messages, or
        where: a filter (the same rules as ``redrive``'s).
    """
    if not ids and where is None:
        raise InvalidMessage("name the message ids to discard")
    return _transition(session, MessageStatus.DISCARDED, "discard", reason, actor,
                       _targets(session, ids, where, all_providers), dry_run, now, True)


def _transition(session, target, action, reason, actor, targets, dry_run, now,
                accept_duplicate_risk):
    reason = _require_reason(reason)
    now = now or utcnow()
    results = []
    for message_id in targets:
        message = session.get(Message, message_id)
        if message is None:
            results.append(ActionResult(message_id, None, False, "no such message"))
            continue
        if (target is MessageStatus.PENDING and message.needs_review
                and message.status == MessageStatus.DEAD and not accept_duplicate_risk):
            results.append(ActionResult(message_id, message.label, False, NEEDS_REVIEW_NOTE))
            continue
        if dry_run:
            ok = message.status == MessageStatus.DEAD
            results.append(ActionResult(message_id, message.label, ok,
                                        f"would {action}" if ok else f"is {message.status}"))
            continue
        values = dict(status=target, updated_at=now)
        if target is MessageStatus.PENDING:
            values.update(attempts=0, rate_limited_count=0, budget_started_at=now,
                          next_attempt_at=now, dead_at=None, queued_at=None,
                          needs_review=False)
        guard = [Message.id == message_id, Message.status == MessageStatus.DEAD]
        if target is MessageStatus.PENDING and not accept_duplicate_risk:
            guard.append(Message.needs_review.is_(False))   # in the statement: no race
        changed = session.execute(
            update(Message).where(*guard).values(**values)
            .execution_options(synchronize_session=False)
        ).rowcount
        if not changed:
            session.refresh(message)
            note = (NEEDS_REVIEW_NOTE if message.status == MessageStatus.DEAD
                    and message.needs_review else f"not dead (is {message.status})")
            results.append(ActionResult(message_id, message.label, False, note))
            continue
        session.execute(insert(AuditEntry).values(
            at=now, actor=actor, action=action, message_id=message_id, reason=reason,
            details={"last_error_class": message.last_error_class,
                     "last_status_code": message.last_status_code,
                     "attempts": message.attempts,
                     "needs_review": message.needs_review}))
        if target is MessageStatus.PENDING:
            dispatch_after_commit(session, MessageRef(message.id, message.provider,
                                                      message.operation))
        elif message.ordering_key is not None:   # a discarded head unblocks its key
            ordering.wake_next(session, message.provider, message.ordering_key, now,
                               relay_due(now))
        results.append(ActionResult(message_id, message.label, True, f"{action} done"))
    if not dry_run:
        session.commit()
    return results
