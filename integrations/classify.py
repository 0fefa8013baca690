"""Generic classification of an HTTP response by status, following the error table (README, "Error classification").

    2xx                          None (success)
    408, 502, 503, 504           Transient
    429                          RateLimited(retry_after_s from Retry-After)
    500                          Ambiguous
    401                          AuthError
    501, 505                     ClientError   (the provider will never support this call)
    other 5xx (507, 520-524...)  Ambiguous     (a gateway may have passed the request on;
                                                retrying with the same key is safe, and a
                                                provider without idempotency must verify)
    3xx                          ClientError   (redirects are never followed: wrong base URL)
    other 4xx                    ClientError   (400, 402, 403, 404, 409, 410, 422, ...)
    anything else (1xx, >= 600)  Ambiguous

Adapters refine this from the error body (``code``, ``detail``) and by code-specific
overrides, e.g. Stripe's 409 ``idempotency_key_in_use`` is Transient.
"""

from __future__ import annotations

from http import HTTPStatus

from integrations.base import Response
from integrations.errors import (
    Ambiguous,
    AuthError,
    ClientError,
    IntegrationError,
    RateLimited,
    Transient,
)
from integrations.retry_after import parse_retry_after
from integrations.sanitize import sanitize

TRANSIENT_STATUSES = frozenset({408, 502, 503, 504})
NOT_IMPLEMENTED_STATUSES = frozenset({501, 505})
DETAIL_MAX_LENGTH = 200


def exception_for_status(status: int) -> type[IntegrationError] | None:
    """The exception class the table above assigns to ``status`` (None for 2xx)."""
    if 200 <= status < 300:
        return None
    if status == 429:
        return RateLimited
    if status in TRANSIENT_STATUSES:
        return Transient
    if status == 401:
        return AuthError
    if status in NOT_IMPLEMENTED_STATUSES or 300 <= status < 500:
        return ClientError
    return Ambiguous


def classify(response: Response, *, code: str | None = None,
             detail: str | None = None) -> IntegrationError | None:
    """Return the error ``response`` stands for, or None for a 2xx.

    Args:
        response: the provider's response.
        code: the provider's error code, if the adapter found one in the body.
        detail: the provider's message; sanitised and shortened here. Defaults to the
            status phrase (``"Service Unavailable"``).

    Returns:
        An ``IntegrationError`` instance (not raised) carrying ``status_code``, ``code``,
        ``detail`` and, for 429, ``retry_after_s``.
    """
    cls = exception_for_status(response.status_code)
    if cls is None:
        return None
    return make_error(cls, response, code=code, detail=detail)


def make_error(cls: type[IntegrationError], response: Response, *, code: str | None = None,
               detail: str | None = None) -> IntegrationError:
    """Build ``cls`` for ``response`` with a sanitised detail and any ``Retry-After``."""
    if detail:
        text = sanitize(detail, DETAIL_MAX_LENGTH)
    elif 300 <= response.status_code < 400:
        text = "unexpected redirect (redirects are not followed; check the base URL)"
    else:
        text = status_phrase(response.status_code)
    retry_after = parse_retry_after(response.headers.get("Retry-After"))
    return cls(text, status_code=response.status_code,
               code=sanitize(code, 80) if code else None, retry_after_s=retry_after)


def status_phrase(status: int) -> str:
    """``"Service Unavailable"`` for 503; ``"HTTP 599"`` for unknown statuses."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"
