"""Retention (``outbox.retention``, ``outbox db prune``): only old delivered and discarded
messages go, with their attempts, in small batches through the partial indexes; dead
letters and unfinished messages stay whatever their age; audit entries are never deleted.
On SQLite and PostgreSQL."""

from __future__ import annotations

import json
import logging
import threading
from datetime import datetime, timedelta

import pytest
from sqlalchemy import event, func, insert, select

from integrations.errors import ClientError, ConfigurationError
from outbox import enqueue, retention
from outbox.clock import utcnow
from outbox.db import make_engine
from outbox.deadletters import discard
from outbox.lifecycle import claim, mark_delivered
from outbox.models import Attempt, AuditEntry, Message, MessageStatus
from outbox.retention import PruneSchedule, PruneSettings, parse_duration, prune
from tests.harness import fail_claimed, run_cli

S = MessageStatus
NOW = datetime(2026, 12, 1, 12, 0, 0)
OLD = NOW - timedelta(days=40)
NEW = NOW - timedelta(days=5)
ANCIENT = NOW - timedelta(days=3650)
WINDOWS = dict(delivered_older_than=timedelta(days=30), discarded_older_than=timedelta(days=30))


def message_row(mid: str, status: str, at: datetime, *, every_timestamp: bool = False) -> dict:
    """A message row of ``status`` that reached it at ``at`` (``delivered_at`` for delivered,
    ``updated_at`` for every status). ``every_timestamp``: every time column set to ``at``,
    whatever the status (to prove that only the status decides)."""
    return dict(
        id=mid, provider="payments", operation="charge", idempotency_key=mid,
        payload={"amount": 100, "currency": "usd"}, payload_sha256="0" * 64, status=status,
        attempts=1, rate_limited_count=0, lease_token=1, needs_review=False,
        next_attempt_at=at, created_at=at - timedelta(minutes=1), updated_at=at,
        budget_started_at=at - timedelta(minutes=1),
        delivered_at=at if status == S.DELIVERED or every_timestamp else None,
        dead_at=at if status in (S.DEAD, S.DISCARDED) or every_timestamp else None,
        queued_at=at if every_timestamp else None,
        lease_expires_at=at if status == S.IN_FLIGHT or every_timestamp else None)


def seed(engine, rows: list[dict], attempts_each: int = 2, audit_for=()) -> None:
    """Insert ``rows``, ``attempts_each`` attempts per row, and one audit entry per id in
    ``audit_for``."""
    with engine.begin() as conn:
        conn.execute(insert(Message.__table__), rows)
        if attempts_each:
            conn.execute(insert(Attempt.__table__), [
                dict(message_id=r["id"], lease_token=1, started_at=r["updated_at"],
                     duration_ms=5.0, outcome="retry" if n else "delivered", status_code=200)
                for r in rows for n in range(attempts_each)])
        if audit_for:
            conn.execute(insert(AuditEntry.__table__), [
                dict(at=OLD, actor="ops@host", action="discard", message_id=mid,
                     reason="order cancelled", details={"attempts": 1}) for mid in audit_for])


def ids(engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.scalars(select(Message.id)))


def count(engine, table) -> int:
    with engine.connect() as conn:
        return conn.scalar(select(func.count()).select_from(table))


EVERY_STATUS = list(S)


# ---- what goes and what stays ---------------------------------------------------------------

def test_only_old_delivered_and_discarded_go_with_their_attempts(engine):
    """Rows of every status, old and recent: only the old delivered and old discarded rows
    and their attempts are deleted; everything else and every audit entry stays."""
    rows = [message_row(f"{status}-{age}", status, at)
            for status in EVERY_STATUS for age, at in (("old", OLD), ("new", NEW))]
    seed(engine, rows, audit_for=["delivered-old", "discarded-old", "discarded-new", "dead-old"])

    result = prune(engine, **WINDOWS, now=NOW, pause_s=0)

    gone = {"delivered-old", "discarded-old"}
    assert ids(engine) == {r["id"] for r in rows} - gone
    assert (result.delivered, result.discarded, result.attempts, result.audit_detached) == (1, 1, 4, 2)
    assert result.complete and result.batches == 1
    with engine.connect() as conn:
        attempt_ids = set(conn.scalars(select(Attempt.message_id)))
        audit = {e.id: e for e in conn.execute(select(AuditEntry)).all()}
    assert attempt_ids == {r["id"] for r in rows} - gone
    assert len(audit) == 4   # the audit trail is never deleted
    linked = sorted(e.message_id for e in audit.values() if e.message_id)
    assert linked == ["dead-old", "discarded-new"]
    unlinked = sorted((e.details["message_id"], e.details["message_label"], e.details["attempts"],
                       e.action, e.reason) for e in audit.values() if not e.message_id)
    assert unlinked == [
        ("delivered-old", "payments.charge delivered-old", 1, "discard", "order cancelled"),
        ("discarded-old", "payments.charge discarded-old", 1, "discard", "order cancelled")]
    assert all(e.details["pruned_at"] == "2026-12-01T12:00:00.000Z"
               for e in audit.values() if not e.message_id)


def test_each_status_has_its_own_window(engine):
    """Delivered rows are aged by delivered_at against their window, discarded rows by
    updated_at (the discard) against theirs."""
    rows = [message_row("delivered-10d", S.DELIVERED, NOW - timedelta(days=10)),
            message_row("discarded-10d", S.DISCARDED, NOW - timedelta(days=10)),
            message_row("discarded-3d", S.DISCARDED, NOW - timedelta(days=3))]
    # Delivered long ago, but the row was touched recently: delivered_at decides.
    rows.append(message_row("delivered-40d", S.DELIVERED, OLD) | {"updated_at": NOW})
    seed(engine, rows)

    result = prune(engine, delivered_older_than=timedelta(days=30),
                   discarded_older_than=timedelta(days=7), now=NOW, pause_s=0)

    assert (result.delivered, result.discarded) == (1, 1)
    assert ids(engine) == {"delivered-10d", "discarded-3d"}


@pytest.mark.parametrize("status", [S.PENDING, S.QUEUED, S.IN_FLIGHT, S.DEAD])
def test_dead_letters_and_unfinished_messages_are_never_pruned(engine, status):
    """Dead, pending, queued and in-flight rows stay whatever their age, even with windows
    of zero and every timestamp (delivered_at included) ten years old."""
    rows = [message_row(f"{status}-{n}", status, ANCIENT, every_timestamp=True) for n in range(5)]
    seed(engine, rows, audit_for=[rows[0]["id"]])

    result = prune(engine, delivered_older_than=timedelta(0), discarded_older_than=timedelta(0),
                   now=NOW, batch_size=2, pause_s=0)
    dry = prune(engine, delivered_older_than=timedelta(0), discarded_older_than=timedelta(0),
                now=NOW, dry_run=True)

    assert result.messages == result.attempts == result.audit_detached == result.batches == 0
    assert dry.messages == dry.attempts == dry.audit_detached == 0
    assert ids(engine) == {r["id"] for r in rows}
    assert count(engine, Attempt) == 10
    with engine.connect() as conn:
        assert conn.scalar(select(AuditEntry.message_id)) == rows[0]["id"]


def test_a_real_discard_and_delivery_are_pruned_and_the_audit_kept(sessions, engine, publisher):
    """Through the real code paths: a delivered message and a dead letter discarded by an
    operator, pruned 31 days later; `outbox show`'s row is gone, the audit entry stays."""
    with sessions() as session:
        ok = enqueue(session, provider="payments", operation="charge",
                     payload={"amount": 100, "currency": "usd"}, idempotency_key="ok")
        bad = enqueue(session, provider="payments", operation="charge",
                      payload={"amount": 200, "currency": "usd"}, idempotency_key="bad")
        kept = enqueue(session, provider="payments", operation="charge",
                       payload={"amount": 300, "currency": "usd"}, idempotency_key="kept")
        session.commit()
        ok_id, bad_id, kept_id = ok.id, bad.id, kept.id
    with sessions() as session:
        mark_delivered(session, claim(session, ok_id, timedelta(minutes=1)), status_code=200,
                       provider_ref="pi_1")
        fail_claimed(session, claim(session, bad_id, timedelta(minutes=1)),
                     ClientError("declined", status_code=402))
        fail_claimed(session, claim(session, kept_id, timedelta(minutes=1)),
                     ClientError("declined", status_code=402))
        [done] = discard(session, reason="order cancelled", actor="ops@host", ids=[bad_id])
        assert done.done

    assert prune(engine, **WINDOWS, pause_s=0).messages == 0   # all fresh
    result = prune(engine, **WINDOWS, now=utcnow() + timedelta(days=31), pause_s=0)

    assert (result.delivered, result.discarded, result.attempts, result.audit_detached) == (1, 1, 2, 1)
    assert ids(engine) == {kept_id}   # the dead letter stays
    with sessions() as session:
        [entry] = session.scalars(select(AuditEntry)).all()
        assert (entry.message_id, entry.action, entry.actor) == (None, "discard", "ops@host")
        assert entry.details["message_id"] == bad_id
        assert entry.details["message_label"] == f"payments.charge {bad_id}"


# ---- batches ----------------------------------------------------------------------------------

def _watch(engine):
    """Record the engine's commits and, per DELETE of messages, the rows it deleted."""
    seen = {"commits": 0, "deleted": []}

    def on_commit(_conn):
        seen["commits"] += 1

    def after_execute(_conn, cursor, statement, _params, _context, _many):
        if statement.lstrip().upper().startswith("DELETE FROM OUTBOX_MESSAGES"):
            seen["deleted"].append(cursor.rowcount)

    event.listen(engine, "commit", on_commit)
    event.listen(engine, "after_cursor_execute", after_execute)
    return seen


def test_batches_are_separate_small_transactions(engine):
    """batch_size=3 over 10 old rows: 4 transactions deleting 3, 3, 3 and 1 rows."""
    seed(engine, [message_row(f"d{n:02}", S.DELIVERED, OLD - timedelta(minutes=n))
                  for n in range(10)])
    seen = _watch(engine)

    result = prune(engine, **WINDOWS, now=NOW, batch_size=3, pause_s=0)

    assert seen == {"commits": 4, "deleted": [3, 3, 3, 1]}
    assert (result.batches, result.delivered, result.attempts) == (4, 10, 20)
    assert ids(engine) == set()


def test_a_batch_is_filled_from_both_statuses(engine):
    """4 delivered + 5 discarded at batch_size 3: [3 delivered], [1 delivered + 2
    discarded], [3 discarded], then one empty look that ends the run."""
    seed(engine, [message_row(f"d{n}", S.DELIVERED, OLD) for n in range(4)]
         + [message_row(f"x{n}", S.DISCARDED, OLD) for n in range(5)])
    seen = _watch(engine)

    result = prune(engine, **WINDOWS, now=NOW, batch_size=3, pause_s=0)

    assert seen["deleted"] == [3, 1, 2, 3]   # one DELETE per status in a batch
    assert seen["commits"] == 4 and result.batches == 3
    assert (result.delivered, result.discarded) == (4, 5)


def test_oldest_go_first_and_a_time_budget_stops_between_batches(engine):
    """With a time budget of 0 one batch runs (the oldest rows) and the result says it is
    not complete; the next call goes on."""
    seed(engine, [message_row(f"d{n:02}", S.DELIVERED, OLD - timedelta(hours=n))
                  for n in range(10)])

    first = prune(engine, **WINDOWS, now=NOW, batch_size=3, pause_s=0, time_budget_s=0)

    assert (first.delivered, first.batches, first.complete) == (3, 1, False)
    assert ids(engine) == {f"d{n:02}" for n in range(7)}   # d07–d09 were the oldest
    rest = prune(engine, **WINDOWS, now=NOW, batch_size=3, pause_s=0)
    assert (rest.delivered, rest.complete) == (7, True)


def test_dry_run_counts_and_deletes_nothing(engine):
    rows = [message_row(f"{s}-{a}", s, at) for s in EVERY_STATUS
            for a, at in (("old", OLD), ("new", NEW))]
    seed(engine, rows, audit_for=["discarded-old"])
    seen = _watch(engine)

    dry = prune(engine, **WINDOWS, now=NOW, dry_run=True)

    assert (dry.delivered, dry.discarded, dry.attempts, dry.audit_detached) == (1, 1, 4, 1)
    assert dry.dry_run and dry.batches == 0 and seen["deleted"] == []
    assert len(ids(engine)) == 12
    real = prune(engine, **WINDOWS, now=NOW, pause_s=0)
    assert (real.delivered, real.discarded, real.attempts, real.audit_detached) == (1, 1, 4, 1)


def test_batch_size_is_bounded(engine):
    with pytest.raises(ValueError, match="batch_size"):
        prune(engine, **WINDOWS, batch_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        prune(engine, **WINDOWS, batch_size=retention.MAX_BATCH_SIZE + 1)


# ---- the partial indexes, and locks -----------------------------------------------------------

def _plan(conn, statement) -> str:
    compiled = statement.compile(dialect=conn.dialect)
    prefix = "EXPLAIN QUERY PLAN " if conn.dialect.name == "sqlite" else "EXPLAIN "
    params = compiled.params
    if compiled.positiontup is not None:   # SQLite's qmark style
        params = tuple(params[name] for name in compiled.positiontup)
    rows = conn.exec_driver_sql(prefix + str(compiled), params).all()
    return "\n".join(" ".join(str(c) for c in row) for row in rows)


def test_batch_select_uses_the_partial_indexes_on_postgresql(pg_url):
    """On a 20,000-row table after ANALYZE, EXPLAIN of each batch select names its partial
    index (and locks rows with SKIP LOCKED)."""
    engine = make_engine(pg_url)
    try:
        statuses = [S.DELIVERED] * 12 + [S.DISCARDED] * 3 + [S.DEAD, S.PENDING, S.QUEUED,
                                                                S.IN_FLIGHT, S.DELIVERED]
        rows = [message_row(f"m{n:06}", statuses[n % len(statuses)],
                            NOW - timedelta(days=n % 60, minutes=n)) for n in range(20_000)]
        seed(engine, rows, attempts_each=0)
        with engine.connect() as conn:
            conn.exec_driver_sql("ANALYZE outbox_messages")
            for status, (_column, index) in retention._KINDS.items():
                statement = retention.batch_select(status, NOW - timedelta(days=30), 500)
                assert "SKIP LOCKED" in str(statement.compile(dialect=conn.dialect))
                plan = _plan(conn, statement)
                assert index in plan, plan
    finally:
        engine.dispose()


def _total_bytes(conn) -> int:
    return conn.exec_driver_sql(
        "SELECT pg_total_relation_size('outbox_messages') + "
        "pg_total_relation_size('outbox_attempts')").scalar()


@pytest.mark.serial
def test_pruning_on_schedule_keeps_the_tables_flat_on_postgresql(pg_url, caplog):
    """Five rounds of 3,000 delivered messages (two attempts each), each pruned by the
    relay's schedule: the vacuum that follows each run makes the freed space reusable, so
    from the second round on (an emptied index page is recycled by the vacuum after the one
    that emptied it) the tables' size on disk stays within 10 %. Without it they grow by a
    round's worth each time: this server runs with autovacuum off.

    Serial: a vacuum frees only rows older than every open transaction on the server, and
    another test's transaction beside it kept a round's rows (811 kB → 2.1 MB)."""
    caplog.set_level(logging.INFO, logger="outbox.retention")
    engine = make_engine(pg_url)
    schedule = PruneSchedule.from_env({"OUTBOX_PRUNE_INTERVAL": "1s"}, time_budget_s=None,
                                      pause_s=0)
    sizes = []
    try:
        for round_ in range(5):
            seed(engine, [message_row(f"r{round_}-{n:05}", S.DELIVERED, OLD)
                          for n in range(3000)])
            assert schedule.maybe_run(engine, NOW + timedelta(minutes=round_)).delivered == 3000
            schedule._vacuuming.join(60)
            with engine.connect() as conn:
                sizes.append(_total_bytes(conn))
        assert count(engine, Message.__table__) == 0
        assert max(sizes[1:]) <= sizes[1] * 1.10, sizes
        assert sum("vacuumed the outbox tables in" in line for line in _lines(caplog)) == 5
    finally:
        engine.dispose()


def test_the_prune_command_vacuums_after_deleting(pg_url, capsys, monkeypatch):
    """``outbox db prune`` says it vacuumed, and PostgreSQL's statistics show the vacuum."""
    monkeypatch.setenv("DATABASE_URL", pg_url)
    engine = make_engine(pg_url)
    try:
        seed(engine, [message_row(f"c{n:04}", S.DELIVERED, OLD) for n in range(200)])
        code, out, err = run_cli(capsys, "db", "prune")
        assert code == 0, err
        assert "pruned 200 delivered" in out and "vacuumed the outbox tables in" in out
        with engine.connect() as conn:
            assert conn.exec_driver_sql(
                "SELECT last_vacuum IS NOT NULL FROM pg_stat_user_tables "
                "WHERE relname = 'outbox_messages'").scalar()
    finally:
        engine.dispose()


def test_batch_select_uses_the_partial_indexes_on_sqlite(sqlite_url):
    engine = make_engine(sqlite_url)
    try:
        seed(engine, [message_row(f"m{n:04}", s, OLD) for n, s in enumerate(EVERY_STATUS * 50)],
             attempts_each=0)
        with engine.connect() as conn:
            for status, (_column, index) in retention._KINDS.items():
                plan = _plan(conn, retention.batch_select(status, NOW, 500))
                assert index in plan, plan
    finally:
        engine.dispose()


def test_rows_locked_by_another_transaction_are_skipped_not_waited_for(pg_url):
    """PostgreSQL: while another transaction holds one old delivered row, prune deletes the
    others without waiting, and takes the held one on a later run."""
    engine = make_engine(pg_url)
    try:
        seed(engine, [message_row(f"d{n}", S.DELIVERED, OLD) for n in range(6)])
        holder = engine.connect()
        holder.execute(select(Message.id).where(Message.id == "d3").with_for_update())
        results = []
        worker = threading.Thread(target=lambda: results.append(
            prune(engine, **WINDOWS, now=NOW, batch_size=2, pause_s=0)))
        worker.start()
        worker.join(timeout=20)
        alive = worker.is_alive()
        holder.rollback()
        holder.close()
        worker.join(timeout=20)
        assert not alive, "prune waited for a locked row"
        assert results[0].delivered == 5 and ids(engine) == {"d3"}
        assert prune(engine, **WINDOWS, now=NOW, pause_s=0).delivered == 1
    finally:
        engine.dispose()


def test_a_concurrent_writer_gets_in_between_batches_on_sqlite(sqlite_url):
    """SQLite has one writer: a write that arrives during a long prune commits before the
    prune ends (between two batches), not after it."""
    engine = make_engine(sqlite_url)
    try:
        seed(engine, [message_row(f"d{n:04}", S.DELIVERED, OLD) for n in range(2000)],
             attempts_each=1)
        order = []
        started = threading.Event()

        def on_commit(_conn):
            if threading.current_thread() is threading.main_thread():   # the prune's batches
                order.append("prune")
                started.set()

        def write():
            started.wait(10)
            with engine.begin() as conn:
                conn.execute(insert(Message.__table__), [message_row("fresh", S.PENDING, NOW)])
            order.append("writer")

        event.listen(engine, "commit", on_commit)
        writer = threading.Thread(target=write)
        writer.start()
        result = prune(engine, **WINDOWS, now=NOW, batch_size=50, pause_s=0.02)
        writer.join(timeout=30)
        event.remove(engine, "commit", on_commit)

        assert result.batches == 40
        assert "writer" in order and order.index("writer") < len(order) - 1, order
        assert ids(engine) == {"fresh"}
    finally:
        engine.dispose()


# ---- durations and settings -------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("30d", timedelta(days=30)), ("12h", timedelta(hours=12)), ("90m", timedelta(minutes=90)),
    ("3600s", timedelta(hours=1)), ("3600", timedelta(hours=1)), (" 7D ", timedelta(days=7)),
    ("0", timedelta(0)), ("36500d", timedelta(days=36500)),
])
def test_durations(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "3x", "-1d", "1.5h", "d", "30 days", "1w", "36501d",
                                  "9" * 12 + "d"])
def test_bad_durations(text):
    with pytest.raises(ValueError, match="expected a duration like 30d, 12h, 90m"):
        parse_duration(text)


def test_settings_from_the_environment():
    assert PruneSettings.from_env({}) == PruneSettings(
        enabled=True, interval=timedelta(hours=1), delivered_after=timedelta(days=30),
        discarded_after=timedelta(days=30), batch_size=500)
    got = PruneSettings.from_env({
        "OUTBOX_PRUNE": "on", "OUTBOX_PRUNE_INTERVAL": "600", "OUTBOX_PRUNE_DELIVERED_AFTER": "7d",
        "OUTBOX_PRUNE_DISCARDED_AFTER": "90m", "OUTBOX_PRUNE_BATCH_SIZE": "100"})
    assert got == PruneSettings(True, timedelta(minutes=10), timedelta(days=7),
                                timedelta(minutes=90), 100)
    for off in ("off", "OFF", "false", "no", "0"):
        assert not PruneSettings.from_env({"OUTBOX_PRUNE": off}).enabled


@pytest.mark.parametrize("name, value, words", [
    ("OUTBOX_PRUNE", "sometimes", "OUTBOX_PRUNE must be on or off"),
    ("OUTBOX_PRUNE_INTERVAL", "0", "OUTBOX_PRUNE=off"),
    ("OUTBOX_PRUNE_INTERVAL", "soon", "OUTBOX_PRUNE_INTERVAL: expected a duration"),
    ("OUTBOX_PRUNE_DELIVERED_AFTER", "30 days", "OUTBOX_PRUNE_DELIVERED_AFTER: expected"),
    ("OUTBOX_PRUNE_DISCARDED_AFTER", "-1d", "OUTBOX_PRUNE_DISCARDED_AFTER: expected"),
    ("OUTBOX_PRUNE_BATCH_SIZE", "0", "OUTBOX_PRUNE_BATCH_SIZE must be a whole number"),
    ("OUTBOX_PRUNE_BATCH_SIZE", "10001", "OUTBOX_PRUNE_BATCH_SIZE must be a whole number"),
])
def test_bad_settings_name_the_variable(name, value, words):
    with pytest.raises(ConfigurationError, match=words.replace("(", r"\(")):
        PruneSchedule.from_env({name: value})


# ---- the relay's schedule ---------------------------------------------------------------------

@pytest.fixture
def lite(sqlite_url):
    engine = make_engine(sqlite_url)
    yield engine
    engine.dispose()


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "outbox.retention"]


def test_schedule_runs_once_per_interval_and_logs_one_line(lite, caplog):
    caplog.set_level(logging.INFO, logger="outbox.retention")
    schedule = PruneSchedule.from_env({"OUTBOX_PRUNE_INTERVAL": "1h"}, pause_s=0)
    seed(lite, [message_row("a", S.DELIVERED, OLD)])

    first = schedule.maybe_run(lite, NOW)   # the first call runs at once

    assert first.delivered == 1
    seed(lite, [message_row("b", S.DELIVERED, OLD)])
    assert schedule.maybe_run(lite, NOW + timedelta(minutes=59, seconds=59)) is None
    assert ids(lite) == {"b"}
    assert schedule.maybe_run(lite, NOW + timedelta(hours=1)).delivered == 1
    assert schedule.maybe_run(lite, NOW + timedelta(hours=1, minutes=30)) is None
    assert schedule.maybe_run(lite, NOW + timedelta(hours=2)).delivered == 0
    lines = _lines(caplog)
    assert len(lines) == 3, lines
    assert lines[0].startswith("pruned 1 delivered (older than 30d) and 0 discarded (older "
                               "than 30d) message(s) with 2 attempt(s); audit kept, 0 entries "
                               "unlinked; 1 batch(es) in ")
    assert lines[0].endswith("next run at 2026-12-01T13:00:00.000Z")


def test_schedule_continues_a_large_run_over_several_calls_and_logs_it_once(lite, caplog):
    """Each call spends at most its time budget (here: one batch); the next call goes on at
    once; the single log line has the whole run's counts."""
    caplog.set_level(logging.INFO, logger="outbox.retention")
    schedule = PruneSchedule.from_env({"OUTBOX_PRUNE_BATCH_SIZE": "3"}, time_budget_s=0,
                                      pause_s=0)
    seed(lite, [message_row(f"d{n}", S.DELIVERED, OLD) for n in range(10)])

    got = [schedule.maybe_run(lite, NOW + timedelta(seconds=n)) for n in range(6)]

    assert [r.delivered if r else None for r in got] == [3, 3, 3, 1, None, None]
    assert [r.complete if r else None for r in got][:4] == [False, False, False, True]
    [line] = _lines(caplog)
    assert line.startswith("pruned 10 delivered") and "20 attempt(s)" in line
    assert "4 batch(es)" in line and line.endswith("next run at 2026-12-01T13:00:03.000Z")


def test_schedule_can_be_turned_off(lite):
    schedule = PruneSchedule.from_env({"OUTBOX_PRUNE": "off"})
    seed(lite, [message_row("a", S.DELIVERED, OLD)])
    assert schedule.maybe_run(lite, NOW) is None
    assert ids(lite) == {"a"}


def test_schedule_logs_a_database_error_and_tries_again_a_minute_later(tmp_path, caplog):
    """A database error is one warning line, not an exception for the relay's loop; the
    next try is a minute later, not at the next pass."""
    caplog.set_level(logging.INFO, logger="outbox.retention")
    engine = make_engine(f"sqlite:///{tmp_path / 'empty.db'}", create=True)   # no tables
    schedule = PruneSchedule(pause_s=0)
    try:
        assert schedule.maybe_run(engine, NOW) is None
        assert schedule.maybe_run(engine, NOW + timedelta(seconds=59)) is None
        assert schedule.maybe_run(engine, NOW + timedelta(seconds=60)) is None
    finally:
        engine.dispose()
    lines = _lines(caplog)
    assert len(lines) == 2, lines
    assert lines[0].startswith("prune failed (OperationalError: no such table")
    assert lines[0].endswith("next try at 2026-12-01T12:01:00.000Z")


# ---- the command line -------------------------------------------------------------------------

@pytest.fixture
def db(cli_db):
    """The CLI's SQLite database, seeded (real time: the CLI counts back from now)."""
    now = utcnow()
    rows = [message_row(f"{s}-{a}", s, at) for s in EVERY_STATUS
            for a, at in (("old", now - timedelta(days=40)), ("new", now - timedelta(days=5)))]
    engine = cli_db.kw["bind"]
    seed(engine, rows, audit_for=["discarded-old"])
    return engine


def test_cli_prune(capsys, db):
    code, out, err = run_cli(capsys, "db", "prune")

    assert (code, err) == (0, "")
    assert out.splitlines()[0].startswith(
        "pruned 1 delivered (older than 30d) and 1 discarded (older than 30d) message(s) with "
        "4 attempt(s); audit kept, 1 entry unlinked; 1 batch(es) in ")
    assert out.splitlines()[1] == "dead letters and unfinished messages are never pruned"
    assert len(ids(db)) == 10 and "dead-old" in ids(db)


def test_cli_prune_windows_and_batch_size(capsys, db):
    code, out, err = run_cli(capsys, "db", "prune", "--delivered-older-than", "72h",
                             "--discarded-older-than", "60d", "--batch-size", "1")
    assert code == 0, err
    assert out.startswith("pruned 2 delivered (older than 3d) and 0 discarded (older than 60d) "
                          "message(s) with 4 attempt(s)")
    assert "2 batch(es)" in out
    assert {"delivered-old", "delivered-new"}.isdisjoint(ids(db))


def test_cli_prune_dry_run(capsys, db):
    code, out, err = run_cli(capsys, "db", "prune", "--dry-run")
    assert code == 0, err
    assert out.splitlines()[0] == (
        "would prune 1 delivered (older than 30d) and 1 discarded (older than 30d) message(s) "
        "with 4 attempt(s); audit kept, 1 entry to unlink")
    assert len(ids(db)) == 12


def test_cli_prune_json(capsys, db):
    code, out, err = run_cli(capsys, "db", "prune", "--json", "--discarded-older-than", "90m")
    assert code == 0, err
    data = json.loads(out)
    assert {k: data[k] for k in ("delivered", "discarded", "messages", "attempts",
                                 "audit_detached", "batches", "dry_run", "complete",
                                 "delivered_older_than_s", "discarded_older_than_s")} == {
        "delivered": 1, "discarded": 2, "messages": 3, "attempts": 6, "audit_detached": 1,
        "batches": 1, "dry_run": False, "complete": True,
        "delivered_older_than_s": 30 * 86400, "discarded_older_than_s": 5400}
    assert data["delivered_cutoff"].endswith("Z") and data["discarded_cutoff"].endswith("Z")

    code, out, _ = run_cli(capsys, "db", "prune", "--json", "--dry-run")
    assert code == 0 and json.loads(out)["dry_run"] is True and json.loads(out)["messages"] == 0


@pytest.mark.parametrize("argv, words", [
    (["--delivered-older-than", "3x"], "--delivered-older-than: expected a duration like 30d, 12h, 90m"),
    (["--discarded-older-than=-1d"], "--discarded-older-than: expected a duration like 30d, 12h, 90m"),
    (["--delivered-older-than", "30 days"], "--delivered-older-than: expected a duration"),
    (["--delivered-older-than", "99999999d"], "at most 36500d"),
    (["--batch-size", "0"], "--batch-size: '0' is not a whole number from 1 to 10000"),
    (["--batch-size", "x"], "--batch-size"),
])
def test_cli_prune_bad_input_is_one_line_and_exit_2(capsys, db, argv, words):
    code, out, err = run_cli(capsys, "db", "prune", *argv)
    assert (code, out) == (2, "")
    [line] = err.splitlines()
    assert line.startswith("outbox: error: ") and words in line, line
    assert len(ids(db)) == 12
