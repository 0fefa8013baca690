"""``OUTBOX_ALERT_WEBHOOK_URL``: one Slack-compatible POST per change of health level, to a
real loopback receiver, through the providers' HTTP policy, with one POST per change
however many relays evaluate; nothing secret in the body."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis

from integrations import alerts
from integrations.errors import ConfigurationError


class Receiver:
    """A loopback HTTP server that records JSON bodies and answers ``status``."""

    def __init__(self):
        self.bodies: list[dict] = []
        self.status = 200
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers["Content-Length"])
                receiver.bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/T000/B000?x=1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def report(level, *reasons):
    return {"level": level, "at": "2026-12-02T00:00:00Z", "findings": [], "dead_awaiting": 3,
            "providers": {"payments": {"level": level, "findings": [
                {"check": "x", "level": level, "reason": r} for r in reasons]}}}


def test_one_post_per_change_of_level(receiver, redis_url):
    store = redis.Redis.from_url(redis_url)
    notifiers = [alerts.AlertNotifier(*alerts.webhook_client(
        {"OUTBOX_ALERT_WEBHOOK_URL": receiver.url}), store) for _ in range(2)]
    steps = [report("ok"), report("warning", "queue depth 150 ≥ 100"),
             report("warning", "queue depth 180 ≥ 100"),
             report("critical", "error rate 27% over 5 min ≥ 5% (503 ×40)"), report("ok")]
    for step in steps:
        for n in notifiers:   # two relays evaluate the same health
            n.notify(step)
    assert [b["level"] for b in receiver.bodies] == ["warning", "critical", "ok"]
    assert [b["previous"] for b in receiver.bodies] == ["ok", "warning", "critical"]
    critical = receiver.bodies[1]
    assert critical["text"].startswith("integration-outbox health is CRITICAL (was warning)")
    assert "payments: error rate 27% over 5 min ≥ 5% (503 ×40)" in critical["text"]
    assert critical["providers"]["payments"]["level"] == "critical"


def test_a_failed_post_is_tried_again_at_the_next_evaluation(receiver, redis_url):
    store = redis.Redis.from_url(redis_url)
    n = alerts.AlertNotifier(*alerts.webhook_client({"OUTBOX_ALERT_WEBHOOK_URL": receiver.url}),
                             store)
    receiver.status = 500
    assert not n.notify(report("critical", "breaker open"))
    receiver.status = 200
    assert n.notify(report("critical", "breaker open"))
    assert [b["level"] for b in receiver.bodies] == ["critical", "critical"]


def test_the_url_follows_the_http_policy():
    assert alerts.webhook_client({}) is None
    for bad in ("http://hooks.example.com/x", "ftp://127.0.0.1/x", "hooks.example.com"):
        with pytest.raises(ConfigurationError, match="OUTBOX_ALERT_WEBHOOK_URL"):
            alerts.webhook_client({"OUTBOX_ALERT_WEBHOOK_URL": bad})
    client, path = alerts.webhook_client(
        {"OUTBOX_ALERT_WEBHOOK_URL": "https://hooks.example.com/services/T/B/c?a=1"})
    assert client.settings.base_url == "https://hooks.example.com" and path == "/services/T/B/c?a=1"
    assert client.settings.timeout == (5.0, 10.0)
