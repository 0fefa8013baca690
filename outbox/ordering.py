"""Ordered delivery per key: messages with the same ``(provider, ordering_key)`` reach the
provider one at a time, in the order their transactions committed.

* ``enqueue(..., ordering_key="contact-42")`` numbers the message ``ordering_seq`` = the
  key's highest number + 1. On PostgreSQL it first takes a transaction-scoped advisory lock
  on the key, so a second transaction enqueueing for the same key waits until the first
  commits or rolls back, and the numbers follow commit order. (SQLite has one writer at a
  time, which gives the same.) Only transactions sharing a key wait for each other.
* Only the key's *head* may be published or claimed: the message with no earlier message of
  the key still unfinished (pending, queued, in flight or dead). While the head retries, its
  followers wait; a dead-lettered head blocks its key, visibly (``outbox status``), until it
  is re-driven (and delivered) or discarded. Delivered and discarded messages unblock.
"""

from __future__ import annotations

import hashlib
from datetime import datetime

from sqlalchemy import and_, bindparam, exists, func, or_, select, text, tuple_, update
from sqlalchemy.orm import Session, aliased

from .models import Message, MessageStatus

# ``next_attempt_at`` of a message waiting behind its key's head: out of the relay's due scan
# (which reads pending rows in due order and stops at "now"), however many wait. The head's
# delivery or discard wakes the next one in the same transaction (``wake_next``); the relay
# sweeps for any it missed (``wake_parked_heads``).
PARKED = datetime(9999, 12, 31)

# States that hold back the key's later messages.
BLOCKING = (MessageStatus.PENDING, MessageStatus.QUEUED, MessageStatus.IN_FLIGHT,
            MessageStatus.DEAD)

_earlier = aliased(Message, name="earlier")


def _earlier_unfinished(table_provider, table_key, table_seq):
    return exists().where(_earlier.provider == table_provider,
                          _earlier.ordering_key == table_key,
                          _earlier.ordering_seq < table_seq,
                          _earlier.status.in_(BLOCKING))


def is_head(columns=Message):
    """SQL condition: the row has no ordering key, or it is its key's head.

    ``columns`` is the ORM class (``Message``) or a table's column collection (``.c``)."""
    return or_(columns.ordering_key.is_(None),
               ~_earlier_unfinished(columns.provider, columns.ordering_key,
                                    columns.ordering_seq))


def next_seq(session: Session, provider: str, key: str) -> tuple[int, bool]:
    """The number for a new message of ``key``, and whether an earlier one is unfinished
    (then the new message is not the head and after-commit dispatch leaves it to the relay).

    On PostgreSQL, waits for any other open transaction that enqueued for the same key."""
    if session.get_bind().dialect.name == "postgresql":
        digest = hashlib.blake2b(f"{provider}\0{key}".encode(), digest_size=8).digest()
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"),
                        {"k": int.from_bytes(digest, "big", signed=True)})
    last, blocking = session.execute(
        select(func.max(Message.ordering_seq),
               func.count().filter(Message.status.in_(BLOCKING)))
        .where(Message.provider == provider, Message.ordering_key == key)).one()
    return (last or 0) + 1, bool(blocking)


_M = Message.__table__
_parked = aliased(Message, name="parked")

_WAKE_NEXT = (
    update(_M)
    .where(_M.c.id == select(_parked.id)
           .where(_parked.provider == bindparam("b_provider"),
                  _parked.ordering_key == bindparam("b_key"),
                  _parked.status == MessageStatus.PENDING,
                  _parked.next_attempt_at == PARKED)
           .order_by(_parked.ordering_seq).limit(1).scalar_subquery())
    .values(next_attempt_at=bindparam("due"), updated_at=bindparam("now"))
)


def wake_next(session: Session, provider: str, key: str, now: datetime, due: datetime) -> None:
    """The key's head is done (delivered or discarded): make the next message due at
    ``due``. Runs in the caller's transaction, so the wake commits with the outcome."""
    session.execute(_WAKE_NEXT, {"b_provider": provider, "b_key": key, "now": now, "due": due})


def wake_parked_heads(session: Session, now: datetime, due: datetime) -> int:
    """Safety net: parked messages that are their key's head (a wake was missed, e.g. the
    head finished while the follower's transaction was still open) become due. Reads each
    blocked key's first parked message only. Does not commit; returns how many woke."""
    firsts = (select(Message.provider, Message.ordering_key, func.min(Message.ordering_seq))
              .where(Message.status == MessageStatus.PENDING, Message.next_attempt_at == PARKED)
              .group_by(Message.provider, Message.ordering_key))
    return session.execute(
        update(Message)
        .where(Message.status == MessageStatus.PENDING, Message.next_attempt_at == PARKED,
               tuple_(Message.provider, Message.ordering_key, Message.ordering_seq).in_(firsts),
               is_head())
        .values(next_attempt_at=due, updated_at=now)
        .execution_options(synchronize_session=False)).rowcount


def blocked_keys(session: Session, provider: str | None = None) -> list[tuple[str, str, int]]:
    """Keys held back by a dead-lettered head: (provider, key, messages waiting behind it)."""
    waiting = aliased(Message, name="waiting")
    query = (select(Message.provider, Message.ordering_key, func.count(waiting.id))
             .join(waiting, and_(waiting.provider == Message.provider,
                                 waiting.ordering_key == Message.ordering_key,
                                 waiting.ordering_seq > Message.ordering_seq,
                                 waiting.status.in_((MessageStatus.PENDING,
                                                     MessageStatus.QUEUED))))
             .where(Message.status == MessageStatus.DEAD, Message.ordering_key.is_not(None))
             .group_by(Message.provider, Message.ordering_key)
             .order_by(Message.provider, Message.ordering_key))
    if provider is not None:
        query = query.where(Message.provider == provider)
    return [tuple(row) for row in session.execute(query).all()]
