"""End to end with real processes: enqueue → dispatch → Celery worker → sandbox → outcome."""

from __future__ import annotations

import signal
import threading

import pytest
import redis as redis_lib
import requests
from sqlalchemy import func, select

from outbox import Message, MessageStatus, enqueue
from outbox.dispatch import MessageRef, dispatcher
from tests.harness import both_brokers, wait_until

pytestmark = pytest.mark.slow

CHARGE = {"amount": 1999, "currency": "usd"}


def _count(sessions, status):
    with sessions() as s:
        return s.scalar(select(func.count()).select_from(Message).where(Message.status == status))


def _stats(sandbox):
    return sandbox.state.stats(include_log=False)


@both_brokers
def test_committed_messages_are_delivered_once_and_rolled_back_ones_never(
        sessions, procs, sandbox, celery_publisher):
    """Given a worker, when 30 charges commit and 5 roll back, then 30 effects, one per key."""
    procs.worker()
    with sessions() as session:
        for i in range(30):
            enqueue(session, provider="payments", operation="charge",
                    payload={**CHARGE, "amount": 100 + i}, idempotency_key=f"ok-{i}")
        session.commit()
        for i in range(5):
            enqueue(session, provider="payments", operation="charge", payload=CHARGE,
                    idempotency_key=f"rolled-back-{i}")
        session.rollback()
    wait_until(lambda: _count(sessions, MessageStatus.DELIVERED) == 30, 60,
               message="30 deliveries")
    stats = _stats(sandbox)
    assert stats["effects_total"] == 30
    assert set(stats["effects_by_key"].values()) == {1}
    assert not any(k.startswith("rolled-back") for k in stats["requests_by_key"])


@both_brokers
def test_twenty_duplicate_broker_messages_make_one_provider_call(
        sessions, procs, sandbox, celery_publisher, broker):
    """Given sandbox idempotency switched OFF, 20 broker messages for one row → 1 request."""
    requests.post(sandbox.url + "/_sandbox/config", json={"idempotency": False}, timeout=5)
    with sessions() as session:
        message = enqueue(session, provider="payments", operation="charge", payload=CHARGE,
                          idempotency_key="dup-1")
        ref = MessageRef(message.id, message.provider, message.operation)
        session.commit()
    celery_publisher.publish([ref] * 20)
    dispatcher().flush()            # and the commit's own dispatch: 21 messages in all
    sent = broker.waiting("payments")
    assert sent >= 20
    worker = procs.worker(concurrency=8)
    wait_until(lambda: _count(sessions, MessageStatus.DELIVERED) == 1, 60, message="delivery")
    # Every message taken and handled (one delivery log line each), then a warm shutdown;
    # nothing is left in the queue, nothing was put back, nothing is unacknowledged.
    wait_until(lambda: procs.log("w1").count("outbox.delivery: ") >= sent, 30,
               message=f"all {sent} broker messages handled")
    procs.kill(worker, signal.SIGTERM)
    assert broker.waiting("payments") == 0
    if broker.kind == "redis":
        assert redis_lib.Redis.from_url(broker.url).hlen("unacked") == 0
    assert _stats(sandbox)["requests_by_key"] == {"dup-1": 1}


def test_redis_flushed_while_queued_relay_republishes_all(
        sessions, procs, sandbox, celery_publisher, redis_url):
    """Given 40 queued messages and no worker, when Redis is flushed, the relay re-sends all."""
    import redis as redis_lib

    with sessions() as session:
        for i in range(40):
            enqueue(session, provider="payments", operation="charge", payload=CHARGE,
                    idempotency_key=f"flush-{i}")
        session.commit()
    dispatcher().flush()
    assert _count(sessions, MessageStatus.QUEUED) == 40
    redis_lib.Redis.from_url(redis_url).flushdb()
    procs.relay(OUTBOX_RELAY_REQUEUE_AFTER="1")
    procs.worker()
    wait_until(lambda: _count(sessions, MessageStatus.DELIVERED) == 40, 60,
               message="40 deliveries after the flush")
    stats = _stats(sandbox)
    assert stats["effects_total"] == 40
    assert sorted(stats["effects_by_key"]) == sorted(f"flush-{i}" for i in range(40))


def test_concurrent_enqueue_from_threads_is_delivered_once_per_key(
        sessions, procs, sandbox, celery_publisher):
    """Given 4 threads enqueueing the same 25 keys, then 25 rows and 25 effects."""
    procs.worker()

    def work():
        for i in range(25):
            with sessions() as session:
                enqueue(session, provider="payments", operation="charge", payload=CHARGE,
                        idempotency_key=f"race-{i}")
                session.commit()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wait_until(lambda: _count(sessions, MessageStatus.DELIVERED) == 25, 60, message="25")
    assert _stats(sandbox)["effects_total"] == 25
