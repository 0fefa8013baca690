"""Fast recovery: the broker holds a bounded backlog, lost messages are found by comparing the
rows marked queued with the broker's queue depth, and a killed worker's leases run out in
seconds because live workers renew theirs."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from integrations.registry import supports_idempotency
from outbox import dispatch, enqueue
from outbox.clock import utcnow
from outbox.config import RelaySettings
from outbox.leases import LeaseKeeper
from outbox.lifecycle import claim
from outbox.models import Message, MessageStatus
from outbox.relay import run_once, take_due
from tests.harness import RecordingPublisher

SETTINGS = RelaySettings(grace_s=0, max_queued=10, settle_s=5, requeue_after_s=300)


class DepthPublisher(RecordingPublisher):
    """Records publishes and answers ``depth`` like a broker whose queue holds ``waiting``."""

    def __init__(self):
        super().__init__()
        self.waiting: dict[str, int | None] = {}

    def depth(self, provider):
        return self.waiting.get(provider, 0)


@pytest.fixture
def broker(monkeypatch):
    monkeypatch.setenv("OUTBOX_RELAY_MAX_QUEUED", str(SETTINGS.max_queued))
    recorder = DepthPublisher()
    dispatch.use_publisher(recorder)
    yield recorder
    dispatch.use_publisher(None)


def _enqueue(sessions, n, prefix="k"):
    with sessions() as session:
        ids = [enqueue(session, provider="payments", operation="charge",
                       payload={"amount": 100 + i, "currency": "usd"},
                       idempotency_key=f"{prefix}-{i}").id for i in range(n)]
        session.commit()
    return ids


def _count(sessions, status):
    with sessions() as session:
        return session.scalar(select(func.count()).where(Message.status == status))


def _age_queued(sessions, seconds):
    """Pretend every queued row was queued ``seconds`` ago."""
    with sessions() as session:
        session.execute(update(Message).where(Message.status == MessageStatus.QUEUED)
                        .values(queued_at=utcnow() - timedelta(seconds=seconds)))
        session.commit()


def _pass(engine, settings=SETTINGS):
    return run_once(engine, dispatch.dispatcher(), settings, idempotent=supports_idempotency)


def test_a_backlog_waits_in_the_database_and_the_broker_holds_at_most_max_queued(
        engine, sessions, broker):
    """Given 35 messages enqueued in one burst and room for 10 per provider, after-commit
    dispatch sends 10 and leaves 25 due in the database; each relay pass tops the queue up
    only as workers take messages."""
    ids = _enqueue(sessions, 35)
    dispatch.dispatcher().flush()
    assert len(broker.published) == 10
    assert _count(sessions, MessageStatus.QUEUED) == 10
    assert _count(sessions, MessageStatus.PENDING) == 25

    broker.waiting["payments"] = 10
    assert _pass(engine) == 0, "the queue is full: nothing more goes to the broker"

    with sessions() as session:   # workers take 4 messages
        for message_id in broker.ids[:4]:
            assert claim(session, message_id, timedelta(seconds=60)) is not None
    broker.waiting["payments"] = 6
    assert _pass(engine) == 4
    assert _count(sessions, MessageStatus.QUEUED) == 10
    # oldest first: the 4 published next are among those left behind, not newer ones
    assert len(broker.ids) == 14 and set(broker.ids[10:]) <= set(ids[10:])


def test_the_dispatch_of_a_burst_past_the_room_leaves_rows_due_for_the_next_relay_pass(
        engine, sessions, broker):
    """Rows the dispatch left behind need no grace period: the relay takes them at once."""
    _enqueue(sessions, 12)
    dispatch.dispatcher().flush()
    broker.waiting["payments"] = 0
    with sessions() as session:
        session.execute(update(Message).where(Message.status == MessageStatus.QUEUED)
                        .values(status=MessageStatus.DELIVERED))
        session.commit()
    assert _pass(engine, RelaySettings(grace_s=60, max_queued=10)) == 2


def test_queued_rows_missing_from_the_broker_are_sent_again_once_settled(
        engine, sessions, broker):
    """A flushed broker: 10 rows queued, 0 messages waiting. Rows younger than settle_s are
    left alone (their message may be on its way); once settled, all 10 are sent again."""
    _enqueue(sessions, 10)
    dispatch.dispatcher().flush()
    broker.published.clear()
    broker.waiting["payments"] = 0
    assert _pass(engine) == 0
    _age_queued(sessions, 6)
    assert _pass(engine) == 10
    assert sorted(broker.ids) == sorted(_ids_with(sessions, MessageStatus.QUEUED))
    broker.waiting["payments"] = 10
    _age_queued(sessions, 6)
    assert _pass(engine) == 0, "every queued row has its message: nothing is sent twice"


def test_only_the_missing_number_is_sent_again_oldest_first(engine, sessions, broker):
    """A worker killed with 3 prefetched messages: 10 rows queued, 7 waiting → the 3 oldest
    queued rows are sent again, not all 10."""
    ids = _enqueue(sessions, 10)
    dispatch.dispatcher().flush()
    broker.published.clear()
    with sessions() as session:
        for n, message_id in enumerate(ids):
            session.execute(update(Message).where(Message.id == message_id)
                            .values(queued_at=utcnow() - timedelta(seconds=60 - n)))
        session.commit()
    broker.waiting["payments"] = 7
    assert _pass(engine) == 3
    assert sorted(broker.ids) == sorted(ids[:3])


def test_without_a_depth_the_relay_falls_back_to_requeue_after(engine, sessions, publisher):
    """A publisher that cannot report depth: queued rows are re-sent after requeue_after_s."""
    _enqueue(sessions, 3)
    dispatch.dispatcher().flush()
    assert len(publisher.published) == 3, "no depth, no room check: all sent"
    publisher.published.clear()
    _age_queued(sessions, 60)
    assert _pass(engine, RelaySettings(grace_s=0, requeue_after_s=120)) == 0
    _age_queued(sessions, 121)
    assert _pass(engine, RelaySettings(grace_s=0, requeue_after_s=120)) == 3


def test_take_due_takes_the_oldest_due_rows_first(engine, sessions, broker):
    """A long backlog is served in due order, per provider, up to the room."""
    ids = _enqueue(sessions, 30)
    with sessions() as session:   # as if the after-commit dispatch never ran
        session.execute(update(Message).values(status=MessageStatus.PENDING, queued_at=None))
        for n, message_id in enumerate(reversed(ids)):
            session.execute(update(Message).where(Message.id == message_id).values(
                next_attempt_at=utcnow() - timedelta(seconds=100 + n),
                updated_at=utcnow() - timedelta(seconds=200)))
        session.commit()
    with sessions() as session:
        refs = take_due(session, SETTINGS, depth=lambda provider: 0)
    assert sorted(r.id for r in refs) == sorted(ids[:10]), "the 10 due longest ago"


def _ids_with(sessions, status):
    with sessions() as session:
        return list(session.scalars(select(Message.id).where(Message.status == status)))


# ---- leases ------------------------------------------------------------------------------

def test_a_held_lease_is_renewed_up_to_the_cap_and_a_released_one_is_not(
        sessions, broker):
    """The keeper extends a held claim's lease by the TTL, never past claim + OUTBOX_LEASE,
    and stops once the delivery ends."""
    [message_id] = _enqueue(sessions, 1)
    settings = RelaySettings(lease_ttl_s=15, lease_s=40)
    keeper = LeaseKeeper(sessions, settings)
    t0 = utcnow()
    with sessions() as session:
        held = claim(session, message_id, settings.claim_lease(), now=t0)
    assert _expiry(sessions, message_id) == t0 + timedelta(seconds=15)
    with keeper.hold(held):
        keeper.renew_now(t0 + timedelta(seconds=10))
        assert _expiry(sessions, message_id) == t0 + timedelta(seconds=25)
        keeper.renew_now(t0 + timedelta(seconds=30))
        assert _expiry(sessions, message_id) == t0 + timedelta(seconds=40), "capped"
        keeper.renew_now(t0 + timedelta(seconds=41))
        assert _expiry(sessions, message_id) == t0 + timedelta(seconds=40), "past the cap"
    with sessions() as session:
        session.execute(update(Message).values(lease_expires_at=t0))
        session.commit()
    keeper.renew_now(t0 + timedelta(seconds=5))
    assert _expiry(sessions, message_id) == t0, "released: not renewed"


def test_a_lease_taken_over_is_not_renewed(sessions, broker):
    """Fenced: once another claim owns the row, the old holder's renewal changes nothing."""
    [message_id] = _enqueue(sessions, 1)
    settings = RelaySettings(lease_ttl_s=15)
    keeper = LeaseKeeper(sessions, settings)
    t0 = utcnow()
    with sessions() as session:
        old = claim(session, message_id, settings.claim_lease(), now=t0)
        session.execute(update(Message).values(status=MessageStatus.QUEUED))
        session.commit()
        new = claim(session, message_id, settings.claim_lease(), now=t0)
    assert new.lease_token == old.lease_token + 1
    with keeper.hold(old):
        keeper.renew_now(t0 + timedelta(seconds=10))
    assert _expiry(sessions, message_id) == t0 + timedelta(seconds=15)


def _expiry(sessions, message_id):
    with sessions() as session:
        return session.get(Message, message_id).lease_expires_at
