"""Chaos with real processes: a worker SIGKILLed mid-delivery loses nothing and duplicates nothing."""

from __future__ import annotations

import pytest
import requests
from sqlalchemy import select

from outbox import Attempt, Message, MessageStatus, enqueue
from tests.harness import both_brokers, wait_until

pytestmark = pytest.mark.slow


def _row(sessions, message_id):
    with sessions() as s:
        return s.get(Message, message_id)


@both_brokers
def test_worker_killed_after_the_effect_redelivers_with_the_same_key(
        sessions, procs, sandbox, celery_publisher):
    """Given the provider applied the charge but the worker dies before recording it (SIGKILL),
    when the lease expires, the relay re-sends it and another worker delivers it with the same
    idempotency key: exactly one effect, and the timeline shows the lost attempt."""
    requests.post(sandbox.url + "/_sandbox/faults", json={
        "fault": "slow_after", "delay_s": 30, "count": 1, "match_key": "crash-1"}, timeout=5)
    first = procs.worker("w1", OUTBOX_LEASE="3")
    procs.relay()
    with sessions() as session:
        message = enqueue(session, provider="payments", operation="charge",
                          payload={"amount": 4200, "currency": "usd"}, idempotency_key="crash-1")
        session.commit()
        message_id = message.id
    wait_until(lambda: sandbox.state.stats(include_log=False)["effects_by_key"].get("crash-1"),
               30, message="the effect at the sandbox")
    assert _row(sessions, message_id).status == MessageStatus.IN_FLIGHT
    procs.kill(first)                                   # SIGKILL, mid-request
    procs.worker("w2", OUTBOX_LEASE="3")
    wait_until(lambda: _row(sessions, message_id).status == MessageStatus.DELIVERED, 60,
               message="re-delivery after the lease expired")
    stats = sandbox.state.stats(include_log=False)
    assert stats["effects_by_key"]["crash-1"] == 1
    assert stats["effects_total"] == 1
    assert stats["requests_by_key"]["crash-1"] == 2
    with sessions() as s:
        outcomes = s.scalars(select(Attempt.outcome).where(Attempt.message_id == message_id)
                             .order_by(Attempt.id)).all()
    assert outcomes == ["lost", "delivered"]
