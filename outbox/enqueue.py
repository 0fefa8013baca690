"""``enqueue``: record an integration operation in the caller's transaction."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy import Insert, inspect, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, configure_mappers, make_transient_to_detached

import schemas

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

MAX_KEY_LENGTH = 255

# Columns enqueue leaves NULL; set on the returned object too, so reading them needs no SELECT.
_UNSET = dict.fromkeys(("lease_expires_at", "queued_at", "delivered_at", "dead_at",
                        "last_error_class", "last_status_code", "last_error", "provider_ref"))
_INSERTS: dict[str, Insert] = {}   # dialect name → INSERT … ON CONFLICT DO NOTHING, built once
_new_message = inspect(Message).class_manager.new_instance   # an instance, as a load makes one


def enqueue(session: Session, *, provider: str, operation: str, payload: dict[str, Any],
            idempotency_key: str, correlation_id: str | None = None) -> Message:
    """Add one message to ``session``; it is dispatched only after the session commits.

    Repeating a call with the same ``(provider, idempotency_key)`` and the same
    payload returns the existing message and writes nothing. The uniqueness is
    enforced by the database (``INSERT … ON CONFLICT DO NOTHING``), so it holds
    across processes and never aborts the caller's PostgreSQL transaction.

    Args:
        session: the caller's SQLAlchemy session; its transaction decides.
        provider: e.g. ``"payments"``.
        operation: e.g. ``"charge"``.
        payload: JSON object validated against ``schemas/operations/<provider>.<operation>``.
        idempotency_key: 1–255 characters, unique per provider; sent to the provider.
        correlation_id: optional request id, kept for tracing.

    Returns:
        The message (new, or the existing one for a repeated key).

    Raises:
        UnknownProvider, UnknownOperation, InvalidPayload, InvalidIdempotencyKey:
            bad input; nothing was written.
        IdempotencyConflict: the key is used with a different payload.
    """
    _validate(provider, operation, payload, idempotency_key, correlation_id)
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(f"{operation}\n{canonical}".encode()).hexdigest()
    now = utcnow()
    message_id = new_id()
    values = dict(
        id=message_id, provider=provider, operation=operation, idempotency_key=idempotency_key,
        payload=payload, payload_sha256=digest, correlation_id=correlation_id,
        status=MessageStatus.PENDING.value, attempts=0, rate_limited_count=0, lease_token=0,
        next_attempt_at=now, created_at=now, updated_at=now, budget_started_at=now,
    )
    if session.autoflush:   # as an ORM insert would: the caller's pending objects go first
        session.flush()
    inserted = session.execute(_insert_statement(session), values).rowcount == 1
    if inserted:
        dispatch_after_commit(session, MessageRef(message_id, provider, operation))
        return _attach(session, values)

    existing = session.scalars(
        select(Message).where(Message.provider == provider,
                              Message.idempotency_key == idempotency_key)
    ).one()
    if existing.payload_sha256 != digest:
        raise IdempotencyConflict(provider, idempotency_key, existing.id)
    return existing


def _insert_statement(session: Session) -> Insert:
    """The dialect's ``INSERT … ON CONFLICT DO NOTHING`` on the table, with bound parameters.

    A Core statement built once and compiled once (SQLAlchemy caches the compiled form):
    rebuilding an ORM insert with literal values on every call cost ~6× as much.
    """
    name = session.get_bind().dialect.name
    statement = _INSERTS.get(name)
    if statement is None:
        configure_mappers()   # _attach builds rows as a load does, on a configured mapper
        dialect = postgresql if name == "postgresql" else sqlite
        statement = _INSERTS[name] = (
            dialect.insert(Message.__table__)
            .on_conflict_do_nothing(index_elements=["provider", "idempotency_key"]))
    return statement


def _attach(session: Session, values: dict[str, Any]) -> Message:
    """The just-inserted row as a persistent object of ``session``, without reading it back.

    Built the way the ORM builds a loaded row (state filled in, no constructor events),
    then attached as already persistent: nothing is pending, so the flush writes nothing.
    The payload is a JSON round trip, as a load gives, not the caller's own dict.
    """
    message = _new_message()
    message.__dict__.update(values, **_UNSET, payload=json.loads(json.dumps(values["payload"])))
    make_transient_to_detached(message)
    session.add(message)
    return message


def _validate(provider: str, operation: str, payload: Any, idempotency_key: Any,
              correlation_id: Any) -> None:
    known = schemas.operations()
    if provider not in known:
        raise UnknownProvider(f"unknown provider {provider!r}; known: {', '.join(sorted(known))}")
    if operation not in known[provider]:
        raise UnknownOperation(f"unknown operation {provider}.{operation}; known: "
                               f"{', '.join(sorted(known[provider]))}")
    if not isinstance(idempotency_key, str) or not idempotency_key.strip():
        raise InvalidIdempotencyKey("idempotency_key must be a non-empty string")
    if len(idempotency_key) > MAX_KEY_LENGTH:
        raise InvalidIdempotencyKey(f"idempotency_key is {len(idempotency_key)} characters; "
                                    f"at most {MAX_KEY_LENGTH} are allowed")
    if not (idempotency_key.isascii() and idempotency_key.isprintable()):
        # It travels in an HTTP header (Idempotency-Key), which carries printable ASCII only.
        raise InvalidIdempotencyKey("idempotency_key must be printable ASCII (it is sent to the "
                                    "provider in an HTTP header); no control characters")
    if correlation_id is not None and (not isinstance(correlation_id, str)
                                       or len(correlation_id) > 255):
        raise InvalidMessage("correlation_id must be a string of at most 255 characters")
    try:
        schemas.validate_operation(provider, operation, payload)
    except schemas.SchemaError as exc:
        raise InvalidPayload(f"invalid payload for {provider}.{operation}: {exc.path}: "
                             f"{exc.reason}", exc.path) from None
