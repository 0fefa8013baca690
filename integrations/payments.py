"""The ``payments`` provider: a Stripe-shaped API (form-encoded, Idempotency-Key, pinned version).

    charge  → POST /v1/payment_intents   (created and confirmed in one call)
    refund  → POST /v1/refunds
    verify  → GET /v1/payment_intents/search?query=metadata['outbox_key']:'<key>'
              GET /v1/refunds?payment_intent=<pi>&limit=100   (refunds: no search API)

Every request carries the key twice: ``Idempotency-Key`` and ``metadata[outbox_key]``, so
that it can be looked up. Stripe stores the result of the first request under a key
"regardless of whether it succeeds or fails, including 500 errors": a retry with the same
key replays a 500 until the key expires. So a 500 (or ``Stripe-Should-Retry: false``) is
an ambiguous failure whose key is **spent**: the outbox waits out the search's
eventual consistency (``verify_after_s``, 60 s; ``OUTBOX_PAYMENTS_VERIFY_AFTER``), looks the
key up, and sends under the next key only if nothing was charged
(``outbox.decisions``, rule 1). ``Stripe-Should-Retry: true`` makes any failure a
transient one (retry, same key).

Error bodies look like ``{"error": {"type", "code", "decline_code", "message", "param"}}``
and refine the status-based classification (``integrations.classify``):

    409 code=idempotency_key_in_use             Transient  (the first request is still running)
    400/409 type=idempotency_error              ClientError (key reused with other parameters)
    500, or Stripe-Should-Retry: false on a 5xx Ambiguous, key spent (verify, next key)
    Stripe-Should-Retry: true                   Transient  (same key)
    402 code=card_declined, 4xx                 ClientError with the provider code
    2xx charge whose intent ended in requires_payment_method / requires_action /
        requires_confirmation / canceled, or a refund that failed / was canceled
                                                ClientError (nothing was charged/refunded:
                                                a customer or an operator must act)
    2xx charge in processing, refund pending    delivered, said so: the money moves later,
                                                and its outcome comes by webhook (issue 9)
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator, Mapping
from typing import Any

import schemas
from integrations.base import (
    DONE,
    NOT_DONE,
    UNKNOWN,
    Adapter,
    Delivery,
    Request,
    Response,
    Verification,
)
from integrations.classify import classify, make_error
from integrations.errors import (
    Ambiguous,
    ClientError,
    IntegrationError,
    InvalidResponse,
    Transient,
)
from integrations.sanitize import sanitize

STRIPE_VERSION = "2024-06-20"
KEY_FIELD = "outbox_key"   # metadata[outbox_key]: the key, searchable

_PATHS = {"charge": "/v1/payment_intents", "refund": "/v1/refunds"}
_RESPONSE_SCHEMAS = {"charge": "payment_intent", "refund": "refund"}
_CHARGE_FIELDS = ("amount", "currency", "customer", "description", "payment_method", "metadata")
_REFUND_FIELDS = ("payment_intent", "amount", "reason", "metadata")
# A 2xx whose object is in one of these states did not move money: the customer or an
# operator must act, so retrying the same key would only replay the same answer.
_FAILED_STATES = {
    "charge": frozenset({"requires_payment_method", "requires_action",
                         "requires_confirmation", "canceled"}),
    "refund": frozenset({"failed", "canceled"}),
}
# Accepted, but the money moves later (bank debits; refunds): delivered, and said so.
_SETTLING_STATES = {"charge": frozenset({"processing"}), "refund": frozenset({"pending"})}


class PaymentsAdapter(Adapter):
    """Builds Stripe-shaped requests and parses their responses; no I/O."""

    name = "payments"
    operations = frozenset({"charge", "refund"})
    supports_idempotency = True
    auth = "bearer"
    verify_after_s = 60.0   # Stripe's search "can lag behind by up to a minute"

    def verify_request(self, operation: str, payload: Mapping[str, Any],
                       idempotency_key: str) -> Request:
        """Find the object this key created: charges by the search API on the key in their
        metadata, refunds in the payment intent's refund list."""
        headers = {"Stripe-Version": STRIPE_VERSION}
        if operation == "charge":
            quoted = idempotency_key.replace("\\", "\\\\").replace("'", "\\'")
            query = urllib.parse.quote(f"metadata['{KEY_FIELD}']:'{quoted}'", safe="")
            return Request("GET", f"{_PATHS['charge']}/search?query={query}&limit=10",
                           headers=headers)
        intent = urllib.parse.quote(str(payload["payment_intent"]), safe="")
        return Request("GET", f"{_PATHS['refund']}?payment_intent={intent}&limit=100",
                       headers=headers)

    def verification(self, operation: str, response: Response, idempotency_key: str,
                     payload: Mapping[str, Any]) -> Verification:
        """Found and not failed: ``done``; none (or only failed ones: sending again gets the
        provider's real answer): ``not_done``; an unreadable list: ``unknown``."""
        if not 200 <= response.status_code < 300:
            raise self.error_for(response)
        data = response.body.get("data") if isinstance(response.body, dict) else None
        if not isinstance(data, list):
            return Verification(UNKNOWN, summary="unreadable list answer")
        mine = [o for o in data if isinstance(o, dict) and isinstance(o.get("metadata"), dict)
                and o["metadata"].get(KEY_FIELD) == idempotency_key]
        done = [o for o in mine if o.get("status") not in _FAILED_STATES[operation]]
        if not done:
            return Verification(NOT_DONE, summary=f"{len(mine)} failed, none done"
                                if mine else "nothing under this key")
        ref, state = sanitize(str(done[0].get("id")), 80), sanitize(str(done[0].get("status")), 64)
        return Verification(DONE, ref, f"found {ref} {state}")

    def check_request(self) -> Request:
        """``GET /v1/balance``: read-only, and refused with 401 for a bad or revoked key."""
        return Request("GET", "/v1/balance", headers={"Stripe-Version": STRIPE_VERSION})

    def build_request(self, operation: str, payload: Mapping[str, Any],
                      idempotency_key: str) -> Request:
        """Return the form-encoded POST for ``operation``.

        Args:
            operation: ``charge`` or ``refund``.
            payload: the operation payload (already valid against its schema).
            idempotency_key: sent as ``Idempotency-Key``.

        Raises:
            ValueError: unknown operation or empty idempotency key.
        """
        if operation not in self.operations:
            raise ValueError(f"unknown payments operation {operation!r}")
        if not idempotency_key:
            raise ValueError("payments requests need an idempotency key")
        fields = _CHARGE_FIELDS if operation == "charge" else _REFUND_FIELDS
        form = dict(form_encode({k: payload[k] for k in fields if payload.get(k) is not None}))
        if operation == "charge":
            # Confirm at once; background charges cannot follow a redirect-based method.
            form["confirm"] = "true"
            form["automatic_payment_methods[enabled]"] = "true"
            form["automatic_payment_methods[allow_redirects]"] = "never"
        form[f"metadata[{KEY_FIELD}]"] = idempotency_key   # so that it can be looked up
        headers = {"Idempotency-Key": idempotency_key, "Stripe-Version": STRIPE_VERSION}
        return Request("POST", _PATHS[operation], headers=headers, form=form)

    def parse_response(self, operation: str, response: Response) -> Delivery:
        """Return the Delivery for a 2xx, else raise the classified error.

        Raises:
            InvalidResponse: a 2xx body that fails its schema.
            ClientError, Transient, RateLimited, Ambiguous, AuthError: per the module table.
        """
        if 200 <= response.status_code < 300:
            return self._success(operation, response)
        raise self.error_for(response)

    def _success(self, operation: str, response: Response) -> Delivery:
        body = response.body
        try:
            schemas.validate_response(self.name, _RESPONSE_SCHEMAS[operation], body)
        except schemas.SchemaError as exc:
            raise InvalidResponse(f"response body {exc.path}: {exc.reason}",
                                  status_code=response.status_code,
                                  code="schema_mismatch") from exc
        ref, state = sanitize(body["id"], 80), sanitize(body["status"], 64)
        if state in _FAILED_STATES[operation]:
            raise ClientError(f"{ref} is {state}", status_code=response.status_code,
                              code=f"{body['object']}_{state}")
        if state in _SETTLING_STATES[operation]:
            return Delivery(status_code=response.status_code, provider_ref=ref,
                            summary=f"{response.status_code} {ref} {state}: accepted, "
                                    "settles later (its webhook says how)")
        return Delivery(status_code=response.status_code, provider_ref=ref,
                        summary=f"{response.status_code} {ref} {state}")

    def error_for(self, response: Response) -> IntegrationError:
        """Classify a non-2xx response, refined by its Stripe error body when there is one."""
        error = _error_object(response.body)
        kind, code = error.get("type"), error.get("code")
        detail = error.get("message") or None
        if error.get("decline_code") and error.get("decline_code") != code:
            detail = f"{detail or 'declined'} (decline_code: {error['decline_code']})"
        code = code or error.get("decline_code") or kind
        should_retry = str(response.headers.get("Stripe-Should-Retry", "")).lower()
        if code == "idempotency_key_in_use" or should_retry == "true":
            return make_error(Transient, response, code=code, detail=detail)
        if response.status_code == 500 or (response.status_code >= 500
                                           and should_retry == "false"):
            found = make_error(Ambiguous, response, code=code, detail=detail)
            found.key_spent = True   # stored under the key: the same key replays it
            return found
        if kind == "idempotency_error" and response.status_code in (400, 409):
            return make_error(ClientError, response, code=code, detail=detail)
        found = classify(response, code=code, detail=detail)
        assert found is not None  # only called for non-2xx
        return found


def _error_object(body: Any) -> dict[str, Any]:
    """The ``error`` object of a Stripe error body, or {} when the body is not one."""
    try:
        schemas.validate_response("payments", "error", body)
    except schemas.SchemaError:
        return {}
    return {k: v for k, v in body["error"].items() if isinstance(v, str)}


def form_encode(value: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """Flatten ``value`` the way Stripe reads forms: ``metadata[k]=v``, ``items[0][price]=p``.

    Booleans become ``true``/``false``; None values are skipped.
    """
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from form_encode(item, f"{prefix}[{key}]" if prefix else str(key))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from form_encode(item, f"{prefix}[{index}]")
    elif value is None:
        return
    elif isinstance(value, bool):
        yield prefix, "true" if value else "false"
    else:
        yield prefix, str(value)
