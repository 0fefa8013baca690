"""The SSRF guard (``integrations.ssrf``, issue 10 §2): every non-public address form is
refused when a URL is registered, and again on the address actually connected to, with a
canary listener on a loopback alias that must see no connection."""

from __future__ import annotations

import socket
import threading

import pytest
import requests

from integrations import ssrf

REFUSED = [
    "https://127.0.0.1/hook", "https://[::1]/hook", "https://localhost/hook",
    "https://2130706433/hook", "https://0x7f000001/hook", "https://0177.0.0.1/hook",
    "https://0x7f.1/hook", "https://127.1/hook",
    "https://10.1.2.3/hook", "https://172.16.0.9/hook", "https://192.168.1.1/hook",
    "https://169.254.169.254/latest/meta-data", "https://[fd00:ec2::254]/hook",
    "https://100.64.0.1/hook", "https://[fc00::1]/hook", "https://[fe80::1]/hook",
    "https://[::ffff:127.0.0.1]/hook", "https://[::ffff:169.254.169.254]/hook",
    "https://0.0.0.0/hook", "https://[::]/hook", "https://0/hook",
    "https://224.0.0.1/hook",
    # IPv6 forms carrying an IPv4 address (NAT64, 6to4, IPv4-compatible/-translated, Teredo)
    "https://[64:ff9b::7f00:1]/hook", "https://[64:ff9b::a00:1]/hook",
    "https://[64:ff9b:1::a00:1]/hook", "https://[2002:7f00:1::]/hook",
    "https://[2002:a9fe:a9fe::1]/hook", "https://[::127.0.0.1]/hook",
    "https://[::a9fe:a9fe]/hook", "https://[::ffff:0:7f00:1]/hook", "https://[2001::1]/hook",
    "http://93.184.216.34/hook",                 # not https
    "https://user:secret@93.184.216.34/hook",    # credentials in the URL
    "https:///hook",                             # no host
    "https://example.com:99999/hook",            # not a port
]


@pytest.mark.parametrize("url", REFUSED)
def test_every_non_public_form_is_refused_at_registration(url):
    with pytest.raises(ssrf.Refused):
        ssrf.check_url(url)


@pytest.mark.parametrize("url", ["https://93.184.216.34/hook", "https://[2606:4700::1111]/x",
                                 "https://[64:ff9b::5db8:d822]/x"])   # NAT64 of a public one
def test_a_public_address_is_accepted(url):
    assert ssrf.check_url(url) == url


@pytest.fixture
def dns(monkeypatch):
    """A resolver the test controls: name → address (others resolve as usual)."""
    answers: dict[str, str] = {}
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host in answers:
            return real(answers[host], port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return answers


def test_a_name_that_resolves_to_a_private_address_is_refused(dns):
    dns["hooks.customer.example"] = "10.0.0.5"
    with pytest.raises(ssrf.Refused, match="not a public address"):
        ssrf.check_url("https://hooks.customer.example/in")


@pytest.fixture
def canary():
    """A TCP listener on the loopback alias 127.0.0.2 that counts connections."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.2", 0))
    server.listen(16)
    server.settimeout(0.2)
    seen = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            seen.append(conn)
            conn.sendall(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1], seen
    stop.set()
    thread.join(2)
    server.close()


def _session(allow_hosts=()):
    session = requests.Session()
    session.trust_env = False
    adapter = ssrf.GuardedAdapter(allow_hosts)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def test_dns_rebinding_is_refused_on_the_address_connected_to(dns, canary):
    """Public when registered, loopback when connected: no connection reaches the canary."""
    port, seen = canary
    dns["rebind.example"] = "93.184.216.34"
    assert ssrf.check_url(f"https://rebind.example:{port}/hook")
    dns["rebind.example"] = "127.0.0.2"
    with pytest.raises(requests.ConnectionError, match="non-public"):
        _session().post(f"http://rebind.example:{port}/hook", data=b"{}", timeout=2)
    with pytest.raises(requests.ConnectionError, match="non-public"):
        _session().post(f"http://127.0.0.2:{port}/hook", data=b"{}", timeout=2)
    assert seen == []


def test_an_allowed_host_is_connected_to(canary):
    """The explicit allow-list (the sandbox, tests) skips the address check: the guard
    itself connects as usual."""
    port, seen = canary
    answer = _session({"127.0.0.2"}).post(f"http://127.0.0.2:{port}/hook", data=b"{}",
                                           timeout=2)
    assert answer.status_code == 204 and len(seen) == 1
    assert ssrf.check_url(f"http://127.0.0.2:{port}/hook", {"127.0.0.2"})
