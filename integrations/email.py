"""The ``email`` provider: a SendGrid-shaped v3 Mail Send API (JSON, 202, no idempotency).

    send  → POST /v3/mail/send      202 Accepted, empty body, ``X-Message-Id`` header

SendGrid has no idempotency header, so ``supports_idempotency = False``: an ambiguous
failure (500, read timeout, connection lost after sending) cannot simply be retried. It is
**verified** instead (``verify_request``): after ``OUTBOX_EMAIL_VERIFY_AFTER`` (300 s: the
Email Activity feed lags behind sending), a search for the key answers whether the mail
went out — found: delivered, with its message id; not found: sent again; the search
unavailable to this key (no Email Activity add-on, 401/403): "needs review", as before.

    verify → GET /v3/messages?limit=1&query=unique_args['outbox_key']="<key>"

The outbox key travels with every request, twice:

* ``custom_args.outbox_key`` in the body — SendGrid stores custom args with the message
  and returns them in Event Webhook events and the Email Activity API (the search above);
* an ``X-Message-Key`` request header — SendGrid ignores unknown request headers; the
  sandbox uses it to count requests per key before it parses the body. Keys are valid
  header values by construction (``schemas/common/idempotency_key``, checked at enqueue
  and again before the request is built).

Sender: the payload's ``from``, else ``OUTBOX_EMAIL_FROM`` (``shop@example.com`` or
``Shop <shop@example.com>``, read when the adapter is built; a malformed value is a
``ConfigurationError``). With neither, ``build_request`` raises ``ClientError``
``sender_missing`` and the message dead-letters (re-drive after setting the variable).

Error bodies look like ``{"errors": [{"message", "field", "help"}]}``; the status decides
the class (``integrations.classify``), the first error's ``field`` becomes the code and
the messages the detail:

    400, 403, 404, 413          ClientError   (403: e.g. sender identity not verified)
    401                         AuthError     (after one credential refresh)
    429                         RateLimited   (Retry-After when given)
    408, 502, 503, 504          Transient
    500, other 5xx              Ambiguous     → verified after OUTBOX_EMAIL_VERIFY_AFTER
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Mapping
from email.utils import parseaddr
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
from integrations.classify import classify
from integrations.errors import ClientError, ConfigurationError, IntegrationError
from integrations.sanitize import sanitize
from integrations.settings import env_name

PATH = "/v3/mail/send"
KEY_ARG = "outbox_key"           # custom_args name that carries the outbox idempotency key
KEY_HEADER = "X-Message-Key"
MESSAGES_PATH = "/v3/messages"   # the Email Activity search
KEY_QUERY = f"unique_args['{KEY_ARG}']"
FROM_VARIABLE = env_name("email", "FROM")
_MAX_ERRORS_IN_DETAIL = 3


def _email_pattern() -> re.Pattern[str]:
    """The address rule of the operation schema (one source of truth)."""
    return re.compile(schemas.load("operations", "email.send")["definitions"]["email"]["pattern"])


def parse_sender(value: str, *, variable: str = FROM_VARIABLE) -> dict[str, str]:
    """Parse ``a@example.com`` or ``Name <a@example.com>`` into a SendGrid address object.

    Raises:
        ConfigurationError: not a valid address (the message names ``variable``, not the value).
    """
    name, address = parseaddr(value)
    if (not address or not _email_pattern().fullmatch(address) or len(address) > 254
            or any(c in value for c in "\r\n")):
        raise ConfigurationError(f"{variable} must be an email address, optionally "
                                 "'Name <address>'")
    return {"email": address, "name": name} if name else {"email": address}


class EmailAdapter(Adapter):
    """Builds SendGrid-shaped mail-send requests and parses their responses; no I/O."""

    name = "email"
    operations = frozenset({"send"})
    supports_idempotency = False
    auth = "bearer"
    verify_after_s = 300.0

    def __init__(self, default_from: str | None = None,
                 environ: Mapping[str, str] | None = None):
        """Args:
            default_from: sender used when a payload has no ``from``; default
                ``OUTBOX_EMAIL_FROM`` from ``environ`` (default ``os.environ``).

        Raises:
            ConfigurationError: the default sender is not a valid address.
        """
        if default_from is None:
            env = os.environ if environ is None else environ
            default_from = env.get(FROM_VARIABLE, "").strip() or None
        self.default_from = parse_sender(default_from) if default_from else None

    def verify_request(self, operation: str, payload: Mapping[str, Any],
                       idempotency_key: str) -> Request:
        """Search the Email Activity feed for a message carrying the key in its custom args."""
        quoted = idempotency_key.replace("\\", "\\\\").replace('"', '\\"')
        query = urllib.parse.quote(f'{KEY_QUERY}="{quoted}"', safe="")
        return Request("GET", f"{MESSAGES_PATH}?limit=1&query={query}")

    def verification(self, operation: str, response: Response, idempotency_key: str,
                     payload: Mapping[str, Any]) -> Verification:
        """Found: ``done`` with its ``msg_id``; an empty list: ``not_done``; an answer that is
        not a message list: ``unknown``. Raises the classified error for a non-2xx."""
        if not 200 <= response.status_code < 300:
            raise self.error_for(response)
        messages = response.body.get("messages") if isinstance(response.body, dict) else None
        if not isinstance(messages, list):
            return Verification(UNKNOWN, summary="unreadable activity search answer")
        if not messages:
            return Verification(NOT_DONE, summary="no message with this key")
        first = messages[0] if isinstance(messages[0], dict) else {}
        ref = sanitize(str(first["msg_id"]), 80) if first.get("msg_id") else None
        return Verification(DONE, ref, f"found {ref or '(no message id)'}")

    def check_request(self) -> Request:
        """``GET /v3/scopes``: the key's permissions, without sending anything."""
        return Request("GET", "/v3/scopes")

    def check_problem(self, response: Response) -> str | None:
        scopes = response.body.get("scopes") if isinstance(response.body, dict) else None
        if not isinstance(scopes, list) or "mail.send" not in scopes:
            return "credentials rejected: the API key lacks the mail.send scope"
        return None

    def build_request(self, operation: str, payload: Mapping[str, Any],
                      idempotency_key: str) -> Request:
        """Return the JSON POST for ``send``.

        Args:
            operation: ``send``.
            payload: valid against ``schemas/operations/email.send``.
            idempotency_key: carried in ``custom_args.outbox_key`` and ``X-Message-Key``.

        Raises:
            ValueError: unknown operation or empty key.
            ClientError: ``sender_missing`` — no ``from`` and no ``OUTBOX_EMAIL_FROM``.
        """
        if operation not in self.operations:
            raise ValueError(f"unknown email operation {operation!r}")
        if not idempotency_key:
            raise ValueError("email requests need an idempotency key")
        sender = _address(payload["from"]) if payload.get("from") else self.default_from
        if sender is None:
            raise ClientError(f"no sender: the payload has no 'from' and {FROM_VARIABLE} "
                              "is not set", code="sender_missing")
        to = payload["to"]
        body: dict[str, Any] = {
            "personalizations": [{"to": _unique(_address(a) for a in (
                to if isinstance(to, list) else [to]))}],
            "from": sender,
            "subject": payload["subject"],
            # SendGrid requires text/plain first, then text/html.
            "content": [{"type": kind, "value": payload[field]}
                        for field, kind in (("text", "text/plain"), ("html", "text/html"))
                        if payload.get(field)],
            "custom_args": {KEY_ARG: idempotency_key},
        }
        if payload.get("reply_to"):
            body["reply_to"] = _address(payload["reply_to"])
        if payload.get("categories"):
            body["categories"] = list(payload["categories"])
        return Request("POST", PATH, headers={KEY_HEADER: idempotency_key}, json=body)

    def parse_response(self, operation: str, response: Response) -> Delivery:
        """Return the Delivery for a 2xx (202, or 200 in SendGrid's sandbox mode), else raise.

        A 2xx without ``X-Message-Id`` is still a delivery (the mail was accepted), with
        ``provider_ref`` None.

        Raises:
            ClientError, AuthError, RateLimited, Transient, Ambiguous: per the module table.
        """
        if 200 <= response.status_code < 300:
            raw = response.headers.get("X-Message-Id")
            ref = sanitize(raw, 80) if raw else None
            return Delivery(status_code=response.status_code, provider_ref=ref,
                            summary=f"{response.status_code} accepted {ref or '(no message id)'}")
        raise self.error_for(response)

    def error_for(self, response: Response) -> IntegrationError:
        """Classify a non-2xx response, with the SendGrid error list as code and detail."""
        errors = _error_list(response.body)
        code = next((e["field"] for e in errors if e.get("field")), None)
        messages = [e["message"] for e in errors if e.get("message")]
        detail = "; ".join(dict.fromkeys(messages[:_MAX_ERRORS_IN_DETAIL])) or None
        found = classify(response, code=code, detail=detail)
        assert found is not None  # only called for non-2xx
        return found


def _address(value: str | Mapping[str, str]) -> dict[str, str]:
    if isinstance(value, str):
        return {"email": value}
    out = {"email": value["email"]}
    if value.get("name"):
        out["name"] = value["name"]
    return out


def _unique(addresses) -> list[dict[str, str]]:
    """Drop repeated addresses (case-insensitive): SendGrid rejects duplicates with a 400."""
    seen: dict[str, dict[str, str]] = {}
    for address in addresses:
        seen.setdefault(address["email"].lower(), address)
    return list(seen.values())


def _error_list(body: Any) -> list[dict[str, str]]:
    """The string fields of each error in a SendGrid error body, or [] when it is not one."""
    try:
        schemas.validate_response("email", "error", body)
    except schemas.SchemaError:
        return []
    return [{k: v for k, v in e.items() if isinstance(v, str)} for e in body["errors"]]
