"""The ``email`` provider: SendGrid-shaped requests, classification, the sandbox, enqueue validation."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import pytest
import requests
from sqlalchemy import func, select

from integrations.email import EmailAdapter
from integrations.errors import (
    Ambiguous,
    AuthError,
    ClientError,
    ConfigurationError,
    ErrorClass,
    RateLimited,
    Transient,
)
from integrations.registry import build_provider, known_providers
from integrations.testing import MockTransport, sequence
from outbox import InvalidPayload, Message, enqueue
from outbox.decisions import decide, failure_from
from outbox.models import AttemptOutcome
from outbox.retry import RetryPolicy

KEY = "signup-42-welcome"
MAIL = {"to": "ann@example.com", "subject": "Welcome", "text": "Hello Ann",
        "from": {"email": "shop@example.com", "name": "Shop"}}

NOW = datetime(2026, 12, 1, 12, 0, 0)


def decided(exc, idempotent=False):
    """What the outbox decides for ``exc`` as an email's first failed attempt (email has no
    idempotency keys)."""
    return decide(failure_from(exc), attempts=0, rate_limited=0, budget_started_at=NOW,
                  policy=RetryPolicy(), idempotent=idempotent, now=NOW)


@pytest.fixture(autouse=True)
def _no_default_sender(monkeypatch):
    monkeypatch.delenv("OUTBOX_EMAIL_FROM", raising=False)


def provider_for(handler, **env):
    transport = MockTransport(handler)
    environ = {"OUTBOX_EMAIL_API_KEY": "SG.test-key", **env}
    return build_provider("email", environ, transport=transport), transport


def answer(status, body=None, headers=None):
    return lambda _request: (status, headers or {}, body)


def accepted(message_id="W6A5rFuiQ9WuFiqF-8rrXQ"):
    return answer(202, b"", {"X-Message-Id": message_id})


def sendgrid_error(message, field=None):
    return {"errors": [{"message": message, "field": field, "help": None}]}


def deliver(handler, payload=MAIL, key=KEY):
    provider, transport = provider_for(handler)
    return provider.deliver("send", payload, key), transport


def sent_body(transport, index=-1):
    return json.loads(transport.calls[index].request.body)


# ---- the adapter's requests ----------------------------------------------------------------

def test_registered_and_not_idempotent():
    assert "email" in known_providers()
    provider, _ = provider_for(accepted())
    assert provider.adapter.supports_idempotency is False
    assert provider.adapter.operations == frozenset({"send"})
    assert provider.settings.base_url == "https://api.sendgrid.com"


def test_request_is_a_sendgrid_v3_mail_send():
    """One POST /v3/mail/send, bearer auth, JSON in SendGrid's shape, the key in custom_args and a header."""
    payload = {"to": ["ann@example.com", {"email": "bob@example.com", "name": "Bob"}],
               "subject": "Your order", "text": "plain", "html": "<p>html</p>",
               "from": "shop@example.com", "reply_to": {"email": "help@example.com"},
               "categories": ["orders", "transactional"]}
    delivery, transport = deliver(accepted(), payload)
    request = transport.calls[0].request
    assert (request.method, request.url) == ("POST", "https://api.sendgrid.com/v3/mail/send")
    assert request.headers["Authorization"] == "Bearer SG.test-key"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["X-Message-Key"] == KEY
    assert "Idempotency-Key" not in request.headers
    assert sent_body(transport) == {
        "personalizations": [{"to": [{"email": "ann@example.com"},
                                     {"email": "bob@example.com", "name": "Bob"}]}],
        "from": {"email": "shop@example.com"},
        "reply_to": {"email": "help@example.com"},
        "subject": "Your order",
        "content": [{"type": "text/plain", "value": "plain"},
                    {"type": "text/html", "value": "<p>html</p>"}],
        "categories": ["orders", "transactional"],
        "custom_args": {"outbox_key": KEY},
    }
    assert len(transport.calls) == 1


def test_single_recipient_html_only_and_duplicates_dropped():
    payload = {"to": ["Ann@Example.com", "ann@example.com"], "subject": "s",
               "html": "<b>hi</b>", "from": "shop@example.com"}
    _, transport = deliver(accepted(), payload)
    body = sent_body(transport)
    assert body["personalizations"] == [{"to": [{"email": "Ann@Example.com"}]}]
    assert body["content"] == [{"type": "text/html", "value": "<b>hi</b>"}]
    assert "reply_to" not in body and "categories" not in body


def test_default_sender_from_environment(monkeypatch):
    monkeypatch.setenv("OUTBOX_EMAIL_FROM", "Shop <shop@example.com>")
    payload = {k: v for k, v in MAIL.items() if k != "from"}
    _, transport = deliver(accepted(), payload)
    assert sent_body(transport)["from"] == {"email": "shop@example.com", "name": "Shop"}
    # An explicit sender wins.
    _, transport = deliver(accepted(), {**payload, "from": "other@example.com"})
    assert sent_body(transport)["from"] == {"email": "other@example.com"}


def test_no_sender_anywhere_is_a_client_error_before_any_call():
    payload = {k: v for k, v in MAIL.items() if k != "from"}
    provider, transport = provider_for(accepted())
    with pytest.raises(ClientError) as info:
        provider.deliver("send", payload, KEY)
    assert info.value.code == "sender_missing"
    assert "OUTBOX_EMAIL_FROM" in str(info.value)
    assert transport.calls == []


@pytest.mark.parametrize("value", ["not-an-address", "Shop <shop@>", "a@b.c\r\nBcc: x@y.z"])
def test_malformed_default_sender_fails_loudly_without_quoting_it(value):
    with pytest.raises(ConfigurationError) as info:
        EmailAdapter(environ={"OUTBOX_EMAIL_FROM": value})
    assert "OUTBOX_EMAIL_FROM" in str(info.value) and value not in str(info.value)


@pytest.mark.parametrize("key", ["заказ-42", " order-42", "order-42 ", "order\n42"])
def test_a_key_that_is_no_header_value_is_refused_before_sending(key):
    """The key rule enqueue applies (schemas/common/idempotency_key) is applied again before
    the request is built: such a row can only come from outside enqueue, and is refused."""
    provider, transport = provider_for(accepted())
    with pytest.raises(ClientError) as info:
        provider.deliver("send", MAIL, key)
    assert info.value.code == "invalid_idempotency_key" and transport.calls == []


def test_invalid_payload_is_refused_before_sending():
    provider, transport = provider_for(accepted())
    with pytest.raises(ClientError) as info:
        provider.deliver("send", {"to": "ann@example.com", "subject": "s"}, KEY)
    assert info.value.code == "invalid_payload"
    assert transport.calls == []


# ---- classification ------------------------------------------------------------------------

def test_202_is_a_delivery_with_the_message_id():
    delivery, _ = deliver(accepted("abc123"))
    assert (delivery.status_code, delivery.provider_ref) == (202, "abc123")
    assert delivery.summary == "202 accepted abc123"


def test_2xx_without_message_id_is_still_delivered():
    """SendGrid's sandbox mode answers 200 without an id: the mail was accepted all the same."""
    delivery, _ = deliver(answer(200))
    assert (delivery.status_code, delivery.provider_ref) == (200, None)


def test_400_is_client_error_coded_by_field():
    body = {"errors": [
        {"message": "The from email does not contain a valid address.", "field": "from.email",
         "help": "http://sendgrid.com/docs"},
        {"message": "The subject is required.", "field": "subject", "help": None}]}
    with pytest.raises(ClientError) as info:
        deliver(answer(400, body))
    error = info.value
    assert (error.status_code, error.code, error.error_class) == (400, "from.email",
                                                                  ErrorClass.CLIENT_ERROR)
    assert error.detail == ("The from email does not contain a valid address.; "
                            "The subject is required.")
    assert decided(error).outcome is AttemptOutcome.DEAD and not decided(error).needs_review


@pytest.mark.parametrize("status", [403, 404, 413])
def test_other_4xx_are_client_errors(status):
    with pytest.raises(ClientError) as info:
        deliver(answer(status, sendgrid_error("access forbidden")))
    assert (info.value.status_code, info.value.detail) == (status, "access forbidden")


def test_401_refreshes_once_then_is_auth_error():
    body = sendgrid_error("The provided authorization grant is invalid, expired, or revoked")
    with pytest.raises(AuthError) as info:
        _, transport = deliver(answer(401, body))
    assert info.value.status_code == 401 and "grant is invalid" in info.value.detail
    provider, transport = provider_for(answer(401, body))
    with pytest.raises(AuthError):
        provider.deliver("send", MAIL, KEY)
    assert len(transport.calls) == 2   # one refresh, one retry, no more


def test_401_then_202_after_refresh_is_delivered():
    provider, transport = provider_for(sequence((401, {}, sendgrid_error("expired")),
                                                (202, {"X-Message-Id": "m1"}, b"")))
    assert provider.deliver("send", MAIL, KEY).provider_ref == "m1"
    assert len(transport.calls) == 2


def test_429_is_rate_limited_with_retry_after():
    with pytest.raises(RateLimited) as info:
        deliver(answer(429, sendgrid_error("too many requests"), {"Retry-After": "3"}))
    assert (info.value.retry_after_s, info.value.detail) == (3, "too many requests")
    decision = decided(info.value)
    assert decision.outcome is AttemptOutcome.RETRY and decision.attempts == 0
    assert decision.next_attempt_at == NOW + timedelta(seconds=3)


@pytest.mark.parametrize("status", [502, 503, 504, 408])
def test_gateway_errors_are_transient_and_retried(status):
    with pytest.raises(Transient) as info:
        deliver(answer(status, "<html>bad gateway</html>"))
    assert decided(info.value).outcome is AttemptOutcome.RETRY


@pytest.mark.parametrize("handler", [
    answer(500, sendgrid_error("internal error")),
    answer(520),
    sequence(requests.ReadTimeout("read timed out")),
], ids=["500", "520", "read-timeout"])
def test_ambiguous_without_idempotency_is_dead_lettered_for_review(handler):
    """The mail may have gone out and SendGrid cannot dedupe a retry: a person decides."""
    with pytest.raises(Ambiguous) as info:
        deliver(handler)
    decision = decided(info.value)
    assert decision.outcome is AttemptOutcome.DEAD and decision.needs_review
    assert decision.reason.startswith("needs review: ")
    assert failure_from(info.value).error_class == "ambiguous"


def test_non_sendgrid_error_body_falls_back_to_the_status():
    with pytest.raises(ClientError) as info:
        deliver(answer(400, {"error": "odd"}))
    assert (info.value.code, info.value.detail) == (None, "Bad Request")


# ---- real HTTP against the sandbox ---------------------------------------------------------

def sandbox_provider(sandbox, **env):
    environ = {"OUTBOX_EMAIL_BASE_URL": sandbox.url, "OUTBOX_EMAIL_API_KEY": "sk_test_outbox",
               "OUTBOX_EMAIL_TIMEOUT": "2", **env}
    return build_provider("email", environ)


def add_fault(sandbox, **spec):
    r = requests.post(sandbox.url + "/_sandbox/faults", json=spec, timeout=5)
    assert r.status_code == 200, r.text


def stats(sandbox):
    return requests.get(sandbox.url + "/_sandbox/stats?log=0", timeout=5).json()


def test_sandbox_accepts_and_counts_one_effect_per_request(sandbox):
    provider = sandbox_provider(sandbox)
    try:
        first = provider.deliver("send", {**MAIL, "html": "<p>Hello</p>", "categories": ["x"]},
                                 KEY)
        assert first.status_code == 202 and len(first.provider_ref) == 22
        assert sandbox.state.emails[first.provider_ref]["to"] == ["ann@example.com"]
        s = stats(sandbox)
        assert s["effects_by_key"] == {KEY: 1} and s["requests_by_key"] == {KEY: 1}
        assert s["status_counts"] == {"202": 1} and s["emails_total"] == 1
        # No idempotency at the provider: a second request with the same key is a second email.
        second = provider.deliver("send", MAIL, KEY)
        assert second.provider_ref != first.provider_ref
        assert stats(sandbox)["effects_by_key"] == {KEY: 2}
    finally:
        provider.close()


def test_sandbox_500_after_sending_is_needs_review_and_the_email_went_out(sandbox):
    add_fault(sandbox, fault="error_after", status=500, path="/v3/mail/send", count=1)
    provider = sandbox_provider(sandbox)
    try:
        with pytest.raises(Ambiguous) as info:
            provider.deliver("send", MAIL, KEY)
    finally:
        provider.close()
    assert decided(info.value, provider.adapter.supports_idempotency).needs_review
    assert stats(sandbox)["effects_by_key"] == {KEY: 1}


@pytest.mark.parametrize("spec, error", [
    ({"fault": "error_before", "status": 503}, Transient),
    ({"fault": "rate_limit", "retry_after": "2"}, RateLimited),
    ({"fault": "down", "mode": "503"}, Transient),
    ({"fault": "status", "status": 403}, ClientError),
])
def test_sandbox_pre_effect_faults_apply_to_email(sandbox, spec, error):
    add_fault(sandbox, **spec, match_key="flaky")
    provider = sandbox_provider(sandbox)
    try:
        with pytest.raises(error) as info:
            provider.deliver("send", MAIL, "flaky-1")
        assert provider.deliver("send", MAIL, "solid-1").status_code == 202
    finally:
        provider.close()
    assert info.value.detail   # a SendGrid-shaped body was parsed
    s = stats(sandbox)
    assert s["effects_by_key"] == {"solid-1": 1}
    assert s["requests_by_key"] == {"flaky-1": 1, "solid-1": 1}


def test_sandbox_read_timeout_after_sending(sandbox):
    add_fault(sandbox, fault="slow_after", delay_s=2.0, count=1)
    provider = sandbox_provider(sandbox, OUTBOX_EMAIL_TIMEOUT="0.3")
    try:
        with pytest.raises(Ambiguous):
            provider.deliver("send", MAIL, KEY)
    finally:
        provider.close()
    assert stats(sandbox)["effects_by_key"] == {KEY: 1}


def test_sandbox_wrong_key_is_auth_error_and_separate_email_key(sandbox):
    provider = sandbox_provider(sandbox, OUTBOX_EMAIL_API_KEY="SG.wrong")
    try:
        with pytest.raises(AuthError):
            provider.deliver("send", MAIL, KEY)
    finally:
        provider.close()
    r = requests.post(sandbox.url + "/_sandbox/config", json={"email_api_key": "SG.wrong"},
                      timeout=5)
    assert r.json()["email_api_key"].endswith("****")
    provider = sandbox_provider(sandbox, OUTBOX_EMAIL_API_KEY="SG.wrong")
    try:
        assert provider.deliver("send", MAIL, KEY).status_code == 202
    finally:
        provider.close()
    s = stats(sandbox)
    assert s["status_counts"] == {"401": 2, "202": 1} and s["effects_by_key"] == {KEY: 1}


def test_sandbox_server_rate_limit_reaches_the_adapter_as_rate_limited(sandbox):
    requests.post(sandbox.url + "/_sandbox/config",
                  json={"rate_limit": {"limit": 1, "window_s": 5}}, timeout=5).raise_for_status()
    provider = sandbox_provider(sandbox)
    try:
        provider.deliver("send", MAIL, "one")
        with pytest.raises(RateLimited) as info:
            provider.deliver("send", MAIL, "two")
    finally:
        provider.close()
    assert 1 <= info.value.retry_after_s <= 5
    assert stats(sandbox)["effects_by_key"] == {"one": 1}


# ---- enqueue validation --------------------------------------------------------------------

def _enqueue(session, payload, key="welcome-1"):
    return enqueue(session, provider="email", operation="send", payload=payload,
                   idempotency_key=key)


def _count(sessions):
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(Message))


@pytest.mark.parametrize("payload, path", [
    ({"to": "ann@example.com", "subject": "s"}, "$"),                    # neither text nor html
    ({"to": "ann@example.com", "subject": "s", "text": ""}, "$.text"),
    ({"subject": "s", "text": "t"}, "$"),
    ({"to": ["ann@example.com", "SECRET-not-an-address"], "subject": "s", "text": "t"}, "$.to[1]"),
    ({"to": [], "subject": "s", "text": "t"}, "$.to"),
    ({"to": ["a@example.com"] * 2, "subject": "s", "text": "t"}, "$.to"),
    ({"to": [f"u{i}@example.com" for i in range(51)], "subject": "s", "text": "t"}, "$.to"),
    ({"to": {"email": "ann@example.com", "nick": "A"}, "subject": "s", "text": "t"}, "$.to"),
    ({"to": {"name": "Ann"}, "subject": "s", "text": "t"}, "$.to"),
    ({"to": "ann@example.com", "subject": "", "text": "t"}, "$.subject"),
    ({"to": "ann@example.com", "subject": "x" * 999, "text": "t"}, "$.subject"),
    ({"to": "ann@example.com", "subject": "Hi\r\nBcc: all@example.com", "text": "t"},
     "$.subject"),
    ({**MAIL, "from": "SECRET@"}, "$.from"),
    ({**MAIL, "reply_to": {"email": "x@example.com", "name": "a\nb"}}, "$.reply_to.name"),
    ({**MAIL, "categories": [f"c{i}" for i in range(11)]}, "$.categories"),
    ({**MAIL, "categories": ["x" * 256]}, "$.categories[0]"),
    ({**MAIL, "cc": "x@example.com"}, "$"),
])
def test_enqueue_refuses_invalid_email_payloads_naming_the_path(sessions, payload, path):
    with sessions() as session:
        with pytest.raises(InvalidPayload) as info:
            _enqueue(session, payload)
        session.commit()
    assert info.value.path == path
    assert f"email.send: {path}:" in str(info.value)
    assert "SECRET" not in str(info.value)
    assert _count(sessions) == 0


def test_missing_text_and_html_says_so(sessions):
    with sessions() as session, pytest.raises(InvalidPayload,
                                              match=r"email\.send: \$: matches none"):
        _enqueue(session, {"to": "ann@example.com", "subject": "s"})


@pytest.mark.parametrize("payload", [
    MAIL,
    {"to": "ann@example.com", "subject": "s", "html": "<p>x</p>"},
    {"to": ["a@example.com", {"email": "b@example.co.uk", "name": "B"}], "subject": "x" * 998,
     "text": "t", "html": "h", "reply_to": "help@example.com", "categories": ["a", "b"]},
    {"to": [f"u{i}@example.com" for i in range(50)], "subject": "s", "text": "t"},
])
def test_enqueue_accepts_valid_email_payloads(sessions, publisher, payload):
    with sessions() as session:
        message = _enqueue(session, payload)
        session.commit()
        assert (message.provider, message.operation) == ("email", "send")
    assert _count(sessions) == 1


def test_celery_declares_an_email_queue():
    from tasks import app

    assert "email" in [queue.name for queue in app.conf.task_queues]


def test_sendgrid_rate_limit_headers_pause_every_worker_before_a_429(sandbox, redis_url):
    """The sandbox answers X-RateLimit-* like SendGrid (3 per 1 s here): the provider reads
    "Remaining: 0" and pauses until the reset, so six sends in a row see no 429."""
    requests.post(sandbox.url + "/_sandbox/config", timeout=5, json={
        "rate_limit": {"limit": 3, "window_s": 1, "path_prefix": "/v3/"}}).raise_for_status()
    env = {"OUTBOX_EMAIL_BASE_URL": sandbox.url, "OUTBOX_EMAIL_API_KEY": "sk_test_outbox",
           "OUTBOX_EMAIL_MAX_WAIT": "5"}
    provider = build_provider("email", env, redis=redis_url)
    try:
        for i in range(6):
            provider.deliver("send", {"to": "ann@example.com", "from": "shop@example.com",
                                      "subject": f"n{i}", "text": "x"}, f"pace-{i}")
    finally:
        provider.close()
    stats = sandbox.state.stats(include_log=False)
    assert stats["status_counts"] == {"202": 6}
