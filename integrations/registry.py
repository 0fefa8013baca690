"""Which providers exist, and one ready-to-use ``Provider`` per name per process.

Adding a provider = one adapter module + one line in ``_ADAPTERS``.

Providers are built lazily from the environment on first use and cached; ``reset()``
drops the cache (tests that change the environment call it). The cache is also dropped
in a forked child, so prefork workers never share pooled sockets with their parent.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import schemas
from integrations.base import Adapter, Delivery
from integrations.errors import ClientError, IntegrationError, InvalidResponse
from integrations.http import HttpClient
from integrations.payments import PaymentsAdapter
from integrations.settings import ProviderSettings

_ADAPTERS: dict[str, Callable[[], Adapter]] = {
    "payments": PaymentsAdapter,
    "email": lambda: __import__("integrations.email", fromlist=["_"]).EmailAdapter(),
}

log = logging.getLogger("integrations.registry")
_lock = threading.Lock()
_providers: dict[str, Provider] = {}


@dataclass
class Provider:
    """An adapter bound to its settings and HTTP client: the delivery task's one entry point."""

    adapter: Adapter
    settings: ProviderSettings
    client: HttpClient

    @property
    def name(self) -> str:
        """The provider name (``payments``)."""
        return self.adapter.name

    def deliver(self, operation: str, payload: Mapping[str, Any], idempotency_key: str) -> Delivery:
        """Perform ``operation`` at the provider once (plus one retry after a 401).

        Validates the payload against its operation schema, builds the request, sends it;
        on a 401 refreshes the credential and sends once more; parses the response.

        Args:
            operation: e.g. ``charge``.
            payload: the operation payload.
            idempotency_key: the outbox message's key; the same on every attempt.

        Returns:
            The ``Delivery`` (status code, provider reference, safe summary).

        Raises:
            IntegrationError: only subclasses of it — ``ClientError`` (code
                ``unknown_operation``/``invalid_payload``) for a message that can never be
                sent, ``AuthError`` after the second 401, and whatever the client and the
                adapter classify.
        """
        request = self._build(operation, payload, idempotency_key)
        auth = getattr(self.adapter, "auth", None)
        response = self.client.send(request, auth=auth)
        if response.status_code == 401 and auth is not None:
            log.info("%s: 401, refreshing credentials and retrying once", self.name,
                     extra={"provider": self.name})
            self.client.credentials.refresh()
            response = self.client.send(request, auth=auth)
        return self._parse(operation, response)

    def _build(self, operation: str, payload: Mapping[str, Any], idempotency_key: str):
        if operation not in self.adapter.operations:
            raise ClientError(f"{self.name} has no operation {operation!r}", code="unknown_operation")
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
        """Release the client's pooled connections."""
        self.client.close()


def known_providers() -> list[str]:
    """Names of every provider with an adapter, sorted."""
    return sorted(_ADAPTERS)


def build_provider(name: str, environ: Mapping[str, str] | None = None, *,
                   transport=None) -> Provider:
    """Build a fresh, uncached ``Provider`` (tests pass a fake ``transport``).

    Raises:
        KeyError: unknown provider.
        ConfigurationError: its settings are invalid.
    """
    if name not in _ADAPTERS:
        raise KeyError(f"unknown provider {name!r}; known: {', '.join(known_providers())}")
    settings = ProviderSettings.from_env(name, environ)
    return Provider(_ADAPTERS[name](), settings, HttpClient(settings, transport))


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
            _providers[name] = build_provider(name)
        return _providers[name]


def reset() -> None:
    """Close and forget every cached provider, so the next ``get_provider`` re-reads the env."""
    with _lock:
        providers = list(_providers.values())
        _providers.clear()
    for provider in providers:
        provider.close()


def _forget_after_fork() -> None:
    # The parent still uses these sockets: forget them in the child, never close them.
    # A fresh lock too: another parent thread may have held it at the fork.
    global _lock
    _lock = threading.Lock()
    _providers.clear()


os.register_at_fork(after_in_child=_forget_after_fork)
