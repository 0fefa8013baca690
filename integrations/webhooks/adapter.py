"""The webhooks adapter: the event body, its Standard Webhooks signature, and what an
endpoint's answer means. No I/O (the provider looks the endpoint up and sends).

Body (Standard Webhooks' recommended shape), compact JSON, the bytes that are signed::

    {"type": <event_type>, "timestamp": <ISO 8601, when the event happened>, "data": <data>}

Headers: ``webhook-id`` = the outbox message id (the same on every retry: receivers
deduplicate by it), ``webhook-timestamp`` = now, per attempt, ``webhook-signature`` =
``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`` under each secret of the endpoint,
newest first, space-separated (two during a secret rotation), made by the
``standardwebhooks`` library itself.

An endpoint's answer::

    2xx                              delivered
    3xx                              ClientError  redirect_refused (never followed)
    410                              ClientError  endpoint_gone (the provider disables it)
    429                              RateLimited  Retry-After honoured, this endpoint paused
    408, 5xx (not 501/505)           Transient / Ambiguous (integrations.classify): retried
    any other 4xx (401 included)     ClientError
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from standardwebhooks.webhooks import Webhook

from integrations.base import Adapter, Delivery, Request, Response
from integrations.classify import classify, make_error
from integrations.errors import ClientError, IntegrationError
from integrations.webhooks.endpoints import Endpoint

OPERATION = "deliver"
CONTENT_TYPE = "application/json"


class WebhooksAdapter(Adapter):
    """Builds the event request and reads the endpoint's answer; signing is ``sign``."""

    name = "webhooks"
    operations = frozenset({OPERATION})
    # Receivers deduplicate by webhook-id (the message id, stable across retries), so an
    # ambiguous attempt is sent again, like a provider with an idempotency key.
    supports_idempotency = True
    auth = None
    has_base_url = False

    def build_request(self, operation: str, payload: Mapping[str, Any],
                      idempotency_key: str) -> Request:
        """The unsigned POST of the event: body only; ``sign`` adds the URL and headers.

        Raises:
            ValueError: unknown operation.
        """
        if operation != OPERATION:
            raise ValueError(f"unknown webhooks operation {operation!r}")
        happened = payload.get("timestamp") or datetime.now(UTC).isoformat()
        body = {"type": payload["event_type"], "timestamp": happened, "data": payload["data"]}
        return Request("POST", f"/{payload['endpoint_id']}",
                       headers={"Content-Type": CONTENT_TYPE},
                       content=json.dumps(body, separators=(",", ":"),
                                          ensure_ascii=False).encode("utf-8"))

    def parse_response(self, operation: str, response: Response) -> Delivery:
        """The Delivery for a 2xx; else raise the classified error (module table).

        Raises:
            ClientError, RateLimited, Transient, Ambiguous.
        """
        status = response.status_code
        if 200 <= status < 300:
            return Delivery(status_code=status, provider_ref=None, summary=f"{status} accepted")
        raise error_for(response)


def error_for(response: Response) -> IntegrationError:
    """Classify an endpoint's non-2xx answer. Its body is the customer's: never kept."""
    status = response.status_code
    if 300 <= status < 400:
        return make_error(ClientError, response, code="redirect_refused",
                          detail="the endpoint redirects; redirects are not followed")
    if status == 410:
        return make_error(ClientError, response, code="endpoint_gone",
                          detail="the endpoint is gone (410): it is disabled")
    if 400 <= status < 500 and status not in (408, 429):
        return make_error(ClientError, response)
    found = classify(response)
    assert found is not None   # only called for non-2xx
    return found


def sign(request: Request, endpoint: Endpoint, message_id: str, now: datetime) -> Request:
    """``request`` aimed at ``endpoint`` and signed: ``webhook-id`` ``message_id``,
    ``webhook-timestamp`` ``now``, one ``v1,`` signature per secret, newest first."""
    signatures = " ".join(Webhook(secret).sign(message_id, now, request.content)
                          for secret in endpoint.secrets)
    headers = {**request.headers, "webhook-id": message_id,
               "webhook-timestamp": str(int(now.timestamp())),
               "webhook-signature": signatures}
    return replace(request, url=endpoint.url, headers=headers)
