"""``enqueue``: record an integration operation in the caller's transaction."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy import Insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, make_transient_to_detached

import schemas

from . import config, ordering
from .clock import utcnow
from .dispatch import MessageRef, dispatch_after_commit
from .errors import (
    IdempotencyConflict,
    InvalidIdempotencyKey,
    InvalidMessage,
    InvalidPayload,
    UnknownOperation,
    UnknownProvider,
)
from .ids import new_id
from .models import Message, MessageStatus
from .payload import canonical_json

MAX_KEY_LENGTH = 255
MAX_LABEL_LENGTH = 255

# Every column NULL unless enqueue sets it: the returned object then holds a value for each
# column and reading one never loads it. Derived from the table, so it cannot go stale.
_ALL_COLUMNS_NULL = {column.key: None for column in Message.__table__.columns}
_INSERTS: dict[str, Insert] = {}   # dialect name → INSERT … ON CONFLICT DO NOTHING, built once


def enqueue(session: Session, *, provider: str, operation: str, payload: dict[str, Any],
            idempotency_key: str, correlation_id: str | None = None,
            ordering_key: str | None = None) -> Message:
    """Add one message to ``session``; it is dispatched only after the session commits.

    Repeating a call with the same ``(provider, idempotency_key)`` and the same
    payload returns the existing message and writes nothing. The uniqueness is
    enforced by the database (``INSERT … ON CONFLICT DO NOTHING``), so it holds
    across processes and, at PostgreSQL's default READ COMMITTED level, never aborts
    the caller's transaction. Under REPEATABLE READ or SERIALIZABLE, a key committed by
    another transaction after yours took its snapshot is a serialization failure
    (SQLSTATE 40001, raised by the driver as at any statement at those levels): retry
    the transaction, and the retry returns the committed message.

    Args:
        session: the caller's SQLAlchemy session; its transaction decides.
        provider: e.g. ``"payments"``.
        operation: e.g. ``"charge"``.
        payload: JSON object, at most ``OUTBOX_MAX_PAYLOAD_BYTES`` serialized (see
            ``outbox.payload``), valid against ``schemas/operations/<provider>.<operation>``.
        idempotency_key: unique per provider and sent to the provider in an HTTP header:
            1–255 printable ASCII characters, no space at either end.
        correlation_id: optional request id for tracing: at most 255 printable characters.
        ordering_key: optional; messages of this provider with the same key are delivered
            one at a time in commit order (``outbox.ordering``): at most 255 printable
            characters. On PostgreSQL, transactions enqueueing for the same key wait for
            each other's commit.

    Returns:
        The message (new, or the existing one for a repeated key).

    Raises:
        UnknownProvider, UnknownOperation, InvalidPayload, InvalidIdempotencyKey,
        InvalidMessage: bad input; nothing was written and the session is usable.
        IdempotencyConflict: the key is used with a different payload.
    """
    canonical = _validate(provider, operation, payload, idempotency_key, correlation_id)
    _check_text("ordering_key", ordering_key)
    digest = hashlib.sha256(f"{operation}\n{canonical}".encode()).hexdigest()
    now = utcnow()
    message_id = new_id()
    values = dict(
        id=message_id, provider=provider, operation=operation, idempotency_key=idempotency_key,
        payload=payload, payload_sha256=digest, correlation_id=correlation_id,
        status=MessageStatus.PENDING.value, attempts=0, rate_limited_count=0, lease_token=0,
        next_attempt_at=now, created_at=now, updated_at=now, budget_started_at=now,
        needs_review=False, ordering_key=None, ordering_seq=None,
    )
    if session.autoflush:   # as an ORM insert would: the caller's pending objects go first
        session.flush()
    follower = False
    if ordering_key is not None:
        values["ordering_key"] = ordering_key
        values["ordering_seq"], follower = ordering.next_seq(session, provider, ordering_key)
        if follower:   # not its key's head: parked until the head is done
            values["next_attempt_at"] = ordering.PARKED
    # RETURNING, not rowcount: psycopg 3 under SQLAlchemy reports -1 for this INSERT.
    inserted = session.execute(_insert_statement(session), values).first() is not None
    if inserted:
        if not follower:
            dispatch_after_commit(session, MessageRef(message_id, provider, operation))
        # The payload as a load would give it (a copy, from the canonical text), not the
        # caller's own dict.
        return _persistent(session, values | {"payload": json.loads(canonical)})

    existing = session.scalars(
        select(Message).where(Message.provider == provider,
                              Message.idempotency_key == idempotency_key)
    ).one()
    if existing.payload_sha256 != digest:
        raise IdempotencyConflict(provider, idempotency_key, existing.id)
    return existing


def _insert_statement(session: Session) -> Insert:
    """The dialect's ``INSERT … ON CONFLICT DO NOTHING RETURNING id`` on the table, with bound
    parameters (a row comes back only if one was inserted).

    A Core statement built once and compiled once (SQLAlchemy caches the compiled form):
    rebuilding an ORM insert with literal values on every call cost ~6× as much, and an ORM
    ``INSERT … RETURNING`` that loads the row back cost ~2× (measured on both databases).
    """
    name = session.get_bind().dialect.name
    statement = _INSERTS.get(name)
    if statement is None:
        dialect = postgresql if name == "postgresql" else sqlite
        statement = _INSERTS[name] = (
            dialect.insert(Message.__table__)
            .on_conflict_do_nothing(index_elements=["provider", "idempotency_key"])
            .returning(Message.__table__.c.id))
    return statement


def _persistent(session: Session, values: dict[str, Any]) -> Message:
    """The row just inserted, as a persistent object of ``session``, without reading it back.

    ``make_transient_to_detached`` marks a constructed object as a row that exists (the
    public API for exactly this); with every column given a value, nothing is expired or
    loaded later, and the flush has nothing to write.
    """
    message = Message(**(_ALL_COLUMNS_NULL | values))
    make_transient_to_detached(message)
    session.add(message)
    return message


def _check_text(name: str, value: Any) -> None:
    """An optional label (``correlation_id``, ``ordering_key``): None, or 1-255 printable
    characters."""
    if value is not None and (not isinstance(value, str) or not value
                              or len(value) > MAX_LABEL_LENGTH or not value.isprintable()):
        raise InvalidMessage(f"{name} must be 1-{MAX_LABEL_LENGTH} printable "
                             "characters (no CR, LF or other control characters)")


def _validate(provider: Any, operation: Any, payload: Any, idempotency_key: Any,
              correlation_id: Any) -> str:
    """Refuse bad input (nothing is written); return the payload's canonical JSON text."""
    known = schemas.operations()
    if not isinstance(provider, str) or provider not in known:
        shown = repr(provider[:64]) if isinstance(provider, str) else type(provider).__name__
        raise UnknownProvider(f"unknown provider {shown}; known: {', '.join(sorted(known))}")
    if not isinstance(operation, str) or operation not in known[provider]:
        shown = repr(operation[:64]) if isinstance(operation, str) else type(operation).__name__
        raise UnknownOperation(f"unknown operation {provider}.{shown}; known: "
                               f"{', '.join(sorted(known[provider]))}")
    try:
        schemas.check_idempotency_key(idempotency_key)
    except schemas.SchemaError as exc:
        raise InvalidIdempotencyKey(
            f"invalid idempotency_key ({exc.reason}): it must be 1-{MAX_KEY_LENGTH} printable "
            "ASCII characters with no space at either end (it is sent to the provider in an "
            "HTTP header)") from None
    _check_text("correlation_id", correlation_id)
    label = f"{provider}.{operation}"
    canonical = canonical_json(payload, max_bytes=config.max_payload_bytes(), label=label)
    try:
        schemas.validate_operation(provider, operation, payload)
    except schemas.SchemaError as exc:
        raise InvalidPayload(f"invalid payload for {label}: {exc.path}: {exc.reason}",
                             exc.path) from None
    return canonical
