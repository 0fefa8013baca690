"""The relay: publishes rows that are due and rows whose broker message was lost.

Safe to run several at once on PostgreSQL: each pass takes its rows with
``FOR UPDATE SKIP LOCKED`` inside one ``UPDATE … RETURNING``, so no row is
taken by two relays. (SQLite has a single writer, so the question does not arise.)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta

from sqlalchemy import Engine, func, or_, select, update
from sqlalchemy.orm import Session

from integrations.errors import ConfigurationError

from . import config, ordering, totals
from .clock import utcnow
from .config import RelaySettings, current_retry_policy
from .dispatch import Dispatcher, MessageRef
from .errors import OutboxError
from .lifecycle import recover_expired_leases, relay_due
from .models import AttemptOutcome, Message, MessageStatus
from .ordering import is_head
from .retention import PruneSchedule
from .retry import RetryPolicy

log = logging.getLogger("outbox.relay")

PARKED_SWEEP_S = 10.0
BACKLOG_POLL_S = 0.05


def take_due(session: Session, settings: RelaySettings, *,
             depth: Callable[[str], int | None] = lambda provider: None,
             providers: Iterable[str] | None = None) -> list[MessageRef]:
    """Mark the rows to publish now queued and return them. Commits.

    Per provider, in this order:

    1. **Re-send what the broker lost.** ``depth(provider)`` is the number of messages
       waiting in the provider's broker queue (None if the broker cannot say). Rows queued
       for at least ``settle_s`` that are not among them — queued rows minus depth — were
       lost: a flushed or restarted broker, a relay killed between marking and publishing,
       a worker killed holding prefetched messages. The oldest that many are sent again.
       A message still waiting is never sent twice this way; if a guess is wrong the copy
       is harmless (the claim is fenced), only wasted. Without a depth, rows queued for
       longer than ``requeue_after_s`` are sent again.
    2. **Top up to ``max_queued``.** At most ``max_queued`` rows of a provider are queued at
       a time; the rest of a backlog waits in the database as due rows, oldest due first,
       so the broker holds seconds of work, and a lost broker costs that much to rebuild.

    Args:
        depth: provider → messages waiting in its broker queue, or None.
        providers: the providers to serve (default: every queue, ``config.queues()``).
    """
    now = utcnow()
    refs: list[MessageRef] = []
    for provider in providers if providers is not None else config.queues():
        waiting = depth(provider)            # before counting rows: see _lost
        queued, settled = session.execute(
            select(func.count(), func.count().filter(
                Message.queued_at <= now - timedelta(seconds=settings.settle_s)))
            .where(Message.provider == provider, Message.status == MessageStatus.QUEUED)).one()
        if waiting is None:
            refs += _resend(session, provider, now, settings.batch_size,
                            before=now - timedelta(seconds=settings.requeue_after_s))
        elif (lost := min(settled, queued - waiting)) > 0:
            log.warning("%s: %d queued message(s) are not in the broker (%d waiting there); "
                        "sending them again", provider, lost, waiting)
            refs += _resend(session, provider, now, lost,
                            before=now - timedelta(seconds=settings.settle_s))
        room = min(settings.batch_size, settings.max_queued - queued)
        if room > 0:
            refs += _take_pending(session, provider, now, room,
                                  grace=timedelta(seconds=settings.grace_s))
    session.commit()
    return refs


def _resend(session: Session, provider: str, now: datetime, limit: int, *,
            before: datetime) -> list[MessageRef]:
    """The oldest queued rows queued before ``before``, stamped queued again now."""
    ids = (select(Message.id)
           .where(Message.provider == provider, Message.status == MessageStatus.QUEUED,
                  Message.queued_at <= before)
           .order_by(Message.queued_at, Message.id).limit(limit)
           .with_for_update(skip_locked=True).scalar_subquery())
    return _mark_queued(session, ids, now)


def _take_pending(session: Session, provider: str, now: datetime, limit: int, *,
                  grace: timedelta) -> list[MessageRef]:
    """Up to ``limit`` pending rows that are due, oldest due first, marked queued.

    Due: a scheduled retry (``next_attempt_at`` after its last change) when its time comes;
    a fresh or re-driven row once ``grace`` has passed, which leaves its after-commit
    dispatch time to send it and mark it queued. An ordered row only as its key's head.
    The partial index ``ix_outbox_pending_due`` gives them in order, however long the
    backlog (no sort).
    """
    ids = (select(Message.id)
           .where(Message.provider == provider, Message.status == MessageStatus.PENDING,
                  Message.next_attempt_at <= now,
                  or_(Message.next_attempt_at > Message.updated_at,
                      Message.updated_at <= now - grace),
                  is_head())
           .order_by(Message.next_attempt_at, Message.id).limit(limit)
           .with_for_update(skip_locked=True).scalar_subquery())
    return _mark_queued(session, ids, now)


def _mark_queued(session: Session, ids, now: datetime) -> list[MessageRef]:
    rows = session.execute(
        update(Message).where(Message.id.in_(ids))
        .values(status=MessageStatus.QUEUED, queued_at=now, updated_at=now)
        .returning(Message.id, Message.provider, Message.operation)
        .execution_options(synchronize_session=False)).all()
    return [MessageRef(*row) for row in rows]


def release(session: Session, refs: list[MessageRef]) -> None:
    """Put rows we failed to publish back to pending, due at the next pass. Commits."""
    now = utcnow()
    session.execute(
        update(Message)
        .where(Message.id.in_([r.id for r in refs]), Message.status == MessageStatus.QUEUED)
        .values(status=MessageStatus.PENDING, next_attempt_at=relay_due(now), updated_at=now,
                queued_at=None)
    )
    session.commit()


def run_once(engine: Engine, dispatcher: Dispatcher, settings: RelaySettings, *,
             idempotent: Callable[[str], bool],
             verify_after: Callable[[str], float | None] = lambda _: None,
             sweep_parked: bool = True) -> int:
    """One relay pass: recover expired leases, then publish what is due. Returns rows published.

    Args:
        idempotent: provider name → whether it deduplicates retries by idempotency key
            (decides what a lost lease becomes; given by the process that runs the relay).
        verify_after: provider name → when its lookup of a lost attempt can be trusted, or
            None when it cannot verify (``integrations.registry.verify_after``).
        sweep_parked: also wake ordered messages whose wake was missed
            (``outbox.ordering.wake_parked_heads``; ``run`` does it every 10 s).
    """
    # The broker's queue depths first, outside any transaction: on SQLite a transaction
    # holds the database's write lock, which the workers' claims wait for, and should not
    # wait on broker round trips. (Read before the rows are counted, as take_due needs.)
    depths = {provider: dispatcher.depth(provider) for provider in config.queues()}
    with Session(engine) as session:
        if sweep_parked:
            now = utcnow()
            if woken := ordering.wake_parked_heads(session, now, relay_due(now)):
                log.info("woke %d ordered message(s) whose key's head was done", woken)
            session.commit()
        # An inbound event's handler commits with its processed mark: running it again
        # after a lost worker cannot act twice, whatever the caller says of providers.
        lost = recover_expired_leases(
            session, limit=settings.batch_size, policy_for=_policy, verify_after=verify_after,
            idempotent=lambda provider: provider == config.INBOUND or idempotent(provider))
        if lost:
            log.warning("recovered %d message(s) whose worker lease expired", len(lost))
            _announce_dead(dispatcher, session,
                           [mid for mid, d in lost if d.outcome is AttemptOutcome.DEAD])
        refs = take_due(session, settings, depth=depths.get, providers=list(depths))
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
        idempotent: Callable[[str], bool],
        verify_after: Callable[[str], float | None] = lambda _: None,
        stop: threading.Event | None = None, prune: PruneSchedule | None = None) -> None:
    """Relay until ``stop`` is set. Broker or database trouble backs off and is retried.

    Args:
        idempotent, verify_after: as ``run_once``.
        prune: retention (``outbox.retention``), run between passes when it is due.
    """
    stop = stop or threading.Event()
    failures = 0
    swept_at = rolled_at = 0.0
    while not stop.is_set():
        try:
            sweep = time.monotonic() - swept_at >= PARKED_SWEEP_S
            published = run_once(engine, dispatcher, settings, idempotent=idempotent,
                                 verify_after=verify_after, sweep_parked=sweep)
            if sweep:
                swept_at = time.monotonic()
            failures = 0
            if time.monotonic() - rolled_at >= totals.ROLLUP_EVERY_S:
                totals.roll_up(engine)   # /metrics' attempt counters, before pruning
                rolled_at = time.monotonic()
            if prune is not None:
                prune.maybe_run(engine)
        except Exception as exc:  # keep relaying through broker/database outages
            failures += 1
            log.warning("relay pass failed (%s: %s); retrying", type(exc).__name__, exc)
            stop.wait(min(0.5 * 2 ** min(failures, 6), 30.0))
            continue
        if not published:
            stop.wait(settings.poll_interval_s)
        elif published < settings.batch_size:
            # A backlog drains through the broker's bounded room: come back soon to top it up
            # (a pass costs a few indexed queries), or the queue runs dry between passes.
            stop.wait(min(settings.poll_interval_s, BACKLOG_POLL_S))
