"""The ``crm`` provider: HubSpot-shaped contacts, authorised with OAuth2 (``integrations.oauth``).

    upsert_contact → POST /crm/v3/objects/contacts/batch/upsert   200, one input by e-mail
    verify         → GET  /crm/v3/objects/contacts/{email}?idProperty=email
    check          → GET  /crm/v3/objects/contacts?limit=1

The upsert's key is the contact's e-mail, a natural key: sending it twice leaves one contact
with the same properties, so HubSpot needs no idempotency header. After an ambiguous
failure the contact is still looked up before sending again (``verify_request``): the
upsert took effect when the contact exists with every property the payload sets; a 404 or
another value means "not done", and it is sent again.

Credentials: the access token of the OAuth2 grant ``outbox crm connect`` stored, refreshed
ahead of expiry (``OUTBOX_CRM_CLIENT_ID``, ``OUTBOX_CRM_CLIENT_SECRET``/``_FILE``,
``OUTBOX_CRM_AUTHORIZE_URL``, ``OUTBOX_CRM_TOKEN_URL``, ``OUTBOX_CRM_SCOPES``,
``OUTBOX_CRM_REDIRECT_PORT``).

Errors are ``{"status": "error", "message", "category"}``; the status decides the class
(``integrations.classify``), the category becomes the code:

    400 VALIDATION_ERROR, 403 MISSING_SCOPES, 404, 409   ClientError
    401 EXPIRED_AUTHENTICATION / INVALID_AUTHENTICATION   AuthError (after one refresh)
    429 RATE_LIMITS                                       RateLimited (Retry-After)
    408, 502, 503, 504                                    Transient
    500, other 5xx                                        Ambiguous → verified
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from typing import Any

import redis

import schemas
from integrations.base import DONE, NOT_DONE, Adapter, Delivery, Request, Response, Verification
from integrations.classify import classify
from integrations.credentials import Credential
from integrations.errors import IntegrationError, InvalidResponse
from integrations.oauth import OAuthCredential, OAuthSettings
from integrations.sanitize import sanitize
from integrations.settings import ProviderSettings

UPSERT_PATH = "/crm/v3/objects/contacts/batch/upsert"
CONTACTS_PATH = "/crm/v3/objects/contacts"
AUTHORIZE_URL = "https://app.hubspot.com/oauth/authorize"
TOKEN_URL = "https://api.hubapi.com/oauth/v1/token"
SCOPES = "crm.objects.contacts.read crm.objects.contacts.write"


def oauth_settings(environ: Mapping[str, str] | None = None) -> OAuthSettings:
    """The crm OAuth2 client (``OUTBOX_CRM_CLIENT_ID`` …), HubSpot's endpoints by default.

    Raises:
        ConfigurationError: a malformed setting.
    """
    return OAuthSettings.from_env("crm", environ, default_authorize_url=AUTHORIZE_URL,
                                  default_token_url=TOKEN_URL, default_scopes=SCOPES)


class CrmAdapter(Adapter):
    """Builds HubSpot-shaped contact requests and parses their answers; no I/O."""

    name = "crm"
    operations = frozenset({"upsert_contact"})
    supports_idempotency = False   # no idempotency header: the e-mail is the key
    auth = "bearer"
    rate_limit = "10/s"            # HubSpot: 100 requests per 10 s per OAuth app and account
    verify_after_s = 2.0           # a contact reads back at once

    def credential(self, settings: ProviderSettings, environ: Mapping[str, str] | None,
                   client: redis.Redis | None) -> Credential:
        """The OAuth2 access token of the stored grant."""
        return OAuthCredential(oauth_settings(environ), None, client)

    def build_request(self, operation: str, payload: Mapping[str, Any],
                      idempotency_key: str) -> Request:
        """The batch upsert of one contact, by e-mail."""
        if operation not in self.operations:
            raise ValueError(f"unknown crm operation {operation!r}")
        return Request("POST", UPSERT_PATH, json={"inputs": [{
            "idProperty": "email", "id": payload["email"].lower(),
            "properties": dict(payload.get("properties") or {})}]})

    def parse_response(self, operation: str, response: Response) -> Delivery:
        """The contact's id for a 2xx, else the classified error."""
        if not 200 <= response.status_code < 300:
            raise self.error_for(response)
        body = _valid(response, "batch_upsert")
        result = body["results"][0]
        ref = sanitize(result["id"], 64)
        created = "created" if result.get("new") else "updated"
        return Delivery(response.status_code, ref, f"{response.status_code} contact {ref} "
                                                   f"{created}")

    def verify_request(self, operation: str, payload: Mapping[str, Any],
                       idempotency_key: str) -> Request:
        """Read the contact back by e-mail, with the properties the upsert sets (HubSpot
        answers only its default properties unless they are named)."""
        email = urllib.parse.quote(payload["email"].lower(), safe="@")
        query = {"idProperty": "email"}
        if payload.get("properties"):
            query["properties"] = ",".join(sorted(payload["properties"]))
        return Request("GET", f"{CONTACTS_PATH}/{email}?{urllib.parse.urlencode(query)}")

    def verification(self, operation: str, response: Response, idempotency_key: str,
                     payload: Mapping[str, Any]) -> Verification:
        """Done when the contact holds every property the payload sets."""
        if response.status_code == 404:
            return Verification(NOT_DONE, summary="no such contact")
        if not 200 <= response.status_code < 300:
            raise self.error_for(response)
        contact = _valid(response, "contact")
        stored = contact["properties"]
        wanted = payload.get("properties") or {}
        ref = sanitize(contact["id"], 64)
        if all(stored.get(name) == value for name, value in wanted.items()):
            return Verification(DONE, ref, f"contact {ref} holds the update")
        return Verification(NOT_DONE, summary=f"contact {ref} lacks the update")

    def check_request(self) -> Request:
        """One contact, to prove the token works."""
        return Request("GET", f"{CONTACTS_PATH}?limit=1")

    def error_for(self, response: Response) -> IntegrationError:
        """Classify a non-2xx answer, its HubSpot ``category`` as the code."""
        body = response.body
        try:
            schemas.validate_response(self.name, "error", body)
        except schemas.SchemaError:
            body = {}
        found = classify(response, code=body.get("category"), detail=body.get("message"))
        assert found is not None   # only called for non-2xx
        return found


def _valid(response: Response, schema: str) -> dict:
    try:
        schemas.validate_response("crm", schema, response.body)
    except schemas.SchemaError as exc:
        raise InvalidResponse(f"response body {exc.path}: {exc.reason}",
                              status_code=response.status_code, code="schema_mismatch") from exc
    return response.body
