"""integration-outbox core: the durable store and its rules.

Application code needs one function::

    from outbox import enqueue
    msg = enqueue(session, provider="payments", operation="charge",
                  payload={"amount": 1999, "currency": "usd"},
                  idempotency_key="order-42-charge")
    session.commit()   # dispatched now; rolled back → never sent

The core imports neither Celery nor a web framework: the relay and the
after-commit dispatch publish through ``outbox.dispatch.Publisher``.
"""

from .enqueue import enqueue
from .errors import (
    ConfigurationError,
    DatabaseNotReady,
    IdempotencyConflict,
    InvalidIdempotencyKey,
    InvalidMessage,
    InvalidPayload,
    MessageNotFound,
    OutboxError,
    UnknownOperation,
    UnknownProvider,
)
from .grants import install as _install_grant_store
from .models import Attempt, AuditEntry, Message, MessageStatus

# OAuth2 providers (``crm``) keep their grants in this database, encrypted.
_install_grant_store()

__all__ = [
    "enqueue", "Message", "Attempt", "AuditEntry", "MessageStatus",
    "OutboxError", "InvalidMessage", "UnknownProvider", "UnknownOperation", "InvalidPayload",
    "InvalidIdempotencyKey", "IdempotencyConflict", "MessageNotFound", "ConfigurationError",
    "DatabaseNotReady",
]
