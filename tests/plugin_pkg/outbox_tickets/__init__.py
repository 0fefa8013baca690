"""A helpdesk's tickets API as an integration-outbox provider (the README's "Add your own
integration" example): ``tickets.create`` posts ``{"subject", "requester"}`` to
``POST /v1/tickets`` with the outbox key as ``Idempotency-Key``.

Configured like a built-in provider: ``OUTBOX_TICKETS_BASE_URL``, ``OUTBOX_TICKETS_API_KEY``
(sent as a bearer token), and every ``OUTBOX_TICKETS_…`` limit.
"""

from __future__ import annotations

from pathlib import Path

from integrations.base import Adapter, Delivery, Request, Response
from integrations.classify import classify
from integrations.sanitize import sanitize


class TicketsAdapter(Adapter):
    name = "tickets"
    operations = frozenset({"create"})
    supports_idempotency = True     # the API deduplicates by Idempotency-Key
    auth = "bearer"
    rate_limit = "20/s"
    # <provider>.<operation>.v<N>.json payload schemas, as in integration-outbox's schemas/
    schema_dir = Path(__file__).parent / "schemas"

    def build_request(self, operation, payload, idempotency_key):
        if operation != "create":
            raise ValueError(operation)
        return Request("POST", "/v1/tickets", headers={"Idempotency-Key": idempotency_key},
                       json={"subject": payload["subject"], "requester": payload["requester"]})

    def parse_response(self, operation, response: Response) -> Delivery:
        error = classify(response)
        if error is not None:
            raise error
        body = response.body if isinstance(response.body, dict) else {}
        ref = sanitize(str(body["id"]), 80) if body.get("id") else None
        return Delivery(response.status_code, ref, f"{response.status_code} ticket {ref}")
