"""The relay: publishes rows that are due and rows whose broker message was lost.

Safe to run several at once on PostgreSQL: each pass takes its rows with
``FOR UPDATE SKIP LOCKED`` inside one ``UPDATE … RETURNING``, so no row is
taken by two relays. (SQLite has a single writer, so the question does not arise.)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from integrations.errors import ConfigurationError

from .clock import utcnow
from .config import RelaySettings, current_retry_policy
from .dispatch import Dispatcher, MessageRef
from .errors import OutboxError
from .lifecycle import due_filter, recover_expired_leases
from .models import AttemptOutcome, Message, MessageStatus
from .retry import RetryPolicy

log = logging.getLogger("outbox.relay")


def take_due(session: Session, settings: RelaySettings) -> list[MessageRef]:
    """Mark up to ``batch_size`` due rows queued and return them for publishing. Commits."""
    now = utcnow()
    due_ids = (
        select(Message.id)
        .where(due_filter(now, timedelta(seconds=settings.grace_s),
                          timedelta(seconds=settings.requeue_after_s)))
        .order_by(Message.next_attempt_at)
        .limit(settings.batch_size)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    rows = session.execute(
        update(Message)
        .where(Message.id.in_(due_ids))
        .values(status=MessageStatus.QUEUED, queued_at=now, updated_at=now)
        .returning(Message.id, Message.provider, Message.operation)
    ).all()
    session.commit()
    return [MessageRef(*row) for row in rows]


def release(session: Session, refs: list[MessageRef]) -> None:
    """Put rows we failed to publish back to pending, due now. Commits."""
    now = utcnow()
    session.execute(
        update(Message)
        .where(Message.id.in_([r.id for r in refs]), Message.status == MessageStatus.QUEUED)
        .values(status=MessageStatus.PENDING, next_attempt_at=now, updated_at=now,
                queued_at=None)
    )
    session.commit()


def run_once(engine: Engine, dispatcher: Dispatcher, settings: RelaySettings, *,
             idempotent: Callable[[str], bool]) -> int:
    """One relay pass: recover expired leases, then publish what is due. Returns rows published.

    Args:
        idempotent: provider name → whether it deduplicates retries by idempotency key
            (decides what a lost lease becomes; given by the process that runs the relay).
    """
    with Session(engine) as session:
        lost = recover_expired_leases(session, limit=settings.batch_size, idempotent=idempotent,
                                      policy_for=_policy)
        if lost:
            log.warning("recovered %d message(s) whose worker lease expired", len(lost))
            _announce_dead(dispatcher, session,
                           [mid for mid, d in lost if d.outcome is AttemptOutcome.DEAD])
        refs = take_due(session, settings)
        if not refs:
            return 0
        if not dispatcher.publish_now(None, refs):
            release(session, refs)
            raise BrokerUnavailable(f"broker unreachable: could not publish {len(refs)} "
                                    "message(s); they stay due")
    log.debug("relay published %d message(s)", len(refs))
    return len(refs)


def _policy(provider: str) -> RetryPolicy:
    """The provider's retry policy; the default one if its settings are invalid, so that one
    provider's typo cannot stop the relay for all (``outbox relay`` checks them at start)."""
    try:
        return current_retry_policy(provider)
    except ConfigurationError as exc:
        log.error("%s: invalid retry settings (%s); using the defaults", provider, exc)
        return RetryPolicy()


def _announce_dead(dispatcher: Dispatcher, session: Session, ids: list[str]) -> None:
    """Publish the dead-letter event of rows the relay dead-lettered."""
    for message in (session.get(Message, mid) for mid in ids):
        log.warning("dead letter %s: %s", message.label, "needs review (worker lost)"
                    if message.needs_review else "worker lost, budget spent")
        dispatcher.announce_dead_letter(message.id, f"{message.label} worker_lost")


class BrokerUnavailable(OutboxError, RuntimeError):
    """The broker refused the relay's messages; the rows are due again and wait for it."""


def run(engine: Engine, dispatcher: Dispatcher, settings: RelaySettings, *,
        idempotent: Callable[[str], bool], stop: threading.Event | None = None) -> None:
    """Relay until ``stop`` is set. Broker or database trouble backs off and is retried."""
    stop = stop or threading.Event()
    failures = 0
    while not stop.is_set():
        try:
            published = run_once(engine, dispatcher, settings, idempotent=idempotent)
            failures = 0
        except Exception as exc:  # keep relaying through broker/database outages
            failures += 1
            log.warning("relay pass failed (%s: %s); retrying", type(exc).__name__, exc)
            stop.wait(min(0.5 * 2 ** min(failures, 6), 30.0))
            continue
        if published < settings.batch_size:
            stop.wait(settings.poll_interval_s)
