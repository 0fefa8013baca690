"""Messages as operators see them (``outbox show``, ``outbox dead list``, the admin app and
its API): ids, labels, states, errors and the attempt timeline; never the payload."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from .clock import iso
from .errors import MessageNotFound
from .models import Attempt, AuditEntry, Message


def as_dict(m: Message) -> dict[str, Any]:
    """One message, without its payload."""
    return {
        "id": m.id, "provider": m.provider, "operation": m.operation, "status": m.status,
        "idempotency_key": m.idempotency_key, "correlation_id": m.correlation_id,
        "attempts": m.attempts, "rate_limited": m.rate_limited_count,
        "next_attempt_at": iso(m.next_attempt_at), "created_at": iso(m.created_at),
        "delivered_at": iso(m.delivered_at), "dead_at": iso(m.dead_at),
        "last_error_class": m.last_error_class, "last_status_code": m.last_status_code,
        "last_error": m.last_error, "provider_ref": m.provider_ref,
        "needs_review": m.needs_review, "verify_first": m.verify_first,
    }


def detail(session: Session, message_id: str) -> dict[str, Any]:
    """``as_dict`` with the attempt timeline and the audit trail.

    Raises:
        MessageNotFound: no such message.
    """
    message = session.get(Message, message_id)
    if message is None:
        raise MessageNotFound(f"no message {message_id[:40]!r}")
    attempts = session.scalars(select(Attempt).where(Attempt.message_id == message_id)
                               .order_by(Attempt.id)).all()
    audit = session.scalars(select(AuditEntry).where(AuditEntry.message_id == message_id)
                            .order_by(AuditEntry.id)).all()
    return as_dict(message) | {
        "label": message.label,
        "attempts_timeline": [{
            "started_at": iso(a.started_at), "duration_ms": round(a.duration_ms, 1),
            "outcome": a.outcome, "status_code": a.status_code, "error_class": a.error_class,
            "error": a.error, "next_attempt_at": iso(a.next_attempt_at), "worker": a.worker,
            "lease_token": a.lease_token} for a in attempts],
        "audit": [{"at": iso(e.at), "actor": e.actor, "action": e.action, "reason": e.reason}
                  for e in audit],
    }
