"""The webhooks provider (issue 10 §2), in process: ``deliver_message`` against the sandbox's
receiver over real HTTP on loopback, real Redis, both databases. Every delivery is verified
with the official ``standardwebhooks`` library, as a customer would.
"""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta

import pytest
import requests
from cryptography.fernet import Fernet
from sqlalchemy import select, text, update
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from integrations.registry import build_provider
from integrations.secretbox import SecretBox
from integrations.webhooks import endpoints as contract
from outbox import Message, deadletters, endpoints, enqueue, secrets
from outbox.clock import utcnow
from outbox.endpoints import SqlEndpointStore
from outbox.models import AttemptOutcome, WebhookEndpoint
from tasks.delivery import deliver_message
from tests.harness import run_cli

LEASE = timedelta(seconds=60)
EVENT = {"invoice": "in_42", "amount": 1999}


@pytest.fixture(autouse=True)
def _no_broker(publisher):
    """Enqueued rows go to a recording publisher; each test delivers them itself."""


@pytest.fixture
def secret_key(monkeypatch):
    key = Fernet.generate_key().decode()
    monkeypatch.setenv("OUTBOX_SECRET_KEY", key)
    monkeypatch.delenv("OUTBOX_SECRET_KEY_FILE", raising=False)
    return key


@pytest.fixture
def store(sessions, secret_key):
    """The outbox's endpoint store on this test's database, installed for the provider."""
    before = contract.installed()
    installed = SqlEndpointStore(lambda: sessions)
    contract.install(installed)
    yield installed
    contract.install(before)


@pytest.fixture
def provider(redis_url, store):
    env = {"OUTBOX_WEBHOOKS_ALLOW_HOSTS": "127.0.0.1", "OUTBOX_WEBHOOKS_TIMEOUT": "2",
           "OUTBOX_WEBHOOKS_BREAKER_FAILURES": "3", "OUTBOX_WEBHOOKS_BREAKER_MIN_CALLS": "3"}
    p = build_provider("webhooks", env, redis=redis_url)
    yield p
    p.close()


def register(sessions, url, events=("*",), rate_limit=None) -> tuple[str, str]:
    with sessions.begin() as session:
        endpoint, secret = endpoints.add(session, url, events, box=SecretBox.from_env(),
                                         rate_limit=rate_limit, allow_hosts={"127.0.0.1"})
        return endpoint.id, secret


def hook(sandbox, name, **config) -> str:
    """The receiver's URL for ``name``, configured (status, retry_after, delay_s, secret)."""
    if config:
        requests.post(f"{sandbox.url}/_sandbox/hooks/{name}/config", json=config,
                      timeout=5).raise_for_status()
    return f"{sandbox.url}/_sandbox/hooks/{name}"


def publish(sessions, key, event_type="invoice.paid", data=EVENT, **more) -> list[str]:
    with sessions.begin() as session:
        return [m.id for m in endpoints.publish(session, event_type, data, idempotency_key=key,
                                                **more)]


def deliver(sessions, provider, message_id, *, later=timedelta(0)):
    """One attempt, ``later`` after now (a retry is due only after its backoff)."""
    return deliver_message(message_id, sessions=sessions, lease=LEASE,
                           provider_for=lambda _name: provider,
                           clock=lambda: utcnow() + later, rng=random.Random(7))


def received(sandbox, name) -> dict:
    return sandbox.state.hooks.stats().get(name, {"received": 0, "log": [], "verified": 0})


def row(sessions, message_id) -> Message:
    with sessions() as session:
        return session.get(Message, message_id)


def verify(secret, entry) -> dict:
    """What a customer does: ``standardwebhooks`` verifies the body against the headers."""
    return Webhook(secret).verify(entry["body"].encode(), entry["headers"])


def test_a_delivery_is_signed_and_verifies_with_the_official_library(sessions, provider,
                                                                     sandbox):
    endpoint_id, secret = register(sessions, hook(sandbox, "a"))
    hook(sandbox, "a", secret=secret)   # the receiver verifies too
    [message_id] = publish(sessions, "order-1-paid")
    result = deliver(sessions, provider, message_id)
    assert result.outcome is AttemptOutcome.DELIVERED and "204 accepted" in result.summary
    got = received(sandbox, "a")
    assert (got["received"], got["verified"], got["unverified"]) == (1, 1, 0)
    [entry] = got["log"]
    body = verify(secret, entry)
    assert entry["headers"]["webhook-id"] == message_id
    assert body["type"] == "invoice.paid" and body["data"] == EVENT and body["timestamp"]
    assert entry["headers"]["webhook-signature"].startswith("v1,")
    assert len(entry["headers"]["webhook-signature"].split(" ")) == 1
    assert row(sessions, message_id).payload["endpoint_id"] == endpoint_id


def test_a_retry_sends_the_same_webhook_id_signed_again(sessions, provider, sandbox):
    _, secret = register(sessions, hook(sandbox, "r", status=503))
    paid_at = datetime(2026, 12, 7, 15, 0, 0, 123000, tzinfo=UTC)
    [message_id] = publish(sessions, "order-2-paid", occurred_at=paid_at)
    first = deliver(sessions, provider, message_id)
    assert first.outcome is AttemptOutcome.RETRY and "transient 503" in first.summary
    hook(sandbox, "r", status=None)
    assert deliver(sessions, provider, message_id, later=timedelta(minutes=10)).outcome \
        is AttemptOutcome.DELIVERED
    log = received(sandbox, "r")["log"]
    assert [e["headers"]["webhook-id"] for e in log] == [message_id, message_id]
    assert log[0]["body"] == log[1]["body"]   # the event's time, not the attempt's
    for entry in log:
        assert verify(secret, entry)["timestamp"] == "2026-12-07T15:00:00.123+00:00"


def test_during_a_rotation_both_secrets_verify_and_after_expiry_only_the_new_one(
        sessions, provider, sandbox):
    endpoint_id, old = register(sessions, hook(sandbox, "rot"))
    with sessions.begin() as session:
        new = endpoints.rotate_secret(session, endpoint_id, box=SecretBox.from_env())
    assert new != old and new.startswith("whsec_")
    [during] = publish(sessions, "rot-1")
    assert deliver(sessions, provider, during).outcome is AttemptOutcome.DELIVERED
    entry = received(sandbox, "rot")["log"][-1]
    first, second = entry["headers"]["webhook-signature"].split(" ")
    assert first == Webhook(new).sign(during, _sent_at(entry), entry["body"])   # new first
    assert second == Webhook(old).sign(during, _sent_at(entry), entry["body"])
    assert verify(new, entry) == verify(old, entry)

    with sessions.begin() as session:   # 24 h later: the previous secret has expired
        session.execute(update(WebhookEndpoint).values(
            previous_secret_expires_at=utcnow() - timedelta(seconds=1)))
    [after] = publish(sessions, "rot-2")
    assert deliver(sessions, provider, after).outcome is AttemptOutcome.DELIVERED
    entry = received(sandbox, "rot")["log"][-1]
    assert len(entry["headers"]["webhook-signature"].split(" ")) == 1
    verify(new, entry)
    with pytest.raises(WebhookVerificationError):
        verify(old, entry)


def _sent_at(entry):
    return datetime.fromtimestamp(int(entry["headers"]["webhook-timestamp"]), UTC)


def test_410_disables_the_endpoint_until_enabled_and_its_dead_letters_redrive(
        sessions, provider, sandbox):
    endpoint_id, _ = register(sessions, hook(sandbox, "gone", status=410))
    [first] = publish(sessions, "gone-1")
    result = deliver(sessions, provider, first)
    assert result.outcome is AttemptOutcome.DEAD and "410 endpoint_gone" in result.summary
    with sessions() as session:
        endpoint = session.get(WebhookEndpoint, endpoint_id)
        assert (endpoint.status, endpoint.disabled_reason) == ("disabled", "410 Gone")
        assert endpoint.disabled_at is not None
    # A message for it, enqueued before it was disabled: dead at once, nothing sent.
    with sessions.begin() as session:
        later = enqueue(session, provider="webhooks", operation="deliver",
                        payload={"endpoint_id": endpoint_id, "event_type": "a.b", "data": {}},
                        idempotency_key="gone-2").id
    result = deliver(sessions, provider, later)
    assert result.outcome is AttemptOutcome.DEAD and "endpoint_disabled" in result.summary
    assert row(sessions, later).last_error_class == "client_error"
    assert received(sandbox, "gone")["received"] == 1

    hook(sandbox, "gone", status=None)   # the customer fixed it
    with sessions.begin() as session:
        endpoints.enable(session, endpoint_id)
    with sessions() as session:
        done = deadletters.redrive(session, reason="customer fixed the endpoint",
                                   actor="tester", ids=[first, later])
    assert all(r.done for r in done)
    for message_id in (first, later):
        assert deliver(sessions, provider, message_id).outcome is AttemptOutcome.DELIVERED
    assert received(sandbox, "gone")["received"] == 3


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)   # the database plays no part
@pytest.mark.parametrize("status, outcome, error_class, code", [
    (302, AttemptOutcome.DEAD, "client_error", "redirect_refused"),
    (400, AttemptOutcome.DEAD, "client_error", None),
    (401, AttemptOutcome.DEAD, "client_error", None),
    (404, AttemptOutcome.DEAD, "client_error", None),
    (422, AttemptOutcome.DEAD, "client_error", None),
    (408, AttemptOutcome.RETRY, "transient", None),
    (500, AttemptOutcome.RETRY, "ambiguous", None),
    (503, AttemptOutcome.RETRY, "transient", None),
])
def test_what_an_endpoint_answers_decides_the_outcome(sessions, provider, sandbox, status,
                                                      outcome, error_class, code):
    register(sessions, hook(sandbox, "c", status=status))
    [message_id] = publish(sessions, f"class-{status}")
    result = deliver(sessions, provider, message_id)
    message = row(sessions, message_id)
    assert (result.outcome, message.last_error_class, message.last_status_code) == (
        outcome, error_class, status)
    if code:
        assert code in message.last_error
    assert received(sandbox, "c")["received"] == 1   # a redirect is never followed


def test_429_pauses_that_endpoint_only_for_retry_after(sessions, provider, sandbox):
    busy, _ = register(sessions, hook(sandbox, "busy", status=429, retry_after="7"),
                       events=("invoice.paid",))
    calm, _ = register(sessions, hook(sandbox, "calm"), events=("other.event",))
    [message_id] = publish(sessions, "busy-1")
    result = deliver(sessions, provider, message_id)
    assert result.outcome is AttemptOutcome.RETRY and "rate_limited 429" in result.summary
    assert row(sessions, message_id).next_attempt_at >= utcnow() + timedelta(seconds=6)
    store = contract.installed()
    paused = provider._protection_for(store.get(busy)).snapshot()["paused_for_s"]
    assert 5 < paused <= 7
    assert provider._protection_for(store.get(calm)).snapshot()["paused_for_s"] == 0
    [other] = publish(sessions, "calm-1", event_type="other.event")
    assert deliver(sessions, provider, other).outcome is AttemptOutcome.DELIVERED


def test_a_failing_endpoint_opens_its_own_breaker_only(sessions, provider, sandbox):
    down, _ = register(sessions, hook(sandbox, "down", status=503), events=("down.event",))
    up, _ = register(sessions, hook(sandbox, "up"), events=("up.event",))
    for n in range(3):
        [message_id] = publish(sessions, f"down-{n}", event_type="down.event")
        assert deliver(sessions, provider, message_id).outcome is AttemptOutcome.RETRY
    [deferred] = publish(sessions, "down-3", event_type="down.event")
    result = deliver(sessions, provider, deferred)
    assert result.outcome is AttemptOutcome.DEFERRED and "breaker" in result.summary
    assert received(sandbox, "down")["received"] == 3   # nothing sent while open
    store = contract.installed()
    assert provider._protection_for(store.get(down)).snapshot()["breaker"]["state"] == "open"
    [fine] = publish(sessions, "up-1", event_type="up.event")
    assert deliver(sessions, provider, fine).outcome is AttemptOutcome.DELIVERED
    assert provider._protection_for(store.get(up)).snapshot()["breaker"]["state"] == "closed"


def test_an_unknown_endpoint_is_a_client_error(sessions, provider):
    with sessions.begin() as session:
        message_id = enqueue(session, provider="webhooks", operation="deliver",
                             payload={"endpoint_id": "ep_NOSUCH", "event_type": "a.b",
                                      "data": {}}, idempotency_key="nobody").id
    result = deliver(sessions, provider, message_id)
    assert result.outcome is AttemptOutcome.DEAD and "unknown_endpoint" in result.summary


def test_without_a_secret_key_a_delivery_waits(sessions, provider, sandbox, monkeypatch):
    register(sessions, hook(sandbox, "nokey"))
    [message_id] = publish(sessions, "nokey-1")
    monkeypatch.delenv("OUTBOX_SECRET_KEY")
    result = deliver(sessions, provider, message_id)
    assert result.outcome is AttemptOutcome.DEFERRED and "secret_unreadable" in result.summary
    assert received(sandbox, "nokey")["received"] == 0


def test_secrets_are_stored_encrypted_and_survive_a_key_rotation(sessions, provider, sandbox,
                                                                  secret_key, monkeypatch,
                                                                  db_url, capsys):
    endpoint_id, secret = register(sessions, hook(sandbox, "enc"))
    with sessions.begin() as session:
        rotated = endpoints.rotate_secret(session, endpoint_id, box=SecretBox.from_env())
    with sessions() as session:
        raw = " ".join(str(v) for r in session.execute(
            text("SELECT * FROM outbox_webhook_endpoints")) for v in r)
    assert secret not in raw and rotated not in raw and "whsec_" not in raw
    assert secret.removeprefix("whsec_") not in raw

    new_key = Fernet.generate_key().decode()
    monkeypatch.setenv("OUTBOX_SECRET_KEY", f"{new_key},{secret_key}")   # new key first
    monkeypatch.setenv("DATABASE_URL", db_url)
    code, out, err = run_cli(capsys, "secrets", "rotate", "--json")
    assert (code, err) == (0, "") and json.loads(out)["outbox_webhook_endpoints"] == 2
    assert secrets.rotate(sessions, SecretBox.from_env())["outbox_webhook_endpoints"] == 0
    monkeypatch.setenv("OUTBOX_SECRET_KEY", new_key)   # the old key dropped
    [message_id] = publish(sessions, "enc-1")
    assert deliver(sessions, provider, message_id).outcome is AttemptOutcome.DELIVERED
    entry = received(sandbox, "enc")["log"][-1]
    verify(rotated, entry)
    verify(secret, entry)   # still within the rotation's 24 h


def test_publish_enqueues_one_message_per_subscribed_enabled_endpoint(sessions, store):
    url = "http://127.0.0.1:9/hook"
    every, _ = register(sessions, url, events=("*",))
    paid, _ = register(sessions, url, events=("invoice.paid", "invoice.voided"))
    register(sessions, url, events=("customer.created",))
    off, _ = register(sessions, url, events=("*",))
    with sessions.begin() as session:
        endpoints.disable(session, off, "testing")
    ids = publish(sessions, "evt-1")
    with sessions() as session:
        rows = session.scalars(select(Message).where(Message.id.in_(ids))).all()
        assert sorted((m.payload["endpoint_id"], m.idempotency_key) for m in rows) == sorted(
            [(every, f"evt-1:{every}"), (paid, f"evt-1:{paid}")])
        assert {m.payload["event_type"] for m in rows} == {"invoice.paid"}
    assert sorted(publish(sessions, "evt-1")) == sorted(ids)   # the same event again: nothing new
    [only] = publish(sessions, "evt-2", event_type="customer.deleted")   # '*' only
    assert row(sessions, only).payload["endpoint_id"] == every


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_timeouts_and_connection_failures_are_retried(sessions, provider, sandbox):
    """A read timeout is ambiguous and a refused connection transient: both retried (the
    receiver deduplicates by webhook-id), neither dead-lettered."""
    register(sessions, hook(sandbox, "slow", delay_s=3), events=("slow.event",))
    [slow] = publish(sessions, "slow-1", event_type="slow.event")
    result = deliver(sessions, provider, slow)
    assert result.outcome is AttemptOutcome.RETRY and "ambiguous read_timeout" in result.summary
    register(sessions, "http://127.0.0.1:9/nobody-listens", events=("gone.event",))
    [refused] = publish(sessions, "refused-1", event_type="gone.event")
    result = deliver(sessions, provider, refused)
    assert result.outcome is AttemptOutcome.RETRY and "transient connect_error" in result.summary


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("case", ["untrusted certificate", "TLS 1.1 only"])
def test_a_failed_tls_handshake_is_transient_and_sends_nothing(sessions, provider, loopback,
                                                               tls_certs, case):
    """Through the SSRF guard too, a handshake that fails is "never sent": transient
    tls_error, retried; the server read no request."""
    from tests.test_classification import HANDSHAKE_FAILURES

    server = loopback(HANDSHAKE_FAILURES[case](tls_certs))
    register(sessions, f"{server.url}/hook")
    [message_id] = publish(sessions, f"tls-{case}")
    result = deliver(sessions, provider, message_id)
    message = row(sessions, message_id)
    assert result.outcome is AttemptOutcome.RETRY
    assert (message.last_error_class, message.last_status_code) == ("transient", None)
    assert message.last_error.startswith("tls_error: TLS ") and server.requests == []
