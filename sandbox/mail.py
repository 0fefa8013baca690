"""SendGrid-shaped v3 Mail Send: ``POST /v3/mail/send``, validation, errors and effects.

SendGrid has no idempotency: every accepted request is one effect (one email sent),
counted under the outbox key found in ``custom_args.outbox_key`` — else the
``X-Message-Key`` header, else "" — so tests can count duplicates per key. Success is
``202 Accepted`` with an empty body and an ``X-Message-Id`` header.

Errors use SendGrid's body ``{"errors": [{"message", "field", "help"}]}``; validation
reports every problem found, like SendGrid. The sandbox is stricter than SendGrid in one
way: unknown top-level fields are a 400 (catches adapter typos that SendGrid would
silently ignore).
"""

from __future__ import annotations

import json
import re
import secrets
import time
import urllib.parse
from typing import Any

from sandbox.auth import key_matches
from sandbox.payments import Result
from sandbox.state import SandboxState

PREFIX = "/v3/"
SEND_PATH = "/v3/mail/send"
SCOPES_PATH = "/v3/scopes"
MESSAGES_PATH = "/v3/messages"   # the Email Activity search
KEY_ARG = "outbox_key"
KEY_HEADER = "X-Message-Key"
MAX_RECIPIENTS = 1000
MAX_CATEGORIES = 10
MAX_CATEGORY_LENGTH = 255
HELP = "https://docs.sendgrid.com/api-reference/mail-send/errors"

TOP_LEVEL = {
    "personalizations", "from", "reply_to", "reply_to_list", "subject", "content",
    "attachments", "template_id", "headers", "categories", "custom_args", "send_at",
    "batch_id", "asm", "ip_pool_name", "mail_settings", "tracking_settings",
}
_EMAIL = re.compile(r'^[^@\s<>()\[\],;:"]+@[^@\s<>()\[\],;:".]+(?:\.[^@\s<>()\[\],;:".]+)+$')

Problem = tuple[str | None, str]   # (field, message)


_KEY_QUERY = re.compile(r"""^unique_args\['outbox_key'\]="((?:[^"\\]|\\.)*)"$""")


def activity(state: SandboxState, query_string: str) -> Result:
    """``GET /v3/messages?query=unique_args['outbox_key']="K"&limit=N``: the Email Activity
    search, for the one query the outbox makes (its verify-before-retry lookup); the
    messages sent with that key, newest first, as SendGrid lists them."""
    params = dict(urllib.parse.parse_qsl(query_string))
    match = _KEY_QUERY.match(params.get("query", ""))
    if match is None:
        return error(400, "invalid query: the sandbox answers unique_args['outbox_key']=\"…\"",
                     "query")
    try:
        limit = int(params.get("limit", "10"))
    except ValueError:
        return error(400, "limit must be an integer", "limit")
    key = re.sub(r"\\(.)", r"\1", match.group(1))
    with state.lock:
        found = sorted(((m, e) for m, e in state.emails.items() if e["key"] == key),
                       key=lambda item: -item[1]["t"])[:max(limit, 0)]
        messages = [{"msg_id": m, "subject": e["subject"], "status": "delivered",
                     "opens_count": 0, "clicks_count": 0,
                     "last_event_time": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                      time.gmtime(e["t"]))}
                    for m, e in found]
    return Result(200, {"messages": messages})


def scopes(state: SandboxState) -> Result:
    """``GET /v3/scopes``: what the (accepted) API key may do."""
    return Result(200, {"scopes": ["mail.send", "scopes.read"]})


def error(status: int, message: str, field: str | None = None) -> Result:
    """A SendGrid-shaped error result with one entry."""
    return errors(status, [(field, message)])


def errors(status: int, problems: list[Problem]) -> Result:
    """A SendGrid-shaped error result listing every problem."""
    return Result(status, {"errors": [{"message": message, "field": field, "help": HELP}
                                      for field, message in problems]}, store=False)


def parse_json(body: bytes) -> Any:
    """The decoded JSON body, or ``ValueError`` when it is not JSON."""
    try:
        return json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError("not UTF-8") from exc


def outbox_key(document: Any) -> str | None:
    """``custom_args.outbox_key`` of a request body, if it has a string one."""
    if isinstance(document, dict) and isinstance(document.get("custom_args"), dict):
        key = document["custom_args"].get(KEY_ARG)
        if isinstance(key, str) and key:
            return key
    return None


def check_auth(header: str, state: SandboxState) -> Result | None:
    """Return a SendGrid-shaped 401 unless ``header`` is ``Bearer <email key>``."""
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return error(401, "Permission denied, wrong credentials")
    if not key_matches(given.strip(), state.effective_email_api_key):
        return error(401, "The provided authorization grant is invalid, expired, or revoked")
    return None


def validate(document: Any) -> list[Problem]:
    """Every problem SendGrid would report for this mail-send body ([] when valid)."""
    if not isinstance(document, dict):
        return [(None, "The request body must be a JSON object.")]
    problems: list[Problem] = [(name, "Unknown field (the sandbox is strict).")
                               for name in sorted(document) if name not in TOP_LEVEL]
    problems += _personalizations(document.get("personalizations"))
    problems += _address(document.get("from"), "from", required=True)
    if document.get("reply_to") is not None:
        problems += _address(document["reply_to"], "reply_to", required=True)
    problems += _subject(document)
    problems += _content(document)
    problems += _categories(document.get("categories"))
    custom = document.get("custom_args")
    if custom is not None and not (isinstance(custom, dict)
                                   and all(isinstance(v, str) for v in custom.values())):
        problems.append(("custom_args", "The custom_args parameter must be an object whose "
                                        "values are strings."))
    return problems


def _is_email(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= 254 and bool(_EMAIL.match(value))


def _address(value: Any, field: str, *, required: bool) -> list[Problem]:
    if value is None and not required:
        return []
    if not isinstance(value, dict) or "email" not in value:
        if field == "from":
            return [("from", "The from object must be provided for every email send. It is an "
                             "object that requires the email parameter, but may also contain "
                             "a name parameter.")]
        return [(field, f"The {field} object must contain an email parameter.")]
    if not _is_email(value["email"]):
        return [(f"{field}.email", f"The {field} email does not contain a valid address.")]
    if "name" in value and (not isinstance(value["name"], str)
                            or any(c in value["name"] for c in "\r\n")):
        return [(f"{field}.name", "The name must be a single-line string.")]
    return []


def _personalizations(value: Any) -> list[Problem]:
    if not isinstance(value, list) or not value:
        return [("personalizations", "The personalizations field is required and must have "
                                     "at least one personalization.")]
    problems: list[Problem] = []
    total = 0
    for i, item in enumerate(value):
        to = item.get("to") if isinstance(item, dict) else None
        if not isinstance(to, list) or not to:
            problems.append((f"personalizations.{i}.to", "The to array is required for all "
                             "personalization objects, and must have at least one email "
                             "object with a valid email address."))
            continue
        seen: set[str] = set()
        for kind in ("to", "cc", "bcc"):
            people = item.get(kind) if kind != "to" else to
            if people is None:
                continue
            if not isinstance(people, list):
                problems.append((f"personalizations.{i}.{kind}",
                                 f"The {kind} field must be an array of email objects."))
                continue
            for j, recipient in enumerate(people):
                problems += _address(recipient, f"personalizations.{i}.{kind}.{j}",
                                     required=True)
                email = recipient.get("email") if isinstance(recipient, dict) else None
                if isinstance(email, str):
                    if email.lower() in seen:
                        problems.append((f"personalizations.{i}", "Each email address in the "
                                         "personalization block should be unique between to, "
                                         "cc, and bcc. We found a duplicate in the "
                                         f"personalizations.{i}.{kind} field."))
                    seen.add(email.lower())
            total += len(people)
    if total > MAX_RECIPIENTS:
        problems.append(("personalizations", "The total number of recipients must be no more "
                                             f"than {MAX_RECIPIENTS}."))
    return problems


def _subject(document: dict) -> list[Problem]:
    subject = document.get("subject")
    if subject is not None:
        if not isinstance(subject, str) or not subject:
            return [("subject", "The subject must be a string at least one character long.")]
        return []
    if document.get("template_id"):
        return []
    people = document.get("personalizations")
    if isinstance(people, list) and people and all(
            isinstance(p, dict) and isinstance(p.get("subject"), str) and p["subject"]
            for p in people):
        return []
    return [("subject", "The subject is required. You can get around this requirement if you "
                        "use a template with a subject defined or if every personalization "
                        "has a subject defined.")]


def _content(document: dict) -> list[Problem]:
    content = document.get("content")
    if content is None and document.get("template_id"):
        return []
    if not isinstance(content, list) or not content:
        return [("content", "Unless a valid template_id is provided, the content parameter is "
                            "required. There must be at least one defined content block. We "
                            "typically suggest both text/plain and text/html blocks are "
                            "included, but only one block is required.")]
    problems: list[Problem] = []
    types = []
    for i, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        value = block.get("value") if isinstance(block, dict) else None
        if not isinstance(kind, str) or not kind or any(c in kind for c in ";\r\n"):
            problems.append((f"content.{i}.type", "The content type cannot contain ';', or CRLF "
                             "characters and must be at least one character in length."))
        if not isinstance(value, str) or not value:
            problems.append((f"content.{i}.value", "The content value must be a string at "
                             "least one character in length."))
        types.append(kind)
    plain = [i for i, kind in enumerate(types) if kind == "text/plain"]
    html = [i for i, kind in enumerate(types) if kind == "text/html"]
    if (plain and plain != [0]) or (html and html != [1 if plain else 0]):
        problems.append(("content", "If present, text/plain content must be first, followed by "
                                    "text/html, followed by any other content."))
    return problems


def _categories(value: Any) -> list[Problem]:
    if value is None:
        return []
    if not isinstance(value, list):
        return [("categories", "The categories parameter must be an array of strings.")]
    if len(value) > MAX_CATEGORIES:
        return [("categories", f"The categories parameter may not exceed {MAX_CATEGORIES} "
                               "items.")]
    return [(f"categories.{i}", f"A category must be a string of 1 to {MAX_CATEGORY_LENGTH} "
                                "characters.")
            for i, c in enumerate(value)
            if not isinstance(c, str) or not 0 < len(c) <= MAX_CATEGORY_LENGTH]


def new_message_id() -> str:
    """A SendGrid-like message id: 22 URL-safe base64 characters."""
    return secrets.token_urlsafe(16)[:22]


def sandbox_mode(document: dict) -> bool:
    """``mail_settings.sandbox_mode.enable``: SendGrid validates the mail and sends nothing."""
    settings = document.get("mail_settings")
    mode = settings.get("sandbox_mode") if isinstance(settings, dict) else None
    return isinstance(mode, dict) and mode.get("enable") is True


def send(state: SandboxState, document: dict, key: str) -> Result:
    """Accept a valid mail-send body: one effect under ``key``, 202 with ``X-Message-Id``;
    in sandbox mode, 200 with nothing sent (no effect, no message id)."""
    if sandbox_mode(document):
        return Result(200, None)
    message_id = new_message_id()
    recipients = [r["email"] for p in document["personalizations"] for r in p["to"]]
    with state.lock:
        state.emails[message_id] = {"key": key, "to": recipients,
                                    "subject": document.get("subject"), "t": time.time()}
        state.record_effect(key)
    bounced = any("bounce" in r for r in recipients)
    # Event data names the message and the outbox key, never the addresses.
    state.webhooks.emit("email", "email.bounce" if bounced else "email.delivered",
                        {"sg_message_id": message_id, "outbox_key": key,
                         "recipients": len(recipients)})
    return Result(202, None, effect=True, headers={"X-Message-Id": message_id})
