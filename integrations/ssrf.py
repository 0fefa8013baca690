"""The SSRF guard for URLs that customers give us (issue 10 §2, signed outbound webhooks):
an address is refused unless it is public, checked when the URL is registered and again
on the address actually connected to, after DNS resolution (against DNS rebinding).

Refused: loopback, private (10/8, 172.16/12, 192.168/16), link-local and cloud metadata
(169.254.169.254, fd00:ec2::254), CGNAT (100.64/10), IPv6 ULA and link-local, IPv4-mapped
IPv6 of any of these, ``0.0.0.0``/``::``, multicast and reserved ranges — anything
``ipaddress`` does not call global. Decimal, hex and octal spellings (``2130706433``,
``0x7f.1``, ``0177.0.0.1``) are what the resolver turns them into, and that is what is
checked. Redirects are never followed (``integrations.http``). An explicit allow-list of
hosts (``OUTBOX_WEBHOOKS_ALLOW_HOSTS`` for the webhooks provider, empty by default) skips
the address check: the sandbox and the tests, on loopback.

Used by the webhooks provider (``integrations.webhooks``): ``outbox endpoints add`` checks
the URL, and every delivery goes through a ``GuardedAdapter``.

    check_url(url, allow_hosts)        at registration: ValueError naming the reason
    GuardedAdapter(allow_hosts)        a requests adapter whose every connection is checked;
                                       a refused address raises ``AddressRefused``
"""

from __future__ import annotations

import ipaddress
import socket
import urllib.parse
from collections.abc import Collection

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import NewConnectionError

from integrations.http import _ConnectFailuresNeverSent


class Refused(ValueError):
    """The URL or the address it resolves to may not be called."""


class AddressRefused(NewConnectionError):
    """A connection the guard refused: the host resolves to a non-public address. Nothing
    was connected to. A ``NewConnectionError`` ("could not connect") to urllib3 and
    requests; its own class, so that a caller can tell it from a failure worth retrying."""


def forbidden(address: str) -> str | None:
    """Why ``address`` (an IP literal) may not be connected to, or None if it is public."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])   # drop an IPv6 zone
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address (cloud metadata lives there)"
    if ip.is_unspecified:
        return "the unspecified address"
    if not ip.is_global:
        return "not a public address (private, CGNAT, ULA or reserved)"
    if ip.is_multicast:
        return "a multicast address"
    return None


def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (what a connection may use)."""
    return sorted({info[4][0] for info in socket.getaddrinfo(host, port,
                                                             type=socket.SOCK_STREAM)})


def check_url(url: str, allow_hosts: Collection[str] = ()) -> str:
    """The URL, if it may be registered: https (http only for an allowed host), a host, and
    every address it resolves to public.

    Raises:
        Refused: why not, in one line.
    """
    parts = urllib.parse.urlsplit(url)
    host = (parts.hostname or "").lower()
    if not host:
        raise Refused("the URL has no host")
    if parts.username or parts.password:
        raise Refused("the URL may not carry credentials")
    allowed = host in {h.lower() for h in allow_hosts}
    if parts.scheme != "https" and not (parts.scheme == "http" and allowed):
        raise Refused("the URL must be https")
    if allowed:
        return url
    try:
        port = parts.port or 443
        addresses = resolve(host, port)
    except (OSError, ValueError) as exc:
        raise Refused(f"{host} does not resolve ({type(exc).__name__})") from None
    for address in addresses:
        why = forbidden(address)
        if why:
            raise Refused(f"{host} resolves to {why}")
    return url


def _guarded_conn(self, base):
    """``_new_conn`` of ``base``, connecting only to a checked address of the host."""
    if self.host.lower() in self.allow_hosts:
        return base._new_conn(self)
    try:
        addresses = resolve(self._dns_host, self.port)
    except OSError as exc:
        raise NewConnectionError(self, f"cannot resolve {self.host}: {exc}") from exc
    safe = [a for a in addresses if forbidden(a) is None]
    if len(safe) != len(addresses) or not safe:
        raise AddressRefused(self, f"refused: {self.host} resolves to a non-public address")
    # Connect to the checked address itself: resolving again could answer otherwise.
    self._dns_host = safe[0]
    return base._new_conn(self)


class _GuardedHTTPConnection(HTTPConnection):
    allow_hosts: frozenset[str] = frozenset()

    def _new_conn(self):
        return _guarded_conn(self, HTTPConnection)


class _GuardedHTTPSConnection(_ConnectFailuresNeverSent):
    """Also types a failed TLS handshake as ``TlsHandshakeError`` ("never sent"), as the
    shared client's HTTPS connections do (``integrations.http``)."""

    allow_hosts: frozenset[str] = frozenset()

    def _new_conn(self):   # TLS still verifies the certificate against the host name
        return _guarded_conn(self, HTTPSConnection)


class GuardedAdapter(HTTPAdapter):
    """A requests transport adapter whose every new connection goes through the guard."""

    def __init__(self, allow_hosts: Collection[str] = (), **kwargs):
        hosts = frozenset(h.lower() for h in allow_hosts)
        self._classes = {
            "http": type("GuardedHTTPConnection", (_GuardedHTTPConnection,),
                         {"allow_hosts": hosts}),
            "https": type("GuardedHTTPSConnection", (_GuardedHTTPSConnection,),
                          {"allow_hosts": hosts}),
        }
        super().__init__(**kwargs)

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        http, https = self._classes["http"], self._classes["https"]
        self.poolmanager.pool_classes_by_scheme = {
            "http": type("GuardedHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": http}),
            "https": type("GuardedHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": https}),
        }
