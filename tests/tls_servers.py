"""Loopback servers that fail a client's TLS handshake in chosen ways, and throwaway certificates.

Used by the HTTP client tests and the classification table test to check, with real sockets,
that a failed handshake is "never sent" and a failure after it is "maybe sent".

Certificates are made with the ``openssl`` command line tool (the ``cryptography`` package
is not a dependency of this project): a test CA, a server certificate it signs for
``127.0.0.1``/``localhost``, and a self-signed one no client trusts.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

PLAIN_HTTP_ANSWER = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
# A generous safety net so a server thread never hangs a test run; no test waits for it.
IO_LIMIT_S = 10


@dataclass(frozen=True)
class Certs:
    """PEM files in a temporary directory.

    Attributes:
        ca: the test CA (trusted by a client through ``trust``).
        cert, key: a server certificate for 127.0.0.1 and localhost signed by ``ca``.
        untrusted_cert, untrusted_key: a self-signed certificate for the same names.
    """

    ca: Path
    cert: Path
    key: Path
    untrusted_cert: Path
    untrusted_key: Path


def make_certs(directory: Path) -> Certs:
    """Create the CA and the two server certificates in ``directory`` with ``openssl``."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("the openssl command is needed to make test certificates "
                    "(apt-get install openssl)", pytrace=False)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, cwd=directory)

    key_options = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    names = "subjectAltName=IP:127.0.0.1,DNS:localhost"
    run("req", "-x509", *key_options, "-days", "2", "-subj", "/CN=outbox test CA",
        "-keyout", "ca.key", "-out", "ca.pem",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", "-new", *key_options, "-subj", "/CN=127.0.0.1",
        "-keyout", "server.key", "-out", "server.csr")
    (directory / "server.ext").write_text(
        f"{names}\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", "server.ext", "-out", "server.pem")
    run("req", "-x509", *key_options, "-days", "2", "-subj", "/CN=127.0.0.1",
        "-keyout", "untrusted.key", "-out", "untrusted.pem", "-addext", names)
    return Certs(ca=directory / "ca.pem", cert=directory / "server.pem",
                 key=directory / "server.key", untrusted_cert=directory / "untrusted.pem",
                 untrusted_key=directory / "untrusted.key")


def trust(transport, ca: Path) -> None:
    """Make a ``RequestsTransport`` also trust the test CA (its SSL context is its own)."""
    context = transport.tls_adapter.poolmanager.connection_pool_kw["ssl_context"]
    context.load_verify_locations(cafile=str(ca))


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server-side context with TLS >= 1.2 serving ``cert``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


def old_protocol_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server that speaks only TLS 1.0 and 1.1, which our client (TLS >= 1.2) refuses.

    OpenSSL 3 allows TLS < 1.2 only at security level 0, hence ``@SECLEVEL=0``.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        # Python deprecates these versions, which is the point of this server.
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.load_cert_chain(cert, key)
    return context


def read_request(conn: socket.socket) -> bytes:
    """Read one HTTP request (headers, then ``Content-Length`` bytes of body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def wait_for_close(conn: socket.socket) -> None:
    """Read and discard until the client closes its end."""
    while conn.recv(65536):
        pass


class LoopbackServer:
    """A TCP server on 127.0.0.1 that hands each accepted connection, one at a time, to
    ``handle(conn, server)``.

    Attributes:
        port: the listening port.
        requests: the HTTP requests ``handle`` read in full (it appends them before it
            closes the connection, so a client that saw the close sees them here).
        errors: what ``handle`` raised, e.g. the server side of a failed handshake; kept
            for debugging a failing test.
    """

    def __init__(self, handle: Callable[[socket.socket, LoopbackServer], None]):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.requests: list[bytes] = []
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._serve, args=(handle,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def _serve(self, handle) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return   # closed by close()
            with conn:
                conn.settimeout(IO_LIMIT_S)
                try:
                    handle(conn, self)
                except (OSError, ValueError) as exc:
                    self.errors.append(exc)

    def close(self) -> None:
        """Stop accepting (shutdown wakes the blocked accept()) and wait for the thread."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass   # not connected: some kernels refuse shutdown on a listening socket
        self.sock.close()
        self.thread.join(IO_LIMIT_S)


# --- behaviours: what the server does with a connection ----------------------------------

def answer_plain_http(conn: socket.socket, server: LoopbackServer) -> None:
    """Not a TLS server: read the ClientHello, answer with plain HTTP bytes."""
    conn.recv(65536)
    conn.sendall(PLAIN_HTTP_ANSWER)


def close_during_handshake(conn: socket.socket, server: LoopbackServer) -> None:
    """Read the ClientHello, then close without answering it."""
    conn.recv(65536)


def never_answer_handshake(conn: socket.socket, server: LoopbackServer) -> None:
    """Read the ClientHello and say nothing until the client gives up."""
    wait_for_close(conn)


def tls(context: ssl.SSLContext, then: Callable[[ssl.SSLSocket, LoopbackServer], None]):
    """Do the server side of the handshake with ``context``, then ``then(tls_conn, server)``."""

    def handle(conn: socket.socket, server: LoopbackServer) -> None:
        with context.wrap_socket(conn, server_side=True) as tls_conn:
            then(tls_conn, server)

    return handle


def read_request_then_drop(conn: ssl.SSLSocket, server: LoopbackServer) -> None:
    """After the handshake: read the whole request, then close without answering."""
    server.requests.append(read_request(conn))


def read_request_then_answer_in_clear(conn: ssl.SSLSocket, server: LoopbackServer) -> None:
    """After the handshake: read the whole request, then answer in plain text on the bare
    TCP socket, past the TLS layer. The client fails reading the response with the same
    SSL error as a client of a server that does not speak TLS, but after it sent the request."""
    server.requests.append(read_request(conn))
    with socket.socket(fileno=os.dup(conn.fileno())) as raw:
        raw.sendall(PLAIN_HTTP_ANSWER)


@contextmanager
def loopback_servers() -> Iterator[Callable[..., LoopbackServer]]:
    """Yield ``start(handle)``, which starts a ``LoopbackServer``; all are closed on exit.

    A test module wraps it (and ``make_certs``) in fixtures of its own.
    """
    servers: list[LoopbackServer] = []

    def start(handle) -> LoopbackServer:
        servers.append(LoopbackServer(handle))
        return servers[-1]

    try:
        yield start
    finally:
        for server in servers:
            server.close()
