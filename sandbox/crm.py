"""HubSpot-shaped CRM v3 contacts API behind OAuth bearer tokens, and the HTTP face of
``sandbox.oauth`` (``/oauth/authorize``, ``/oauth/v1/token``).

HubSpot has no idempotency keys: an upsert by e-mail is idempotent by nature. Each input
that creates a contact or changes one of its properties is one effect, counted under the
lower-cased e-mail, so re-sending the same upsert shows as requests without effects.

Errors use HubSpot's body ``{"status": "error", "message", "correlationId", "category"}``.
Expired and revoked access tokens are counted as they arrive (``stats()["crm"]``): a
correct client refreshes before expiry and never sends a revoked token.
"""

from __future__ import annotations

import json
import re
import time
import urllib.parse
import uuid
from collections.abc import Mapping
from typing import Any

from sandbox import oauth
from sandbox.payments import Result
from sandbox.state import SandboxState

PREFIXES = ("/crm/", oauth.PREFIX)
CONTACTS_PATH = "/crm/v3/objects/contacts"
UPSERT_PATH = CONTACTS_PATH + "/batch/upsert"
MAX_BATCH = 100
MAX_LIMIT = 100
FIRST_ID = 100001   # contact ids are numeric strings, like HubSpot's
_EMAIL = re.compile(r"^[^@\s]+@[^@\s.]+(?:\.[^@\s.]+)+$")
_SERVER_ERROR = {"before": "internal error (sandbox fault)",
                 "after": "internal error after processing (sandbox fault)",
                 "down": "service unavailable (sandbox down)"}
_AUTH_MISSING = ("Authentication credentials not found. This API supports OAuth 2.0 "
                 "authentication.")


def error(status: int, message: str, category: str, **extra: Any) -> Result:
    """A HubSpot-shaped error result."""
    return Result(status, {"status": "error", "message": message,
                           "correlationId": str(uuid.uuid4()), "category": category, **extra},
                  store=False)


def server_error(status: int, which: str) -> Result:
    """A 5xx fault: before the effect, after it, or an outage."""
    return error(status, _SERVER_ERROR[which], "INTERNAL_ERROR")


def too_many() -> Result:
    """HubSpot's 429 for its per-second limit (the sandbox's limit or a fault)."""
    return error(429, "You have reached your secondly limit.", "RATE_LIMITS",
                 errorType="RATE_LIMIT", policyName="SECONDLY")


def effect_key(path: str, body: bytes) -> str:
    """The lower-cased e-mail of a one-input upsert (what faults match and requests are
    counted under), else ""."""
    if path != UPSERT_PATH:
        return ""
    try:
        inputs = json.loads(body).get("inputs")
        email = inputs[0]["id"] if len(inputs) == 1 else ""
    except (ValueError, AttributeError, TypeError, LookupError):
        return ""
    return email.lower() if isinstance(email, str) else ""


def serve(state: SandboxState, method: str, path: str, query: str,
          headers: Mapping[str, str], body: bytes) -> Result:
    """Answer one request on an OAuth or CRM path (after faults, the rate limit and
    ``check_token``)."""
    if path == oauth.AUTHORIZE_PATH:
        if method != "GET":
            return _oauth_reply((405, {"error": "invalid_request",
                                       "error_description": "use GET"}, {}))
        return _oauth_reply(state.oauth.authorize(query))
    if path == oauth.TOKEN_PATH:
        if method != "POST":
            return _oauth_reply((405, {"error": "invalid_request",
                                       "error_description": "use POST"}, {}))
        return _oauth_reply(state.oauth.token(headers.get("Authorization", ""),
                                              headers.get("Content-Type", ""), body))
    if not path.startswith(PREFIXES[0]):
        return error(404, "resource not found", "OBJECT_NOT_FOUND")
    params = dict(urllib.parse.parse_qsl(query))
    if path == UPSERT_PATH:
        if method != "POST":
            return error(405, "method not allowed", "VALIDATION_ERROR")
        return upsert(state, body)
    if path == CONTACTS_PATH:
        if method != "GET":
            return error(405, "method not allowed", "VALIDATION_ERROR")
        return list_contacts(state, params)
    if path.startswith(CONTACTS_PATH + "/") and "/" not in path[len(CONTACTS_PATH) + 1:]:
        if method != "GET":
            return error(405, "method not allowed", "VALIDATION_ERROR")
        return get_contact(state, urllib.parse.unquote(path[len(CONTACTS_PATH) + 1:]), params)
    return error(404, "resource not found", "OBJECT_NOT_FOUND")


def _oauth_reply(reply: oauth.Reply) -> Result:
    status, body, headers = reply
    return Result(status, body, store=False, headers=headers)


def check_token(state: SandboxState, path: str, header: str) -> Result | None:
    """A 401 unless ``header`` carries a live access token; None on the OAuth server's
    paths, which authenticate the client themselves."""
    if path.startswith(oauth.PREFIX):
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return error(401, _AUTH_MISSING, "INVALID_AUTHENTICATION")
    verdict, late_s = state.oauth.check_access(token.strip())
    if verdict == "expired":
        return error(401, f"The OAuth token used to make this call expired {int(late_s)} "
                          "second(s) ago.", "EXPIRED_AUTHENTICATION")
    if verdict == "revoked":
        return error(401, "The OAuth token used to make this call has been revoked.",
                     "INVALID_AUTHENTICATION")
    if verdict == "unknown":
        return error(401, "Authentication credentials not valid.", "INVALID_AUTHENTICATION")
    return None


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


def _invalid(message: str) -> Result:
    return error(400, message, "VALIDATION_ERROR")


def _validate(document: Any) -> str | None:
    """The first problem HubSpot would report for a batch upsert body (None when valid)."""
    inputs = document.get("inputs") if isinstance(document, dict) else None
    if not isinstance(inputs, list) or not 1 <= len(inputs) <= MAX_BATCH:
        return f"inputs must be a list of 1 to {MAX_BATCH} objects"
    seen: set[str] = set()
    for i, item in enumerate(inputs):
        if not isinstance(item, dict):
            return f"inputs[{i}] must be an object"
        if item.get("idProperty") != "email":
            return f"inputs[{i}].idProperty must be email"
        email = item.get("id")
        if not isinstance(email, str) or len(email) > 254 or not _EMAIL.match(email):
            return f"inputs[{i}].id must be an e-mail address"
        props = item.get("properties")
        if not isinstance(props, dict) or not all(
                isinstance(k, str) and k and isinstance(v, str) for k, v in props.items()):
            return f"inputs[{i}].properties must be an object of string values"
        if props.get("email", email).lower() != email.lower():
            return f"inputs[{i}].properties.email differs from its id"
        if "hs_object_id" in props:
            return f"inputs[{i}].properties.hs_object_id is read-only"
        if email.lower() in seen:
            return f"Duplicate IDs found in batch input: {email.lower()}"
        seen.add(email.lower())
    return None


def _public(contact: dict) -> dict:
    """The SimplePublicObject form of a stored contact."""
    return {"id": contact["id"],
            "properties": {**contact["properties"], "hs_object_id": contact["id"],
                           "createdate": _iso(contact["created"]),
                           "lastmodifieddate": _iso(contact["updated"])},
            "createdAt": _iso(contact["created"]), "updatedAt": _iso(contact["updated"]),
            "archived": False}


def upsert(state: SandboxState, body: bytes) -> Result:
    """``POST .../contacts/batch/upsert`` by e-mail: create or update each input."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return _invalid("Invalid input JSON: the body is not JSON")
    problem = _validate(document)
    if problem:
        return _invalid(problem)
    results, changed = [], 0
    with state.lock:
        started = state.now()
        for item in document["inputs"]:
            email = item["id"].lower()
            props = {**item["properties"], "email": email}
            contact = state.contacts.get(email)
            new = contact is None
            if new:
                contact = {"id": str(FIRST_ID + len(state.contacts)), "properties": {},
                           "created": started, "updated": started}
                state.contacts[email] = contact
            if new or any(contact["properties"].get(k) != v for k, v in props.items()):
                contact["properties"].update(props)
                contact["updated"] = started
                state.record_effect(email)
                changed += 1
            results.append({**_public(contact), "new": new})
        completed = state.now()
    return Result(200, {"status": "COMPLETE", "results": results,
                        "startedAt": _iso(started), "completedAt": _iso(completed)},
                  effect=changed > 0)


def get_contact(state: SandboxState, contact_id: str, params: dict[str, str]) -> Result:
    """``GET .../contacts/{id}``, by e-mail with ``idProperty=email``, else by object id."""
    id_property = params.get("idProperty")
    if id_property not in (None, "email"):
        return _invalid("idProperty must be email")
    with state.lock:
        if id_property == "email":
            contact = state.contacts.get(contact_id.lower())
        else:
            contact = next((c for c in state.contacts.values() if c["id"] == contact_id), None)
        if contact is None:
            return error(404, "resource not found", "OBJECT_NOT_FOUND")
        return Result(200, _public(contact))


def list_contacts(state: SandboxState, params: dict[str, str]) -> Result:
    """``GET .../contacts?limit=N``: the first contacts by id (the client's health check;
    no paging)."""
    try:
        limit = int(params.get("limit", "10"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIMIT:
        return _invalid(f"limit must be an integer from 1 to {MAX_LIMIT}")
    with state.lock:
        contacts = sorted(state.contacts.values(), key=lambda c: int(c["id"]))[:limit]
        return Result(200, {"results": [_public(c) for c in contacts]})
