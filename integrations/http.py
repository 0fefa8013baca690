"""The one HTTP client every adapter's requests go through: policy here, I/O in a transport.

Policy (``HttpClient``): base URL, ``(connect, read)`` timeouts on every request, TLS
verification always on with TLS >= 1.2, a connection pool sized to the provider's
concurrency, no redirects, a fixed User-Agent, bearer credentials, one sanitised DEBUG
log line per request (the delivery logs each outcome once), and translation of library errors into ``integrations.errors``:

    never sent: refused, DNS, connect timeout                        → Transient connect_error
    never sent: TLS handshake failed (certificate rejected, not TLS,  → Transient tls_error
                dropped or timed out mid-handshake, no common
                protocol or cipher)
    maybe sent: read timeout                                         → Ambiguous read_timeout
    maybe sent: reset/dropped after sending, TLS error while         → Ambiguous connection_lost
                reading the response, anything else

"Never sent" is decided by where the failure happened, never by its message: urllib3
opens a connection (TCP connect, TLS handshake, certificate and host name check) in its
connection's ``connect()`` and writes the request only after that returned. The HTTPS
pool here uses a connection class (``HTTPSConnectionPool.ConnectionCls``) whose
``connect()`` raises ``TlsHandshakeError`` for any failure after the TCP connect; TCP
failures already arrive as urllib3's ``NewConnectionError``/``ConnectTimeoutError``.

I/O (``Transport``): one method, ``send(prepared, timeout) -> requests.Response``.
``RequestsTransport`` is the real one; ``integrations.testing.MockTransport`` fakes it.
"""

from __future__ import annotations

import json
import logging
import re
import ssl
import time
from collections.abc import Mapping
from typing import Protocol
from urllib.parse import urlencode

import requests
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from urllib3.connection import HTTPSConnection
from urllib3.connectionpool import HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, HTTPError, NewConnectionError
from urllib3.util.retry import Retry

from integrations.base import Request, Response
from integrations.credentials import ApiKey, Credential
from integrations.errors import Ambiguous, ClientError, IntegrationError, Transient
from integrations.sanitize import sanitize
from integrations.settings import ProviderSettings

USER_AGENT = "integration-outbox/0.1"
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
BEARER = "bearer"

log = logging.getLogger("integrations.http")

# Raised before a single byte of the request went out (urllib3 2: refused and DNS
# failures are NewConnectionError/NameResolutionError, both ConnectTimeoutError subclasses).
_NEVER_SENT = (NewConnectionError, ConnectTimeoutError, ConnectionRefusedError)
_UNSENDABLE = (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
               requests.exceptions.InvalidSchema)


class TlsHandshakeError(NewConnectionError):
    """A new HTTPS connection failed after its TCP connect: in the TLS handshake or the
    certificate and host name check. Nothing of the request was written.

    A ``NewConnectionError`` ("could not connect"), so urllib3 and requests treat it as
    the connection failure it is; ``__cause__`` holds the original error.
    """


class _ConnectFailuresNeverSent(HTTPSConnection):
    """An ``HTTPSConnection`` whose ``connect()`` failures say "not sent" by their type.

    urllib3 calls ``connect()`` (from ``HTTPSConnectionPool._validate_conn``) before it
    writes the request line, so whatever fails in here happened before the provider could
    see a byte of the request — a timeout or reset during the handshake included, which
    urllib3 would otherwise report as a read timeout or a dropped connection.
    """

    def connect(self) -> None:
        try:
            super().connect()
        except ConnectTimeoutError:
            # The TCP stage (refused, DNS, connect timeout): urllib3's NewConnectionError,
            # NameResolutionError or ConnectTimeoutError already say "not connected".
            raise
        except (OSError, ValueError, HTTPError) as exc:
            # The failures urllib3 itself expects from connect(): socket and ssl errors
            # (OSError), its CertificateError (a ValueError) and its own SSLError. Anything
            # else — a Celery time limit, say — propagates unchanged.
            raise TlsHandshakeError(self, f"TLS handshake failed: {exc}") from exc


class _HttpsPool(HTTPSConnectionPool):
    """The HTTPS pool, with connections whose connect failures are typed (see above)."""

    ConnectionCls = _ConnectFailuresNeverSent


class Transport(Protocol):
    """Does the I/O for ``HttpClient``."""

    def send(self, prepared: requests.PreparedRequest,
             timeout: tuple[float, float]) -> requests.Response:
        """Send ``prepared`` and return the fully read response; raise ``requests`` errors."""

    def close(self) -> None:
        """Release pooled connections."""


# Retries are the outbox's job (with backoff and attempt rows), never urllib3's.
NO_RETRIES = Retry(total=0, read=False, redirect=False)


def tls_context() -> ssl.SSLContext:
    """The client TLS policy: certificates verified, TLS >= 1.2."""
    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class _TlsAdapter(HTTPAdapter):
    """An HTTPAdapter whose pools use an SSL context with TLS >= 1.2 and no urllib3 retries,
    and whose connections report a failed TLS handshake as ``TlsHandshakeError``."""

    def __init__(self, pool_size: int):
        self._ssl_context = tls_context()
        super().__init__(pool_connections=1, pool_maxsize=pool_size, max_retries=NO_RETRIES)

    def init_poolmanager(self, connections, maxsize, block=False, **pool_kwargs):
        pool_kwargs["ssl_context"] = self._ssl_context
        super().init_poolmanager(connections, maxsize, block=block, **pool_kwargs)
        # urllib3's per-manager hook for the pool class of a scheme. Replaced, not updated:
        # the default mapping is urllib3's module-level dict, shared by every PoolManager.
        self.poolmanager.pool_classes_by_scheme = {
            **self.poolmanager.pool_classes_by_scheme, "https": _HttpsPool}


def pinned_session(session: requests.Session, pool_size: int) -> requests.Session:
    """``session`` under this module's policy: TLS >= 1.2 with verification, no urllib3
    retries, and no .netrc, proxy or CA-bundle variables from the environment. (Redirects
    are refused by the callers: ``allow_redirects=False``.) Returns ``session``."""
    session.trust_env = False
    session.verify = True
    session.mount("https://", _TlsAdapter(pool_size))
    session.mount("http://", HTTPAdapter(pool_maxsize=pool_size, max_retries=NO_RETRIES))
    return session


class RequestsTransport:
    """The real transport: a ``requests.Session`` with a TLS-pinned, sized connection pool."""

    def __init__(self, pool_size: int):
        """Args: pool_size: connections kept per host; match the worker concurrency."""
        self.session = pinned_session(requests.Session(), pool_size)
        self.tls_adapter = self.session.get_adapter("https://")

    def send(self, prepared: requests.PreparedRequest,
             timeout: tuple[float, float]) -> requests.Response:
        """Send without following redirects, with TLS verification on; reads the whole body.

        Straight to the mounted adapter, as ``Session.send`` would with these arguments,
        without its steps that do nothing here but cost about a tenth of a request's CPU:
        no redirect is followed, no hook is set, and the session's cookie jar (which it
        would fill from every response) is never sent, since ``HttpClient.prepare`` builds
        requests without the session.
        """
        adapter = self.session.get_adapter(prepared.url)
        response = adapter.send(prepared, stream=False, timeout=timeout, verify=True,
                                cert=None, proxies={})
        response.content  # noqa: B018  (reads the body and returns the connection to the pool)
        return response

    def close(self) -> None:
        """Close the session's pooled connections."""
        self.session.close()


class HttpClient:
    """Sends adapter ``Request``s for one provider under the shared policy."""

    def __init__(self, settings: ProviderSettings, transport: Transport | None = None, *,
                 credentials: Credential | None = None):
        """Create the client.

        Args:
            settings: the provider's settings (base URL, timeouts, pool size, key source).
            transport: the I/O object; default ``RequestsTransport(settings.max_concurrency)``.
            credentials: default ``ApiKey.from_settings(settings)``.
        """
        self.settings = settings
        self.transport = transport or RequestsTransport(settings.max_concurrency)
        self.credentials = credentials or ApiKey.from_settings(settings)

    def close(self) -> None:
        """Release the transport's connections."""
        self.transport.close()

    def prepare(self, request: Request, *, auth: str | None = None) -> requests.PreparedRequest:
        """Build the ``PreparedRequest`` for ``request`` (URL, headers, encoded body).

        Args:
            request: what the adapter built; ``path`` must start with ``/`` unless the
                request carries its own absolute ``url``.
            auth: ``"bearer"`` to add ``Authorization: Bearer <key>``, or None.

        Raises:
            CredentialUnavailable: bearer auth asked for but the key cannot be read.
            ValueError: the path is not absolute, there is no URL (neither the request's
                nor a base URL), ``auth`` is unknown, or a form key or value is not a str.
        """
        if request.url is not None:
            url = request.url
        elif self.settings.base_url is None:
            raise ValueError(f"{self.settings.name} has no base URL: its requests need a url")
        elif not request.path.startswith("/"):
            raise ValueError(f"request path must start with '/': {sanitize(request.path, 80)!r}")
        else:
            url = self.settings.base_url + request.path
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json", **request.headers}
        if auth == BEARER:
            headers["Authorization"] = f"Bearer {self.credentials.get()}"
        elif auth is not None:
            raise ValueError(f"unknown auth scheme {auth!r}")
        if request.content is not None:
            return requests.Request(request.method.upper(), url, headers=headers,
                                    data=request.content, params="").prepare()
        if request.form is not None:
            body = _encode_form(request.form)
            if body:
                # The body and headers requests builds from the dict, built without its
                # isinstance checks against typing Protocols (slow on Python 3.11): a str
                # body is taken as is, and the Content-Type it would add is added here.
                prepared = requests.Request(request.method.upper(), url, headers=headers,
                                            data=body, params="").prepare()
                if "content-type" not in prepared.headers:
                    prepared.headers["Content-Type"] = FORM_CONTENT_TYPE
                return prepared
            kwargs = {}   # an empty form: no body, no Content-Type, as requests does for {}
        elif request.json is not None:
            kwargs = {"json": request.json}
        else:
            kwargs = {}
        return requests.Request(request.method.upper(), url, headers=headers, params="",
                                **kwargs).prepare()

    def send(self, request: Request, *, auth: str | None = None) -> Response:
        """Send ``request`` and return the response, whatever its status.

        Args:
            request: what the adapter built.
            auth: ``"bearer"`` (the adapter's ``auth`` attribute) or None.

        Raises:
            Transient: the request was never sent (refused, DNS, connect timeout, TLS
                handshake failed or certificate rejected).
            Ambiguous: it may have been sent (read timeout, connection dropped after
                sending, TLS error after the handshake, unknown transport failure).
            CredentialUnavailable: bearer auth asked for but the key cannot be read.
            ClientError: the request could not be built (bad path or URL).
        """
        path = request.path.split("?", 1)[0]
        try:
            prepared = self.prepare(request, auth=auth)
        except (ValueError, requests.exceptions.RequestException) as exc:
            raise ClientError(f"cannot build request: {type(exc).__name__}",
                              code="bad_request") from exc
        started = time.perf_counter()
        try:
            raw = self.transport.send(prepared, self.settings.timeout)
        except OSError as exc:  # requests' exceptions included (RequestException is an OSError)
            elapsed_s = time.perf_counter() - started
            error = translate(exc, self.settings)
            # DEBUG: the delivery logs each outcome once, with its class and code.
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s %s failed after %.0f ms: %s (%s)", request.method.upper(), path,
                          elapsed_s * 1000, error.error_class.value,
                          sanitize(_strip_queries(str(exc)), 300),
                          extra=self._extra(request.method, path, None, elapsed_s,
                                            error_class=error.error_class.value))
            raise error from exc
        elapsed_s = time.perf_counter() - started
        if log.isEnabledFor(logging.DEBUG):   # the line and its fields only when it is kept
            log.debug("%s %s -> %s in %.0f ms", request.method.upper(), path, raw.status_code,
                      elapsed_s * 1000,
                      extra=self._extra(request.method, path, raw.status_code, elapsed_s))
        headers = raw.headers   # requests' own case-insensitive copy: no second one
        if not isinstance(headers, CaseInsensitiveDict):
            headers = CaseInsensitiveDict(headers)
        return Response(status_code=raw.status_code, headers=headers,
                        body=_decode_json(raw.content), elapsed_s=elapsed_s)

    def _extra(self, method: str, path: str, status: int | None, elapsed_s: float,
               **more: str) -> dict:
        return {"provider": self.settings.name, "method": method.upper(), "path": path,
                "status": status, "elapsed_ms": round(elapsed_s * 1000, 1), **more}


def translate(exc: OSError, settings: ProviderSettings) -> IntegrationError:
    """Map a transport failure (``requests`` error or raw ``OSError``) to ``Transient`` (never sent) or ``Ambiguous`` (maybe sent).

    The decision hinges on whether the request can have reached the provider: urllib3's
    ``NewConnectionError``/``ConnectTimeoutError`` (refused, DNS, connect timeout) and a
    ``TlsHandshakeError`` (whatever failed in the TLS handshake, a rejected certificate
    included; see the module docstring) happen before any byte of the request is written.
    Everything else — read timeouts, resets, ``RemoteDisconnected``, TLS errors while
    reading the response, broken chunked bodies, unknown errors — may come after the
    provider acted, so it is ambiguous. SSL error text is never consulted: the same
    ``WRONG_VERSION_NUMBER`` is "never sent" in a handshake and "maybe sent" after it.
    """
    chain = _causes(exc)
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return Ambiguous(f"read timeout after {settings.read_timeout_s:g}s", code="read_timeout")
    if isinstance(exc, _UNSENDABLE):
        return ClientError(f"cannot send request ({type(exc).__name__})", code="bad_request")
    # Before the NewConnectionError test: a TlsHandshakeError is one, with its own code.
    handshake = next((e for e in chain if isinstance(e, TlsHandshakeError)), None)
    if handshake is not None:
        return Transient(_handshake_detail(handshake.__cause__), code="tls_error")
    root = next((e for e in chain if isinstance(e, _NEVER_SENT)), None)
    if root is not None or isinstance(exc, requests.exceptions.ConnectTimeout):
        return Transient(f"connect failed ({type(root or exc).__name__})", code="connect_error")
    names = "/".join(dict.fromkeys(type(e).__name__ for e in chain[1:4])) or type(exc).__name__
    return Ambiguous(f"connection lost after sending ({names})", code="connection_lost")


def _handshake_detail(cause: BaseException | None) -> str:
    """``TLS certificate rejected (self-signed certificate)``, ``TLS handshake failed
    (SSLError WRONG_VERSION_NUMBER)``: short and safe to log. For people, not for deciding."""
    if isinstance(cause, ssl.SSLCertVerificationError):
        return sanitize(f"TLS certificate rejected ({cause.verify_message})", 160)
    name = type(cause).__name__ if cause is not None else "unknown"
    reason = getattr(cause, "reason", None) if isinstance(cause, ssl.SSLError) else None
    return sanitize(f"TLS handshake failed ({name} {reason})" if reason
                    else f"TLS handshake failed ({name})", 160)


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and everything it explicitly wraps (args, ``reason``, ``__cause__``)."""
    seen: list[BaseException] = []
    todo: list[object] = [exc]
    while todo and len(seen) < 20:
        e = todo.pop(0)
        if not isinstance(e, BaseException) or any(e is s for s in seen):
            continue
        seen.append(e)
        todo.extend(a for a in e.args if isinstance(a, BaseException))
        # Only explicit wrapping: __context__ could drag in an unrelated earlier failure
        # and turn "maybe sent" into "never sent", the one mistake that duplicates effects.
        todo.extend(x for x in (getattr(e, "reason", None), e.__cause__) if x)
    return seen


def _encode_form(form: Mapping[str, str]) -> str:
    """The body ``requests`` builds from the same dict, via the public ``urlencode``.

    requests UTF-8-encodes str keys and values and ``urlencode``s the pairs; ``urlencode``
    of the str pairs (``quote_plus``, UTF-8) gives the same text. Its other rules (None
    dropped, a list's items repeated, bytes taken raw) are for values a ``Request.form``
    never holds: those are refused rather than sent as ``None`` or ``['a', 'b']``.

    Raises:
        ValueError: a key or value is not a str.
    """
    pairs = list(form.items())
    for key, value in pairs:
        if not (isinstance(key, str) and isinstance(value, str)):
            raise ValueError("form fields must map str to str, not "
                             f"{type(key).__name__} to {type(value).__name__}")
    return urlencode(pairs)


def _decode_json(content: bytes):
    if not content:
        return None
    try:
        return json.loads(content)
    except (ValueError, UnicodeDecodeError):
        return None


def _strip_queries(text: str) -> str:
    """Drop query strings from URLs quoted in library error messages (they may hold data)."""
    return re.sub(r"\?[^\s'\")]*", "?…", text)
