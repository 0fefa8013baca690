"""The relay: publishes rows that are due and rows whose broker message was lost.

Safe to run several at once on PostgreSQL: each pass takes its rows with
``FOR UPDATE SKIP LOCKED`` inside one ``UPDATE … RETURNING``, so no row is
taken by two relays. (SQLite has a single writer, so the question does not arise.)
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from integrations.registry import supports_idempotency

from .clock import utcnow
from .config import RelaySettings
from .dispatch import Dispatcher, MessageRef
from .lifecycle import due_filter, recover_expired_leases
from .models import Message, MessageStatus

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


def run_once(engine: Engine, dispatcher: Dispatcher, settings: RelaySettings) -> int:
    """One relay pass: recover expired leases, then publish what is due. Returns rows published."""
    with Session(engine) as session:
        lost = recover_expired_leases(session, limit=settings.batch_size,
                                      idempotent=supports_idempotency)
        if lost:
            log.warning("recovered %d message(s) whose worker lease expired", len(lost))
            _announce_dead(dispatcher, session, [mid for mid, dead in lost if dead])
        refs = take_due(session, settings)
        if not refs:
            return 0
        if not dispatcher.publish_now(None, refs):
            release(session, refs)
            raise BrokerUnavailable(f"could not publish {len(refs)} message(s)")
    log.info("relay published %d message(s)", len(refs))
    return len(refs)


def _announce_dead(dispatcher: Dispatcher, session: Session, ids: list[str]) -> None:
    """Publish the dead-letter event of rows the relay dead-lettered (needs review)."""
    announce = getattr(dispatcher.publisher, "publish_dead_letter", None)
    for message in (session.get(Message, mid) for mid in ids):
        log.error("dead letter %s: needs review (worker lost; provider has no idempotency)",
                  message.label)
        if announce is not None:
            try:
                announce(message.id, f"{message.label} needs_review")
            except Exception as exc:  # the row is dead in the database whatever the broker says
                log.warning("dead-letter event for %s not published: %s", message.id,
                            type(exc).__name__)


class BrokerUnavailable(RuntimeError):
    pass


def run(engine: Engine, dispatcher: Dispatcher, settings: RelaySettings,
        stop: threading.Event | None = None) -> None:
    """Relay until ``stop`` is set. Broker or database trouble backs off and is retried."""
    stop = stop or threading.Event()
    failures = 0
    while not stop.is_set():
        try:
            published = run_once(engine, dispatcher, settings)
            failures = 0
        except Exception as exc:  # keep relaying through broker/database outages
            failures += 1
            log.warning("relay pass failed (%s: %s); retrying", type(exc).__name__, exc)
            stop.wait(min(0.5 * 2 ** min(failures, 6), 30.0))
            continue
        if published < settings.batch_size:
            stop.wait(settings.poll_interval_s)
