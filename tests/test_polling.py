"""Polling the provider's event list (``outbox.polling``, ``integrations.polling``) against
the sandbox's ``GET /v1/events`` (Stripe's pagination): 1,000 records paged, the cursor
moved with each page's events (a poller dying mid-walk misses and repeats nothing), backoff
while quiet, and an event seen by webhook and by poll processed once."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
from datetime import timedelta

import pytest
import requests
from sqlalchemy import func, select

from integrations.polling import StripeEvents
from integrations.registry import build_provider
from outbox import inbound, polling
from outbox.clock import utcnow
from outbox.models import Message, PollCursor
from tasks.delivery import deliver_message
from tests.harness import BIN, ROOT, free_port, served, wait_until
from web.inbound import create_receiver, sources_from_env

SECRET = "whsec_test_poll_0123456789"
QUIET = polling.PollSettings(interval_s=1.0, max_interval_s=8.0)


# Publishes recorded, the inbound limits in the test's Redis (conftest).
pytestmark = pytest.mark.usefixtures("publisher", "inbound_redis")


@pytest.fixture
def provider(sandbox, redis_url):
    p = build_provider("payments", {"OUTBOX_PAYMENTS_BASE_URL": sandbox.url,
                                    "OUTBOX_PAYMENTS_API_KEY": "sk_test_outbox"},
                       redis=redis_url)
    yield p
    p.close()


def emit(sandbox, n, start=0):
    for i in range(start, start + n):
        sandbox.state.webhooks.emit("payments", "payment_intent.succeeded",
                                    {"id": f"pi_{i:06d}", "object": "payment_intent",
                                     "status": "succeeded", "metadata": {"order": str(i)}})


def stored_ids(sessions) -> list[str]:
    with sessions() as s:
        return sorted(m.payload["event_id"] for m in s.scalars(
            select(Message).where(Message.provider == inbound.INBOUND)))


def event_ids(sandbox) -> list[str]:
    return sorted(e["id"] for e in sandbox.state.webhooks.events)


def test_a_thousand_events_are_paged_and_the_cursor_walks_forward(sessions, sandbox, provider):
    emit(sandbox, 1000)
    source = StripeEvents(provider)
    found, interval = polling.poll_once(sessions, "payments", source, QUIET)
    assert found == 1000 and stored_ids(sessions) == event_ids(sandbox)
    assert interval == QUIET.interval_s
    with sessions() as s:
        assert s.get(PollCursor, "payments").cursor == max(event_ids(sandbox))
    emit(sandbox, 250, start=1000)
    assert polling.poll_once(sessions, "payments", source, QUIET)[0] == 250
    assert stored_ids(sessions) == event_ids(sandbox)
    requests_made = [r for r in sandbox.state.stats(include_log=True)["request_log"]
                     if r["path"] == "/v1/events"]
    assert len(requests_made) == 10 + 3   # 100 a page: 10 pages back, then 3 forward


class Dies(Exception):
    pass


class DyingSource(StripeEvents):
    """Stops (as a killed poller would) after ``pages`` pages."""

    def __init__(self, provider, pages):
        super().__init__(provider)
        self.left = pages

    def newer(self, cursor):
        for page in super().newer(cursor):
            if self.left == 0:
                raise Dies()
            self.left -= 1
            yield page


def test_a_poller_dying_mid_walk_misses_and_repeats_nothing(sessions, sandbox, provider):
    emit(sandbox, 10)
    polling.poll_once(sessions, "payments", StripeEvents(provider), QUIET)   # cursor set
    emit(sandbox, 450, start=10)
    with pytest.raises(Dies):
        polling.poll_once(sessions, "payments", DyingSource(provider, pages=2), QUIET)
    assert len(stored_ids(sessions)) == 10 + 200   # two pages stored, with their cursor
    polling.poll_once(sessions, "payments", StripeEvents(provider), QUIET)
    assert stored_ids(sessions) == event_ids(sandbox)   # 0 missed
    with sessions() as s:                               # 0 twice
        assert s.scalar(select(func.count()).select_from(Message)) == 460


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)   # a process test: one kind
def test_a_sigkilled_poller_process_misses_and_repeats_nothing(sessions, db_url, redis_url,
                                                               tmp_path):
    """``outbox poll`` against a sandbox answering each page in 0.3 s, SIGKILLed mid-walk,
    then run to the end."""
    port = free_port()
    env = {"DATABASE_URL": db_url, "REDIS_URL": redis_url,
           "OUTBOX_PAYMENTS_BASE_URL": f"http://127.0.0.1:{port}",
           "OUTBOX_PAYMENTS_API_KEY": "sk_test_outbox", "SANDBOX_PAYMENTS_API_KEY": "sk_test_outbox",
           "OUTBOX_PAYMENTS_POLL_INTERVAL": "0.5", "OUTBOX_EMAIL_POLL": "off",
           "OUTBOX_POLL_LOCK_TTL": "1",
           "OUTBOX_EMAIL_API_KEY": "sk_test_outbox"}
    import os

    full = {**os.environ, **env}
    box = subprocess.Popen([sys.executable, "-m", "sandbox", "--port", str(port)], cwd=ROOT,
                           env=full, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _answers(url), 20, message="the sandbox")
        auth = {"Authorization": "Bearer sk_test_outbox"}
        for i in range(30):
            requests.post(url + "/v1/payment_intents", headers={**auth, "Idempotency-Key": f"k{i}"},
                          data={"amount": 100 + i, "currency": "usd", "confirm": "true"}, timeout=5)
        first = subprocess.run([str(BIN / "outbox"), "poll", "--once"], env=full, cwd=ROOT,
                               capture_output=True, text=True, timeout=60)
        assert first.returncode == 0, first.stderr
        for i in range(30, 530):
            requests.post(url + "/v1/payment_intents", headers={**auth, "Idempotency-Key": f"k{i}"},
                          data={"amount": 100 + i, "currency": "usd", "confirm": "true"}, timeout=5)
        requests.post(url + "/_sandbox/faults", json={"fault": "latency", "delay_s": 0.3,
                                                      "path": "/v1/events"}, timeout=5)
        log = open(tmp_path / "poll.log", "wb")
        poller = subprocess.Popen([str(BIN / "outbox"), "poll"], env=full, cwd=ROOT,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: len(stored_ids(sessions)) >= 130, 30, message="two pages stored")
        os.killpg(poller.pid, signal.SIGKILL)
        poller.wait(10)
        assert len(stored_ids(sessions)) < 530
        requests.delete(url + "/_sandbox/faults", timeout=5)
        import time

        time.sleep(1.2)   # the killed poller's lock lapses (OUTBOX_POLL_LOCK_TTL)
        again = subprocess.run([str(BIN / "outbox"), "poll", "--once"], env=full, cwd=ROOT,
                               capture_output=True, text=True, timeout=60)
        assert again.returncode == 0, again.stderr
        ids = stored_ids(sessions)
        assert len(ids) == len(set(ids)) == 530
    finally:
        box.terminate()
        box.wait(10)


def _answers(url) -> bool:
    try:
        return requests.get(url + "/_sandbox/stats", timeout=1).ok
    except requests.ConnectionError:
        return False


def test_polling_backs_off_while_quiet_and_returns_when_something_changes(sessions, sandbox,
                                                                          provider):
    source = StripeEvents(provider)
    emit(sandbox, 1)
    intervals = [polling.poll_once(sessions, "payments", source, QUIET)[1] for _ in range(6)]
    assert intervals == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    with sessions() as s:
        assert not polling.due(s, "payments")
        assert polling.due(s, "payments", utcnow() + timedelta(seconds=9))
    emit(sandbox, 1, start=1)
    assert polling.poll_once(sessions, "payments", source, QUIET) == (1, 1.0)


def test_an_event_seen_by_webhook_and_by_poll_is_processed_once(sessions, sandbox, provider,
                                                               engine):
    """The sandbox's webhook reaches a real receiver, the poller reads the same event: one
    stored event, one handler call."""
    calls = []

    @inbound.handler("payments", "payment_intent.succeeded")
    def paid(session, event):
        calls.append(event.id)

    app = create_receiver(sessions, sources_from_env({"OUTBOX_PAYMENTS_WEBHOOK_SECRET": SECRET}))
    try:
        with served(app) as base:
            sandbox.state.webhooks.configure({"payments": {
                "url": f"{base}/webhooks/payments", "secret": SECRET}})
            requests.post(sandbox.url + "/v1/payment_intents", timeout=5, data={
                "amount": 500, "currency": "usd", "confirm": "true"}, headers={
                "Authorization": "Bearer sk_test_outbox", "Idempotency-Key": "both-paths"})
            wait_until(lambda: sandbox.state.webhooks.describe()["sent"] == 1, 10,
                       message="the webhook")
        assert polling.poll_once(sessions, "payments", StripeEvents(provider), QUIET)[0] == 0
        [event] = stored_ids(sessions)
        with sessions() as s:
            message_id = s.scalar(select(Message.id).where(Message.provider == inbound.INBOUND))
        for _ in range(2):   # the broker may carry both paths' messages: one processing
            deliver_message(message_id, sessions=sessions, lease=timedelta(seconds=60),
                            rng=random.Random(1))
        assert calls == [event]
    finally:
        inbound._handlers.clear()
