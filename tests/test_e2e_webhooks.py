"""Signed outbound webhooks end to end (issue 10 §2): ``outbox endpoints add`` → publish in a
transaction → commit → a real Celery worker (``-Q webhooks``, threads) → the sandbox's
receiver, which verifies each delivery with ``standardwebhooks``. Then the bulkhead: one
endpoint hanging does not delay another's deliveries and opens only its own breaker; an
endpoint's own rate limit holds at the receiver.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest
import redis as redis_lib
import requests
from cryptography.fernet import Fernet
from sqlalchemy import func, select

from integrations.registry import build_provider
from integrations.webhooks.endpoints import Endpoint
from outbox import Message, MessageStatus, endpoints
from sandbox.stats import max_in_window
from tests.harness import BIN, ROOT, run_cli, wait_until

pytestmark = pytest.mark.slow

EVENT = {"invoice": "in_42", "amount": 1999}


@pytest.fixture
def webhooks_env(procs, monkeypatch):
    """The key and allow-list of this test's processes, and of this one (the CLI)."""
    env = {"OUTBOX_SECRET_KEY": Fernet.generate_key().decode(),
           "OUTBOX_WEBHOOKS_ALLOW_HOSTS": "127.0.0.1"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("OUTBOX_SECRET_KEY_FILE", raising=False)
    procs.env.pop("OUTBOX_SECRET_KEY_FILE", None)
    procs.env.update(env)
    return env


def _add(capsys, url, *extra, events="*") -> tuple[str, str]:
    code, out, err = run_cli(capsys, "endpoints", "add", url, "--events", events, *extra)
    assert code == 0, err
    first, second = out.strip().splitlines()
    return first.split()[0], second.rsplit(" ", 1)[1]


def _publish(sessions, key, event_type="invoice.paid") -> list[str]:
    with sessions() as session:
        ids = [m.id for m in endpoints.publish(session, event_type, EVENT,
                                               idempotency_key=key)]
        session.commit()
    return ids


def _statuses(sessions, ids) -> list[str]:
    with sessions() as session:
        return list(session.scalars(select(Message.status).where(Message.id.in_(ids))))


def _hooks(base_url) -> dict:
    return requests.get(f"{base_url}/_sandbox/stats", timeout=10).json()["hooks"]


def _redis_text(url) -> str:
    """Every key and value in the test's Redis database (broker, limiter, breaker, events)."""
    client = redis_lib.Redis.from_url(url)
    parts = []
    try:
        for key in client.scan_iter(count=1000):
            parts.append(key)
            kind = client.type(key).decode()
            if kind == "string":
                parts.append(client.get(key) or b"")
            elif kind == "list":
                parts += client.lrange(key, 0, -1)
            elif kind == "hash":
                parts += [b for pair in client.hgetall(key).items() for b in pair]
            elif kind == "set":
                parts += list(client.smembers(key))
            elif kind == "zset":
                parts += client.zrange(key, 0, -1)
    finally:
        client.close()
    return b" ".join(parts).decode("utf-8", "replace")


def test_a_published_event_is_delivered_once_verified_and_the_secret_stays_secret(
        sessions, procs, sandbox, celery_publisher, webhooks_env, capsys, redis_url):
    """Given an endpoint on the sandbox's receiver, when an event is published and committed,
    then the receiver gets it once, verified by standardwebhooks, with webhook-id = the
    message id; the secret is in no worker log line, no Redis key or value."""
    endpoint_id, secret = _add(capsys, f"{sandbox.url}/_sandbox/hooks/shop")
    requests.post(f"{sandbox.url}/_sandbox/hooks/shop/config", json={"secret": secret},
                  timeout=5).raise_for_status()
    procs.worker("w1", queues="webhooks,dead_letter")
    procs.relay()
    [message_id] = _publish(sessions, "order-42-paid")
    wait_until(lambda: _statuses(sessions, [message_id]) == ["delivered"], 30,
               message="the webhook delivered")
    shop = sandbox.state.hooks.stats()["shop"]
    assert (shop["received"], shop["verified"], shop["unverified"]) == (1, 1, 0)
    assert shop["by_id"] == {message_id: 1}
    for text in (procs.log("w1"), procs.log("relay"), _redis_text(redis_url),
                 run_cli(capsys, "endpoints", "list", "--json")[1],
                 run_cli(capsys, "show", message_id, "--json")[1]):
        assert secret not in text and secret.removeprefix("whsec_") not in text


@pytest.mark.serial
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_hanging_endpoint_does_not_slow_another_and_opens_only_its_own_breaker(
        sessions, procs, celery_publisher, webhooks_env, capsys, redis_url):
    """Bulkhead: endpoint "dead" hangs (its calls wait for the 5 s read timeout), with a
    backlog; endpoint "ok" answers at once. With a cap of 2 calls in flight per endpoint,
    the worker's other threads keep delivering: every "ok" message is delivered well
    within the dead one's timeout of its commit, and only the dead one's breaker opens.
    The receiver runs in a process of its own (its timing is not the test's)."""
    receiver = procs.sandbox()
    requests.post(f"{receiver}/_sandbox/hooks/dead/config", json={"delay_s": 60},
                  timeout=5).raise_for_status()
    dead, _ = _add(capsys, f"{receiver}/_sandbox/hooks/dead", events="dead.event")
    ok, _ = _add(capsys, f"{receiver}/_sandbox/hooks/ok", events="ok.event")
    settings = {"OUTBOX_WEBHOOKS_TIMEOUT": "5",
                "OUTBOX_WEBHOOKS_BREAKER_FAILURES": "2",
                "OUTBOX_WEBHOOKS_BREAKER_MIN_CALLS": "2"}
    procs.worker("w1", queues="webhooks", concurrency=4, **settings)
    procs.relay()
    stuck = [_publish(sessions, f"dead-{n}", "dead.event")[0] for n in range(12)]
    wait_until(lambda: _hooks(receiver).get("dead", {}).get("received", 0) >= 2, 30,
               message="two calls hanging at the dead endpoint")
    committed = time.monotonic()
    fine = [_publish(sessions, f"ok-{n}", "ok.event")[0] for n in range(12)]
    wait_until(lambda: _statuses(sessions, fine) == ["delivered"] * 12, 30, interval_s=0.02,
               message="the healthy endpoint's 12 deliveries")
    took = time.monotonic() - committed
    assert took < 3.0, f"the healthy endpoint waited {took:.1f} s behind the hanging one"
    assert _hooks(receiver).get("dead", {}).get("received", 0) == 2   # the cap held

    provider = build_provider("webhooks", settings, redis=redis_url)
    try:
        def breaker(endpoint_id):
            endpoint = Endpoint(endpoint_id, "https://unused.invalid/", secrets=())
            return provider._protection_for(endpoint).snapshot()["breaker"]["state"]

        wait_until(lambda: breaker(dead) == "open", 30, interval_s=0.2,
                   message="the dead endpoint's breaker to open")
        assert breaker(ok) == "closed"
    finally:
        provider.close()
    with sessions() as session:
        lost = session.scalar(select(func.count()).select_from(Message).where(
            Message.id.in_(stuck), Message.status.in_([MessageStatus.DELIVERED,
                                                        MessageStatus.DISCARDED])))
    assert lost == 0   # the hanging endpoint's messages wait; none dead-lettered or dropped
    assert MessageStatus.DEAD not in _statuses(sessions, stuck)


@pytest.mark.serial
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_an_endpoints_own_rate_limit_holds_at_the_receiver(
        sessions, procs, celery_publisher, webhooks_env, capsys):
    """An endpoint added with --rate-limit 5/s gets 15 events no faster than 5 in any
    second, though the worker has 4 threads and the provider no limit of its own."""
    receiver = procs.sandbox()
    _add(capsys, f"{receiver}/_sandbox/hooks/slow", "--rate-limit", "5/s")
    procs.worker("w1", queues="webhooks", concurrency=4)
    procs.relay()
    ids = [_publish(sessions, f"slow-{n}")[0] for n in range(15)]
    wait_until(lambda: _statuses(sessions, ids) == ["delivered"] * 15, 60, interval_s=0.2,
               message="15 rate-limited deliveries")
    log = requests.get(f"{receiver}/_sandbox/stats", timeout=10).json()["hooks"]["slow"]["log"]
    times = sorted(e["at"] for e in log)
    assert len(times) == 15
    assert max_in_window(times) <= 5
    assert times[-1] - times[0] >= 14 / 5 * 0.95


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_webhooks_worker_refuses_to_start_without_a_secret_key(stack_env):
    """Without OUTBOX_SECRET_KEY no endpoint secret can be read: exit 2, one line."""
    env = {k: v for k, v in {**os.environ, **stack_env}.items()
           if k not in ("OUTBOX_SECRET_KEY", "OUTBOX_SECRET_KEY_FILE")}
    done = subprocess.run(
        [str(BIN / "celery"), "-A", "tasks", "worker", "-Q", "webhooks", "-P", "threads",
         "-c", "1", "--without-mingle", "--without-gossip"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-2000:]
    [line] = [x for x in output.splitlines() if "refusing to start" in x]
    assert "webhooks: OUTBOX_SECRET_KEY" in line and "Traceback" not in output
