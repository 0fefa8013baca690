"""The ``outbox`` command line, run in-process against a real SQLite database."""

from __future__ import annotations

import argparse
import json
import re
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select

from integrations.errors import ClientError, Transient
from outbox import cli
from outbox.clock import utcnow
from outbox.lifecycle import claim
from outbox.models import AuditEntry, Message, MessageStatus
from tests.harness import fail_claimed, run_cli

ULID = re.compile(r"\b[0-9A-HJKMNP-TV-Z]{26}\b")


@pytest.fixture
def db(cli_db):
    return cli_db


run = run_cli


def run_json(capsys, *argv, code=0):
    got, out, err = run(capsys, *argv, "--json")
    assert got == code, err
    return json.loads(out)


def enqueue_charge(capsys, key, amount=100):
    code, out, err = run(capsys, "enqueue", "payments", "charge", "--key", key,
                         "--payload", json.dumps({"amount": amount, "currency": "usd"}))
    assert code == 0, err
    return ULID.search(out)[0]


def kill(db, message_id, dead_at=None, retry_first=False):
    """Claim and fail the message permanently (after one transient failure if asked)."""
    with db() as session:
        if retry_first:
            c = claim(session, message_id, timedelta(minutes=1))
            fail_claimed(session, c, Transient("upstream", status_code=503, retry_after_s=0))
        c = claim(session, message_id, timedelta(minutes=1))
        fail_claimed(session, c, ClientError("declined", status_code=402), now=dead_at)


def status_of(db, message_id):
    with db() as session:
        return session.get(Message, message_id).status


# ---- enqueue --------------------------------------------------------------------------------

def test_enqueue_prints_the_id_and_dispatches(capsys, db, publisher):
    """`outbox enqueue` exits 0, prints the label with the new id, and the message is published."""
    code, out, _ = run(capsys, "enqueue", "payments", "charge", "--key", "cli-1",
                       "--payload", '{"amount": 1999, "currency": "usd"}',
                       "--correlation-id", "req-9")
    assert code == 0
    message_id = ULID.search(out)[0]
    assert out.startswith(f"payments.charge {message_id} ")
    assert publisher.ids == [message_id]
    with db() as session:
        row = session.get(Message, message_id)
        assert (row.idempotency_key, row.correlation_id) == ("cli-1", "req-9")
        assert row.payload == {"amount": 1999, "currency": "usd"}


def test_enqueue_json_and_repeat_returns_the_same_id(capsys, db):
    """`--json` prints the message; repeating the same key and payload returns the same id."""
    first = run_json(capsys, "enqueue", "payments", "charge", "--key", "k",
                     "--payload", '{"amount": 5, "currency": "usd"}')
    again = run_json(capsys, "enqueue", "payments", "charge", "--key", "k",
                     "--payload", '{"currency": "usd", "amount": 5}')
    assert first["id"] == again["id"] and first["status"] == "pending"
    assert (first["provider"], first["operation"], first["attempts"]) == ("payments", "charge", 0)
    with db() as session:
        assert len(session.scalars(select(Message)).all()) == 1


def test_enqueue_bad_json_exits_2_with_a_clear_message(capsys, db):
    """Unparseable --payload → exit 2, 'not valid JSON' on stderr, nothing on stdout, no row."""
    code, out, err = run(capsys, "enqueue", "payments", "charge", "--key", "k",
                         "--payload", "{amount: 1}")
    assert code == 2 and out == ""
    assert "outbox: error: --payload is not valid JSON" in err
    with db() as session:
        assert session.scalars(select(Message)).all() == []


def test_enqueue_conflict_exits_2(capsys, db):
    """Same key, other payload → exit 2 naming the key and the existing message."""
    message_id = enqueue_charge(capsys, "dup", amount=1)
    code, _, err = run(capsys, "enqueue", "payments", "charge", "--key", "dup",
                       "--payload", '{"amount": 2, "currency": "usd"}')
    assert code == 2
    assert "'dup'" in err and message_id in err


def test_enqueue_invalid_payload_names_the_path(capsys, db):
    """A schema failure → exit 2 naming $.amount, without echoing the value."""
    code, _, err = run(capsys, "enqueue", "payments", "charge", "--key", "k",
                       "--payload", '{"amount": "77777", "currency": "usd"}')
    assert code == 2
    assert "$.amount" in err and "77777" not in err


# ---- status and show --------------------------------------------------------------------------

def test_status_json_counts(capsys, db):
    """Two queued, one dead → by_status counts, depth 2 and one dead letter awaiting action."""
    enqueue_charge(capsys, "s1")
    enqueue_charge(capsys, "s2")
    kill(db, enqueue_charge(capsys, "s3"))
    data = run_json(capsys, "status", code=2)
    payments = data["providers"]["payments"]
    assert payments["by_status"]["queued"] == 2
    assert payments["by_status"]["dead"] == 1
    assert payments["by_status"]["pending"] == 0
    assert payments["depth"] == 2 and payments["dead_awaiting"] == 1
    assert data["dead_awaiting"] == 1
    assert payments["checks"]["dead_letters"] == "warning"   # any dead letter in the last hour
    assert payments["error_rate_5m"] == 1.0                  # its one attempt failed
    assert payments["checks"]["error_rate"] == "critical"
    assert {"check": "error_rate", "level": "critical",
            "reason": "error rate 100% over 5 min ≥ 5% (402 ×1)"} in payments["findings"]
    assert data["level"] == "critical"


def test_status_counts_a_discarded_dead_letter_of_the_last_hour(capsys, db):
    """A dead letter discarded at once still counts among the last hour's dead letters (and
    as discarded), not as awaiting action; counts are exact (nothing estimated on SQLite)."""
    message_id = enqueue_charge(capsys, "gone")
    kill(db, message_id)
    assert run(capsys, "dead", "discard", message_id, "--reason", "cancelled")[0] == 0
    payments = run_json(capsys, "status", code=2)["providers"]["payments"]
    assert payments["dead_last_hour"] == 1 and payments["checks"]["dead_letters"] == "warning"
    assert payments["by_status"]["discarded"] == 1 and payments["dead_awaiting"] == 0
    assert payments["by_status_estimated"] == [] and payments["delivered_5m"] == 0


def test_status_text_on_an_empty_outbox(capsys, db):
    """With no messages every provider shows zeros, the level is ok and the exit status 0."""
    code, out, _ = run(capsys, "status")
    assert code == 0
    assert "outbox status: ok" in out
    assert re.search(r"^payments\s+0\s+0\s+0\s+0\s+0\s+0\s+0\s+0.0s\s+0.0%\s+ok$", out, re.M)


def test_show_json_includes_the_attempt_timeline(capsys, db):
    """`show ID --json` lists the retry then the dead-lettering, in order, with error classes."""
    message_id = enqueue_charge(capsys, "t1")
    kill(db, message_id, retry_first=True)
    data = run_json(capsys, "show", message_id)
    assert data["id"] == message_id and data["status"] == "dead"
    timeline = data["attempts_timeline"]
    assert [a["outcome"] for a in timeline] == ["retry", "dead"]
    assert [a["error_class"] for a in timeline] == ["transient", "client_error"]
    assert [a["status_code"] for a in timeline] == [503, 402]
    assert [a["lease_token"] for a in timeline] == [1, 2]
    assert timeline[0]["next_attempt_at"].endswith("Z")
    assert data["audit"] == []


def test_show_text_and_unknown_id(capsys, db):
    """The text view prints the label and attempts; an unknown id exits 2."""
    message_id = enqueue_charge(capsys, "t2")
    kill(db, message_id)
    code, out, _ = run(capsys, "show", message_id)
    assert code == 0
    assert f"payments.charge {message_id}  [dead]" in out
    assert "last error: client_error not retryable: 402: declined" in out
    code, _, err = run(capsys, "show", "01NOSUCHMESSAGE00000000000")
    assert code == 2 and "no message '01NOSUCHMESSAGE00000000000'" in err


# ---- dead letters ------------------------------------------------------------------------------

def test_dead_list_json_with_provider_filter(capsys, db):
    """`dead list --json --provider payments` lists exactly the dead ones; another provider lists none."""
    dead = [enqueue_charge(capsys, f"d{n}") for n in range(2)]
    enqueue_charge(capsys, "alive")
    for message_id in dead:
        kill(db, message_id)
    rows = run_json(capsys, "dead", "list", "--provider", "payments")
    assert [r["id"] for r in rows] == dead
    assert {r["last_error_class"] for r in rows} == {"client_error"}
    assert run_json(capsys, "dead", "list", "--provider", "crm") == []
    code, out, _ = run(capsys, "dead", "list")
    assert code == 0 and out.rstrip().endswith("2 dead letter(s)")


def test_dead_list_since(capsys, db):
    """`--since 1h` keeps the dead letter from just now and drops the one from two hours ago."""
    old, new = enqueue_charge(capsys, "old"), enqueue_charge(capsys, "new")
    kill(db, old, dead_at=utcnow() - timedelta(hours=2))
    kill(db, new)
    assert [r["id"] for r in run_json(capsys, "dead", "list", "--since", "1h")] == [new]
    assert [r["id"] for r in run_json(capsys, "dead", "list", "--since", "3h")] == [old, new]


def test_dead_list_by_key_id_or_operation(capsys, db):
    """`--text` finds a dead letter by its idempotency key or id, exactly; `--operation`
    narrows to one operation (the admin app's filters, on the CLI)."""
    a, b = enqueue_charge(capsys, "order-17"), enqueue_charge(capsys, "order-170")
    kill(db, a)
    kill(db, b)
    assert [r["id"] for r in run_json(capsys, "dead", "list", "--text", "order-17")] == [a]
    assert [r["id"] for r in run_json(capsys, "dead", "list", "--text", b)] == [b]
    assert len(run_json(capsys, "dead", "list", "--operation", "charge")) == 2
    assert run_json(capsys, "dead", "list", "--operation", "refund") == []


def test_bad_since_is_a_usage_error(capsys, db):
    """An unparseable --since exits 2 with an example of what is accepted, on one line."""
    code, _, err = run(capsys, "dead", "list", "--since", "yesterday")
    assert code == 2 and "use e.g. 30m, 2h, 7d" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("text, expected", [
    ("2026-11-21T10:00:00Z", datetime(2026, 11, 21, 10, 0)),
    ("2026-11-21T12:00:00+02:00", datetime(2026, 11, 21, 10, 0)),
    ("2026-11-21T10:00:00", datetime(2026, 11, 21, 10, 0)),
])
def test_since_accepts_iso_times_as_utc(text, expected):
    """ISO times are converted to naive UTC (no zone means UTC)."""
    assert cli._parse_since(text) == expected


@pytest.mark.parametrize("text, ago", [
    ("30s", timedelta(seconds=30)), ("30m", timedelta(minutes=30)),
    ("2h", timedelta(hours=2)), ("7d", timedelta(days=7)),
])
def test_since_accepts_relative_times(text, ago):
    """30s/30m/2h/7d mean that long before now."""
    moment = cli._parse_since(text)
    assert abs((utcnow() - ago) - moment) < timedelta(seconds=5)


@pytest.mark.parametrize("text", ["yesterday", "1w", "-1h", ""])
def test_since_rejects_other_text(text):
    """Anything else is an argparse type error."""
    with pytest.raises(argparse.ArgumentTypeError):
        cli._parse_since(text)


def test_dead_redrive_by_id(capsys, db, publisher):
    """`dead redrive ID --reason r` exits 0, re-queues the message, audits it and publishes it."""
    message_id = enqueue_charge(capsys, "r1")
    kill(db, message_id)
    publisher.published.clear()
    code, out, _ = run(capsys, "dead", "redrive", message_id, "--reason", "card fixed")
    assert code == 0
    assert f"ok   payments.charge {message_id}: redrive done" in out
    assert "acted on 1 of 1 message(s)" in out
    assert publisher.ids == [message_id]
    assert status_of(db, message_id) == MessageStatus.QUEUED
    with db() as session:
        [entry] = session.scalars(select(AuditEntry)).all()
    assert (entry.actor, entry.action, entry.reason) == ("tester@ci", "redrive", "card fixed")


def test_dead_redrive_all_dry_run_changes_nothing(capsys, db, publisher):
    """`--all --provider payments --dry-run` prints what would go and leaves everything dead."""
    dead = [enqueue_charge(capsys, f"a{n}") for n in range(2)]
    for message_id in dead:
        kill(db, message_id)
    publisher.published.clear()
    code, out, _ = run(capsys, "dead", "redrive", "--all", "--provider", "payments",
                       "--reason", "r", "--dry-run")
    assert code == 0
    for message_id in dead:
        assert f"ok   payments.charge {message_id}: would redrive" in out
    assert "would act on 2 of 2 message(s)" in out
    assert [status_of(db, i) for i in dead] == [MessageStatus.DEAD] * 2
    assert publisher.ids == []
    with db() as session:
        assert session.scalars(select(AuditEntry)).all() == []


def test_dead_redrive_all_json(capsys, db, publisher):
    """`--all --any-provider --json` re-drives every dead letter and reports each as done."""
    dead = [enqueue_charge(capsys, f"j{n}") for n in range(2)]
    for message_id in dead:
        kill(db, message_id)
    publisher.published.clear()
    results = run_json(capsys, "dead", "redrive", "--all", "--any-provider", "--reason", "r",
                       "--actor", "ann")
    assert [(r["id"], r["done"]) for r in results] == [(i, True) for i in dead]
    assert sorted(publisher.ids) == sorted(dead)


def test_dead_redrive_of_a_live_message_exits_1(capsys, db):
    """A message that is not dead is skipped and the exit status is 1."""
    message_id = enqueue_charge(capsys, "live")
    code, out, _ = run(capsys, "dead", "redrive", message_id, "--reason", "r")
    assert code == 1
    assert f"skip payments.charge {message_id}: not dead (is queued)" in out
    assert status_of(db, message_id) == MessageStatus.QUEUED


def test_dead_redrive_needs_ids_or_all(capsys, db):
    """Neither ids nor --all (or both) is a usage error, exit 2."""
    code, _, err = run(capsys, "dead", "redrive", "--reason", "r")
    assert code == 2 and "--all" in err
    code, _, err = run(capsys, "dead", "redrive", "X", "--all", "--reason", "r")
    assert code == 2


def test_dead_redrive_needs_a_non_blank_reason(capsys, db):
    """A blank reason exits 2 and changes nothing; a missing one is an argparse error."""
    message_id = enqueue_charge(capsys, "nr")
    kill(db, message_id)
    code, _, err = run(capsys, "dead", "redrive", message_id, "--reason", "  ")
    assert code == 2 and "reason" in err
    assert status_of(db, message_id) == MessageStatus.DEAD
    code, _, err = run(capsys, "dead", "redrive", message_id)
    assert code == 2 and "--reason" in err and len(err.splitlines()) == 1


def test_dead_discard(capsys, db, publisher):
    """`dead discard ID --reason r` → discarded, audited, not published; the dead list is empty."""
    message_id = enqueue_charge(capsys, "x1")
    kill(db, message_id)
    publisher.published.clear()
    code, out, _ = run(capsys, "dead", "discard", message_id, "--reason", "cancelled")
    assert code == 0 and "discard done" in out
    assert status_of(db, message_id) == MessageStatus.DISCARDED
    assert publisher.ids == []
    assert run_json(capsys, "dead", "list") == []
    with db() as session:
        [entry] = session.scalars(select(AuditEntry)).all()
    assert (entry.action, entry.reason, entry.message_id) == ("discard", "cancelled", message_id)
