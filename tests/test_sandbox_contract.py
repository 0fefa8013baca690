"""Contract test (issue 10 §4): the official ``stripe`` and ``sendgrid`` libraries (test-only
dependencies) drive the sandbox and parse every answer the outbox's code paths meet,
successes and error types alike. If the sandbox drifts from what real clients expect, a
path that real providers take would go untested; this is where that shows.
"""

from __future__ import annotations

import json

import pytest
import python_http_client.exceptions as sg_errors
import requests
import stripe
from sendgrid import SendGridAPIClient
from sendgrid.helpers.mail import CustomArg, Mail, MailSettings, SandBoxMode

KEY = "sk_test_outbox"   # conftest's sandbox key, for both APIs


def _fault(sandbox, **rule):
    requests.post(sandbox.url + "/_sandbox/faults", json=rule, timeout=5).raise_for_status()


@pytest.fixture
def stripe_client(sandbox):
    return stripe.StripeClient(KEY, base_addresses={"api": sandbox.url}, max_network_retries=0)


@pytest.fixture
def sendgrid_client(sandbox):
    return SendGridAPIClient(api_key=KEY, host=sandbox.url)


CHARGE = {"amount": 1999, "currency": "usd", "customer": "cus_1", "metadata": {"order": "42"},
          "confirm": True}


def test_stripe_parses_a_charge_its_replay_a_retrieve_a_refund_and_the_event_list(
        stripe_client):
    intent = stripe_client.v1.payment_intents.create(params=CHARGE,
                                                  options={"idempotency_key": "order-42"})
    assert isinstance(intent, stripe.PaymentIntent)
    assert (intent.object, intent.amount, intent.currency, intent.status) == (
        "payment_intent", 1999, "usd", "succeeded")
    assert intent.metadata["order"] == "42"
    replay = stripe_client.v1.payment_intents.create(params=CHARGE,
                                                  options={"idempotency_key": "order-42"})
    assert replay.id == intent.id
    assert stripe_client.v1.payment_intents.retrieve(intent.id).id == intent.id
    refund = stripe_client.v1.refunds.create(params={"payment_intent": intent.id},
                                          options={"idempotency_key": "refund-42"})
    assert isinstance(refund, stripe.Refund) and refund.payment_intent == intent.id
    events = stripe_client.v1.events.list(params={"limit": 10})
    assert isinstance(events, stripe.ListObject)
    assert all(isinstance(e, stripe.Event) for e in events.data)


@pytest.mark.parametrize("setup, params, key, error, code", [
    (None, {**CHARGE, "customer": "cus_declined"}, "declined", stripe.CardError, "card_declined"),
    (None, {"amount": -1, "currency": "usd"}, "bad-amount", stripe.InvalidRequestError, None),
    ({"fault": "rate_limit", "retry_after": "2"}, CHARGE, "limited", stripe.RateLimitError, None),
    ({"fault": "error_before", "status": 500}, CHARGE, "boom", stripe.APIError, None),
    ({"fault": "down", "mode": "503"}, CHARGE, "down", stripe.APIError, None),
])
def test_stripe_raises_its_own_error_type_for_each_failure(stripe_client, sandbox, setup, params,
                                                           key, error, code):
    if setup:
        _fault(sandbox, **setup)
    with pytest.raises(error) as caught:
        stripe_client.v1.payment_intents.create(params=params, options={"idempotency_key": key})
    if code:
        assert caught.value.code == code
    assert caught.value.http_status is not None


def test_stripe_sees_a_key_reused_with_other_parameters_and_a_wrong_api_key(stripe_client,
                                                                           sandbox):
    stripe_client.v1.payment_intents.create(params=CHARGE, options={"idempotency_key": "reused"})
    with pytest.raises(stripe.IdempotencyError):
        stripe_client.v1.payment_intents.create(params={**CHARGE, "amount": 5},
                                             options={"idempotency_key": "reused"})
    wrong = stripe.StripeClient("sk_test_wrong", base_addresses={"api": sandbox.url},
                                max_network_retries=0)
    with pytest.raises(stripe.AuthenticationError):
        wrong.v1.payment_intents.create(params=CHARGE, options={"idempotency_key": "wrong-key"})


def _mail(**kw):
    return Mail(from_email="shop@example.com", to_emails="ann@example.com",
                subject=kw.pop("subject", "Your order"), plain_text_content="Thank you.", **kw)


def test_sendgrid_parses_a_send_the_activity_search_and_the_scopes(sendgrid_client, sandbox):
    mail = _mail()
    mail.custom_arg = CustomArg("outbox_key", "order-42-mail")
    sent = sendgrid_client.send(mail)
    assert sent.status_code == 202 and len(sent.headers["X-Message-Id"]) == 22
    found = sendgrid_client.client.messages.get(query_params={
        "limit": 1, "query": "unique_args['outbox_key']=\"order-42-mail\""})   # it encodes
    [message] = json.loads(found.body)["messages"]
    assert message["msg_id"] == sent.headers["X-Message-Id"]
    scopes = sendgrid_client.client.scopes.get()
    assert "mail.send" in json.loads(scopes.body)["scopes"]


@pytest.mark.parametrize("setup, error, status", [
    ({"fault": "status", "status": 400}, sg_errors.BadRequestsError, 400),
    ({"fault": "rate_limit", "retry_after": "1"}, sg_errors.TooManyRequestsError, 429),
    ({"fault": "error_before", "status": 500}, sg_errors.InternalServerError, 500),
    ({"fault": "down", "mode": "503"}, sg_errors.ServiceUnavailableError, 503),
])
def test_sendgrid_raises_its_own_error_type_for_each_failure(sendgrid_client, sandbox, setup,
                                                             error, status):
    _fault(sandbox, **setup)
    with pytest.raises(error) as caught:
        sendgrid_client.send(_mail())
    assert caught.value.status_code == status
    assert isinstance(json.loads(caught.value.body)["errors"], list)


def test_sendgrid_sees_validation_errors_a_wrong_key_and_sandbox_mode(sendgrid_client, sandbox):
    with pytest.raises(sg_errors.BadRequestsError) as caught:
        sendgrid_client.send(_mail(subject=None))
    assert any(e["field"] == "subject" for e in json.loads(caught.value.body)["errors"])
    with pytest.raises(sg_errors.UnauthorizedError):
        SendGridAPIClient(api_key="SG.wrong", host=sandbox.url).send(_mail())
    mail = _mail()
    mail.mail_settings = MailSettings(sandbox_mode=SandBoxMode(True))
    assert sendgrid_client.send(mail).status_code == 200
    assert sandbox.state.emails == {}
