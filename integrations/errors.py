"""One exception tree for everything that can go wrong talking to a provider.

Split by what the caller must do, not by where it happened. Each class carries what it
means (class attributes, so the most specific class wins and every subclass has an
answer): ``error_class`` (the stored label), ``handling`` (what a delivery does with it),
``maybe_acted`` (the provider may have acted on the request) and ``outage_evidence``
(the circuit breaker counts it as a failure)::

    IntegrationError                  error_class       handling      maybe   outage
    │   (unknown failure: treated as ambiguous)                       acted   evidence
    ├── Retryable                     ambiguous         backoff       yes     yes
    │   ├── Transient                 transient         backoff       no      yes
    │   │     connect error, DNS, TLS handshake, 502/503/504/408, 409 key in use
    │   ├── RateLimited(retry_after_s) rate_limited     rate_limited  no      no
    │   └── Ambiguous                 ambiguous         backoff       yes     yes
    │         read timeout / reset after sending, 500
    ├── Deferred(retry_after_s)       deferred          defer         no      no
    │   │     breaker open, throttled, quota: no provider call was made
    │   └── CredentialUnavailable     deferred          defer         no      no
    │         the API key cannot be read right now (file missing, unreadable, empty)
    └── Permanent                                       dead
        ├── ClientError               client_error      dead          no      no
        │     400/402/403/404/410/422, key reused with other parameters
        ├── AuthError                 auth              dead          no      no
        │     401 after one credential refresh
        └── InvalidResponse           invalid_response  dead          yes     no
              2xx whose body we cannot read: the effect may have happened

What the outbox then does (the provider's idempotency, the retry budget, a failed breaker
probe) is decided in one place: ``outbox.decisions``.

``str(exc)`` is safe to store: the status, the provider's error code and a short
sanitised message (personal data masked), never a payload, a header value or a
credential. ``exc.label()`` is shorter still — status and code only (``402
card_declined``) — for logs and Flower. Library errors are translated at the boundary
with ``raise ... from exc``.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorClass(StrEnum):
    """The classes of the error table (README, "Error classification"). Attempt rows also
    hold two the outbox adds: ``internal`` (an exception that is not an IntegrationError) and
    ``exhausted`` (the budget was spent before a call), from ``outbox.decisions``."""

    TRANSIENT = "transient"
    RATE_LIMITED = "rate_limited"
    AMBIGUOUS = "ambiguous"
    DEFERRED = "deferred"
    CLIENT_ERROR = "client_error"
    AUTH = "auth"
    INVALID_RESPONSE = "invalid_response"


class Handling(StrEnum):
    """What a delivery does with a failure, before the outbox's own rules apply."""

    BACKOFF = "backoff"             # retry after a backoff; consumes an attempt
    RATE_LIMITED = "rate_limited"   # retry after Retry-After; free up to the policy's cap
    DEFER = "defer"                 # no call was made: reschedule, no attempt consumed
    DEAD = "dead"                   # retrying cannot help: dead-letter now


class IntegrationError(Exception):
    """Base of every provider failure. Raised bare, it means "unknown": treated as ambiguous.

    Attributes:
        error_class, handling, maybe_acted, outage_evidence: what the class means (above).
        status_code: HTTP status, or None when no response was received.
        code: the provider's machine-readable error code (``card_declined``), if any.
        retry_after_s: seconds the provider asked us to wait, if it said.
        detail: short sanitised human text.
        probe: set by the provider when the failed call was a half-open breaker probe.
        key_spent: set by an adapter when the provider stored this answer under the
            idempotency key (Stripe stores a 500 too): a retry with the same key would
            only replay it, so the outbox verifies, then sends under the next key.
    """

    error_class: ErrorClass = ErrorClass.AMBIGUOUS
    handling: Handling = Handling.BACKOFF
    maybe_acted: bool = True
    outage_evidence: bool = True
    probe: bool = False
    key_spent: bool = False

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

    def label(self) -> str:
        """Status and code only, no provider text: ``"402 card_declined"``, ``"503"``,
        ``"connect_error"`` (the error class when there is neither). Safe for logs and Flower."""
        return (" ".join(str(p) for p in (self.status_code, self.code) if p)
                or self.error_class.value)


class Retryable(IntegrationError):
    """The provider may succeed later; retry with the same idempotency key."""


class Transient(Retryable):
    """The provider did not act (never sent, or it said "not now"); retry later."""

    error_class = ErrorClass.TRANSIENT
    maybe_acted = False


class RateLimited(Retryable):
    """429: the provider did not act and asked us to slow down."""

    error_class = ErrorClass.RATE_LIMITED
    handling = Handling.RATE_LIMITED
    maybe_acted = False
    outage_evidence = False


class Ambiguous(Retryable):
    """The request may or may not have taken effect at the provider."""

    error_class = ErrorClass.AMBIGUOUS


class Deferred(IntegrationError):
    """Not attempted: our own protection (breaker, limiter, quota) said wait."""

    error_class = ErrorClass.DEFERRED
    handling = Handling.DEFER
    maybe_acted = False
    outage_evidence = False


class CredentialUnavailable(Deferred):
    """The credential cannot be read right now (key file missing, unreadable, empty or not
    UTF-8). Nothing was sent; the message waits, and ``outbox status`` says why."""


class Permanent(IntegrationError):
    """Retrying cannot help; the message goes to the dead-letter queue."""

    error_class = ErrorClass.CLIENT_ERROR
    handling = Handling.DEAD
    maybe_acted = False
    outage_evidence = False


class ClientError(Permanent):
    error_class = ErrorClass.CLIENT_ERROR


class AuthError(Permanent):
    error_class = ErrorClass.AUTH


class InvalidResponse(Permanent):
    """A 2xx we cannot read: the provider acted, in a way we cannot confirm."""

    error_class = ErrorClass.INVALID_RESPONSE
    maybe_acted = True


class ConfigurationError(ValueError):
    """A bad setting (environment variable), named in the message; the one class both
    ``integrations`` and ``outbox`` raise. Workers, the relay and the CLI check settings at
    start-up; a setting read later (``OUTBOX_MAX_PAYLOAD_BYTES`` at enqueue) raises it then."""
