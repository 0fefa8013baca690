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

from sqlalchemy import and_, exists, func, or_, select, text
from sqlalchemy.orm import Session, aliased

from .models import Message, MessageStatus

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
