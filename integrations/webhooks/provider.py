"""``WebhooksProvider``: a delivery looks its endpoint up, is signed, and passes the
endpoint's own protection — one circuit breaker, rate limit, 429 pause and concurrency cap
per endpoint (``OUTBOX_WEBHOOKS_MAX_CONCURRENCY``, default ``DEFAULT_ENDPOINT_CAP``), shared
by every worker through Redis under ``outbox:webhooks:<endpoint id>:…``. A dead endpoint
opens its own breaker and fills its own cap; the other endpoints' calls never wait for it
(a bulkhead each): no thread waits for an endpoint's permit or slot (``max_wait_s`` 0; a
message whose endpoint has its cap in flight comes back after ``BUSY_RETRY_S``).

Each endpoint's ``Protection`` copies the provider's settings (``OUTBOX_WEBHOOKS_RATE_LIMIT``,
``_MAX_CONCURRENCY``, ``_BREAKER_*``…, read once; not ``_MAX_WAIT``) with its own name and,
when the endpoint has one, its own rate limit. They are built on first use and cached per
process (with the provider, which ``integrations.registry`` forgets after a fork); a new
rate limit for an endpoint builds a new one. The provider's own ``protection`` holds these
defaults and guards no call.

Before anything is sent: an unknown endpoint or a disabled one is a ``ClientError``
(``unknown_endpoint``, ``endpoint_disabled``), a URL that is neither https nor an
allow-listed http host is ``ssrf_refused``; no endpoint store installed, or secrets that
cannot be decrypted, defer the message (``CredentialUnavailable``). A 410 disables the
endpoint, reason "410 Gone".
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from integrations import ssrf
from integrations.base import Delivery
from integrations.errors import (
    ClientError,
    ConfigurationError,
    CredentialUnavailable,
    Deferred,
)
from integrations.http import HttpClient
from integrations.protection import Protection, RateSpec
from integrations.registry import Provider
from integrations.sanitize import sanitize
from integrations.settings import ProviderSettings
from integrations.webhooks import endpoints
from integrations.webhooks.adapter import WebhooksAdapter, sign
from integrations.webhooks.endpoints import GONE_REASON, Endpoint
from integrations.webhooks.transport import GuardedTransport

NOT_INSTALLED_RETRY_S = 30.0

# Calls in flight to one endpoint, fleet-wide, unless OUTBOX_WEBHOOKS_MAX_CONCURRENCY says:
# an endpoint that hangs holds at most this many worker threads, whatever its backlog.
DEFAULT_ENDPOINT_CAP = 2
# A message whose endpoint has its cap in flight comes back after this.
BUSY_RETRY_S = 5.0


@dataclass
class WebhooksProvider(Provider):
    """The webhooks ``Provider``: per-endpoint URL, signature and protection."""

    allow_hosts: frozenset[str] = frozenset()
    lease_s: float = 30.0
    _protections: dict[str, tuple[str | None, Protection]] = field(default_factory=dict,
                                                                    repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def build(cls, adapter: WebhooksAdapter, settings: ProviderSettings,
              environ: Mapping[str, str] | None, *, transport=None,
              protection: Protection | None, lease_s: float) -> WebhooksProvider:
        """The provider over the SSRF-guarded transport (unless a test passes one);
        ``protection`` holds the per-endpoint defaults (None: unprotected)."""
        hosts = endpoints.allow_hosts(environ)
        transport = transport or GuardedTransport(settings.max_concurrency, hosts)
        return cls(adapter, settings, HttpClient(settings, transport), protection,
                   allow_hosts=hosts, lease_s=lease_s)

    def deliver(self, operation: str, payload: Mapping[str, Any], idempotency_key: str, *,
                message_id: str | None = None) -> Delivery:
        """POST the event to its endpoint, signed, under the endpoint's protection.

        Args:
            operation: ``deliver``.
            payload: ``{"endpoint_id", "event_type", "data"}`` (optional ``timestamp``).
            idempotency_key: the message's key (checked, not sent).
            message_id: the outbox message id: the ``webhook-id``.

        Raises:
            ClientError: ``unknown_endpoint``, ``endpoint_disabled``, ``ssrf_refused``,
                ``redirect_refused``, ``endpoint_gone`` (410: the endpoint is disabled),
                another 4xx, or an invalid payload.
            CredentialUnavailable: no endpoint store, or the secrets cannot be decrypted.
            IntegrationError: as ``Provider.deliver`` (Deferred, RateLimited, Transient…).
        """
        request = self._build(operation, payload, idempotency_key)
        if not message_id:
            raise ClientError("a webhook needs its outbox message id (the webhook-id)",
                              code="no_message_id")
        endpoint = self._endpoint(payload["endpoint_id"])
        self._check_url(endpoint)
        protection = self._protection_for(endpoint)
        signed = sign(request, endpoint, message_id, datetime.now(UTC))
        try:
            return self._protected(protection, operation, signed)
        except ClientError as exc:
            if exc.status_code == 410:
                self._store().disable(endpoint.id, GONE_REASON)
            raise
        except Deferred as exc:
            if exc.code == "concurrency":   # its calls in flight may last a whole deadline
                exc.retry_after_s = max(exc.retry_after_s or 0.0, BUSY_RETRY_S)
            raise

    def _store(self) -> endpoints.EndpointStore:
        store = endpoints.installed()
        if store is None:
            raise CredentialUnavailable("no endpoint store installed in this process",
                                        code="no_endpoint_store",
                                        retry_after_s=NOT_INSTALLED_RETRY_S)
        return store

    def _endpoint(self, endpoint_id: str) -> Endpoint:
        try:
            endpoint = self._store().get(endpoint_id)
        except ConfigurationError as exc:   # OUTBOX_SECRET_KEY missing or wrong: wait
            raise CredentialUnavailable(str(exc), code="secret_unreadable",
                                        retry_after_s=NOT_INSTALLED_RETRY_S) from None
        if endpoint is None:
            raise ClientError(f"no endpoint {sanitize(endpoint_id, 40)}",
                              code="unknown_endpoint")
        if not endpoint.enabled:
            raise ClientError(f"endpoint {endpoint.id} is disabled "
                              f"({sanitize(endpoint.disabled_reason or 'no reason', 120)})",
                              code="endpoint_disabled")
        return endpoint

    def _check_url(self, endpoint: Endpoint) -> None:
        """The URL's form, as at registration (a row may not have gone through it); the
        address itself is the guard's, on connecting."""
        try:
            ssrf.check_form(endpoint.url, self.allow_hosts)
        except ssrf.Refused as exc:
            raise ClientError(f"the endpoint URL is refused: {exc}",
                              code="ssrf_refused") from None

    def _protection_for(self, endpoint: Endpoint) -> Protection | None:
        """The endpoint's own protection, built on first use (None when unprotected)."""
        if self.protection is None:
            return None
        cached = self._protections.get(endpoint.id)
        if cached is not None and cached[0] == endpoint.rate_limit:
            return cached[1]
        defaults = self.protection.settings
        try:
            rate = RateSpec.parse(endpoint.rate_limit) if endpoint.rate_limit else None
        except ValueError:
            raise ClientError(f"endpoint {endpoint.id} has an invalid rate limit",
                              code="invalid_endpoint") from None
        # No waiting for an endpoint's permit or slot: a thread that slept for a busy
        # endpoint would be a thread taken from the others (the message is deferred).
        settings = replace(defaults, name=f"{self.name}:{endpoint.id}",
                           rate_limit=rate or defaults.rate_limit,
                           max_concurrency=defaults.max_concurrency or DEFAULT_ENDPOINT_CAP,
                           max_wait_s=0.0)
        protection = Protection(settings, self.protection.client, lease_s=self.lease_s)
        with self._lock:
            self._protections[endpoint.id] = (endpoint.rate_limit, protection)
        return protection
