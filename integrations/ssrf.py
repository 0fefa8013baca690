"""The SSRF guard for URLs that customers give us (issue 10 §2, signed outbound webhooks):
an address is refused unless it is public, checked when the URL is registered and again
on the address actually connected to, after DNS resolution (against DNS rebinding).

Refused: loopback, private (10/8, 172.16/12, 192.168/16), link-local and cloud metadata
(169.254.169.254, fd00:ec2::254), CGNAT (100.64/10), IPv6 ULA and link-local, IPv4-mapped
IPv6 of any of these (and NAT64 ``64:ff9b::/96`` and 6to4 ``2002::/16`` forms, judged by the
IPv4 address they carry; local NAT64, IPv4-compatible and -translated forms and Teredo
refused), ``0.0.0.0``/``::``, multicast and reserved ranges — anything ``ipaddress`` does
not call global. Decimal, hex and octal spellings (``2130706433``,
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
import threading
import urllib.parse
from collections.abc import Collection

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from urllib3.util.connection import create_connection

from integrations.http import _ConnectFailuresNeverSent


class Refused(ValueError):
    """The URL or the address it resolves to may not be called."""


class AddressRefused(NewConnectionError):
    """A connection the guard refused: the host resolves to a non-public address. Nothing
    was connected to. A ``NewConnectionError`` ("could not connect") to urllib3 and
    requests; its own class, so that a caller can tell it from a failure worth retrying."""


# IPv6 forms that carry an IPv4 address a gateway may turn into an IPv4 connection: the
# embedded address is what is judged (NAT64's well-known prefix, 6to4), or the form is
# refused outright (a local NAT64 prefix, the deprecated IPv4-compatible and -translated).
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_REFUSED_V6 = tuple(ipaddress.ip_network(n) for n in (
    "64:ff9b:1::/48", "::/96", "::ffff:0:0:0/96"))


def forbidden(address: str) -> str | None:
    """Why ``address`` (an IP literal) may not be connected to, or None if it is public."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])   # drop an IPv6 zone
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        elif ip.sixtofour is not None:
            ip = ip.sixtofour
        elif ip.teredo is not None:
            return "a Teredo address"
        elif any(ip in net for net in _REFUSED_V6) and not (ip.is_loopback
                                                             or ip.is_unspecified):
            return "an IPv6 form embedding an IPv4 address"
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
    # The resolver's order (RFC 6724's preference), each address once.
    return list(dict.fromkeys(info[4][0] for info in socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM)))


def check_form(url: str, allow_hosts: Collection[str] = ()) -> tuple[str, int, bool]:
    """The URL's host (lower case), port and whether the host is allow-listed, if its form
    may be called: https (http only to an allowed host), a host, a port, no credentials.
    At registration (``check_url``) and before each send (the address is the guard's then).

    Raises:
        Refused: why not, in one line.
    """
    try:
        parts = urllib.parse.urlsplit(url)
        host = (parts.hostname or "").lower()
    except ValueError:
        raise Refused("the URL is malformed") from None
    if not host:
        raise Refused("the URL has no host")
    if parts.username or parts.password:
        raise Refused("the URL may not carry credentials")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise Refused("the URL's port is not a port number") from None
    allowed = host in {h.lower() for h in allow_hosts}
    if parts.scheme != "https" and not (parts.scheme == "http" and allowed):
        raise Refused("the URL must be https")
    return host, port, allowed


def check_url(url: str, allow_hosts: Collection[str] = ()) -> str:
    """The URL, if it may be registered: https (http only for an allowed host), a host, and
    every address it resolves to public.

    Raises:
        Refused: why not, in one line.
    """
    host, port, allowed = check_form(url, allow_hosts)
    if allowed:
        return url
    try:
        addresses = resolve(host, port)
    except (OSError, ValueError) as exc:
        raise Refused(f"{host} does not resolve ({type(exc).__name__})") from None
    for address in addresses:
        why = forbidden(address)
        if why:
            raise Refused(f"{host} resolves to {why}")
    return url


def _guarded_conn(self, base):
    """``_new_conn`` of ``base``, connecting only to a checked address of the host. The
    connection keeps its host name (TLS sends it as SNI and checks the certificate against
    it; it is the ``Host`` header): only the socket goes to the checked address."""
    if self.host.lower() in self.allow_hosts:
        return _watched(base._new_conn(self))
    try:
        addresses = resolve(self._dns_host, self.port)
    except OSError as exc:
        raise NewConnectionError(self, f"cannot resolve {self.host}: {exc}") from exc
    if not addresses or any(forbidden(a) for a in addresses):
        raise AddressRefused(self, f"refused: {self.host} resolves to a non-public address")
    error: Exception | None = None
    for address in addresses:   # the checked addresses themselves: resolving again could
        try:                    # answer otherwise
            return _watched(create_connection((address, self.port), self.timeout,
                                              source_address=self.source_address,
                                              socket_options=self.socket_options))
        except TimeoutError as exc:
            error = ConnectTimeoutError(self, f"connecting to {self.host} timed out")
            error.__cause__ = exc
        except OSError as exc:
            error = NewConnectionError(self, f"cannot connect to {self.host}: {exc}")
            error.__cause__ = exc
    assert error is not None
    raise error


class Deadline:
    """One call's limit on its whole duration: ``expire()`` (from a timer) shuts its socket
    down, whatever the peer is doing (a read timeout bounds each wait for a byte, not a
    call: an endpoint that drips a byte a second never reaches it). The guarded
    connections made in a thread register their socket with the thread's current deadline
    (``watch``)."""

    _current = threading.local()

    def __init__(self) -> None:
        self.expired = False
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def expire(self) -> None:
        with self._lock:
            self.expired = True
            sock = self._sock
        if sock is not None:
            _shut(sock)

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sock = sock
            expired = self.expired
        if expired:
            _shut(sock)

    def __enter__(self) -> Deadline:
        Deadline._current.deadline = self
        return self

    def __exit__(self, *exc: object) -> None:
        Deadline._current.deadline = None


def _watched(sock: socket.socket) -> socket.socket:
    deadline = getattr(Deadline._current, "deadline", None)
    if deadline is not None:
        deadline.watch(sock)
    return sock


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass   # already closed


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
