"""Webhook endpoints of the ``webhooks`` provider: register, list, disable, enable, rotate
the signing secret (``outbox endpoints …``), publish an event to every subscriber in the
caller's transaction, and ``SqlEndpointStore``, through which the provider reads them
(``integrations.webhooks.endpoints.EndpointStore``).

A URL is checked by the SSRF guard when registered (``integrations.ssrf.check_url``; hosts
in ``OUTBOX_WEBHOOKS_ALLOW_HOSTS`` exempt) and again on every connection. Secrets are
stored Fernet-encrypted (``integrations.secretbox``, ``OUTBOX_SECRET_KEY``) and returned in
clear exactly twice: by ``add`` and by ``rotate_secret``, for the caller to show once.
After a rotation the previous secret keeps signing (second signature) until it expires.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from integrations import secretbox, ssrf
from integrations.protection import RateSpec
from integrations.secretbox import SecretBox
from integrations.webhooks import endpoints as contract
from integrations.webhooks.endpoints import Endpoint

from .clock import iso, utcnow
from .enqueue import enqueue
from .errors import OutboxError
from .ids import new_id
from .models import Message, WebhookEndpoint

PROVIDER, OPERATION = "webhooks", "deliver"
ENABLED, DISABLED = "enabled", "disabled"
ALL_EVENTS = "*"
PREVIOUS_SECRET_LIFETIME = timedelta(hours=24)   # Stripe's and Svix's default
MAX_URL_LENGTH = 2000
_EVENT_TYPE = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")


class EndpointNotFound(OutboxError):
    """No endpoint has this id."""


def new_endpoint_id() -> str:
    """``ep_`` + a ULID."""
    return f"ep_{new_id()}"


def check_events(events: Iterable[str]) -> list[str]:
    """The event types, checked: at least one; each like ``invoice.paid``, or ``*``.

    Raises:
        OutboxError: none, or one that is not an event type.
    """
    found = list(dict.fromkeys(e.strip() for e in events if e.strip()))
    if not found:
        raise OutboxError("name at least one event type (--events invoice.paid,… or '*')")
    for event in found:
        if event != ALL_EVENTS and not _EVENT_TYPE.match(event):
            raise OutboxError(f"{event[:40]!r} is not an event type (letters, digits and "
                              "_ . : -, at most 100; or '*' for all)")
    return found


def add(session: Session, url: str, events: Iterable[str], *, box: SecretBox,
        rate_limit: str | None = None, allow_hosts: Iterable[str] = (),
        now: datetime | None = None) -> tuple[WebhookEndpoint, str]:
    """Register an endpoint (added to ``session``; the caller commits).

    Returns:
        The row and its signing secret in clear (show it once; it is stored encrypted).

    Raises:
        OutboxError: the URL is refused (the guard's reason), no or a bad event type,
            or a bad rate limit.
    """
    if len(url) > MAX_URL_LENGTH:
        raise OutboxError(f"refused URL: longer than {MAX_URL_LENGTH} characters")
    if not url.isprintable() or any(c.isspace() for c in url):
        raise OutboxError("refused URL: it holds spaces or control characters")
    try:
        ssrf.check_url(url, allow_hosts)
    except ssrf.Refused as exc:
        raise OutboxError(f"refused URL: {exc}") from None
    event_types = check_events(events)
    if rate_limit is not None:
        try:
            rate_limit = str(RateSpec.parse(rate_limit))
        except ValueError as exc:
            raise OutboxError(f"--rate-limit: {exc}") from None
    secret = contract.new_secret()
    now = now or utcnow()
    endpoint = WebhookEndpoint(id=new_endpoint_id(), url=url, event_types=event_types,
                               rate_limit=rate_limit, status=ENABLED,
                               secret=box.encrypt(secret), created_at=now, updated_at=now)
    session.add(endpoint)
    return endpoint, secret


def get(session: Session, endpoint_id: str) -> WebhookEndpoint:
    """The endpoint. Raises ``EndpointNotFound``."""
    endpoint = session.get(WebhookEndpoint, endpoint_id)
    if endpoint is None:
        raise EndpointNotFound(f"no endpoint {endpoint_id[:40]!r} (see outbox endpoints list)")
    return endpoint


def all_endpoints(session: Session) -> list[WebhookEndpoint]:
    """Every endpoint, oldest first."""
    return list(session.scalars(select(WebhookEndpoint).order_by(WebhookEndpoint.created_at,
                                                                 WebhookEndpoint.id)))


def disable(session: Session, endpoint_id: str, reason: str, now: datetime | None = None
            ) -> WebhookEndpoint:
    """Disable the endpoint: its messages dead-letter ``endpoint_disabled`` until
    ``enable``. Raises ``EndpointNotFound``."""
    endpoint = get(session, endpoint_id)
    now = now or utcnow()
    endpoint.status, endpoint.disabled_reason = DISABLED, reason[:255]
    endpoint.disabled_at = endpoint.updated_at = now
    return endpoint


def enable(session: Session, endpoint_id: str, now: datetime | None = None) -> WebhookEndpoint:
    """Enable the endpoint again (its dead letters can then be re-driven).
    Raises ``EndpointNotFound``."""
    endpoint = get(session, endpoint_id)
    endpoint.status, endpoint.disabled_reason, endpoint.disabled_at = ENABLED, None, None
    endpoint.updated_at = now or utcnow()
    return endpoint


def rotate_secret(session: Session, endpoint_id: str, *, box: SecretBox,
                  previous_lifetime: timedelta = PREVIOUS_SECRET_LIFETIME,
                  now: datetime | None = None) -> str:
    """Give the endpoint a new secret; the current one signs too (second signature) for
    ``previous_lifetime``. Returns the new secret in clear (show it once).

    Raises:
        EndpointNotFound.
    """
    endpoint = get(session, endpoint_id)
    now = now or utcnow()
    secret = contract.new_secret()
    endpoint.previous_secret = endpoint.secret
    endpoint.previous_secret_expires_at = now + previous_lifetime
    endpoint.secret = box.encrypt(secret)
    endpoint.updated_at = now
    return secret


def as_dict(endpoint: WebhookEndpoint, now: datetime | None = None) -> dict[str, Any]:
    """The endpoint for listings and JSON: never a secret."""
    expires = endpoint.previous_secret_expires_at
    rotating = endpoint.previous_secret is not None and expires and expires > (now or utcnow())
    return {"id": endpoint.id, "url": endpoint.url, "events": list(endpoint.event_types),
            "rate_limit": endpoint.rate_limit, "status": endpoint.status,
            "disabled_reason": endpoint.disabled_reason,
            "disabled_at": iso(endpoint.disabled_at),
            "previous_secret_expires_at": iso(expires) if rotating else None,
            "created_at": iso(endpoint.created_at), "updated_at": iso(endpoint.updated_at)}


def subscribed(endpoint: WebhookEndpoint, event_type: str) -> bool:
    """Whether the endpoint wants ``event_type``."""
    return ALL_EVENTS in endpoint.event_types or event_type in endpoint.event_types


def publish(session: Session, event_type: str, data: dict[str, Any], *, idempotency_key: str,
            occurred_at: datetime | None = None, correlation_id: str | None = None
            ) -> list[Message]:
    """Enqueue one ``webhooks.deliver`` per enabled endpoint subscribed to ``event_type``,
    in the caller's transaction (nothing is sent before it commits).

    Args:
        session: the caller's session.
        event_type: e.g. ``invoice.paid``.
        data: the event's data (a JSON object).
        idempotency_key: the event's key; each endpoint's message gets
            ``<key>:<endpoint id>``, so publishing the same event again adds nothing.
        occurred_at: when the event happened (naive UTC or aware), sent as the body's
            ``timestamp``; without it each attempt sends its own time.
        correlation_id: passed to every message.

    Returns:
        The messages, one per endpoint (none when nobody subscribes).

    Raises:
        InvalidMessage: a bad event type, data or key (see ``enqueue``).
        IdempotencyConflict: the key was used for another event.
    """
    payload: dict[str, Any] = {"event_type": event_type, "data": data}
    if occurred_at is not None:
        payload["timestamp"] = occurred_at.isoformat(timespec="milliseconds") + (
            "Z" if occurred_at.tzinfo is None else "")
    endpoints = session.scalars(select(WebhookEndpoint).where(WebhookEndpoint.status == ENABLED)
                                .order_by(WebhookEndpoint.id)).all()
    return [enqueue(session, provider=PROVIDER, operation=OPERATION,
                    payload={"endpoint_id": e.id, **payload},
                    idempotency_key=f"{idempotency_key}:{e.id}", correlation_id=correlation_id)
            for e in endpoints if subscribed(e, event_type)]


class SqlEndpointStore:
    """The provider's ``EndpointStore`` on the outbox database: reads an endpoint with its
    secrets decrypted (the previous one while unexpired) and disables one."""

    def __init__(self, sessions: Callable[[], sessionmaker[Session]],
                 box: Callable[[], SecretBox] = secretbox.current,
                 clock: Callable[[], datetime] = utcnow):
        """Args:
            sessions: returns the session factory (called per use, so it may be lazy:
                the worker's ``tasks.runtime.sessions``).
            box: returns the secret box (default ``secretbox.current``: the configured
                keys, read again when they change, so a key added to the key file is used
                without a restart).
            clock: naive UTC now, for the previous secret's expiry.
        """
        self._sessions, self._box, self._clock = sessions, box, clock

    def get(self, endpoint_id: str) -> Endpoint | None:
        """See ``EndpointStore.get``. Raises ConfigurationError (secrets unreadable)."""
        with self._sessions()() as session:
            row = session.get(WebhookEndpoint, endpoint_id)
            if row is None:
                return None
            box = self._box()
            tokens = [row.secret]
            if (row.previous_secret and row.previous_secret_expires_at
                    and row.previous_secret_expires_at > self._clock()):
                tokens.append(row.previous_secret)
            return Endpoint(id=row.id, url=row.url,
                            secrets=tuple(box.decrypt(t) for t in tokens),
                            enabled=row.status == ENABLED, disabled_reason=row.disabled_reason,
                            rate_limit=row.rate_limit)

    def disable(self, endpoint_id: str, reason: str) -> None:
        """See ``EndpointStore.disable``: one conditional UPDATE (an enabled endpoint only)."""
        now = self._clock()
        with self._sessions().begin() as session:
            session.execute(update(WebhookEndpoint)
                            .where(WebhookEndpoint.id == endpoint_id,
                                   WebhookEndpoint.status == ENABLED)
                            .values(status=DISABLED, disabled_reason=reason[:255],
                                    disabled_at=now, updated_at=now))
