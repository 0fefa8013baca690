"""Errors raised by the outbox core.

    OutboxError
    ├── InvalidMessage            bad input to ``enqueue``: nothing was written
    │   ├── UnknownProvider
    │   ├── UnknownOperation
    │   ├── InvalidPayload        names the JSON path (``$.amount``), never the value
    │   └── InvalidIdempotencyKey
    ├── IdempotencyConflict       same (provider, key), different payload
    ├── MessageNotFound
    └── DatabaseNotReady          unreachable, missing or not migrated: one line says which

    ConfigurationError            a bad environment value, named; the one class both
                                  packages raise (defined in ``integrations.errors``, which
                                  the outbox may import and not the other way round)
"""

from __future__ import annotations

from integrations.errors import ConfigurationError

__all__ = ["OutboxError", "InvalidMessage", "UnknownProvider", "UnknownOperation",
           "InvalidPayload", "InvalidIdempotencyKey", "IdempotencyConflict", "MessageNotFound",
           "DatabaseNotReady", "ConfigurationError"]


class OutboxError(Exception):
    """Base of every error the outbox core raises."""


class InvalidMessage(OutboxError, ValueError):
    """``enqueue`` refused its input; nothing was added to the session."""


class UnknownProvider(InvalidMessage):
    pass


class UnknownOperation(InvalidMessage):
    pass


class InvalidPayload(InvalidMessage):
    """The payload is not plain, bounded JSON data (``outbox.payload``) or fails its JSON
    Schema. ``path`` is the JSON path of the failing value (never the value itself)."""

    def __init__(self, message: str, path: str):
        super().__init__(message)
        self.path = path


class InvalidIdempotencyKey(InvalidMessage):
    pass


class IdempotencyConflict(OutboxError):
    """The idempotency key is already used for this provider with a different payload."""

    def __init__(self, provider: str, idempotency_key: str, existing_id: str):
        super().__init__(
            f"idempotency key {idempotency_key!r} is already used for provider {provider!r} "
            f"with a different payload (message {existing_id})"
        )
        self.provider = provider
        self.idempotency_key = idempotency_key
        self.existing_id = existing_id


class MessageNotFound(OutboxError, LookupError):
    pass


class DatabaseNotReady(OutboxError):
    """The database cannot be used yet: it is unreachable, does not exist, or is not migrated
    to the latest revision (``outbox db upgrade``)."""
