"""Dead letters end to end: declined → dead → Flower-visible dead-letter task → fixed →
re-driven from the CLI → delivered exactly once, with an audit trail."""

from __future__ import annotations

import json
import threading

import pytest
import requests
from sqlalchemy import func, select

from outbox import AuditEntry, Message, MessageStatus, deadletters, enqueue
from outbox import cli as outbox_cli
from outbox.dispatch import dispatcher
from tests.harness import both_brokers, wait_until

pytestmark = pytest.mark.slow

DECLINED = {"amount": 1500, "currency": "usd", "customer": "cus_declined"}


def _count(sessions, status):
    with sessions() as s:
        return s.scalar(select(func.count()).select_from(Message).where(Message.status == status))


def _enqueue(sessions, keys, payload=DECLINED):
    with sessions() as session:
        ids = [enqueue(session, provider="payments", operation="charge", payload=payload,
                       idempotency_key=k).id for k in keys]
        session.commit()
    return ids


def _fix_cards(sandbox):
    requests.post(sandbox.url + "/_sandbox/config", json={"declined_customers": []},
                  timeout=5).raise_for_status()


def _cli(capsys, *argv):
    capsys.readouterr()
    code = outbox_cli.main(list(argv))
    return code, capsys.readouterr().out


@both_brokers
def test_dead_letters_are_listed_fixed_and_redriven_once(sessions, procs, sandbox,
                                                         celery_publisher, capsys):
    """3 declines → 3 dead (+ 3 dead_letter tasks); after the card fix, redrive one by id and the
    rest with --all --provider: each key charged exactly once; status shows 0 awaiting."""
    procs.worker()
    ids = _enqueue(sessions, ["d-1", "d-2", "d-3"])
    _enqueue(sessions, ["ok-1"], {"amount": 100, "currency": "usd"})
    wait_until(lambda: _count(sessions, MessageStatus.DEAD) == 3, 60, message="3 dead letters")
    wait_until(lambda: procs.log("w1").count("DEAD LETTER") == 3, 30,
               message="the dead_letter task to run for each")

    code, out = _cli(capsys, "dead", "list", "--provider", "payments", "--json")
    listed = json.loads(out)
    assert code == 0 and sorted(m["id"] for m in listed) == sorted(ids)
    assert {m["last_error_class"] for m in listed} == {"client_error"}
    code, out = _cli(capsys, "status", "--json")
    assert json.loads(out)["dead_awaiting"] == 3

    code, out = _cli(capsys, "dead", "redrive", "--all", "--provider", "payments",
                     "--reason", "card data fixed", "--dry-run")
    assert code == 0 and "would act on 3 of 3" in out
    assert _count(sessions, MessageStatus.DEAD) == 3

    _fix_cards(sandbox)
    code, out = _cli(capsys, "dead", "redrive", ids[0], "--reason", "card data fixed",
                     "--actor", "alice")
    assert code == 0
    wait_until(lambda: _count(sessions, MessageStatus.DELIVERED) == 2, 60, message="one redrive")
    code, out = _cli(capsys, "dead", "redrive", "--all", "--provider", "payments",
                     "--reason", "card data fixed", "--actor", "alice")
    assert code == 0 and "acted on 2 of 2" in out
    wait_until(lambda: _count(sessions, MessageStatus.DELIVERED) == 4, 60, message="all redriven")

    stats = sandbox.state.stats(include_log=False)
    assert stats["effects_by_key"] == {"d-1": 1, "d-2": 1, "d-3": 1, "ok-1": 1}
    code, out = _cli(capsys, "status", "--json")
    assert json.loads(out)["dead_awaiting"] == 0
    with sessions() as s:
        audit = s.scalars(select(AuditEntry).order_by(AuditEntry.id)).all()
    assert [(a.action, a.actor, a.reason) for a in audit] == [
        ("redrive", "alice", "card data fixed")] * 3


def test_two_concurrent_redrives_of_one_message_deliver_it_once(sessions, procs, sandbox,
                                                                celery_publisher):
    """Two operators re-drive the same dead letter at the same moment → one re-drive, one charge."""
    procs.worker()
    [message_id] = _enqueue(sessions, ["twice"])
    wait_until(lambda: _count(sessions, MessageStatus.DEAD) == 1, 60, message="dead")
    _fix_cards(sandbox)
    barrier = threading.Barrier(2)
    results = []

    def redrive(actor):
        with sessions() as session:
            barrier.wait()
            results.extend(deadletters.redrive(session, reason="retry", actor=actor,
                                               ids=[message_id]))

    threads = [threading.Thread(target=redrive, args=(a,)) for a in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dispatcher().flush()
    assert sorted(r.done for r in results) == [False, True]
    wait_until(lambda: _count(sessions, MessageStatus.DELIVERED) == 1, 60, message="delivered")
    assert sandbox.state.stats(include_log=False)["effects_by_key"] == {"twice": 1}
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(AuditEntry)) == 1


def test_discarded_dead_letters_are_never_sent(sessions, procs, sandbox, celery_publisher,
                                               capsys):
    """discard → status discarded, audit row, and a later redrive refuses it."""
    procs.worker()
    [message_id] = _enqueue(sessions, ["discard-me"])
    wait_until(lambda: _count(sessions, MessageStatus.DEAD) == 1, 60, message="dead")
    code, _ = _cli(capsys, "dead", "discard", message_id, "--reason", "customer cancelled")
    assert code == 0
    code, out = _cli(capsys, "dead", "redrive", message_id, "--reason", "oops")
    assert code == 1 and "not dead (is discarded)" in out
    assert _count(sessions, MessageStatus.DISCARDED) == 1
    assert sandbox.state.stats(include_log=False)["requests_by_key"] == {"discard-me": 1}
