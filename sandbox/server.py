"""The sandbox HTTP server: start/stop in a background thread, or run in the foreground."""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import socket
import sys
import threading
from http.server import ThreadingHTTPServer

from sandbox import oauth
from sandbox.handler import SandboxHandler
from sandbox.state import SandboxState

DEFAULT_API_KEY = "sk_test_sandbox"


def is_loopback(host: str) -> bool:
    """True if ``host`` is ``localhost`` or a loopback IP address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _HTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with TCP_NODELAY, connection tracking and a non-blocking close."""

    daemon_threads = True
    # Idle keep-alive threads would make server_close() wait forever; stop() closes them instead.
    block_on_close = False
    allow_reuse_address = True
    # socketserver's default backlog of 5 drops SYNs under a burst of concurrent clients,
    # and each dropped SYN costs the client a 1 s retransmission.
    request_queue_size = 128

    def __init__(self, address, state: SandboxState, access_log: bool, family: int) -> None:
        self.address_family = family
        self.state = state
        self.access_log = access_log
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(address, SandboxHandler)

    def get_request(self):
        sock, addr = super().get_request()
        # Without it, http.server stalls ~43 ms per response (Nagle + delayed ACK).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._conns_lock:
            self._conns.add(sock)
        return sock, addr

    def shutdown_request(self, request) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        # Client disconnects are routine under fault injection; don't spray tracebacks.
        exc = sys.exc_info()[1]
        if not isinstance(exc, OSError):
            super().handle_error(request, client_address)

    def close_connections(self) -> None:
        """Shut down every open client connection so their threads exit."""
        with self._conns_lock:
            conns = list(self._conns)
        for sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class SandboxServer:
    """Fake Stripe-shaped payments, SendGrid-shaped email and HubSpot-shaped CRM providers
    on loopback, with a ``/_sandbox/`` control API.

    ``SandboxServer(port=0).start()`` listens on an ephemeral port; ``url`` says where.
    Payments and email take ``Authorization: Bearer <key>``; the email API accepts
    ``email_api_key``, or the payments key when that is None. The CRM takes OAuth access
    tokens issued to the one client ``crm_client_id``/``crm_client_secret``.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 payments_api_key: str = DEFAULT_API_KEY, access_log: bool = False,
                 email_api_key: str | None = None,
                 crm_client_id: str = oauth.DEFAULT_CLIENT_ID,
                 crm_client_secret: str = oauth.DEFAULT_CLIENT_SECRET) -> None:
        """Bind to ``host:port`` (loopback only; ValueError otherwise) without serving yet."""
        if not is_loopback(host):
            raise ValueError(f"refusing to bind the sandbox to non-loopback host {host!r}; "
                             "use 127.0.0.1, ::1 or localhost")
        self.state = SandboxState(payments_api_key, email_api_key, crm_client_id,
                                  crm_client_secret)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._httpd = _HTTPServer((host.strip("[]"), port), self.state, access_log, family)
        self._thread: threading.Thread | None = None
        bound_host, bound_port = self._httpd.server_address[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.url = f"http://{shown}:{bound_port}"
        self.port = bound_port

    def start(self) -> SandboxServer:
        """Serve in a background daemon thread; the socket is already listening."""
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name="sandbox-server", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until stop() is called from another thread."""
        self._httpd.serve_forever(poll_interval=0.05)

    def stop(self) -> None:
        """Stop serving, end sleeping/hanging requests and close every connection."""
        self.state.stopping.set()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._httpd.server_close()
        self._httpd.close_connections()

    def __enter__(self) -> SandboxServer:
        """Start on entering a ``with`` block."""
        return self.start()

    def __exit__(self, *exc: object) -> None:
        """Stop on leaving a ``with`` block."""
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """Run the sandbox in the foreground until SIGTERM or SIGINT; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m sandbox",
                                     description="Fake payments, email and CRM providers "
                                                 "with fault injection.")
    parser.add_argument("--host", default="127.0.0.1", help="loopback address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8100, help="port (default 8100; 0 = any)")
    parser.add_argument("--access-log", action="store_true",
                        help="print method, path and status of each request to stderr")
    args = parser.parse_args(argv)
    api_key = (os.environ.get("SANDBOX_PAYMENTS_API_KEY")
               or os.environ.get("OUTBOX_PAYMENTS_API_KEY") or DEFAULT_API_KEY)
    # Unset: the email API shares the payments key.
    email_key = (os.environ.get("SANDBOX_EMAIL_API_KEY")
                 or os.environ.get("OUTBOX_EMAIL_API_KEY") or None)
    crm_client_id = os.environ.get("SANDBOX_CRM_CLIENT_ID") or oauth.DEFAULT_CLIENT_ID
    crm_client_secret = (os.environ.get("SANDBOX_CRM_CLIENT_SECRET")
                         or oauth.DEFAULT_CLIENT_SECRET)
    try:
        srv = SandboxServer(args.host, args.port, api_key, access_log=args.access_log,
                            email_api_key=email_key, crm_client_id=crm_client_id,
                            crm_client_secret=crm_client_secret)
    except (ValueError, OSError) as exc:
        print(f"sandbox: {exc}", file=sys.stderr)
        return 2
    # Webhooks to the outbox's receiver (make run): SANDBOX_<FLAVOR>_WEBHOOK_URL and the
    # secret the receiver checks (OUTBOX_<NAME>_WEBHOOK_SECRET, its first one).
    targets = {}
    for flavor in ("payments", "email"):
        url = os.environ.get(f"SANDBOX_{flavor.upper()}_WEBHOOK_URL")
        secret = (os.environ.get(f"OUTBOX_{flavor.upper()}_WEBHOOK_SECRET") or "").split(",")[0]
        if url and secret:
            targets[flavor] = {"url": url, "secret": secret.strip()}
    if targets:
        srv.state.webhooks.configure(targets)
    stop = threading.Event()

    def _on_signal(signum, frame) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    srv.start()
    print(f"sandbox listening on {srv.url}", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        srv.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
