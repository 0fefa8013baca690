"""SSRF rules of the webhooks provider (issue 10 §2): every non-public address form is refused
when an endpoint is registered (``outbox endpoints add``: exit 2, one line) and again when a
message is sent to an endpoint row that never went through registration — with a canary
listener on the loopback alias 127.0.0.2 that must see no connection. Redirects are not
followed, and the allow-list is empty by default.
"""

from __future__ import annotations

import random
import socket
import subprocess
import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from cryptography.fernet import Fernet

from integrations import ssrf
from integrations.errors import Ambiguous
from integrations.registry import build_provider
from integrations.secretbox import SecretBox
from integrations.webhooks import endpoints as contract
from integrations.webhooks.endpoints import allow_hosts, new_secret
from integrations.webhooks.transport import GuardedTransport
from outbox import Message, endpoints, enqueue
from outbox.clock import utcnow
from outbox.endpoints import SqlEndpointStore
from outbox.models import AttemptOutcome, WebhookEndpoint
from tasks.delivery import deliver_message
from tests.harness import run_cli
from tests.test_ssrf import canary, dns  # noqa: F401  (fixtures: the loopback canary, a resolver)
from tests.tls_servers import server_context

# Host spellings of non-public addresses; the loopback ones name the canary's 127.0.0.2.
NON_PUBLIC = ["127.0.0.2", "[::1]", "10.0.0.1", "172.16.0.1", "192.168.0.1", "169.254.169.254",
              "[fd00:ec2::254]", "100.64.0.1", "[fc00::1]", "[fe80::1]", "[::ffff:127.0.0.2]",
              "0.0.0.0", "2130706434", "0x7f000002", "0177.0.0.2", "localhost",
              "[64:ff9b::7f00:2]", "[2002:7f00:2::]", "[::127.0.0.2]"]


@pytest.fixture(autouse=True)
def _keys(monkeypatch, publisher):
    monkeypatch.setenv("OUTBOX_SECRET_KEY", Fernet.generate_key().decode())
    monkeypatch.delenv("OUTBOX_SECRET_KEY_FILE", raising=False)
    monkeypatch.delenv("OUTBOX_WEBHOOKS_ALLOW_HOSTS", raising=False)   # make exports one


@pytest.mark.parametrize("host", NON_PUBLIC)
def test_registration_refuses_every_non_public_form(cli_db, capsys, canary, host):  # noqa: F811
    port, seen = canary
    code, out, err = run_cli(capsys, "endpoints", "add", f"https://{host}:{port}/hook",
                             "--events", "invoice.paid")
    assert code == 2 and out == ""
    assert err.startswith("outbox: error: refused URL: ") and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err
    code, out, _ = run_cli(capsys, "endpoints", "list", "--json")
    assert (code, out.strip()) == (0, "[]")
    assert seen == []


@pytest.fixture
def sending(sessions, redis_url):
    """A webhooks provider as a worker builds it with the default (empty) allow-list, and
    the endpoint store on this test's database."""
    before = contract.installed()
    contract.install(SqlEndpointStore(lambda: sessions))
    provider = build_provider("webhooks", {"OUTBOX_WEBHOOKS_CONNECT_TIMEOUT": "1",
                                           "OUTBOX_WEBHOOKS_TIMEOUT": "1"}, redis=redis_url)
    assert provider.allow_hosts == frozenset()
    yield provider
    provider.close()
    contract.install(before)


def _endpoint_row(sessions, url) -> str:
    """An endpoint inserted as is, past the registration check (an old row, a bug, a
    hand-edited database)."""
    now = utcnow()
    with sessions.begin() as session:
        endpoint = WebhookEndpoint(id=endpoints.new_endpoint_id(), url=url, event_types=["*"],
                                   status=endpoints.ENABLED,
                                   secret=SecretBox.from_env().encrypt(new_secret()),
                                   created_at=now, updated_at=now)
        session.add(endpoint)
        return endpoint.id


def _send(sessions, provider, endpoint_id, key="ssrf"):
    with sessions.begin() as session:
        message_id = enqueue(session, provider="webhooks", operation="deliver",
                             payload={"endpoint_id": endpoint_id, "event_type": "a.b",
                                      "data": {"x": 1}}, idempotency_key=key).id
    result = deliver_message(message_id, sessions=sessions, lease=timedelta(seconds=30),
                             provider_for=lambda _name: provider, rng=random.Random(1))
    with sessions() as session:
        return result, session.get(Message, message_id)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("host", NON_PUBLIC)
def test_sending_refuses_every_non_public_form_without_connecting(sessions, sending, canary,  # noqa: F811
                                                                  host):
    port, seen = canary
    endpoint_id = _endpoint_row(sessions, f"https://{host}:{port}/hook")
    result, message = _send(sessions, sending, endpoint_id)
    assert result.outcome is AttemptOutcome.DEAD
    assert message.last_error_class == "client_error" and "ssrf_refused" in message.last_error
    assert seen == []


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_name_that_rebinds_to_loopback_after_registration_is_refused(
        sessions, sending, canary, dns):  # noqa: F811
    port, seen = canary
    dns["hooks.customer.example"] = "93.184.216.34"
    with sessions.begin() as session:
        endpoint, _ = endpoints.add(session, f"https://hooks.customer.example:{port}/in",
                                    ["*"], box=SecretBox.from_env())
        endpoint_id = endpoint.id
    dns["hooks.customer.example"] = "127.0.0.2"
    result, message = _send(sessions, sending, endpoint_id)
    assert result.outcome is AttemptOutcome.DEAD and "ssrf_refused" in message.last_error
    assert seen == []


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_plain_http_is_refused_unless_the_host_is_allowed(sessions, sending, canary):  # noqa: F811
    port, seen = canary
    endpoint_id = _endpoint_row(sessions, f"http://93.184.216.34:{port}/hook")
    result, message = _send(sessions, sending, endpoint_id)
    assert result.outcome is AttemptOutcome.DEAD and "ssrf_refused" in message.last_error
    assert seen == []


class _Redirect(BaseHTTPRequestHandler):
    location = ""

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(302)
        self.send_header("Location", self.location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_redirect_to_a_private_address_is_not_followed(sessions, redis_url, canary):  # noqa: F811
    """An allowed host (127.0.0.1) answers 302 Location: the canary: nothing follows it."""
    port, seen = canary
    handler = type("Redirect", (_Redirect,), {"location": f"http://127.0.0.2:{port}/stolen"})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    before = contract.installed()
    contract.install(SqlEndpointStore(lambda: sessions))
    provider = build_provider("webhooks", {"OUTBOX_WEBHOOKS_ALLOW_HOSTS": "127.0.0.1"},
                              redis=redis_url)
    try:
        endpoint_id = _endpoint_row(sessions, f"http://127.0.0.1:{server.server_port}/hook")
        result, message = _send(sessions, provider, endpoint_id)
    finally:
        provider.close()
        contract.install(before)
        server.shutdown()
        server.server_close()
    assert result.outcome is AttemptOutcome.DEAD
    assert (message.last_error_class, message.last_status_code) == ("client_error", 302)
    assert "redirect_refused" in message.last_error
    assert seen == []


def test_the_allow_list_is_empty_by_default():
    assert allow_hosts({}) == frozenset()
    assert allow_hosts({"OUTBOX_WEBHOOKS_ALLOW_HOSTS": " 127.0.0.1, Sandbox.Local ,"}) == {
        "127.0.0.1", "sandbox.local"}


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_canary_sees_a_delivery_to_an_allow_listed_host(sessions, redis_url, canary):  # noqa: F811
    """The control: the same canary, allow-listed, gets the delivery (so its silence above
    means no connection, not a deaf canary)."""
    port, seen = canary
    before = contract.installed()
    contract.install(SqlEndpointStore(lambda: sessions))
    provider = build_provider("webhooks", {"OUTBOX_WEBHOOKS_ALLOW_HOSTS": "127.0.0.2"},
                              redis=redis_url)
    try:
        endpoint_id = _endpoint_row(sessions, f"http://127.0.0.2:{port}/hook")
        result, _ = _send(sessions, provider, endpoint_id)
    finally:
        provider.close()
        contract.install(before)
    assert result.outcome is AttemptOutcome.DELIVERED and len(seen) == 1


# --- the guarded transport itself ------------------------------------------------------------

def _name_cert(certs, directory, name: str):
    """A server certificate for the DNS name ``name`` only, signed by the test CA."""
    ca_dir = certs.ca.parent

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)
    run("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-subj", f"/CN={name}", "-keyout", "name.key", "-out", "name.csr")
    (directory / "name.ext").write_text(f"subjectAltName=DNS:{name}\n"
                                        "extendedKeyUsage=serverAuth\n")
    run("x509", "-req", "-in", "name.csr", "-CA", str(certs.ca), "-CAkey",
        str(ca_dir / "ca.key"), "-CAcreateserial", "-days", "2", "-extfile", "name.ext",
        "-out", "name.pem")
    return directory / "name.pem", directory / "name.key"


def test_https_through_the_guard_keeps_the_host_name_for_sni_the_certificate_and_host(
        tls_certs, tmp_path, monkeypatch):
    """The socket goes to the checked address; TLS and HTTP still speak to the name: a
    certificate for the name only verifies, SNI and Host carry the name."""
    name = "hooks.example.test"
    cert, key = _name_cert(tls_certs, tmp_path, name)
    seen = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            seen["host"] = self.headers.get("Host")
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = server_context(cert, key)

    def sni(sock, server_name, ctx):
        seen["sni"] = server_name
    context.sni_callback = sni
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    real_getaddrinfo, real_forbidden = socket.getaddrinfo, ssrf.forbidden
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: real_getaddrinfo(
        "127.0.0.1" if host == name else host, *a, **k))
    monkeypatch.setattr(ssrf, "forbidden", lambda address: (
        None if address == "127.0.0.1" else real_forbidden(address)))   # "public", here
    transport = GuardedTransport(2, ())
    transport.session.get_adapter("https://")._ssl_context.load_verify_locations(tls_certs.ca)
    try:
        answer = transport.send(requests.Request("POST", f"https://{name}:{port}/in",
                                                 data=b"{}").prepare(), (3, 3))
    finally:
        server.shutdown()
        transport.close()
    assert answer.status_code == 204
    assert seen == {"sni": name, "host": f"{name}:{port}"}


@pytest.fixture
def raw_server():
    """A loopback TCP server that reads a request and then runs ``behave(conn)``."""
    servers = []

    def start(behave):
        listener = socket.create_server(("127.0.0.1", 0))
        servers.append(listener)

        def serve():
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                behave(conn)
        threading.Thread(target=serve, daemon=True).start()
        return listener.getsockname()[1]
    yield start
    for listener in servers:
        listener.close()


def test_an_endpoint_that_drips_its_answer_is_cut_at_the_call_deadline(raw_server):
    """A read timeout bounds each wait for a byte; an endpoint sending one byte every 0.2 s
    never reaches it, but the whole call ends at connect + read timeout, ambiguous."""
    def drip(conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\n")
        try:
            for _ in range(200):
                conn.sendall(b"X")
                time.sleep(0.2)
        except OSError:
            pass
    port = raw_server(drip)
    transport = GuardedTransport(2, ["127.0.0.1"])
    started = time.monotonic()
    with pytest.raises(Ambiguous) as cut:
        transport.send(requests.Request("POST", f"http://127.0.0.1:{port}/in",
                                        data=b"{}").prepare(), (1, 1))
    assert cut.value.code == "deadline"
    assert time.monotonic() - started < 4


def test_an_endpoints_body_is_never_read(raw_server):
    """A 1 GB answer body costs nothing: the status and headers decide, and the connection
    is closed unread."""
    def flood(conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n")
        try:
            for _ in range(1000):
                conn.sendall(b"x" * 1_000_000)
        except OSError:
            pass
    port = raw_server(flood)
    transport = GuardedTransport(2, ["127.0.0.1"])
    started = time.monotonic()
    answer = transport.send(requests.Request("POST", f"http://127.0.0.1:{port}/in",
                                             data=b"{}").prepare(), (3, 3))
    assert answer.status_code == 200 and answer.content == b""
    assert time.monotonic() - started < 2
