"""Ordered delivery with real processes, under faults and a worker kill: per key, the order
of effects at the provider is exactly the commit order."""

from __future__ import annotations

import random
import time

import pytest
import requests
from sqlalchemy import func, select

from outbox import Message, MessageStatus, enqueue
from tests.harness import wait_until

pytestmark = pytest.mark.slow

KEYS, PER_KEY = 50, 20


@pytest.fixture
def db_url(pg_url):
    """PostgreSQL only: several transactions per key compete for the commit order."""
    return pg_url


def _delivered(sessions):
    with sessions() as session:
        return session.scalar(select(func.count()).where(
            Message.status == MessageStatus.DELIVERED))


def test_fifty_keys_of_twenty_arrive_in_commit_order_through_faults_and_a_worker_kill(
        sessions, procs, sandbox, celery_publisher):
    """50 keys × 20 messages, committed one per transaction in a shuffled order of keys.
    5 % of messages meet a 503 before the effect, 5 % a 500 after it (ambiguous, and the
    provider stores the 500 under the key: found by the search 1.5 s later, past the
    sandbox's 1 s lag), and one of the two workers is SIGKILLed mid-run and restarted. Per
    key, the provider's effects follow commit order, one effect each."""
    rng = random.Random(7)
    plan = [k for k in range(KEYS) for _ in range(PER_KEY)]
    rng.shuffle(plan)
    sent_in_order: dict[int, list[str]] = {k: [] for k in range(KEYS)}
    for k in range(KEYS):
        for n in range(PER_KEY):
            if rng.random() < 0.05:
                fault = rng.choice([{"fault": "error_before", "status": 503},
                                    {"fault": "error_after", "status": 500}])
                requests.post(sandbox.url + "/_sandbox/faults", timeout=5,
                              json={**fault, "count": 1, "match_key": f"o-{k}-{n}"})
    verify = {"OUTBOX_PAYMENTS_VERIFY_AFTER": "1.5"}
    workers = [procs.worker("w1", queues="payments", concurrency=8, **verify),
               procs.worker("w2", queues="payments", concurrency=8, **verify)]
    procs.relay(**verify)
    counters = {k: 0 for k in range(KEYS)}
    for k in plan:
        key = f"o-{k}-{counters[k]}"
        counters[k] += 1
        with sessions() as session:
            enqueue(session, provider="payments", operation="charge",
                    payload={"amount": 100 + counters[k], "currency": "usd"},
                    idempotency_key=key, ordering_key=f"contact-{k}")
            session.commit()
        sent_in_order[k].append(key)
    wait_until(lambda: _delivered(sessions) >= 200, 90, interval_s=0.5,
               message="the first 200 deliveries")
    procs.kill(workers[0])                               # SIGKILL, mid-run
    time.sleep(1)
    procs.worker("w1b", queues="payments", concurrency=8, **verify)   # as a supervisor would
    wait_until(lambda: _delivered(sessions) == KEYS * PER_KEY, 180, interval_s=0.5,
               message=f"all {KEYS * PER_KEY} deliveries")

    stats = sandbox.state.stats()
    assert stats["effects_total"] == KEYS * PER_KEY
    assert set(stats["effects_by_key"].values()) == {1}
    effects = [key for key in stats["effect_log"] if key.startswith("o-")]
    for k in range(KEYS):
        order = [key for key in effects if key.startswith(f"o-{k}-")]
        assert order == sent_in_order[k], f"contact-{k} out of order"
    with sessions() as session:
        assert session.scalar(select(func.count()).where(
            Message.status == MessageStatus.DEAD)) == 0
