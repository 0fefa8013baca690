"""HttpClient policy, settings, credentials, sanitising and Retry-After parsing."""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
import time
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qsl

import pytest
import requests
import urllib3
from urllib3 import HTTPSConnectionPool

from integrations.base import Request
from integrations.credentials import ApiKey
from integrations.errors import (
    Ambiguous,
    ClientError,
    ConfigurationError,
    CredentialUnavailable,
    Transient,
)
from integrations.http import FORM_CONTENT_TYPE, USER_AGENT, HttpClient, RequestsTransport
from integrations.payments import STRIPE_VERSION, PaymentsAdapter
from integrations.registry import build_provider, get_provider, known_providers, reset
from integrations.retry_after import parse_retry_after
from integrations.sanitize import SanitizingFilter, sanitize
from integrations.settings import ProviderSettings
from integrations.testing import MockTransport
from tests.tls_servers import (
    LoopbackServer,
    answer_plain_http,
    close_during_handshake,
    never_answer_handshake,
    old_protocol_context,
    read_request,
    read_request_then_answer_in_clear,
    read_request_then_drop,
    server_context,
    tls,
    trust,
)

KEY = "sk_test_4eC39HqLyjWDarjtT1zdp7dc"
INTENT = {"id": "pi_123", "object": "payment_intent", "status": "succeeded"}
CHARGE = {"amount": 2000, "currency": "usd", "customer": "cus_1", "description": "Order 42",
          "payment_method": "pm_card_visa", "metadata": {"order": "42", "note": "a&b=c"}}


def ok(_request):
    return 200, {"Content-Type": "application/json"}, INTENT


def provider_for(handler=ok, **env):
    environ = {"OUTBOX_PAYMENTS_API_KEY": KEY, **env}
    transport = MockTransport(handler)
    return build_provider("payments", environ, transport=transport), transport


# --- request shape ---------------------------------------------------------------------

def test_charge_request_shape():
    """Form-encoded POST with nested metadata, idempotency key, pinned version, bearer key."""
    provider, transport = provider_for(OUTBOX_PAYMENTS_TIMEOUT="7", OUTBOX_PAYMENTS_CONNECT_TIMEOUT="2")
    provider.deliver("charge", CHARGE, "order-42-charge")
    (call,) = transport.calls
    sent = call.request
    assert sent.method == "POST" and sent.url == "https://api.stripe.com/v1/payment_intents"
    assert sent.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert sent.headers["Idempotency-Key"] == "order-42-charge"
    assert sent.headers["Stripe-Version"] == STRIPE_VERSION == "2024-06-20"
    assert sent.headers["Authorization"] == f"Bearer {KEY}"
    assert sent.headers["User-Agent"] == USER_AGENT
    form = dict(parse_qsl(sent.body))
    assert form == {"amount": "2000", "currency": "usd", "customer": "cus_1",
                    "description": "Order 42", "payment_method": "pm_card_visa",
                    "metadata[order]": "42", "metadata[note]": "a&b=c", "confirm": "true",
                    "automatic_payment_methods[enabled]": "true",
                    "automatic_payment_methods[allow_redirects]": "never",
                    "metadata[outbox_key]": "order-42-charge"}   # so it can be looked up
    assert call.timeout == (2.0, 7.0)


def test_refund_request_shape():
    provider, transport = provider_for(
        lambda r: (200, {}, {"id": "re_1", "object": "refund", "status": "pending"}))
    provider.deliver("refund", {"payment_intent": "pi_123", "amount": 500}, "order-42-refund")
    sent = transport.calls[0].request
    assert sent.url.endswith("/v1/refunds")
    assert dict(parse_qsl(sent.body)) == {"payment_intent": "pi_123", "amount": "500",
                                          "metadata[outbox_key]": "order-42-refund"}
    assert sent.headers["Idempotency-Key"] == "order-42-refund"


def test_json_request_and_no_auth():
    """Adapters without bearer auth get no Authorization header; JSON bodies are encoded."""
    settings = ProviderSettings.from_env("email", {})
    transport = MockTransport(lambda r: (202, {}, b""))
    response = HttpClient(settings, transport).send(Request("POST", "/v3/mail/send", json={"a": 1}))
    sent = transport.calls[0].request
    assert "Authorization" not in sent.headers
    assert sent.body == b'{"a": 1}' and sent.headers["Content-Type"] == "application/json"
    assert response.status_code == 202 and response.body is None


FORMS = {
    "stripe metadata brackets": {"amount": "2000", "metadata[order]": "42",
                                 "metadata[note]": "a&b=c", "items[0][price]": "p_1"},
    "unicode": {"description": "Crème brûlée für 2 — 注文 ✓ 🎉", "名前": "ü"},
    "spaces": {"a key": "a value  with  spaces", " ": " "},
    "reserved characters": {"amp": "&", "eq": "=", "plus": "+", "pct": "%", "mix": "a+b=c&d%20e",
                            "k&=+%": "v", "slash": "/?#[]@!$'()*,;:~"},
    "empty values": {"empty": "", "": "empty key", "also": ""},
    "control characters": {"lines": "one\r\ntwo\tthree\x00"},
}


@pytest.mark.parametrize("form", FORMS.values(), ids=FORMS.keys())
def test_form_body_is_what_requests_builds_from_the_dict(form):
    """Our urlencode of the pairs = requests' own encoding of the same dict: same body
    text, same Content-Type and Content-Length."""
    settings = ProviderSettings.from_env("payments", {"OUTBOX_PAYMENTS_API_KEY": KEY})
    ours = HttpClient(settings, MockTransport(ok)).prepare(Request("POST", "/v1/x", form=form))
    theirs = requests.Request("POST", settings.base_url + "/v1/x", data=form).prepare()
    assert (ours.body, type(ours.body)) == (theirs.body, type(theirs.body))
    assert ours.headers["Content-Type"] == theirs.headers["Content-Type"] == FORM_CONTENT_TYPE
    assert ours.headers["Content-Length"] == theirs.headers["Content-Length"]
    assert dict(parse_qsl(ours.body, keep_blank_values=True)) == form


@pytest.mark.parametrize("form", [{"amount": 2000}, {"note": None}, {"tags": ["a", "b"]},
                                  {"raw": b"\xff"}, {1: "one"}])
def test_form_values_must_be_str(form):
    """``Request.form`` maps str to str; anything else is refused, not sent as ``None``."""
    settings = ProviderSettings.from_env("payments", {"OUTBOX_PAYMENTS_API_KEY": KEY})
    transport = MockTransport(ok)
    client = HttpClient(settings, transport)
    with pytest.raises(ValueError, match="str to str"):
        client.prepare(Request("POST", "/v1/x", form=form))
    with pytest.raises(ClientError) as info:
        client.send(Request("POST", "/v1/x", form=form))
    assert info.value.code == "bad_request" and transport.calls == []


def test_real_transport_policy():
    """TLS verification on, TLS >= 1.2, pool sized to max concurrency, no env leakage."""
    transport = RequestsTransport(pool_size=16)
    assert transport.session.verify is True and transport.session.trust_env is False
    adapter = transport.session.get_adapter("https://api.stripe.com")
    assert adapter is transport.tls_adapter
    assert adapter._pool_maxsize == 16
    context = adapter.poolmanager.connection_pool_kw["ssl_context"]
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    # Our HTTPS pool class is set on this adapter's manager only, not on urllib3's defaults.
    assert issubclass(adapter.poolmanager.pool_classes_by_scheme["https"], HTTPSConnectionPool)
    assert urllib3.poolmanager.pool_classes_by_scheme["https"] is HTTPSConnectionPool
    settings = ProviderSettings.from_env("payments", {"OUTBOX_PAYMENTS_MAX_CONCURRENCY": "16"})
    assert HttpClient(settings).transport.tls_adapter._pool_maxsize == 16


# --- real sockets on loopback ----------------------------------------------------------

class OneShotServer:
    """A loopback TCP server that reads one request and then does ``behaviour(conn)``."""

    def __init__(self, behaviour):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.requests = 0
        self.thread = threading.Thread(target=self._serve, args=(behaviour,), daemon=True)
        self.thread.start()

    def _serve(self, behaviour):
        self.sock.settimeout(5)
        try:
            while True:
                conn, _ = self.sock.accept()
                with conn:
                    conn.recv(65536)
                    self.requests += 1
                    behaviour(conn)
        except OSError:
            pass

    def close(self):
        self.sock.close()


@pytest.fixture
def server():
    servers = []

    def start(behaviour):
        servers.append(OneShotServer(behaviour))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def loopback_provider(port, **env):
    environ = {"OUTBOX_PAYMENTS_API_KEY": KEY,
               "OUTBOX_PAYMENTS_BASE_URL": f"http://127.0.0.1:{port}", **env}
    return build_provider("payments", environ)


def test_real_closed_port_is_transient():
    """No mock: connecting to a closed loopback port is 'never sent'."""
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with pytest.raises(Transient) as info:
        loopback_provider(port).deliver("charge", CHARGE, "k1")
    assert info.value.code == "connect_error"


def test_real_connection_closed_after_send_is_ambiguous(server):
    srv = server(lambda conn: None)  # read the request, close without answering
    with pytest.raises(Ambiguous):
        loopback_provider(srv.port).deliver("charge", CHARGE, "k1")
    assert srv.requests == 1


def test_real_read_timeout_is_ambiguous(server):
    srv = server(lambda conn: time.sleep(1))
    started = time.monotonic()
    with pytest.raises(Ambiguous, match="read timeout"):
        loopback_provider(srv.port, OUTBOX_PAYMENTS_TIMEOUT="0.2").deliver("charge", CHARGE, "k1")
    assert time.monotonic() - started < 0.9


def test_real_redirect_is_not_followed(server):
    srv = server(lambda conn: conn.sendall(
        b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.1:9/steal\r\n"
        b"Content-Length: 0\r\nConnection: close\r\n\r\n"))
    with pytest.raises(ClientError, match="redirect"):
        loopback_provider(srv.port).deliver("charge", CHARGE, "k1")
    assert srv.requests == 1


def test_real_success_round_trip(server):
    body = b'{"id": "pi_9", "object": "payment_intent", "status": "processing"}'
    srv = server(lambda conn: conn.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body))
    delivery = loopback_provider(srv.port).deliver("charge", CHARGE, "k1")
    assert delivery.summary == "200 pi_9 processing: accepted, settles later (its webhook says how)"



class KeepAliveServer:
    """A loopback HTTP/1.1 server that answers every request with a 200 that sets a cookie,
    keeping connections open; counts connections and requests that carried a cookie."""

    BODY = b'{"id": "pi_9", "object": "payment_intent", "status": "processing"}'

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = self.requests = self.with_cookie = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        try:
            while True:
                conn, _ = self.sock.accept()
                self.connections += 1
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()
        except OSError:
            pass

    def _serve(self, conn):
        buffer = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buffer:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                while len(buffer) < length:
                    buffer += conn.recv(65536)
                buffer = buffer[length:]
                self.requests += 1
                self.with_cookie += b"\r\ncookie:" in head.lower()
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Set-Cookie: session=abc; Path=/\r\nContent-Length: "
                             + str(len(self.BODY)).encode() + b"\r\n\r\n" + self.BODY)

    def close(self):
        self.sock.close()


def test_real_transport_reuses_its_connection_and_keeps_no_cookies():
    """The transport reads each body whole (the connection goes back to the pool and is used
    again) and, as before, never sends a cookie a provider set."""
    srv = KeepAliveServer()
    try:
        transport = RequestsTransport(pool_size=1)
        provider = build_provider("payments", {"OUTBOX_PAYMENTS_API_KEY": KEY,
                                               "OUTBOX_PAYMENTS_BASE_URL":
                                               f"http://127.0.0.1:{srv.port}"},
                                  transport=transport)
        for i in range(5):
            assert provider.deliver("charge", CHARGE, f"k{i}").provider_ref == "pi_9"
        assert (srv.requests, srv.connections, srv.with_cookie) == (5, 1, 0)
        assert len(transport.session.cookies) == 0
    finally:
        srv.close()

# --- TLS handshake: never sent; TLS failures after it: maybe sent (real sockets) -------

def tls_provider(server: LoopbackServer, ca, **env):
    """A payments provider for ``server`` over https that also trusts the test CA ``ca``."""
    transport = RequestsTransport(pool_size=1)
    trust(transport, ca)
    environ = {"OUTBOX_PAYMENTS_API_KEY": KEY, "OUTBOX_PAYMENTS_BASE_URL": server.url, **env}
    return build_provider("payments", environ, transport=transport)


HANDSHAKE_FAILURES = {
    # name: (server behaviour given the certificates, what the error detail says)
    "not a TLS server (wrong version number)": (lambda c: answer_plain_http, "handshake failed"),
    "closed during the handshake": (lambda c: close_during_handshake, "handshake failed"),
    "certificate not trusted": (
        lambda c: tls(server_context(c.untrusted_cert, c.untrusted_key), read_request_then_drop),
        "certificate rejected"),
    "only TLS 1.0/1.1 offered": (
        lambda c: tls(old_protocol_context(c.cert, c.key), read_request_then_drop),
        "handshake failed"),
}


@pytest.mark.parametrize("case", list(HANDSHAKE_FAILURES))
def test_real_tls_handshake_failure_is_never_sent(loopback, tls_certs, case):
    """Whatever breaks the handshake, the request was not written: Transient ``tls_error``
    (an e-mail is retried, not dead-lettered "needs review")."""
    behaviour, detail = HANDSHAKE_FAILURES[case]
    srv = loopback(behaviour(tls_certs))
    with pytest.raises(Transient, match=detail) as info:
        tls_provider(srv, tls_certs.ca).deliver("charge", CHARGE, "k1")
    assert info.value.code == "tls_error"
    assert srv.requests == []


def test_real_tls_handshake_timeout_is_never_sent(loopback, tls_certs):
    """A server that never answers the ClientHello: the connect timeout ends the handshake,
    before any request byte (urllib3 alone would call it a read timeout)."""
    srv = loopback(never_answer_handshake)
    provider = tls_provider(srv, tls_certs.ca, OUTBOX_PAYMENTS_CONNECT_TIMEOUT="0.2")
    with pytest.raises(Transient, match=r"handshake failed \(TimeoutError\)") as info:
        provider.deliver("charge", CHARGE, "k1")
    assert info.value.code == "tls_error"


@pytest.mark.parametrize("behaviour", [read_request_then_drop, read_request_then_answer_in_clear],
                         ids=["dropped without answering", "SSL error reading the response"])
def test_real_tls_failure_after_the_handshake_is_maybe_sent(loopback, tls_certs, behaviour):
    """The handshake succeeded and the server read the whole request: ambiguous, even when
    the error is the same SSL error a non-TLS server causes during the handshake."""
    srv = loopback(tls(server_context(tls_certs.cert, tls_certs.key), behaviour))
    with pytest.raises(Ambiguous) as info:
        tls_provider(srv, tls_certs.ca).deliver("charge", CHARGE, "k1")
    assert info.value.code == "connection_lost"
    (request,) = srv.requests
    assert request.startswith(b"POST /v1/payment_intents ") and b"metadata%5Border%5D=42" in request


def test_real_tls_round_trip_with_verification(loopback, tls_certs):
    """The connection class changes only how failures are reported: a trusted server works."""
    body = b'{"id": "pi_7", "object": "payment_intent", "status": "succeeded"}'

    def answer(conn, server):
        server.requests.append(read_request(conn))
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)

    srv = loopback(tls(server_context(tls_certs.cert, tls_certs.key), answer))
    assert tls_provider(srv, tls_certs.ca).deliver("charge", CHARGE, "k1").summary == \
        "200 pi_7 succeeded"
    assert len(srv.requests) == 1


def test_ssl_error_from_elsewhere_than_connect_is_maybe_sent():
    """Only where the failure happened decides, never its text: an SSL error a transport
    raises outside our connection's connect() — even a certificate error — is ambiguous."""
    def cert_error(_r):
        raise requests.exceptions.SSLError(ssl.SSLCertVerificationError(1, "verify failed"))

    with pytest.raises(Ambiguous):
        provider_for(cert_error)[0].deliver("charge", CHARGE, "k1")


# --- settings --------------------------------------------------------------------------

def test_settings_defaults_and_repr_hides_key():
    settings = ProviderSettings.from_env("payments", {"OUTBOX_PAYMENTS_API_KEY": KEY})
    assert settings.base_url == "https://api.stripe.com"
    assert settings.timeout == (3.05, 10.0) and settings.max_concurrency == 10
    assert settings.api_key == KEY
    assert KEY not in repr(settings) and KEY not in str(settings)


@pytest.mark.parametrize("url", ["http://api.stripe.com", "http://10.0.0.5:8080",
                                 "http://localhost.evil.com", "ftp://127.0.0.1",
                                 "https://user:pw@api.stripe.com", "api.stripe.com"])
def test_base_url_refused(url):
    with pytest.raises(ConfigurationError, match="OUTBOX_PAYMENTS_BASE_URL"):
        ProviderSettings.from_env("payments", {"OUTBOX_PAYMENTS_BASE_URL": url})


@pytest.mark.parametrize("url", ["http://127.0.0.1:8001", "http://127.5.6.7", "http://localhost:9000/",
                                 "http://[::1]:8001", "https://api.stripe.com"])
def test_base_url_allowed(url):
    settings = ProviderSettings.from_env("payments", {"OUTBOX_PAYMENTS_BASE_URL": url})
    assert settings.base_url == url.rstrip("/")


@pytest.mark.parametrize("variable,value", [
    ("OUTBOX_PAYMENTS_TIMEOUT", "soon"), ("OUTBOX_PAYMENTS_TIMEOUT", "0"),
    ("OUTBOX_PAYMENTS_TIMEOUT", "nan"), ("OUTBOX_PAYMENTS_CONNECT_TIMEOUT", "-1"),
    ("OUTBOX_PAYMENTS_MAX_CONCURRENCY", "0"), ("OUTBOX_PAYMENTS_MAX_CONCURRENCY", "2.5"),
])
def test_bad_settings_name_the_variable(variable, value):
    with pytest.raises(ConfigurationError, match=variable):
        ProviderSettings.from_env("payments", {variable: value})


def test_both_key_sources_refused():
    with pytest.raises(ConfigurationError, match="OUTBOX_PAYMENTS_API_KEY_FILE"):
        ProviderSettings.from_env("payments", {"OUTBOX_PAYMENTS_API_KEY": KEY,
                                               "OUTBOX_PAYMENTS_API_KEY_FILE": "/run/key"})


def test_provider_without_default_url_needs_one():
    with pytest.raises(ConfigurationError, match="OUTBOX_WEBHOOKS_BASE_URL"):
        ProviderSettings.from_env("webhooks", {})


def test_registry_caches_and_reset_rereads_env(monkeypatch):
    monkeypatch.setenv("OUTBOX_PAYMENTS_TIMEOUT", "4")
    reset()
    try:
        first = get_provider("payments")
        assert get_provider("payments") is first and first.settings.read_timeout_s == 4
        monkeypatch.setenv("OUTBOX_PAYMENTS_TIMEOUT", "6")
        assert get_provider("payments").settings.read_timeout_s == 4
        reset()
        assert get_provider("payments").settings.read_timeout_s == 6
    finally:
        reset()
    assert known_providers() == ["crm", "email", "payments", "webhooks"]
    with pytest.raises(KeyError):
        get_provider("nope")


def test_a_request_with_its_own_url_and_content_is_sent_as_built():
    """A provider without a base URL (webhooks): the request's absolute URL, its bytes as
    they are (what a signature covers), no body re-encoding; without a URL it cannot be sent."""
    settings = ProviderSettings(name="webhooks", base_url=None)
    transport = MockTransport(lambda r: (204, {}, None))
    client = HttpClient(settings, transport)
    body = b'{"type":"a.b","data":{"x":"\xc3\xa9"}}'
    answer = client.send(Request("POST", "/ep_1", headers={"Content-Type": "application/json"},
                                 content=body, url="https://93.184.216.34/in?token=t"))
    sent = transport.calls[0].request
    assert answer.status_code == 204
    assert (sent.url, sent.body, sent.headers["Content-Type"]) == (
        "https://93.184.216.34/in?token=t", body, "application/json")
    with pytest.raises(ClientError, match="bad_request"):
        client.send(Request("POST", "/ep_1", content=body))
    assert ProviderSettings.from_env("webhooks", {"OUTBOX_WEBHOOKS_BASE_URL": "nonsense"},
                                     has_base_url=False).base_url is None


# --- credentials -----------------------------------------------------------------------

def test_key_file_rotation_without_restart(tmp_path):
    path = tmp_path / "key"
    path.write_text("sk_test_one\n")
    key = ApiKey(path=path)
    assert key.get() == "sk_test_one"
    replacement = tmp_path / "key.new"
    replacement.write_text("sk_test_two\n")
    os.replace(replacement, path)  # atomic rotation, as a secrets manager does it
    assert key.get() == "sk_test_two"
    assert "sk_test" not in repr(key)


def test_refresh_rereads_even_when_file_looks_unchanged(tmp_path):
    path = tmp_path / "key"
    path.write_text("sk_test_aaa")
    key = ApiKey(path=path)
    assert key.get() == "sk_test_aaa"
    st = os.stat(path)
    with open(path, "r+") as f:  # same inode, same size, same mtime
        f.write("sk_test_bbb")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert key.get() == "sk_test_aaa"
    key.refresh()
    assert key.get() == "sk_test_bbb"


def test_missing_empty_unreadable_or_non_utf8_key_is_unavailable(tmp_path):
    """Each names the variable (never the key) and is a deferral, not a dead letter."""
    with pytest.raises(CredentialUnavailable, match="no API key configured"):
        ApiKey().get()
    var = "OUTBOX_PAYMENTS_API_KEY_FILE"
    with pytest.raises(CredentialUnavailable, match=f"absent \\(No such file.*the file {var}"
                                                    " names") as info:
        ApiKey(path=tmp_path / "absent", file_variable=var).get()
    assert sanitize(info.value.detail) == info.value.detail   # the path is not masked
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(CredentialUnavailable, match=f"empty \\(empty\\), the file {var}"):
        ApiKey(path=tmp_path / "empty", file_variable=var).get()
    (tmp_path / "latin1").write_bytes(b"sk_test_caf\xe9")
    with pytest.raises(CredentialUnavailable, match="not UTF-8") as info:
        ApiKey(path=tmp_path / "latin1", file_variable=var).get()
    assert "caf" not in str(info.value)
    (tmp_path / "a-folder").mkdir()   # unreadable as a file, whoever runs the test
    with pytest.raises(CredentialUnavailable, match="Is a directory"):
        ApiKey(path=tmp_path / "a-folder", file_variable=var).get()
    assert repr(ApiKey(KEY)) == "ApiKey(value=***)"


def test_a_key_file_readable_by_others_gives_a_warning(tmp_path):
    path = tmp_path / "key"
    path.write_text(KEY)
    path.chmod(0o600)
    assert ApiKey(path=path, file_variable="OUTBOX_X_API_KEY_FILE").check() == []
    path.chmod(0o644)
    [warning] = ApiKey(path=path, file_variable="OUTBOX_X_API_KEY_FILE").check()
    assert "OUTBOX_X_API_KEY_FILE" in warning and "readable by group or others" in warning


# --- Retry-After -----------------------------------------------------------------------

NOW = datetime(2024, 6, 20, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize("value,expected", [
    ("2", 2.0), (" 1.5 ", 1.5), ("0", 0.0),
    ("Thu, 20 Jun 2024 12:00:30 GMT", 30.0),
    ("Thu, 20 Jun 2024 11:00:00 GMT", 0.0),       # past date
    ("999999999", 86_400.0),                      # clamped to a day
    ("-5", None), ("soon", None), ("", None), (None, None), ("1e3", None), ("nan", None),
])
def test_parse_retry_after(value, expected):
    assert parse_retry_after(value, now=NOW) == expected


def test_parse_retry_after_far_date_is_clamped():
    later = (NOW + timedelta(days=30)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert parse_retry_after(later, now=NOW, max_s=60) == 60


# --- sanitising and logs ---------------------------------------------------------------

@pytest.mark.parametrize("text,secret", [
    (f"using key {KEY} now", KEY),
    ("rk_live_51Habcdefghijklmnop failed", "51Habcdefghijklmnop"),
    ("Authorization: Bearer eyJhbGciOi.J9xyz-abc", "eyJhbGciOi"),
    ("header bearer abc.def.ghi", "abc.def.ghi"),
    ("signing with whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
    ("GET /x?api_key=hunter22&page=2", "hunter22"),
    ('{"password": "correct horse", "user": "bob"}', "correct horse"),
    ("client_secret=abc123; token: t0k3n", "abc123"),
    ("client_secret=abc123; token: t0k3n", "t0k3n"),
    ("card 4242 4242 4242 4242 exp 12/34", "4242 4242 4242 4242"),
    ("card 4000-0566-5566-5556", "4000-0566-5566-5556"),
    ("card 378282246310005", "378282246310005"),
])
def test_sanitize_masks(text, secret):
    cleaned = sanitize(text)
    assert secret not in cleaned
    assert "***" in cleaned


def test_sanitize_keeps_useful_text():
    assert sanitize("402 card_declined on pi_3N1234567890123456") == "402 card_declined on pi_3N1234567890123456"
    assert sanitize("ts=1718884800123 order 42") == "ts=1718884800123 order 42"  # not a Luhn number
    assert sanitize("card 4242424242424242").endswith("****4242")
    assert sanitize("Idempotency-Key: order-42") == "Idempotency-Key: order-42"


def test_sanitize_strips_control_chars_and_truncates():
    assert sanitize("line1\r\nFAKE 200 OK\x1b[31m") == "line1  FAKE 200 OK [31m"
    long = sanitize("x" * 1000)
    assert len(long) == 500 and long.endswith("…")
    assert len(sanitize("x" * 1000, max_length=None)) == 1000


def test_sanitizing_filter_renders_args():
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "key=%s user=%s\nforged",
                               (KEY, "bob"), None)
    assert SanitizingFilter().filter(record) is True
    assert record.args is None
    assert KEY not in record.getMessage() and "bob" in record.getMessage()
    assert "\n" not in record.getMessage()


def test_sanitizing_filter_cleans_tracebacks():
    try:
        raise ValueError(f"bad key {KEY}")
    except ValueError:
        import sys
        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "boom", None, sys.exc_info())
    SanitizingFilter().filter(record)
    assert KEY not in record.exc_text and "ValueError" in record.exc_text


def test_one_log_line_per_request_without_secrets_or_payload(caplog):
    provider, _ = provider_for()
    with caplog.at_level(logging.DEBUG, logger="integrations"):
        provider.deliver("charge", CHARGE, "order-42-charge")
    lines = [r for r in caplog.records if r.name == "integrations.http"]
    assert len(lines) == 1
    record = lines[0]
    assert (record.provider, record.method, record.path, record.status) == (
        "payments", "POST", "/v1/payment_intents", 200)
    assert record.elapsed_ms >= 0
    # Timings and ids are numbers that may spell "2000" by chance (0.048602000…).
    fields = {k: v for k, v in record.__dict__.items()
              if k not in ("created", "msecs", "relativeCreated", "elapsed_ms", "thread",
                           "process")}
    text = caplog.text + repr(fields)
    for secret in (KEY, "Bearer", "cus_1", "Order 42", "2000", "order-42-charge", "pm_card_visa"):
        assert secret not in text


def test_failure_log_is_sanitised(caplog):
    exc = requests.ConnectionError(f"failed for https://api.stripe.com/v1/x?api_key={KEY}&q=1")
    provider, _ = provider_for(lambda r: (_ for _ in ()).throw(exc))
    with caplog.at_level(logging.DEBUG, logger="integrations.http"), pytest.raises(Ambiguous):
        provider.deliver("charge", CHARGE, "k1")
    assert KEY not in caplog.text and "q=1" not in caplog.text
    assert caplog.records[-1].error_class == "ambiguous"


def test_adapter_contract():
    adapter = PaymentsAdapter()
    assert adapter.name == "payments" and adapter.operations == {"charge", "refund"}
    assert adapter.supports_idempotency and adapter.auth == "bearer"
    with pytest.raises(ValueError):
        adapter.build_request("teleport", {}, "k")


def test_raw_os_errors_from_a_transport_are_translated():
    """A transport that leaks a bare OSError still yields an IntegrationError."""
    def refused(_r):
        raise ConnectionRefusedError(111, "refused")

    def reset(_r):
        raise ConnectionResetError(104, "reset")

    with pytest.raises(Transient):
        provider_for(refused)[0].deliver("charge", CHARGE, "k1")
    with pytest.raises(Ambiguous):
        provider_for(reset)[0].deliver("charge", CHARGE, "k1")
