"""Ordered delivery per key: one message of a key at a time, in commit order; a retrying or
dead head holds its followers back, and other keys are not delayed."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from integrations.errors import Transient
from integrations.registry import supports_idempotency
from outbox import InvalidMessage, dispatch, enqueue, status
from outbox.clock import utcnow
from outbox.config import RelaySettings
from outbox.db import make_engine, make_sessionmaker
from outbox.deadletters import discard
from outbox.lifecycle import claim, mark_delivered
from outbox.models import Message, MessageStatus
from outbox.ordering import PARKED, blocked_keys
from outbox.relay import run_once
from tests.harness import fail_claimed

SETTINGS = RelaySettings(grace_s=60)   # fresh rows are left to the after-commit dispatch
LEASE = timedelta(seconds=60)


def _charge(session, key, amount, ordering_key):
    return enqueue(session, provider="payments", operation="charge",
                   payload={"amount": amount, "currency": "usd"}, idempotency_key=key,
                   ordering_key=ordering_key).id


def _pass(engine, publisher):
    publisher.published.clear()
    run_once(engine, dispatch.dispatcher(), SETTINGS, idempotent=supports_idempotency)
    return publisher.ids


def _deliver(sessions, message_id):
    with sessions() as session:
        held = claim(session, message_id, LEASE)
        assert held is not None, f"{message_id} could not be claimed"
        mark_delivered(session, held, status_code=200, provider_ref="pi_x")


def _row(sessions, message_id):
    with sessions() as session:
        return session.get(Message, message_id)


def test_messages_of_one_key_are_numbered_and_only_the_head_is_dispatched(
        engine, sessions, publisher):
    """Three messages for contact-42 in one transaction: numbered 1, 2, 3; after commit only
    the head goes to the broker. Another key's message goes at once."""
    with sessions() as session:
        ids = [_charge(session, f"c42-{n}", 100 + n, "contact-42") for n in range(3)]
        other = _charge(session, "c7-0", 500, "contact-7")
        session.commit()
    dispatch.dispatcher().flush()
    assert sorted(publisher.ids) == sorted([ids[0], other])
    assert [_row(sessions, i).ordering_seq for i in ids] == [1, 2, 3]


def test_followers_go_one_at_a_time_in_order(engine, sessions, publisher):
    """Each relay pass publishes the key's next message only after the previous is delivered."""
    with sessions() as session:
        ids = [_charge(session, f"seq-{n}", 100 + n, "contact-1") for n in range(3)]
        session.commit()
    dispatch.dispatcher().flush()
    assert publisher.ids == [ids[0]]
    assert _pass(engine, publisher) == []          # the head is queued, not yet delivered
    _deliver(sessions, ids[0])
    assert _pass(engine, publisher) == [ids[1]]
    _deliver(sessions, ids[1])
    assert _pass(engine, publisher) == [ids[2]]


def test_a_retrying_head_holds_its_followers_but_not_other_keys(engine, sessions, publisher):
    with sessions() as session:
        head = _charge(session, "r-0", 100, "contact-1")
        follower = _charge(session, "r-1", 101, "contact-1")
        session.commit()
    dispatch.dispatcher().flush()
    with sessions() as session:
        held = claim(session, head, LEASE)
        fail_claimed(session, held, Transient("503", status_code=503))
    assert _row(sessions, head).status == MessageStatus.PENDING
    with sessions() as session:
        other = _charge(session, "other-0", 300, "contact-2")
        session.commit()
    dispatch.dispatcher().flush()
    assert other in publisher.ids, "another key is not delayed"
    assert follower not in _pass(engine, publisher), "the follower waits for its head"


def test_a_follower_published_anyway_is_not_claimed_and_goes_back_to_the_relay(
        engine, sessions, publisher):
    """If a follower's message reaches a worker (an old copy, a race), the claim refuses it and
    hands the row back to the relay, which publishes it once it is the head."""
    with sessions() as session:
        head = _charge(session, "p-0", 100, "contact-1")
        follower = _charge(session, "p-1", 101, "contact-1")
        session.commit()
    with sessions() as session:
        session.execute(update(Message).where(Message.id == follower)
                        .values(status=MessageStatus.QUEUED, queued_at=utcnow()))
        session.commit()
        assert claim(session, follower, LEASE) is None
    assert _row(sessions, follower).status == MessageStatus.PENDING
    _deliver(sessions, head)
    assert _pass(engine, publisher) == [follower]


def test_a_dead_head_blocks_its_key_visibly_until_discarded(engine, sessions, publisher):
    with sessions() as session:
        head = _charge(session, "d-0", 100, "contact-9")
        followers = [_charge(session, f"d-{n}", 100 + n, "contact-9") for n in (1, 2)]
        session.commit()
    dispatch.dispatcher().flush()
    with sessions() as session:
        held = claim(session, head, LEASE)
        from integrations.errors import ClientError
        fail_claimed(session, held, ClientError("402", status_code=402, code="card_declined"))
    assert _row(sessions, head).status == MessageStatus.DEAD
    assert _pass(engine, publisher) == []
    with sessions() as session:
        assert blocked_keys(session) == [("payments", "contact-9", 2)]
        shown = status.report(session)
    assert shown["blocked_keys"] == [{"provider": "payments", "ordering_key": "contact-9",
                                      "waiting": 2}]
    assert shown["providers"]["payments"]["waiting_for_key"] == 2
    assert ("blocked: payments ordering key 'contact-9': 2 message(s) wait behind a dead "
            "letter (re-drive or discard it)") in status.render(shown, {})
    with sessions() as session:
        discard(session, reason="customer cancelled", actor="test", ids=[head])
        session.commit()
        assert blocked_keys(session) == []
    assert _pass(engine, publisher) == [followers[0]]


def test_a_repeated_key_returns_the_existing_message(sessions, publisher):
    with sessions() as session:
        first = _charge(session, "same", 100, "contact-3")
        again = _charge(session, "same", 100, "contact-3")
        session.commit()
    assert first == again


@pytest.mark.parametrize("bad", ["", "x" * 256, "a\nb", 42])
def test_a_bad_ordering_key_is_refused_and_nothing_is_written(sessions, publisher, bad):
    with sessions() as session:
        with pytest.raises(InvalidMessage, match="ordering_key"):
            _charge(session, "bad", 100, bad)
        session.commit()
        assert session.scalars(select(Message)).all() == []


def test_on_postgresql_numbers_follow_commit_order_not_insert_order(pg_url, publisher):
    """T1 enqueues first but commits last; T2, enqueueing for the same key, waits for T1's
    commit, so its number is higher: order at the provider is commit order. (PostgreSQL's
    advisory lock; SQLite has one writer at a time.)"""
    engine = make_engine(pg_url)
    sessions = make_sessionmaker(engine)
    t1 = sessions()
    first = _charge(t1, "co-1", 100, "contact-5")
    second: list[str] = []

    def other_transaction():
        with sessions() as t2:
            second.append(_charge(t2, "co-2", 101, "contact-5"))
            t2.commit()

    thread = threading.Thread(target=other_transaction)
    thread.start()
    time.sleep(0.5)
    assert second == [], "T2 waits for T1 (same key)"
    t1.commit()
    t1.close()
    thread.join(10)
    assert _row(sessions, first).ordering_seq == 1
    assert _row(sessions, second[0]).ordering_seq == 2
    engine.dispose()


def test_followers_are_parked_out_of_the_due_scan_and_a_missed_wake_is_swept_up(
        engine, sessions, publisher):
    """A follower waits with next_attempt_at = PARKED, so however many wait behind a dead
    head, the relay's due scan never reads them. If its head finished without waking it
    (here: marked delivered behind the lifecycle's back), the relay's sweep wakes it."""
    with sessions() as session:
        head = _charge(session, "w-0", 100, "contact-8")
        follower = _charge(session, "w-1", 101, "contact-8")
        session.commit()
    assert _row(sessions, follower).next_attempt_at == PARKED
    with sessions() as session:
        session.execute(update(Message).where(Message.id == head)
                        .values(status=MessageStatus.DELIVERED))
        session.commit()
    dispatch.dispatcher().flush()
    publisher.published.clear()
    run_once(engine, dispatch.dispatcher(), SETTINGS, idempotent=supports_idempotency,
             sweep_parked=False)
    assert publisher.ids == [], "not woken, not due"
    assert _pass(engine, publisher) == [follower]
