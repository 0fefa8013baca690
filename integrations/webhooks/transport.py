"""HTTP to customers' endpoints: the shared transport's policy (TLS verified, TLS >= 1.2,
no redirects, no urllib3 retries, no proxy variables) through the SSRF guard.

Every new connection, http or https, goes through ``ssrf.GuardedAdapter``: the host is
resolved and the address actually connected to must be public (or the host allow-listed,
``OUTBOX_WEBHOOKS_ALLOW_HOSTS``). A refused address is a ``ClientError`` ``ssrf_refused``:
no connection was made and retrying cannot help — not the ``Transient`` "could not connect"
that ``integrations.http.translate`` makes of other connect failures.
"""

from __future__ import annotations

import threading
from collections.abc import Collection

import requests

from integrations.errors import Ambiguous, ClientError
from integrations.http import NO_RETRIES, RequestsTransport, _causes, tls_context
from integrations.ssrf import AddressRefused, Deadline, GuardedAdapter


class _GuardedTlsAdapter(GuardedAdapter):
    """The guard, with the shared client's TLS floor (>= 1.2, certificates verified)."""

    def __init__(self, allow_hosts: Collection[str], pool_size: int):
        self._ssl_context = tls_context()
        super().__init__(allow_hosts, pool_connections=4, pool_maxsize=pool_size,
                         max_retries=NO_RETRIES)

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
        """Send, and read the status and headers only: the body is the customer's, never
        kept, so not a byte of it is read (a flood, or a drip holding the call) and the
        connection is closed. The whole call lasts at most connect + read timeout
        (``ssrf.Deadline``): a slow endpoint cannot hold a worker thread, or outlive the
        permit of its concurrency cap.

        Raises:
            ClientError: ``ssrf_refused``, the guard refused the address (nothing sent).
            Ambiguous: ``deadline``, the call took longer (it may have been received).
            requests.RequestException: any other transport failure, as usual.
        """
        limit_s = sum(timeout)
        deadline = Deadline()
        timer = threading.Timer(limit_s, deadline.expire)
        timer.daemon = True
        try:
            with deadline:
                timer.start()
                adapter = self.session.get_adapter(prepared.url)
                response = adapter.send(prepared, stream=True, timeout=timeout, verify=True,
                                        cert=None, proxies={})
                response.close()
                if deadline.expired:   # a cut answer can parse as a complete one
                    raise Ambiguous(f"the endpoint took longer than {limit_s:g} s",
                                    code="deadline")
                response._content = b""   # read as empty by HttpClient; nothing was read
                return response
        except requests.ConnectionError as exc:
            if any(isinstance(e, AddressRefused) for e in _causes(exc)):
                raise ClientError("the endpoint's host resolves to a non-public address",
                                  code="ssrf_refused") from exc
            if deadline.expired:
                raise Ambiguous(f"the endpoint took longer than {limit_s:g} s",
                                code="deadline") from exc
            raise
        except requests.RequestException as exc:
            if deadline.expired:
                raise Ambiguous(f"the endpoint took longer than {limit_s:g} s",
                                code="deadline") from exc
            raise
        finally:
            timer.cancel()
