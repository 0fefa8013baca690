"""One exception tree for everything that can go wrong talking to a provider.

Split by what the caller must do, not by where it happened::

    IntegrationError                      error_class      what the delivery task does
    ├── Retryable                                          retry with backoff, same idempotency key
    │   ├── Transient                     transient        connect error, 502/503/504/408, 409 key in use
    │   ├── RateLimited(retry_after_s)    rate_limited     wait Retry-After, else backoff
    │   └── Ambiguous                     ambiguous        read timeout / reset after sending, 500
    ├── Deferred(retry_after_s)           deferred         breaker open, throttled, quota: reschedule,
    │                                                      no attempt consumed, no provider call made
    └── Permanent                                          dead-letter at once
        ├── ClientError                   client_error     400/402/403/404/410/422, key reused
        ├── AuthError                     auth             401 after one credential refresh
        └── InvalidResponse               invalid_response 2xx whose body fails its schema: needs review

``str(exc)`` is always safe to log and to show in Flower: it carries the status,
the provider's error code and a short sanitised message, never a payload, a
header value or a credential. Library errors are translated at the boundary
with ``raise ... from exc``.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorClass(StrEnum):
    """The classes of the DESIGN error table, as stored in attempt rows."""

    TRANSIENT = "transient"
    RATE_LIMITED = "rate_limited"
    AMBIGUOUS = "ambiguous"
    DEFERRED = "deferred"
    CLIENT_ERROR = "client_error"
    AUTH = "auth"
    INVALID_RESPONSE = "invalid_response"


class IntegrationError(Exception):
    """Base of every provider failure.

    Attributes:
        error_class: one of ``ErrorClass``.
        status_code: HTTP status, or None when no response was received.
        code: the provider's machine-readable error code (``card_declined``), if any.
        retry_after_s: seconds the provider asked us to wait, if it said.
        detail: short sanitised human text.
    """

    error_class: ErrorClass

    def __init__(self, detail: str = "", *, status_code: int | None = None,
                 code: str | None = None, retry_after_s: float | None = None):
        self.detail = detail
        self.status_code = status_code
        self.code = code
        self.retry_after_s = retry_after_s
        super().__init__(self.summary())

    def summary(self) -> str:
        """``"402 card_declined: Your card was declined."`` style one-liner."""
        head = " ".join(str(p) for p in (self.status_code, self.code) if p)
        if head and self.detail:
            return f"{head}: {self.detail}"
        return head or self.detail or self.error_class.value


class Retryable(IntegrationError):
    """The provider may succeed later; retry with the same idempotency key."""


class Transient(Retryable):
    error_class = ErrorClass.TRANSIENT


class RateLimited(Retryable):
    error_class = ErrorClass.RATE_LIMITED


class Ambiguous(Retryable):
    """The request may or may not have taken effect at the provider."""

    error_class = ErrorClass.AMBIGUOUS


class Deferred(IntegrationError):
    """Not attempted: our own protection (breaker, limiter, quota) said wait."""

    error_class = ErrorClass.DEFERRED


class Permanent(IntegrationError):
    """Retrying cannot help; the message goes to the dead-letter queue."""


class ClientError(Permanent):
    error_class = ErrorClass.CLIENT_ERROR


class AuthError(Permanent):
    error_class = ErrorClass.AUTH


class InvalidResponse(Permanent):
    error_class = ErrorClass.INVALID_RESPONSE


class ConfigurationError(ValueError):
    """Bad provider settings (URL, timeout, credentials source). Raised at start-up."""
