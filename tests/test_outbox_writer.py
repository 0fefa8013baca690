"""The group writer: a worker's claims and outcomes written in batches, each write with the
same effect as written alone (``outbox.writer``, ``lifecycle.claim_many``,
``lifecycle.apply_delivered_many``), on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from integrations.errors import Transient
from outbox import dispatch, enqueue, lifecycle, writer
from outbox.clock import utcnow
from outbox.decisions import decide, failure_from
from outbox.models import Attempt, AttemptOutcome, Message, MessageStatus
from outbox.retry import RetryPolicy

LEASE = timedelta(seconds=60)


@pytest.fixture
def ids(sessions, publisher):
    """Six committed payments.charge messages, handed to the (recording) broker."""
    with sessions() as session:
        made = [enqueue(session, provider="payments", operation="charge",
                        payload={"amount": 100 + i, "currency": "usd"},
                        idempotency_key=f"writer-{i}").id for i in range(6)]
        session.commit()
    dispatch.dispatcher().flush()
    return made


def _status(sessions, message_id):
    with sessions() as session:
        return session.get(Message, message_id).status


def _attempts(sessions, message_id):
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(Attempt)
                              .where(Attempt.message_id == message_id))


def _write(group, writes):
    """Run ``writes`` as one batch, as the writer thread does; their results."""
    group._write(writes)
    return [w.future.result(timeout=5) for w in writes]


def test_a_batch_of_claims_takes_each_row_once_even_when_an_id_comes_twice(sessions, ids):
    """Two broker copies of one message in a batch: one Claim, the copy gets None."""
    group = writer.GroupWriter(sessions)
    now = utcnow() + timedelta(seconds=1)
    claims = _write(group, [writer._Claim(i, LEASE, now, Future())
                            for i in [ids[0], ids[1], ids[0], ids[2]]])
    assert [c.id if c else None for c in claims] == [ids[0], ids[1], None, ids[2]]
    assert all(c.lease_token == 1 and c.claimed_at == now for c in claims if c)
    assert [_status(sessions, i) for i in ids[:4]] == ["in_flight"] * 3 + ["queued"]


def test_claims_and_outcomes_in_one_batch_match_writing_them_alone(sessions, ids):
    """A batch of a claim, two successes and a failure: each row ends as ``lifecycle``'s
    functions, one by one, would leave it, with one attempt row per outcome."""
    group = writer.GroupWriter(sessions)
    now = utcnow() + timedelta(seconds=1)
    held = _write(group, [writer._Claim(i, LEASE, now, Future()) for i in ids[:3]])
    failure = failure_from(Transient("Service Unavailable", status_code=503))
    c = held[2]
    decision = decide(failure, attempts=c.attempts, rate_limited=c.rate_limited_count,
                      budget_started_at=c.budget_started_at, policy=RetryPolicy(),
                      idempotent=True, now=now)
    results = _write(group, [
        writer._Claim(ids[3], LEASE, now, Future()),
        writer._Delivered(lifecycle.Delivered(held[0], 200, "pi_0", now, "w"), Future()),
        writer._Delivered(lifecycle.Delivered(held[1], 200, "pi_1", now, "w"), Future()),
        writer._Failed(c, failure, decision, now, "w", Future()),
    ])
    assert results[0].id == ids[3] and results[1:] == [True, True, True]
    assert [_status(sessions, i) for i in ids[:4]] == [
        "delivered", "delivered", "pending", "in_flight"]
    with sessions() as session:
        assert session.get(Message, ids[1]).provider_ref == "pi_1"
        assert session.get(Message, ids[2]).last_error_class == "transient"
    assert [_attempts(sessions, i) for i in ids[:4]] == [1, 1, 1, 0]


def test_a_success_under_a_lost_lease_is_reported_as_such_in_a_batch(sessions, ids):
    """Of two successes in one executemany, the one whose row was claimed again meanwhile
    (lease token moved on) is False — history only — and the other True."""
    group = writer.GroupWriter(sessions)
    now = utcnow() + timedelta(seconds=1)
    first, second = _write(group, [writer._Claim(i, LEASE, now, Future()) for i in ids[:2]])
    with sessions() as session:   # the relay took the row over, and a new claim holds it
        session.get(Message, ids[1]).status = MessageStatus.QUEUED
        session.commit()
        assert lifecycle.claim(session, ids[1], LEASE, now=now).lease_token == 2
    results = _write(group, [
        writer._Delivered(lifecycle.Delivered(c, 200, f"pi_{n}", now, "w"), Future())
        for n, c in enumerate([first, second])])
    assert results == [True, False]
    assert [_status(sessions, i) for i in ids[:2]] == ["delivered", "in_flight"]
    assert [_attempts(sessions, i) for i in ids[:2]] == [1, 1]


def test_a_write_that_fails_fails_only_its_own_delivery(sessions, ids, monkeypatch, caplog):
    """The batch is rolled back and each write tried alone: the others succeed. The warning
    names the error's type only."""
    group = writer.GroupWriter(sessions)
    now = utcnow() + timedelta(seconds=1)
    held = _write(group, [writer._Claim(i, LEASE, now, Future()) for i in ids[:2]])
    failure = failure_from(Transient("Service Unavailable", status_code=503))
    real = lifecycle.apply_record

    def broken(session, claim, *args, **kwargs):
        if claim.id == ids[1]:
            raise RuntimeError("boom")
        return real(session, claim, *args, **kwargs)

    monkeypatch.setattr(lifecycle, "apply_record", broken)
    decision = decide(failure, attempts=0, rate_limited=0, budget_started_at=now,
                      policy=RetryPolicy(), idempotent=True, now=now)
    writes = [writer._Delivered(lifecycle.Delivered(held[0], 200, "pi_0", now, "w"), Future()),
              writer._Failed(held[1], failure, decision, now, "w", Future())]
    group._write(writes)
    assert writes[0].future.result(timeout=5) is True
    with pytest.raises(RuntimeError, match="boom"):
        writes[1].future.result(timeout=5)
    assert [_status(sessions, i) for i in ids[:2]] == ["delivered", "in_flight"]
    assert [r.getMessage() for r in caplog.records if r.name == "outbox.writer"] == [
        "a batch of 2 writes failed (RuntimeError); writing them one by one"]


def test_many_threads_through_one_writer_claim_each_row_exactly_once(sessions, ids):
    """12 threads, two per message, claim and deliver through the writer thread: every row
    delivered once, one attempt each, one Claim per row."""
    group = writer.GroupWriter(sessions)
    claimed: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(12)

    def work(message_id):
        start.wait()
        c = group.claim(message_id, LEASE, utcnow() + timedelta(seconds=1))
        if c is not None:
            with lock:
                claimed.append(c.id)
            assert group.mark_delivered(c, status_code=200, provider_ref="pi", now=utcnow(),
                                        worker="w")

    threads = [threading.Thread(target=work, args=(i,)) for i in ids * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(claimed) == sorted(ids)
    assert {_status(sessions, i) for i in ids} == {"delivered"}
    assert [_attempts(sessions, i) for i in ids] == [1] * 6
    assert group.writes == 18 and 1 <= group.batches <= 18   # 12 claims, 6 successes


def test_direct_and_group_writer_give_the_same_outcome(sessions, ids):
    """The same claim → failure → claim → success through each: the same rows."""
    now = utcnow() + timedelta(seconds=1)
    failure = failure_from(Transient("Service Unavailable", status_code=503))
    for way, message_id in ((writer.Direct(sessions), ids[0]),
                            (writer.GroupWriter(sessions), ids[1])):
        c = way.claim(message_id, LEASE, now)
        decision = decide(failure, attempts=0, rate_limited=0, budget_started_at=now,
                          policy=RetryPolicy(), idempotent=True, now=now)
        assert way.record(c, failure, decision, now=now, worker="w")
        later = decision.next_attempt_at + timedelta(seconds=1)
        c2 = way.claim(message_id, LEASE, later)
        assert c2.lease_token == 2 and c2.attempts == 1
        assert way.mark_delivered(c2, status_code=200, provider_ref="pi", now=later,
                                  worker="w")
    with sessions() as session:
        rows = [session.get(Message, i) for i in ids[:2]]
        assert [(m.status, m.attempts, m.lease_token, m.provider_ref) for m in rows] == [
            ("delivered", 2, 2, "pi")] * 2
        outcomes = [[a.outcome for a in session.scalars(
            select(Attempt).where(Attempt.message_id == m.id).order_by(Attempt.id))]
            for m in rows]
    assert outcomes == [[AttemptOutcome.RETRY, AttemptOutcome.DELIVERED]] * 2
