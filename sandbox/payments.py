"""Stripe-shaped payments endpoints: form parsing, validation, payment intents and refunds."""

from __future__ import annotations

import re
import secrets
import string
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from sandbox.state import SandboxState

_ALNUM = string.ascii_letters + string.digits
_KEY_RE = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")
_CURRENCY_RE = re.compile(r"^[a-z]{3}$")

PI_PARAMS = {
    "amount", "currency", "customer", "description", "payment_method", "metadata", "confirm",
    "capture_method", "receipt_email", "statement_descriptor", "payment_method_types",
    "automatic_payment_methods", "off_session", "expand",
}
REFUND_PARAMS = {"payment_intent", "amount", "reason", "metadata", "expand"}
REFUND_REASONS = {"duplicate", "fraudulent", "requested_by_customer"}

# Stripe's minimum charge amounts (in the currency's smallest unit) for the currencies the
# sandbox is asked for; others: 50.
MINIMUM_AMOUNTS = {"usd": 50, "eur": 50, "gbp": 30, "cad": 50, "aud": 50, "chf": 50,
                   "jpy": 50, "sek": 300, "dkk": 250, "nok": 300, "mxn": 1000}
# Test payment methods whose confirmation ends in a state other than succeeded, on a 200.
PM_STATES = {"pm_card_authenticationRequired": "requires_action",
             "pm_card_threeDSecureRequired": "requires_action",
             "pm_card_processing": "processing"}

# Built-in declines, keyed by (param, value): (code, decline_code, message). The customer
# declines apply while the customer is in ``state.declined_customers`` (switchable at run time).
DECLINES = {
    ("customer", "cus_declined"): ("card_declined", "generic_decline", "Your card was declined."),
    ("customer", "cus_insufficient"): (
        "card_declined", "insufficient_funds", "Your card has insufficient funds."),
    ("payment_method", "pm_card_expired"): (
        "expired_card", "expired_card", "Your card has expired."),
}


@dataclass
class Result:
    """An endpoint's answer. ``store`` says whether an idempotency key may keep it; ``headers``
    are sent with it."""

    status: int
    body: dict | None          # None: an empty response body (SendGrid's 202)
    effect: bool = False
    store: bool = True
    headers: dict[str, str] | None = None


class FormError(ValueError):
    """The body is not a well-formed Stripe form encoding."""


def new_id(prefix: str) -> str:
    """A Stripe-like object id: prefix, underscore, 24 random alphanumerics."""
    return prefix + "_" + "".join(secrets.choice(_ALNUM) for _ in range(24))


def error(status: int, etype: str, message: str, **extra: Any) -> Result:
    """A Stripe-shaped error result; validation errors are not stored for the key."""
    return Result(status, {"error": {"type": etype, "message": message, **extra}}, store=False)


def invalid(param: str, code: str, message: str) -> Result:
    """A 400 invalid_request_error for ``param``."""
    return error(400, "invalid_request_error", message, code=code, param=param)


def parse_form(body: bytes) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """Decode a form body into (sorted pairs for fingerprints, nested params).

    ``metadata[order]=42`` becomes ``{"metadata": {"order": "42"}}`` and ``a[]=x`` a list.
    """
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError as exc:
        raise FormError("request body is not valid UTF-8") from exc
    params: dict[str, Any] = {}
    for raw_key, value in pairs:
        m = _KEY_RE.match(raw_key)
        if not m:
            raise FormError(f"invalid parameter name: {raw_key!r}")
        parts = [m.group(1)] + re.findall(r"\[([^\[\]]*)\]", m.group(2))
        node: Any = params
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if part == "":
                if not isinstance(node, list):
                    raise FormError(f"invalid array parameter: {raw_key!r}")
                node.append(value if last else {})
                node = node[-1]
                continue
            if not isinstance(node, dict):
                raise FormError(f"conflicting parameter: {raw_key!r}")
            if last:
                node[part] = value
            else:
                child_is_list = parts[i + 1] == ""
                node = node.setdefault(part, [] if child_is_list else {})
    return sorted(pairs), params


def _parse_amount(params: dict, required: bool) -> int | Result | None:
    raw = params.get("amount")
    if raw is None:
        if required:
            return invalid("amount", "parameter_missing", "Missing required param: amount.")
        return None
    if not isinstance(raw, str) or not re.fullmatch(r"-?\d+", raw):
        return invalid("amount", "parameter_invalid_integer", "Invalid integer: " + str(raw)[:40])
    amount = int(raw)
    if amount <= 0:
        return invalid("amount", "amount_too_small", "Amount must be greater than zero.")
    return amount


def _check_common(params: dict, allowed: set[str]) -> Result | None:
    for name in params:
        if name not in allowed:
            return invalid(name, "parameter_unknown", f"Received unknown parameter: {name}")
    meta = params.get("metadata")
    if meta is not None and meta != "" and not (
        isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())
    ):
        return invalid("metadata", "parameter_invalid", "Invalid metadata: must be a hash of strings.")
    return None


def create_payment_intent(state: SandboxState, params: dict, key: str) -> Result:
    """``POST /v1/payment_intents``: validate, decline on the magic inputs, else create."""
    bad = _check_common(params, PI_PARAMS)
    if bad:
        return bad
    amount = _parse_amount(params, required=True)
    if isinstance(amount, Result):
        return amount
    currency = params.get("currency")
    if currency is None:
        return invalid("currency", "parameter_missing", "Missing required param: currency.")
    if not isinstance(currency, str) or not _CURRENCY_RE.match(currency):
        return invalid("currency", "parameter_invalid", f"Invalid currency: {str(currency)[:20]}.")
    for name in ("customer", "description", "payment_method"):
        if name in params and not isinstance(params[name], str):
            return invalid(name, "parameter_invalid", f"Invalid {name}: must be a string.")
    minimum = MINIMUM_AMOUNTS.get(currency, 50)
    if amount < minimum:
        return invalid("amount", "amount_too_small",
                       f"Amount must be at least {minimum} {currency} (smallest unit).")
    for (param, value), (code, decline_code, message) in DECLINES.items():
        if params.get(param) != value:
            continue
        if param == "customer" and value not in state.declined_customers:
            continue
        # Stripe keeps a decline under its key for 24 h (``store_declines``); by default the
        # sandbox does not, so re-driving after the card data is fixed (above) goes through.
        failed = {"id": new_id("pi"), "object": "payment_intent", "amount": amount,
                  "currency": currency, "status": "requires_payment_method",
                  "customer": params.get("customer"), "metadata": params.get("metadata") or {},
                  "last_payment_error": {"code": code, "decline_code": decline_code},
                  "created": int(time.time()), "livemode": False}
        with state.lock:
            state.payment_intents[failed["id"]] = {**failed, "amount_refunded": 0}
            state.searchable_at[failed["id"]] = time.time() + state.search_lag_s
        state.webhooks.emit("payments", "payment_intent.payment_failed", failed)
        return Result(402, {"error": {
            "type": "card_error", "code": code, "decline_code": decline_code,
            "message": message, "param": "" if param == "customer" else param,
            "payment_intent": {"id": failed["id"], "status": failed["status"]},
        }}, store=state.store_declines)
    # Where confirmation leaves the intent: not confirmed → waiting for a payment method or
    # a confirmation; confirmed with a test method that needs the customer (3-D Secure) or
    # settles later (bank debits) → requires_action / processing; else succeeded.
    confirmed = params.get("confirm") in ("true", True)
    method = params.get("payment_method")
    if not confirmed:
        status = "requires_confirmation" if method else "requires_payment_method"
    else:
        status = PM_STATES.get(method, "succeeded")
    pi = {
        "id": new_id("pi"),
        "object": "payment_intent",
        "amount": amount,
        "amount_received": amount if status == "succeeded" else 0,
        "currency": currency,
        "status": status,
        "customer": params.get("customer"),
        "description": params.get("description"),
        "payment_method": params.get("payment_method"),
        "metadata": params.get("metadata") or {},
        "created": int(time.time()),
        "livemode": False,
    }
    with state.lock:
        state.payment_intents[pi["id"]] = {**pi, "amount_refunded": 0}
        state.searchable_at[pi["id"]] = time.time() + state.search_lag_s
        if status in ("succeeded", "processing"):   # money moves (processing: later)
            state.record_effect(key)
    if status == "succeeded":
        state.webhooks.emit("payments", "payment_intent.succeeded", pi)
    if status == "requires_action":
        pi["next_action"] = {"type": "use_stripe_sdk"}
    return Result(200, pi, effect=status in ("succeeded", "processing"))


def create_refund(state: SandboxState, params: dict, key: str) -> Result:
    """``POST /v1/refunds``: refund all or part of an existing payment intent."""
    bad = _check_common(params, REFUND_PARAMS)
    if bad:
        return bad
    pi_id = params.get("payment_intent")
    if pi_id is None:
        return invalid("payment_intent", "parameter_missing",
                       "Missing required param: payment_intent.")
    amount = _parse_amount(params, required=False)
    if isinstance(amount, Result):
        return amount
    reason = params.get("reason")
    if reason is not None and reason not in REFUND_REASONS:
        return invalid("reason", "parameter_invalid",
                       f"Invalid reason: must be one of {', '.join(sorted(REFUND_REASONS))}.")
    with state.lock:
        pi = state.payment_intents.get(pi_id) if isinstance(pi_id, str) else None
        if pi is None:
            res = error(404, "invalid_request_error", f"No such payment_intent: '{pi_id}'",
                        code="resource_missing", param="payment_intent")
            res.store = True
            return res
        remaining = pi["amount"] - pi["amount_refunded"]
        if remaining <= 0:
            return Result(400, {"error": {
                "type": "invalid_request_error", "code": "charge_already_refunded",
                "message": f"Charge for payment_intent {pi_id} has already been refunded."}})
        amount = remaining if amount is None else amount
        if amount > remaining:
            return Result(400, {"error": {
                "type": "invalid_request_error", "code": "amount_too_large", "param": "amount",
                "message": f"Refund amount ({amount}) is greater than unrefunded amount "
                           f"on charge ({remaining})."}})
        refund = {
            "id": new_id("re"),
            "object": "refund",
            "amount": amount,
            "payment_intent": pi_id,
            "status": "succeeded",
            "currency": pi["currency"],
            "reason": reason,
            "metadata": params.get("metadata") or {},
            "created": int(time.time()),
        }
        pi["amount_refunded"] += amount
        state.refunds[refund["id"]] = refund
        state.record_effect(key)
        charge = {"id": "ch_" + pi_id[3:], "object": "charge", "payment_intent": pi_id,
                  "amount": pi["amount"], "amount_refunded": pi["amount_refunded"],
                  "refunded": pi["amount_refunded"] >= pi["amount"],
                  "currency": pi["currency"], "metadata": pi.get("metadata") or {}}
    state.webhooks.emit("payments", "charge.refunded", charge)
    return Result(200, refund, effect=True)


def balance(state: SandboxState) -> Result:
    """``GET /v1/balance``: what the charges so far add up to (read-only, no effect)."""
    with state.lock:
        total = sum(pi.get("amount", 0) for pi in state.payment_intents.values()
                    if pi.get("status") == "succeeded")
    return Result(200, {"object": "balance", "livemode": False,
                        "available": [{"amount": total, "currency": "usd"}],
                        "pending": [{"amount": 0, "currency": "usd"}]})


_SEARCH = re.compile(r"""^metadata\['([^'\\]+)'\]:'((?:[^'\\]|\\.)*)'$""")


def search_payment_intents(state: SandboxState, query_string: str) -> Result:
    """``GET /v1/payment_intents/search?query=metadata['k']:'v'``: Stripe's search, for the
    one clause the outbox uses, with its eventual consistency: an intent shows only
    ``search_lag_s`` after it was created (Stripe: "up to a minute"; here 1 s unless set)."""
    params = dict(urllib.parse.parse_qsl(query_string))
    match = _SEARCH.match(params.get("query", ""))
    if match is None:
        return invalid("query", "parameter_invalid", "The sandbox searches one clause: "
                       "metadata['key']:'value'.")
    field, value = match.group(1), re.sub(r"\\(.)", r"\1", match.group(2))
    now = time.time()
    with state.lock:
        found = [dict(pi) for pid, pi in state.payment_intents.items()
                 if (pi.get("metadata") or {}).get(field) == value
                 and state.searchable_at.get(pid, 0.0) <= now]
    found.sort(key=lambda pi: -pi["created"])
    return Result(200, {"object": "search_result", "url": "/v1/payment_intents/search",
                        "has_more": False, "data": found[:_limit(params)]})


def list_refunds(state: SandboxState, query_string: str) -> Result:
    """``GET /v1/refunds?payment_intent=pi_…``: a payment intent's refunds, newest first."""
    params = dict(urllib.parse.parse_qsl(query_string))
    intent = params.get("payment_intent")
    with state.lock:
        found = [dict(r) for r in state.refunds.values()
                 if intent is None or r.get("payment_intent") == intent]
    found.sort(key=lambda r: -r["created"])
    return Result(200, {"object": "list", "url": "/v1/refunds", "has_more": False,
                        "data": found[:_limit(params)]})


def _limit(params: dict[str, str]) -> int:
    try:
        return min(max(int(params.get("limit", "10")), 1), 100)
    except ValueError:
        return 10


def retrieve(state: SandboxState, kind: str, obj_id: str) -> Result:
    """``GET /v1/payment_intents/ID`` or ``/v1/refunds/ID`` (lets a client verify state)."""
    with state.lock:
        table = state.payment_intents if kind == "payment_intents" else state.refunds
        obj = table.get(obj_id)
        if obj is None:
            name = "payment_intent" if kind == "payment_intents" else "refund"
            return error(404, "invalid_request_error", f"No such {name}: '{obj_id}'",
                         code="resource_missing", param="id")
        return Result(200, dict(obj))
