"""Inbound events (webhooks, later polls) on the outbox's own lifecycle.

A verified event is stored as an outbox message of the pseudo-provider ``inbound``: its
idempotency key is ``<source>:<event id>``, so the table's unique constraint deduplicates
it atomically (``INSERT … ON CONFLICT DO NOTHING``, never check-then-insert), and from
there it is claimed with a lease, attempted, retried with backoff, dead-lettered and
re-driven exactly as an outbound message is — on its own ``inbound`` queue and with its
own rate limit (``OUTBOX_INBOUND_RATE_LIMIT``), visible in Flower, ``outbox status``,
``/metrics`` and the admin app. Its operation is ``<source>.<event type>``.

Handlers are user code, registered with ``@handler("payments", "payment_intent.succeeded")``
in a module named by ``OUTBOX_HANDLERS`` (comma-separated) or an ``outbox.handlers`` entry
point. ``process`` runs the handler in a database transaction that also marks the event
processed (fenced by the claim's lease token): the handler's writes and the mark commit
together or not at all, so a crash mid-handler leaves the event to be processed again, and
a handler may enqueue outbound messages in that transaction. An event type without a
handler is recorded as ignored (a delivered row whose ``provider_ref`` is ``ignored``).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, and_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from integrations.errors import Handling
from integrations.sanitize import sanitize

from . import config, decisions, lifecycle
from .clock import utcnow
from .ids import new_id
from .lifecycle import Claim
from .models import AttemptOutcome, Message, MessageStatus

log = logging.getLogger("outbox.inbound")

INBOUND = config.INBOUND
HANDLED, IGNORED = "handled", "ignored"   # provider_ref of a processed event
HANDLER_ERROR = "handler_error"


@dataclass(frozen=True)
class Event:
    """What a handler gets: where the event came from, its id and type, its parsed body
    (``data``), and the outbox message that carries it."""

    source: str
    id: str
    type: str
    data: Any
    message_id: str
    received_at: datetime


Handler = Callable[[Session, Event], None]
_handlers: dict[tuple[str, str], Handler] = {}


def handler(source: str, event_type: str) -> Callable[[Handler], Handler]:
    """Register ``fn(session, event)`` for ``event_type`` events from ``source``."""
    def register(fn: Handler) -> Handler:
        _handlers[source, event_type] = fn
        return fn
    return register


def find_handler(source: str, event_type: str) -> Handler | None:
    return _handlers.get((source, event_type))


def load_handlers(environ: Mapping[str, str] | None = None) -> list[str]:
    """Import the modules of ``OUTBOX_HANDLERS`` and of ``outbox.handlers`` entry points
    (importing them registers their handlers); returns their names."""
    from importlib.metadata import entry_points

    env = os.environ if environ is None else environ
    names = [n.strip() for n in env.get("OUTBOX_HANDLERS", "").split(",") if n.strip()]
    for name in names:
        importlib.import_module(name)
    for point in entry_points(group="outbox.handlers"):
        point.load()
        names.append(point.value)
    return names


def store(db: Session | Connection, *, source: str, event_id: str, event_type: str,
          body: str, headers: Mapping[str, str], now: datetime | None = None
          ) -> tuple[str, bool]:
    """Store a verified event in the transaction of ``db`` (a Session, or a Core Connection:
    the receiver's lean path); the relay publishes it.

    Returns:
        (its message id, whether it is new): a duplicate (same source and event id) is not
        stored again, however close together the two arrive.
    """
    now = now or utcnow()
    key = f"{source}:{event_id}"
    message_id = new_id()
    operation = f"{source}.{event_type}"[:64]
    params = dict(
        id=message_id, provider=INBOUND, operation=operation, idempotency_key=key,
        correlation_id=event_id[:255],
        payload={"source": source, "event_id": event_id, "type": event_type, "body": body,
                 "headers": dict(headers), "received_at": now.isoformat() + "Z"},
        payload_sha256=hashlib.sha256(body.encode()).hexdigest(),
        # Due just after now: the relay publishes it on its next pass (no grace period, no
        # after-commit dispatch), so the receiver needs no broker and spends nothing on it.
        next_attempt_at=lifecycle.relay_due(now), created_at=now, updated_at=now,
        budget_started_at=now)
    bind = db.get_bind() if isinstance(db, Session) else db
    if db.execute(_insert(bind.dialect.name), params).rowcount:
        return message_id, True
    existing = db.execute(select(Message.id).where(Message.provider == INBOUND,
                                                   Message.idempotency_key == key)).scalar()
    return existing, False


def _insert(dialect: str):
    """``INSERT … ON CONFLICT (provider, idempotency_key) DO NOTHING`` of a pending row, its
    values bound at execution (one compiled statement for every event)."""
    module = postgresql if dialect == "postgresql" else sqlite
    table = Message.__table__
    return module.insert(table).values(
        status=MessageStatus.PENDING.value, attempts=0, rate_limited_count=0, lease_token=0,
        needs_review=False).on_conflict_do_nothing(
        index_elements=[table.c.provider, table.c.idempotency_key])


def status_of(message: Message) -> str:
    """An event's state for people: pending, queued, in_flight, processed, ignored, dead,
    discarded."""
    if message.status == MessageStatus.DELIVERED:
        return IGNORED if message.provider_ref == IGNORED else "processed"
    return str(message.status)


def status_where(state: str):
    """The SQL condition of ``status_of(message) == state``."""
    if state in ("processed", IGNORED):
        ref = Message.provider_ref == IGNORED
        return and_(Message.status == MessageStatus.DELIVERED,
                    ref if state == IGNORED else ~ref)
    return Message.status == state


@dataclass(frozen=True)
class Processed:
    """What ``process`` did: ``outcome`` None when the lease was lost."""

    outcome: AttemptOutcome | None
    summary: str
    next_attempt_at: datetime | None = None


def process(sessions: sessionmaker[Session], claim: Claim, *, worker: str | None = None,
            clock: Callable[[], datetime] = utcnow,
            rng: random.Random | None = None) -> Processed:
    """Run the event's handler and mark it processed in one transaction; on an exception,
    roll both back and record the failure (retried with backoff, then dead-lettered)."""
    payload = claim.payload
    fn = find_handler(payload["source"], payload["type"])
    try:
        with sessions() as session:
            if fn is not None:
                fn(session, Event(payload["source"], payload["event_id"], payload["type"],
                                  json.loads(payload["body"]), claim.id, claim.claimed_at))
            recorded = lifecycle.apply_delivered(
                session, claim, status_code=200, provider_ref=HANDLED if fn else IGNORED,
                now=clock(), worker=worker)
            if not recorded:   # a newer claim owns the event: its handler's run counts
                session.rollback()
                return Processed(None, "lease lost: not recorded")
            session.commit()
        return Processed(AttemptOutcome.DELIVERED, HANDLED if fn else f"{IGNORED} (no handler)")
    except Exception as exc:  # noqa: BLE001  (user code: any exception is its failure)
        return _failed(sessions, claim, exc, worker, clock, rng)


def _failed(sessions, claim: Claim, exc: Exception, worker, clock, rng) -> Processed:
    name = type(exc).__name__
    # The transaction was rolled back: nothing the handler did happened, so a retry is safe.
    failure = decisions.Failure(HANDLER_ERROR, Handling.BACKOFF, maybe_acted=False,
                                outage_evidence=False, detail=sanitize(f"{name}: {exc}"),
                                label=name)
    decision = decisions.decide(failure, attempts=claim.attempts,
                                rate_limited=claim.rate_limited_count,
                                budget_started_at=claim.budget_started_at,
                                policy=config.current_retry_policy(INBOUND), idempotent=True,
                                now=clock(), rng=rng)
    with sessions() as session:
        if not lifecycle.record(session, claim, failure, decision, now=clock(), worker=worker):
            return Processed(None, f"{HANDLER_ERROR} {name}; lease lost: not recorded")
    log.warning("inbound %s %s: handler raised %s", claim.label, decision.outcome, name)
    return Processed(decision.outcome, f"{HANDLER_ERROR} {name}", decision.next_attempt_at)



