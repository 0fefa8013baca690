"""Which providers exist, and one ready-to-use ``Provider`` per name per process.

Adding a provider = one adapter module + one line in ``_BUILT_IN``, or, from a package of
your own, an ``outbox.providers`` entry point (``integrations.plugins``).

Providers are built lazily from the environment on first use and cached; ``reset()``
drops the cache and the shared Redis client (tests that change the environment call it).
The cache is also dropped in a forked child, so prefork workers never share pooled
sockets with their parent.

``get_provider`` providers are protected (``integrations.protection``: quota, breaker,
concurrency cap, rate limit, 429 pause) through the process's shared Redis client
(``REDIS_URL``). ``build_provider`` protects only when given ``redis`` or ``protection``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import schemas
from integrations import checks, plugins
from integrations.base import UNKNOWN, Adapter, Delivery, Verification
from integrations.crm import CrmAdapter
from integrations.email import EmailAdapter
from integrations.errors import (
    ClientError,
    ConfigurationError,
    IntegrationError,
    InvalidResponse,
    RateLimited,
)
from integrations.http import HttpClient
from integrations.oauth import REAUTHORIZATION_REQUIRED
from integrations.payments import PaymentsAdapter
from integrations.protection import DEFAULT_429_PAUSE_S, Protection, ProtectionSettings
from integrations.protection import store as protection_store
from integrations.settings import ProviderSettings, env_name, get_float
from integrations.webhooks.adapter import WebhooksAdapter

_BUILT_IN: dict[str, type[Adapter]] = {
    "payments": PaymentsAdapter,
    "email": EmailAdapter,
    "crm": CrmAdapter,
    "webhooks": WebhooksAdapter,
}
assert set(_BUILT_IN) == plugins.BUILT_IN


def adapters() -> Mapping[str, type[Adapter]]:
    """Every provider's adapter class: the built-in ones and the installed plugins'.

    Raises:
        ConfigurationError: a plugin cannot be loaded, or takes a built-in provider's name.
    """
    found = plugins.discovered()   # refuses a plugin named like a built-in provider
    return {**_BUILT_IN, **found} if found else _BUILT_IN


log = logging.getLogger("integrations.registry")
_lock = threading.Lock()
_providers: dict[str, Provider] = {}


@dataclass
class Provider:
    """An adapter bound to its settings and HTTP client: the delivery task's one entry point."""

    adapter: Adapter
    settings: ProviderSettings
    client: HttpClient
    protection: Protection | None = None

    @property
    def name(self) -> str:
        """The provider name (``payments``)."""
        return self.adapter.name

    def deliver(self, operation: str, payload: Mapping[str, Any], idempotency_key: str, *,
                message_id: str | None = None) -> Delivery:
        """Perform ``operation`` at the provider once (plus one retry after a 401).

        Validates the payload against its operation schema, builds the request, passes the
        protection guards (may sleep briefly for a rate-limit slot or permit), sends it;
        on a 401 refreshes the credential and sends once more; parses the response. Every
        response's rate-limit headers are observed, a 429 pauses the provider for every
        worker, and the outcome is reported to the breaker.

        Args:
            operation: e.g. ``charge``.
            payload: the operation payload.
            idempotency_key: the outbox message's key; the same on every attempt.
            message_id: the outbox message's id (the webhooks provider's ``webhook-id``);
                the other providers ignore it.

        Returns:
            The ``Delivery`` (status code, provider reference, safe summary).

        Raises:
            IntegrationError: only subclasses of it — ``ClientError`` (code
                ``unknown_operation``/``invalid_payload``/``invalid_idempotency_key``) for a
                message that can never be sent, ``AuthError`` after the second 401,
                ``Deferred`` when protection says wait (no call made), and whatever the
                client and the adapter classify; with ``probe`` set when the failed call
                was a half-open breaker probe.
        """
        request = self._build(operation, payload, idempotency_key)
        return self._protected(self.protection, operation, request)

    def _protected(self, protection: Protection | None, operation: str, request) -> Delivery:
        """Send ``request`` under ``protection``'s guards (the provider's; the webhooks
        provider passes the endpoint's own) and parse the answer."""
        if protection is None:
            return self._send(operation, request, None)
        permit = protection.admit(operation)
        error: BaseException | None = None
        try:
            return self._send(operation, request, protection)
        except BaseException as exc:
            error = exc
            if permit.probe and isinstance(exc, IntegrationError):
                # What a failed probe means for its message is outbox.decisions' call; if it
                # is deferred, the breaker is open again for open_s: no use coming back sooner.
                exc.probe = True
                if exc.retry_after_s is None:
                    exc.retry_after_s = protection.settings.breaker.open_s
            raise
        finally:
            permit.release(error)

    def verify(self, operation: str, payload: Mapping[str, Any],
               idempotency_key: str) -> Verification:
        """Ask the provider whether ``operation`` under ``idempotency_key`` took effect (one
        lookup, through the same protection as a delivery).

        Returns:
            The ``Verification``; ``unknown`` when the adapter has no lookup.

        Raises:
            IntegrationError: as ``deliver`` (``Deferred`` when protection says wait, the
                classified error of a failed lookup).
        """
        request = self.adapter.verify_request(operation, payload, idempotency_key)
        if request is None:
            return Verification(UNKNOWN)
        # The permit releases itself with the outcome (the breaker hears of a failure).
        with (self.protection.admit(operation) if self.protection is not None
              else nullcontext()):
            return self._exchange(operation, request, lambda response: (
                self.adapter.verification(operation, response, idempotency_key, payload)),
                self.protection)

    def _send(self, operation: str, request, protection: Protection | None) -> Delivery:
        return self._exchange(operation, request,
                              lambda response: self._parse(operation, response), protection)

    def _exchange(self, operation: str, request, read, protection: Protection | None):
        """Send ``request`` (once more after a 401, the credential re-read first) and
        return what ``read`` makes of the response; a 429 pauses every worker's calls
        under ``protection``."""
        auth = self.adapter.auth
        response = self._observed(self.client.send(request, auth=auth), protection)
        if response.status_code == 401 and auth is not None:
            log.info("%s: 401, refreshing credentials and retrying once", self.name,
                     extra={"provider": self.name})
            self.client.credentials.refresh()
            if protection is not None:
                protection.pace(operation)   # the second request needs its own slot
            response = self._observed(self.client.send(request, auth=auth), protection)
        try:
            return read(response)
        except RateLimited as exc:
            if protection is not None:
                protection.pause(exc.retry_after_s or DEFAULT_429_PAUSE_S)
            raise

    @staticmethod
    def _observed(response, protection: Protection | None):
        if protection is not None:
            protection.observe(response)
        return response

    def _build(self, operation: str, payload: Mapping[str, Any], idempotency_key: str):
        if operation not in self.adapter.operations:
            raise ClientError(f"{self.name} has no operation {operation!r}", code="unknown_operation")
        try:
            # The same rule enqueue applies: the key becomes an HTTP header value.
            schemas.check_idempotency_key(idempotency_key)
        except schemas.SchemaError as exc:
            raise ClientError(f"idempotency key {exc.reason}",
                              code="invalid_idempotency_key") from None
        try:
            schemas.validate_operation(self.name, operation, payload)
        except KeyError:
            pass  # no schema for this operation: the adapter's own checks apply
        except schemas.SchemaError as exc:
            raise ClientError(str(exc), code="invalid_payload") from exc
        try:
            return self.adapter.build_request(operation, payload, idempotency_key)
        except (ValueError, KeyError, TypeError) as exc:
            raise ClientError(f"cannot build {operation} request: {type(exc).__name__}",
                              code="invalid_payload") from exc

    def _parse(self, operation: str, response) -> Delivery:
        try:
            return self.adapter.parse_response(operation, response)
        except IntegrationError:
            raise
        except Exception as exc:
            # An adapter bug on a response we cannot read: the effect may have happened.
            raise InvalidResponse(f"could not parse response ({type(exc).__name__})",
                                  status_code=response.status_code) from exc

    def close(self) -> None:
        """Release the client's pooled connections (the Redis client is shared: kept)."""
        self.client.close()


def verify_after(name: str, environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds after an ambiguous failure before provider ``name`` is asked whether the
    operation took effect (``OUTBOX_<NAME>_VERIFY_AFTER``, default the adapter's); None when
    it cannot verify (or is unknown).

    Raises:
        ConfigurationError: the setting is not a number of seconds > 0.
    """
    adapter = adapters().get(name)
    if adapter is None or adapter.verify_after_s is None:
        return None
    env = os.environ if environ is None else environ
    return get_float(env, env_name(name, "VERIFY_AFTER"), adapter.verify_after_s)


def supports_idempotency(name: str) -> bool:
    """Whether provider ``name`` deduplicates retries by idempotency key (False if unknown)."""
    adapter = adapters().get(name)
    return adapter is not None and adapter.supports_idempotency


def known_providers() -> list[str]:
    """Names of every provider with an adapter (plugins' included), sorted."""
    return sorted(adapters())


@dataclass(frozen=True)
class ProviderCheck:
    """Whether a provider can work here and now, for workers' start-up and for health.

    Attributes:
        provider: the process's ``Provider``, or None when its settings are invalid.
        settings_error: why its settings are invalid, or None.
        credential_error: why its credential cannot be read, or None.
        warnings: about its credential (a key file others can read).
        reauthorize: the credential is an OAuth2 grant that is missing or revoked: its
            messages wait for ``outbox <name> connect`` (workers start anyway).
    """

    provider: Provider | None
    settings_error: str | None = None
    credential_error: str | None = None
    warnings: tuple[str, ...] = ()
    reauthorize: bool = False


def check_provider(name: str) -> ProviderCheck:
    """Build (or reuse) provider ``name`` and read its credential now."""
    try:
        provider = get_provider(name)
    except (ConfigurationError, KeyError) as exc:
        return ProviderCheck(None, settings_error=str(exc))
    if provider.adapter.auth is None:
        return ProviderCheck(provider)
    try:
        return ProviderCheck(provider, warnings=tuple(provider.client.credentials.check()))
    except IntegrationError as exc:
        return ProviderCheck(provider, credential_error=exc.detail,
                             reauthorize=exc.code == REAUTHORIZATION_REQUIRED)


DEFAULT_LATENCY_BASELINE_MS = 1000.0


def provider_facts(environ: Mapping[str, str] | None = None) -> dict[str, dict]:
    """Each provider's live state, for health (``outbox.health.provider_findings``): its
    shared limiter/quota/breaker state (Redis), whether its credential can be read,
    whether its settings load, its p99 latency baseline
    (``OUTBOX_<NAME>_LATENCY_BASELINE_MS``, default 1,000 ms) and its last synthetic health
    check (``integrations.checks``)."""
    env = os.environ if environ is None else environ
    facts = {}
    for name in known_providers():
        check = check_provider(name)
        try:
            baseline = get_float(env, f"OUTBOX_{name.upper()}_LATENCY_BASELINE_MS",
                                 DEFAULT_LATENCY_BASELINE_MS)
        except ConfigurationError as exc:
            baseline = None
            check = ProviderCheck(check.provider, settings_error=str(exc),
                                  credential_error=check.credential_error)
        protection = check.provider.protection if check.provider else None
        facts[name] = {
            "protection": protection.snapshot() if protection else None,
            "credential": check.credential_error, "settings_error": check.settings_error,
            "latency_baseline_ms": baseline,
            "check": checks.load(protection.client, name) if protection else None}
    return facts


def build_provider(name: str, environ: Mapping[str, str] | None = None, *,
                   transport=None, redis=None, protection: Protection | None = None
                   ) -> Provider:
    """Build a fresh, uncached ``Provider`` (tests pass a fake ``transport``).

    The protection settings are always read and validated (bad rate specs fail here, at
    start-up); protection is enabled only with ``redis`` or ``protection``.

    Args:
        name: provider name.
        environ: the environment (default ``os.environ``).
        transport: the HTTP I/O object (default: the real one).
        redis: a Redis client or URL holding the shared protection state.
        protection: a ready ``Protection`` (wins over ``redis``). Neither: unprotected.

    Raises:
        KeyError: unknown provider.
        ConfigurationError: its settings are invalid.
    """
    known = adapters()
    if name not in known:
        raise KeyError(f"unknown provider {name!r}; known: {', '.join(sorted(known))}")
    adapter = known[name]()
    settings = ProviderSettings.from_env(name, environ, has_base_url=adapter.has_base_url)
    limits = ProtectionSettings.from_env(
        name, environ, operations=adapter.operations,
        default_rate_limit=adapter.rate_limit,
        default_operation_rate_limits=adapter.operation_rate_limits)
    if isinstance(redis, str):
        redis = protection_store.shared_redis(redis)
    # A permit must outlast the longest call: connect + read timeout + the slot wait.
    lease_s = settings.connect_timeout_s + settings.read_timeout_s + limits.max_wait_s + 5
    if protection is None and redis is not None:
        protection = Protection(limits, redis, lease_s=lease_s)
    if isinstance(adapter, WebhooksAdapter):
        # Imported here: it subclasses Provider, defined in this module.
        from integrations.webhooks.provider import WebhooksProvider

        return WebhooksProvider.build(adapter, settings, environ, transport=transport,
                                      protection=protection, lease_s=lease_s)
    credential = adapter.credential(settings, environ,
                                    redis if redis is not None else
                                    protection.client if protection is not None else None)
    return Provider(adapter, settings, HttpClient(settings, transport, credentials=credential),
                    protection)


def get_provider(name: str) -> Provider:
    """The process-wide ``Provider`` for ``name``, built from ``os.environ`` on first use.

    Raises:
        KeyError: unknown provider.
        ConfigurationError: its settings are invalid.
    """
    provider = _providers.get(name)
    if provider is not None:
        return provider
    with _lock:
        if name not in _providers:
            _providers[name] = build_provider(name, redis=protection_store.redis_url())
        return _providers[name]


def reset() -> None:
    """Close and forget every cached provider and the shared Redis client, so the next
    ``get_provider`` re-reads the env."""
    with _lock:
        providers = list(_providers.values())
        _providers.clear()
    for provider in providers:
        provider.close()
    protection_store.reset()


def _forget_after_fork() -> None:
    # The parent still uses these sockets: forget them in the child, never close them.
    # A fresh lock too: another parent thread may have held it at the fork.
    global _lock
    _lock = threading.Lock()
    _providers.clear()


os.register_at_fork(after_in_child=_forget_after_fork)
