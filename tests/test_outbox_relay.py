"""The relay: publishes due and lost rows, leaves the rest, and never loses a row when the broker fails."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import insert, update

from integrations.errors import RateLimited, Transient
from integrations.registry import supports_idempotency
from outbox import dispatch, enqueue
from outbox.clock import utcnow
from outbox.config import RelaySettings
from outbox.db import make_engine, make_sessionmaker
from outbox.decisions import decide, failure_from
from outbox.ids import new_id
from outbox.lifecycle import claim, record
from outbox.models import Message, MessageStatus
from outbox.relay import BrokerUnavailable, run_once, take_due
from outbox.retry import RetryPolicy

NOW_DUE = RelaySettings(grace_s=0, requeue_after_s=300, batch_size=500)


def _commit_charge(sessions, key):
    with sessions() as session:
        message = enqueue(session, provider="payments", operation="charge",
                          payload={"amount": 100, "currency": "usd"}, idempotency_key=key)
        session.commit()
    return message.id


def _row(sessions, message_id) -> Message:
    with sessions() as session:
        return session.get(Message, message_id)


def _relay(engine, settings=NOW_DUE) -> int:
    return run_once(engine, dispatch.dispatcher(), settings, idempotent=supports_idempotency)


def _fail(session, c, exc):
    """Record ``exc`` as the claimed attempt's failure, as the delivery task would."""
    failure = failure_from(exc)
    decision = decide(failure, attempts=c.attempts, rate_limited=c.rate_limited_count,
                      budget_started_at=c.budget_started_at, policy=RetryPolicy(),
                      idempotent=True, now=utcnow())
    record(session, c, failure, decision)
    return decision


@pytest.fixture
def stranded(sessions, publisher):
    """A row committed while the broker was down: its after-commit dispatch failed."""
    publisher.fail = True
    message_id = _commit_charge(sessions, "stranded-1")
    dispatch.dispatcher().flush()
    publisher.fail = False
    assert _row(sessions, message_id).status == MessageStatus.PENDING
    assert publisher.ids == []
    return message_id


def test_relay_publishes_a_stranded_row_once(engine, sessions, publisher, stranded):
    """The pending row is published by the relay and marked queued; a second pass publishes nothing."""
    assert _relay(engine) == 1
    assert publisher.ids == [stranded]
    row = _row(sessions, stranded)
    assert row.status == MessageStatus.QUEUED and row.queued_at is not None
    assert _relay(engine) == 0
    assert publisher.ids == [stranded]


def test_relay_waits_out_the_grace_for_fresh_rows(engine, sessions, publisher, stranded):
    """With a 1 h grace a fresh pending row is left for its after-commit dispatch."""
    assert _relay(engine, RelaySettings(grace_s=3600)) == 0
    assert publisher.ids == []
    assert _row(sessions, stranded).status == MessageStatus.PENDING


def test_relay_does_not_republish_rows_the_dispatch_already_queued(engine, sessions, publisher):
    """A row dispatched after commit (queued just now) is not sent again by the relay."""
    message_id = _commit_charge(sessions, "fast-path")
    dispatch.dispatcher().flush()
    assert publisher.ids == [message_id]
    assert _relay(engine) == 0
    assert publisher.ids == [message_id]


def test_queued_row_older_than_requeue_after_is_republished(engine, sessions, publisher):
    """Redis flushed: a row queued longer than requeue_after_s ago is sent again, once."""
    message_id = _commit_charge(sessions, "lost-in-redis")
    dispatch.dispatcher().flush()
    assert _relay(engine) == 0
    with sessions() as session:              # five minutes pass without a worker claiming it
        session.execute(update(Message).where(Message.id == message_id)
                        .values(queued_at=utcnow() - timedelta(seconds=301)))
        session.commit()
    assert _relay(engine) == 1
    assert publisher.ids == [message_id, message_id]
    row = _row(sessions, message_id)
    assert row.status == MessageStatus.QUEUED and utcnow() - row.queued_at < timedelta(seconds=60)
    assert _relay(engine) == 0


def test_expired_lease_is_recovered_and_republished(engine, sessions, publisher, stranded):
    """A worker died holding the row: the relay recovers the lease (attempts+1) and publishes
    it in the same pass (a dead worker says nothing about the provider: no backoff)."""
    with sessions() as session:
        assert claim(session, stranded, timedelta(0)) is not None    # lease already over
    assert _relay(engine) == 1
    assert publisher.ids == [stranded]
    row = _row(sessions, stranded)
    assert row.status == MessageStatus.QUEUED
    assert row.attempts == 1 and row.lease_token == 1
    assert row.last_error_class == "ambiguous"


def test_live_lease_is_left_alone(engine, sessions, publisher, stranded):
    """A row in flight under a valid lease is neither recovered nor published."""
    with sessions() as session:
        claim(session, stranded, timedelta(minutes=5))
    assert _relay(engine) == 0
    assert _row(sessions, stranded).status == MessageStatus.IN_FLIGHT
    assert publisher.ids == []


def test_scheduled_retry_is_published_only_when_due(engine, sessions, publisher, stranded):
    """A retry 0.3 s ahead is not published now, and is published (once) as soon as it is due."""
    with sessions() as session:
        c = claim(session, stranded, timedelta(minutes=1))
        outcome = _fail(session, c, Transient(status_code=503, retry_after_s=0.3))
    due_at = outcome.next_attempt_at
    grace = RelaySettings(grace_s=3600)     # a scheduled retry does not wait for the grace
    assert _relay(engine, grace) == 0
    deadline = time.monotonic() + 5
    published = 0
    while not published:
        assert time.monotonic() < deadline, "the retry was never published"
        published = _relay(engine, grace)
        if not published:
            time.sleep(0.02)
    assert utcnow() >= due_at
    assert published == 1 and publisher.ids == [stranded]
    assert _relay(engine, grace) == 0


def test_far_future_retry_is_not_published(engine, sessions, publisher, stranded):
    """A retry an hour ahead stays pending through relay passes."""
    with sessions() as session:
        c = claim(session, stranded, timedelta(minutes=1))
        _fail(session, c, RateLimited(status_code=429, retry_after_s=3600))
    assert _relay(engine) == 0
    row = _row(sessions, stranded)
    assert row.status == MessageStatus.PENDING and publisher.ids == []


def test_broker_failure_raises_and_puts_rows_back(engine, sessions, publisher):
    """Publisher down: run_once raises BrokerUnavailable, all 3 rows are pending again; later they go out."""
    publisher.fail = True
    ids = [_commit_charge(sessions, f"k-{n}") for n in range(3)]
    dispatch.dispatcher().flush()
    with pytest.raises(BrokerUnavailable, match="3 message"):
        _relay(engine)
    for message_id in ids:
        row = _row(sessions, message_id)
        assert row.status == MessageStatus.PENDING and row.queued_at is None
    publisher.fail = False
    assert _relay(engine) == 3
    assert sorted(publisher.ids) == sorted(ids)


def test_batch_size_limits_one_pass(engine, sessions, publisher):
    """batch_size=2 over 5 due rows: 2, 2, 1, then 0; each row once."""
    publisher.fail = True
    ids = [_commit_charge(sessions, f"b-{n}") for n in range(5)]
    dispatch.dispatcher().flush()
    publisher.fail = False
    settings = RelaySettings(grace_s=0, batch_size=2)
    assert [_relay(engine, settings) for _ in range(4)] == [2, 2, 1, 0]
    assert sorted(publisher.ids) == sorted(ids)


def test_two_relays_take_every_row_exactly_once(pg_url, publisher):
    """PostgreSQL: two relays (threads, engines) racing over 1,000 due rows take each row exactly once."""
    engine = make_engine(pg_url)
    past = utcnow() - timedelta(minutes=1)
    rows = [dict(id=new_id(), provider="payments", operation="charge", idempotency_key=f"bulk-{n}",
                 payload={"amount": n + 1, "currency": "usd"}, payload_sha256=f"{n:064d}",
                 status=MessageStatus.PENDING, attempts=0, rate_limited_count=0, lease_token=0,
                 next_attempt_at=past, created_at=past, updated_at=past, budget_started_at=past)
            for n in range(1000)]
    with make_sessionmaker(engine)() as session:
        session.execute(insert(Message), rows)
        session.commit()
    engine.dispose()

    settings = RelaySettings(grace_s=0, batch_size=25, max_queued=len(rows))
    taken: list[list[str]] = [[], []]
    errors = []
    barrier = threading.Barrier(2)

    def relay(n):
        own = make_engine(pg_url)
        try:
            sessions = make_sessionmaker(own)
            barrier.wait(10)
            while True:
                with sessions() as session:
                    refs = take_due(session, settings)
                if not refs:
                    return
                taken[n].extend(r.id for r in refs)
        except Exception as exc:  # reported below
            errors.append(exc)
        finally:
            own.dispose()

    threads = [threading.Thread(target=relay, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    everything = taken[0] + taken[1]
    assert len(everything) == 1000
    assert set(everything) == {r["id"] for r in rows}
    assert taken[0] and taken[1], "both relays should have taken some rows"


def test_expired_lease_of_an_email_needs_review_instead_of_a_resend(engine, sessions, publisher):
    """email has no idempotency: a worker lost mid-send must not lead to a second send —
    the relay dead-letters it 'needs review' and publishes nothing."""
    with sessions() as session:
        message = enqueue(session, provider="email", operation="send",
                          payload={"to": "a@example.com", "subject": "Hi", "text": "x",
                                   "from": "shop@example.com"}, idempotency_key="mail-1")
        session.commit()
        assert claim(session, message.id, timedelta(0)) is not None   # lease already over
    dispatch.dispatcher().flush()
    published_before = list(publisher.ids)
    assert _relay(engine) == 0
    assert publisher.ids == published_before
    row = _row(sessions, message.id)
    assert row.status == MessageStatus.DEAD and row.last_error.startswith("needs review")
