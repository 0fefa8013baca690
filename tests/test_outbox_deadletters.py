"""Dead letters: listing with filters, re-drive and discard with an audit trail, safe under concurrency."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import func, insert, select

from integrations.errors import Ambiguous, AuthError, ClientError
from outbox import InvalidMessage, dispatch, enqueue
from outbox.clock import utcnow
from outbox.deadletters import DeadFilter, discard, list_dead, redrive
from outbox.ids import new_id
from outbox.lifecycle import claim
from outbox.models import AuditEntry, Message, MessageStatus
from tests.harness import fail_claimed


@pytest.fixture
def now():
    return utcnow() + timedelta(seconds=1)


def _make_dead(sessions, key, *, provider="payments", error_class="client_error",
               status_code=402, dead_at=None):
    """Commit a message, claim it and record a PERMANENT failure at ``dead_at``."""
    with sessions() as session:
        if provider == "payments":
            message_id = enqueue(session, provider="payments", operation="charge",
                                 payload={"amount": 100, "currency": "usd"},
                                 idempotency_key=key).id
        else:   # a provider whose schemas live elsewhere: the row as enqueue would write it
            message_id, at = new_id(), utcnow()
            session.execute(insert(Message).values(
                id=message_id, provider=provider, operation="send", idempotency_key=key,
                payload={"to": "a@example.com"}, payload_sha256="0" * 64,
                status=MessageStatus.PENDING, attempts=0, rate_limited_count=0, lease_token=0,
                next_attempt_at=at, created_at=at, updated_at=at, budget_started_at=at))
        session.commit()
    dispatch.dispatcher().flush()
    dead_at = dead_at or utcnow()
    error = {"client_error": ClientError, "auth": AuthError, "ambiguous": Ambiguous}[error_class]
    with sessions() as session:
        c = claim(session, message_id, timedelta(minutes=1))
        decision = fail_claimed(session, c, error("refused", status_code=status_code),
                                now=dead_at, idempotent=provider == "payments")
    assert decision.outcome == "dead"
    return message_id


def _row(sessions, message_id) -> Message:
    with sessions() as session:
        return session.get(Message, message_id)


def _audit(sessions) -> list[AuditEntry]:
    with sessions() as session:
        return list(session.scalars(select(AuditEntry).order_by(AuditEntry.id)))


@pytest.fixture
def three_dead(sessions, publisher, now):
    """payments/client_error 2 h ago, payments/auth 10 min ago, email/client_error 5 min ago."""
    ids = {
        "old_declined": _make_dead(sessions, "a", dead_at=now - timedelta(hours=2)),
        "auth": _make_dead(sessions, "b", error_class="auth", status_code=401,
                           dead_at=now - timedelta(minutes=10)),
        "email": _make_dead(sessions, "c", provider="email", dead_at=now - timedelta(minutes=5)),
    }
    publisher.published.clear()
    return ids


# ---- listing -------------------------------------------------------------------------------

def test_list_dead_with_filters(sessions, three_dead, now):
    """provider, error_class and since filters (alone and together) select the right rows, oldest first."""
    def ids(**kwargs):
        with sessions() as session:
            return [m.id for m in list_dead(session, DeadFilter(**kwargs))]

    d = three_dead
    assert ids() == [d["old_declined"], d["auth"], d["email"]]
    assert ids(provider="payments") == [d["old_declined"], d["auth"]]
    assert ids(provider="email") == [d["email"]]
    assert ids(error_class="client_error") == [d["old_declined"], d["email"]]
    assert ids(error_class="auth") == [d["auth"]]
    assert ids(since=now - timedelta(minutes=30)) == [d["auth"], d["email"]]
    assert ids(provider="payments", since=now - timedelta(minutes=30)) == [d["auth"]]
    assert ids(provider="crm") == []


def test_list_dead_ignores_other_states(sessions, publisher, three_dead):
    """A delivered-or-waiting message is not a dead letter."""
    with sessions() as session:
        enqueue(session, provider="payments", operation="charge",
                payload={"amount": 5, "currency": "usd"}, idempotency_key="alive")
        session.commit()
    dispatch.dispatcher().flush()
    with sessions() as session:
        assert len(list_dead(session)) == 3


# ---- re-drive -------------------------------------------------------------------------------

def test_redrive_by_id_restarts_the_budget_and_dispatches(sessions, publisher, three_dead, now):
    """dead → pending, attempts 0, budget from now, same key; audited with actor and reason; published."""
    message_id = three_dead["old_declined"]
    before = _row(sessions, message_id)
    redriven_at = now + timedelta(seconds=5)
    gate = threading.Event()        # hold the broker hand-off until we looked at the row
    record = publisher.publish
    publisher.publish = lambda refs: (gate.wait(5), record(refs))
    with sessions() as session:
        [result] = redrive(session, reason="customer updated card", actor="alice@ops",
                           ids=[message_id], now=redriven_at)
    assert (result.id, result.done, result.note) == (message_id, True, "redrive done")
    assert result.label == f"payments.charge {message_id}"
    row = _row(sessions, message_id)
    assert row.status == MessageStatus.PENDING
    assert (row.attempts, row.rate_limited_count) == (0, 0)
    assert row.budget_started_at == redriven_at and row.next_attempt_at == redriven_at
    assert row.dead_at is None
    assert row.idempotency_key == before.idempotency_key == "a"
    [entry] = _audit(sessions)
    assert (entry.actor, entry.action, entry.message_id) == ("alice@ops", "redrive", message_id)
    assert entry.reason == "customer updated card" and entry.at == redriven_at
    assert entry.details == {"last_error_class": "client_error", "last_status_code": 402,
                             "attempts": 1, "needs_review": False}

    gate.set()
    dispatch.dispatcher().flush()
    assert publisher.ids == [message_id]
    assert _row(sessions, message_id).status == MessageStatus.QUEUED
    with sessions() as session:        # a worker may now claim it with a fresh budget
        c = claim(session, message_id, timedelta(minutes=1), now=redriven_at)
    assert c.attempts == 0 and c.budget_started_at == redriven_at
    assert c.idempotency_key == "a"


def test_redrive_dry_run_changes_nothing(sessions, publisher, three_dead):
    """dry_run reports what would be re-driven; rows stay dead, no audit, nothing published."""
    with sessions() as session:
        results = redrive(session, reason="check", actor="alice", where=DeadFilter(),
                          all_providers=True, dry_run=True)
    assert [(r.id, r.done, r.note) for r in results] == [
        (three_dead[k], True, "would redrive") for k in ("old_declined", "auth", "email")]
    dispatch.dispatcher().flush()
    assert publisher.ids == []
    assert _audit(sessions) == []
    assert all(_row(sessions, i).status == MessageStatus.DEAD for i in three_dead.values())


def test_redrive_all_with_filters(sessions, publisher, three_dead):
    """--all with provider=payments and error_class=client_error re-drives exactly that one."""
    with sessions() as session:
        results = redrive(session, reason="fixed", actor="ops",
                          where=DeadFilter(provider="payments", error_class="client_error"))
    assert [(r.id, r.done) for r in results] == [(three_dead["old_declined"], True)]
    dispatch.dispatcher().flush()
    assert publisher.ids == [three_dead["old_declined"]]
    assert _row(sessions, three_dead["auth"]).status == MessageStatus.DEAD
    assert _row(sessions, three_dead["email"]).status == MessageStatus.DEAD
    assert len(_audit(sessions)) == 1


def test_redrive_of_a_message_that_is_not_dead(sessions, publisher, three_dead):
    """A queued message and an unknown id are reported done=False; the dead one in the batch still goes."""
    with sessions() as session:
        alive = enqueue(session, provider="payments", operation="charge",
                        payload={"amount": 5, "currency": "usd"}, idempotency_key="alive").id
        session.commit()
    dispatch.dispatcher().flush()
    publisher.published.clear()
    with sessions() as session:
        results = redrive(session, reason="oops", actor="ops",
                          ids=[alive, "01NOSUCHMESSAGE00000000000", three_dead["auth"]])
    assert [(r.done, r.note) for r in results] == [
        (False, "not dead (is queued)"), (False, "no such message"), (True, "redrive done")]
    assert _row(sessions, alive).status == MessageStatus.QUEUED
    assert [e.message_id for e in _audit(sessions)] == [three_dead["auth"]]
    dispatch.dispatcher().flush()
    assert publisher.ids == [three_dead["auth"]]


def test_two_concurrent_redrives_make_one(sessions, publisher, three_dead):
    """Two operators re-driving one message at once: one done=True, one done=False, one audit row."""
    message_id = three_dead["email"]
    barrier = threading.Barrier(2)
    results, errors = [], []

    def operator(name):
        try:
            with sessions() as session:
                barrier.wait(10)
                results.extend(redrive(session, reason="retry", actor=name, ids=[message_id]))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=operator, args=(n,)) for n in ("alice", "bob")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert sorted(r.done for r in results) == [False, True]
    audit = _audit(sessions)
    assert len(audit) == 1 and audit[0].action == "redrive"
    dispatch.dispatcher().flush()
    assert publisher.ids == [message_id]


# ---- discard and reasons --------------------------------------------------------------------

def test_discard_is_final_and_audited(sessions, publisher, three_dead, now):
    """dead → discarded with an audit row; nothing published; it can no longer be re-driven."""
    message_id = three_dead["auth"]
    with sessions() as session:
        [result] = discard(session, reason="customer cancelled", actor="bob", ids=[message_id],
                           now=now)
    assert (result.done, result.note) == (True, "discard done")
    assert _row(sessions, message_id).status == MessageStatus.DISCARDED
    [entry] = _audit(sessions)
    assert (entry.action, entry.actor, entry.reason) == ("discard", "bob", "customer cancelled")
    with sessions() as session:
        [again] = redrive(session, reason="undo", actor="bob", ids=[message_id])
        assert len(list_dead(session)) == 2
    assert (again.done, again.note) == (False, "not dead (is discarded)")
    dispatch.dispatcher().flush()
    assert publisher.ids == []


@pytest.mark.parametrize("reason", ["", "   ", None])
def test_a_reason_is_required(sessions, three_dead, reason):
    """Re-drive and discard without a reason raise InvalidMessage and change nothing."""
    message_id = three_dead["old_declined"]
    with sessions() as session:
        with pytest.raises(InvalidMessage, match="reason"):
            redrive(session, reason=reason, actor="ops", ids=[message_id])
        with pytest.raises(InvalidMessage, match="reason"):
            discard(session, reason=reason, actor="ops", ids=[message_id])
    assert _row(sessions, message_id).status == MessageStatus.DEAD
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(AuditEntry)) == 0


def test_targets_must_be_named(sessions, three_dead):
    """Re-drive needs ids or a filter; discard needs ids."""
    with sessions() as session:
        with pytest.raises(InvalidMessage):
            redrive(session, reason="r", actor="ops")
        with pytest.raises(InvalidMessage):
            discard(session, reason="r", actor="ops", ids=[])
    with sessions() as session:
        assert len(list_dead(session)) == 3


# ---- re-drive safety ---------------------------------------------------------------------------

def test_a_filter_must_name_a_provider_or_say_any_provider(sessions, publisher, three_dead):
    """An unscoped filter is refused (nothing changes); all_providers=True takes every one."""
    with sessions() as session:
        with pytest.raises(InvalidMessage, match="--any-provider"):
            redrive(session, reason="r", actor="ops", where=DeadFilter(error_class="client_error"))
    assert len(_audit(sessions)) == 0
    with sessions() as session:
        results = redrive(session, reason="r", actor="ops",
                          where=DeadFilter(error_class="client_error"), all_providers=True)
    assert sorted(r.id for r in results if r.done) == sorted(
        [three_dead["old_declined"], three_dead["email"]])


def test_ids_and_a_filter_together_are_refused(sessions, publisher, three_dead):
    """A filter beside ids would be silently ignored: refused, nothing re-driven."""
    with sessions() as session:
        with pytest.raises(InvalidMessage, match="not both"):
            redrive(session, reason="r", actor="ops", ids=[three_dead["auth"]],
                    where=DeadFilter(provider="email"))
    assert _row(sessions, three_dead["auth"]).status == MessageStatus.DEAD
    assert _audit(sessions) == []


def test_needs_review_is_redriven_only_with_the_duplicate_risk_accepted(sessions, publisher,
                                                                         three_dead):
    """An email that may have been sent (ambiguous, no idempotency) is marked needs_review;
    re-drive by id or filter skips it with a note, and takes it only with
    accept_duplicate_risk — audited with the flag, and the mark cleared."""
    review = _make_dead(sessions, "d", provider="email", error_class="ambiguous",
                        status_code=500)
    row = _row(sessions, review)
    assert row.needs_review and row.last_error.startswith("needs review")
    publisher.published.clear()
    with sessions() as session:
        [by_id] = redrive(session, reason="r", actor="ops", ids=[review])
        by_filter = redrive(session, reason="r", actor="ops", where=DeadFilter(provider="email"))
    assert (by_id.done, by_id.note.split(":")[0]) == (False, "needs review")
    assert {r.id: r.done for r in by_filter} == {three_dead["email"]: True, review: False}
    assert _row(sessions, review).status == MessageStatus.DEAD
    with sessions() as session:
        [taken] = redrive(session, reason="checked the mail log: not sent", actor="ops",
                          ids=[review], accept_duplicate_risk=True)
    assert taken.done
    row = _row(sessions, review)
    assert row.status in (MessageStatus.PENDING, MessageStatus.QUEUED) and not row.needs_review
    assert _audit(sessions)[-1].details["needs_review"] is True
    dispatch.dispatcher().flush()
    assert review in publisher.ids
