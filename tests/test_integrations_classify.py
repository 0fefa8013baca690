"""Every row of the error table (README, "Error classification"), through PaymentsAdapter + HttpClient + MockTransport."""

from __future__ import annotations

import http.client
import os
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
import requests
from urllib3.exceptions import MaxRetryError, NewConnectionError, ProtocolError

from integrations.errors import (
    Ambiguous,
    AuthError,
    ClientError,
    CredentialUnavailable,
    Deferred,
    ErrorClass,
    InvalidResponse,
    RateLimited,
    Transient,
)
from integrations.registry import build_provider
from integrations.testing import MockTransport

CHARGE = {"amount": 2000, "currency": "usd", "customer": "cus_1", "metadata": {"order": "42"}}
INTENT = {"id": "pi_123", "object": "payment_intent", "status": "succeeded", "amount": 2000}


def provider_for(handler, **env):
    environ = {"OUTBOX_PAYMENTS_API_KEY": "sk_test_key123", **env}
    transport = MockTransport(handler)
    return build_provider("payments", environ, transport=transport), transport


def answer(status, body=None, headers=None):
    return lambda _request: (status, headers or {}, body)


def stripe_error(type_, code=None, message="", decline_code=None):
    return {"error": {"type": type_, "code": code, "message": message,
                      "decline_code": decline_code, "param": None}}


def deliver(handler, operation="charge", payload=CHARGE):
    provider, _ = provider_for(handler)
    return provider.deliver(operation, payload, "order-42-charge")


def raising(exc):
    def handler(_request):
        raise exc
    return handler


def test_success_returns_delivery_with_reference():
    """Given a 200 PaymentIntent, deliver returns its id and a short summary."""
    delivery = deliver(answer(200, INTENT))
    assert (delivery.status_code, delivery.provider_ref) == (200, "pi_123")
    assert delivery.summary == "200 pi_123 succeeded"


def test_refund_success():
    body = {"id": "re_9", "object": "refund", "status": "succeeded"}
    delivery = deliver(answer(200, body), "refund", {"payment_intent": "pi_123"})
    assert delivery.provider_ref == "re_9"


def test_connect_refused_is_transient():
    """The request was never sent: retry is always safe."""
    refused = NewConnectionError(None, "Failed to establish a new connection: [Errno 111] refused")
    exc = requests.ConnectionError(MaxRetryError(None, "/v1", refused))
    with pytest.raises(Transient) as info:
        deliver(raising(exc))
    assert info.value.error_class is ErrorClass.TRANSIENT
    assert info.value.status_code is None


def test_connect_timeout_is_transient():
    with pytest.raises(Transient):
        deliver(raising(requests.ConnectTimeout("connect timed out")))


@pytest.mark.parametrize("status", [408, 502, 503, 504])
def test_gateway_and_timeout_statuses_are_transient(status):
    with pytest.raises(Transient) as info:
        deliver(answer(status, "<html>bad gateway</html>"))
    assert info.value.status_code == status


def test_429_with_retry_after_seconds():
    with pytest.raises(RateLimited) as info:
        deliver(answer(429, stripe_error("invalid_request_error", "rate_limit"), {"Retry-After": "2"}))
    assert info.value.retry_after_s == 2
    assert info.value.code == "rate_limit"


def test_429_with_retry_after_http_date():
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=2), usegmt=True)
    with pytest.raises(RateLimited) as info:
        deliver(answer(429, None, {"Retry-After": when}))
    assert 0 < info.value.retry_after_s <= 2


def test_429_without_retry_after():
    with pytest.raises(RateLimited) as info:
        deliver(answer(429))
    assert info.value.retry_after_s is None


def test_read_timeout_is_ambiguous():
    with pytest.raises(Ambiguous) as info:
        deliver(raising(requests.ReadTimeout("read timed out")))
    assert info.value.code == "read_timeout"


@pytest.mark.parametrize("exc", [
    requests.ConnectionError(ProtocolError("Connection aborted.",
                                           ConnectionResetError(104, "reset by peer"))),
    requests.ConnectionError(ProtocolError("Connection aborted.",
                                           http.client.RemoteDisconnected("x"))),
    requests.exceptions.ChunkedEncodingError("connection broken: IncompleteRead"),
], ids=["reset", "remote-disconnected", "chunked"])
def test_connection_lost_after_send_is_ambiguous(exc):
    with pytest.raises(Ambiguous):
        deliver(raising(exc))


def test_500_is_ambiguous():
    with pytest.raises(Ambiguous) as info:
        deliver(answer(500, stripe_error("api_error", message="Something went wrong")))
    assert (info.value.status_code, info.value.code) == (500, "api_error")


def test_409_idempotency_key_in_use_is_transient():
    body = stripe_error("invalid_request_error", "idempotency_key_in_use",
                        "There is currently another in-progress request using this key")
    with pytest.raises(Transient) as info:
        deliver(answer(409, body))
    assert info.value.code == "idempotency_key_in_use"


@pytest.mark.parametrize("status", [400, 409])
def test_idempotency_key_reused_with_other_parameters_is_client_error(status):
    body = stripe_error("idempotency_error", None,
                        "Keys for idempotent requests can only be used with the same parameters")
    with pytest.raises(ClientError) as info:
        deliver(answer(status, body))
    assert info.value.code == "idempotency_error"
    assert "same parameters" in info.value.detail


def test_402_card_declined_is_client_error_with_code():
    body = stripe_error("card_error", "card_declined", "Your card was declined.", "insufficient_funds")
    with pytest.raises(ClientError) as info:
        deliver(answer(402, body))
    error = info.value
    assert (error.status_code, error.code) == (402, "card_declined")
    assert error.detail.startswith("Your card was declined.")
    assert "insufficient_funds" in error.detail
    assert str(error).startswith("402 card_declined: Your card was declined.")


@pytest.mark.parametrize("status,code", [(400, "parameter_invalid_integer"), (403, "secret_key_required"),
                                         (404, "resource_missing"), (410, "resource_gone"),
                                         (422, "unprocessable")])
def test_other_client_statuses_are_client_errors(status, code):
    with pytest.raises(ClientError) as info:
        deliver(answer(status, stripe_error("invalid_request_error", code, "nope")))
    assert (info.value.status_code, info.value.code) == (status, code)


def test_non_json_error_body_still_classifies_by_status():
    with pytest.raises(ClientError) as info:
        deliver(answer(404, "<html>Not Found</html>"))
    assert info.value.detail == "Not Found" and info.value.code is None


def test_redirect_is_client_error():
    with pytest.raises(ClientError, match="redirect"):
        deliver(answer(302, None, {"Location": "https://elsewhere.example/"}))


@pytest.mark.parametrize("status,cls", [(501, ClientError), (505, ClientError), (507, Ambiguous),
                                        (524, Ambiguous)])
def test_unusual_5xx(status, cls):
    with pytest.raises(cls):
        deliver(answer(status))


def test_401_refreshes_once_then_auth_error():
    """Two 401s in a row: one refresh, one retry, then AuthError (no third call)."""
    provider, transport = provider_for(answer(401, stripe_error("invalid_request_error", None,
                                                                "Invalid API Key provided: sk_test_***y123")))
    with pytest.raises(AuthError) as info:
        provider.deliver("charge", CHARGE, "k1")
    assert len(transport.calls) == 2
    assert info.value.status_code == 401
    assert "sk_test_key123" not in str(info.value)


def test_401_then_rotated_key_file_succeeds(tmp_path):
    """The key file is rotated while the first request is in flight; the retry uses the new key."""
    key_file = tmp_path / "key"
    key_file.write_text("sk_test_old\n")

    def handler(request):
        if request.headers["Authorization"] == "Bearer sk_test_new":
            return 200, {}, INTENT
        key_file.write_text("sk_test_new\n")
        return 401, {}, stripe_error("invalid_request_error", None, "Invalid API Key")

    environ = {"OUTBOX_PAYMENTS_API_KEY_FILE": str(key_file)}
    transport = MockTransport(handler)
    provider = build_provider("payments", environ, transport=transport)
    assert provider.deliver("charge", CHARGE, "k1").provider_ref == "pi_123"
    assert [c.request.headers["Authorization"] for c in transport.calls] == [
        "Bearer sk_test_old", "Bearer sk_test_new"]
    assert os.path.exists(key_file)


def test_missing_key_defers_without_a_call():
    """No key: nothing is sent and the message waits (CredentialUnavailable is a Deferred:
    no attempt spent), naming the variables to set."""
    transport = MockTransport(answer(200, INTENT))
    provider = build_provider("payments", {}, transport=transport)
    with pytest.raises(CredentialUnavailable, match="OUTBOX_PAYMENTS_API_KEY") as info:
        provider.deliver("charge", CHARGE, "k1")
    assert isinstance(info.value, Deferred) and info.value.retry_after_s > 0
    assert transport.calls == []


@pytest.mark.parametrize("body", [
    {"id": "ch_1", "object": "payment_intent", "status": "succeeded"},
    {"id": "pi_1", "object": "charge", "status": "succeeded"},
    {"id": "pi_1", "object": "payment_intent"},
    ["not", "an", "object"],
    None,
], ids=["bad-id", "bad-object", "no-status", "array", "not-json"])
def test_invalid_2xx_body_is_invalid_response(body):
    with pytest.raises(InvalidResponse) as info:
        deliver(answer(200, body if body is not None else "<html>ok</html>"))
    assert info.value.status_code == 200


def test_2xx_intent_needing_customer_action_is_client_error():
    body = {**INTENT, "status": "requires_action"}
    with pytest.raises(ClientError) as info:
        deliver(answer(200, body))
    assert info.value.code == "payment_intent_requires_action"


def test_invalid_payload_is_client_error_without_a_call():
    provider, transport = provider_for(answer(200, INTENT))
    with pytest.raises(ClientError) as info:
        provider.deliver("charge", {"amount": -1, "currency": "usd"}, "k1")
    assert info.value.code == "invalid_payload" and "$.amount" in str(info.value)
    with pytest.raises(ClientError, match="unknown_operation"):
        provider.deliver("teleport", CHARGE, "k1")
    assert transport.calls == []
