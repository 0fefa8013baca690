"""HTTP to customers' endpoints: the shared transport's policy (TLS verified, TLS >= 1.2,
no redirects, no urllib3 retries, no proxy variables) through the SSRF guard.

Every new connection, http or https, goes through ``ssrf.GuardedAdapter``: the host is
resolved and the address actually connected to must be public (or the host allow-listed,
``OUTBOX_WEBHOOKS_ALLOW_HOSTS``). A refused address is a ``ClientError`` ``ssrf_refused``:
no connection was made and retrying cannot help — not the ``Transient`` "could not connect"
that ``integrations.http.translate`` makes of other connect failures.
"""

from __future__ import annotations

import ssl
from collections.abc import Collection

import requests
from urllib3.util.retry import Retry

from integrations.errors import ClientError
from integrations.http import RequestsTransport, _causes
from integrations.ssrf import AddressRefused, GuardedAdapter


class _GuardedTlsAdapter(GuardedAdapter):
    """The guard, with the shared client's TLS floor (>= 1.2, certificates verified)."""

    def __init__(self, allow_hosts: Collection[str], pool_size: int):
        self._ssl_context = ssl.create_default_context()
        self._ssl_context.minimum_version = ssl.TLSVersion.TLSv1_2
        super().__init__(allow_hosts, pool_connections=4, pool_maxsize=pool_size,
                         max_retries=Retry(total=0, read=False, redirect=False))

    def init_poolmanager(self, connections, maxsize, block=False, **pool_kwargs):
        pool_kwargs["ssl_context"] = self._ssl_context
        super().init_poolmanager(connections, maxsize, block=block, **pool_kwargs)


class GuardedTransport(RequestsTransport):
    """``RequestsTransport`` whose every connection is checked by the SSRF guard."""

    def __init__(self, pool_size: int, allow_hosts: Collection[str] = ()):
        """Args: pool_size: connections kept per endpoint host; allow_hosts: hosts exempt
        from the address check."""
        super().__init__(pool_size)
        guarded = _GuardedTlsAdapter(allow_hosts, pool_size)
        self.session.mount("https://", guarded)
        self.session.mount("http://", guarded)

    def send(self, prepared: requests.PreparedRequest,
             timeout: tuple[float, float]) -> requests.Response:
        """As ``RequestsTransport.send``.

        Raises:
            ClientError: ``ssrf_refused``, the guard refused the address (nothing sent).
            requests.RequestException: any other transport failure, as usual.
        """
        try:
            return super().send(prepared, timeout)
        except requests.ConnectionError as exc:
            if any(isinstance(e, AddressRefused) for e in _causes(exc)):
                raise ClientError("the endpoint's host resolves to a non-public address",
                                  code="ssrf_refused") from exc
            raise
