"""``enqueue``: transactional writes, idempotency, validation — on SQLite and real PostgreSQL."""

from __future__ import annotations

import json
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import event, func, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from outbox import (
    IdempotencyConflict,
    InvalidIdempotencyKey,
    InvalidMessage,
    InvalidPayload,
    Message,
    MessageStatus,
    UnknownOperation,
    UnknownProvider,
    dispatch,
    enqueue,
)
from outbox.db import make_engine, make_sessionmaker

CHARGE = {"amount": 1999, "currency": "usd"}


def _charge(session, key="order-42-charge", payload=None, **kwargs):
    return enqueue(session, provider="payments", operation="charge",
                   payload=CHARGE if payload is None else payload, idempotency_key=key, **kwargs)


def _count(sessions) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(Message))


def _wait_for(condition, timeout_s=10.0, what="condition"):
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.01)


def _lock_waiters(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(text(
            "select count(*) from pg_stat_activity "
            "where datname = current_database() and wait_event_type = 'Lock'")).scalar()


# ---- commit / rollback -------------------------------------------------------------------

def test_commit_writes_pending_then_dispatches_and_marks_queued(sessions, publisher):
    """Commit → one pending row; after the dispatcher flushes, exactly that id was published and the row is queued."""
    gate = threading.Event()             # hold the broker hand-off until we looked at the row
    record = publisher.publish
    publisher.publish = lambda refs: (gate.wait(5), record(refs))
    with sessions() as session:
        message = _charge(session, correlation_id="req-1")
        assert publisher.ids == []            # nothing leaves before commit
        session.commit()
    with sessions() as session:
        row = session.get(Message, message.id)
        assert row.status == MessageStatus.PENDING
        assert (row.provider, row.operation, row.payload) == ("payments", "charge", CHARGE)
        assert row.correlation_id == "req-1" and row.attempts == 0
    gate.set()
    dispatch.dispatcher().flush()
    assert publisher.ids == [message.id]
    assert publisher.published[0].label == f"payments.charge {message.id}"
    with sessions() as session:
        row = session.get(Message, message.id)
        assert row.status == MessageStatus.QUEUED
        assert row.queued_at is not None
    assert _count(sessions) == 1


def test_row_is_pending_right_after_commit_when_publisher_is_down(sessions, publisher):
    """With the broker down the committed row stays pending (for the relay), and nothing is published."""
    publisher.fail = True
    with sessions() as session:
        message = _charge(session)
        session.commit()
    dispatch.dispatcher().flush()
    with sessions() as session:
        assert session.get(Message, message.id).status == MessageStatus.PENDING
    assert publisher.ids == []


def test_rollback_writes_nothing_and_publishes_nothing(sessions, publisher):
    """Rollback → no row and no broker message."""
    with sessions() as session:
        _charge(session)
        session.rollback()
    dispatch.dispatcher().flush()
    assert _count(sessions) == 0
    assert publisher.ids == []


def test_refs_of_a_rolled_back_transaction_are_not_sent_by_the_next_commit(sessions, publisher):
    """A rolled-back enqueue is forgotten: a later commit on the same session publishes only its own id."""
    with sessions() as session:
        _charge(session, key="rolled-back")
        session.rollback()
        kept = _charge(session, key="kept")
        session.commit()
    dispatch.dispatcher().flush()
    assert publisher.ids == [kept.id]
    assert _count(sessions) == 1


# ---- idempotency -------------------------------------------------------------------------

def test_same_key_same_payload_returns_the_same_message(sessions, publisher):
    """Repeating the call (same and separate transactions) returns the same id; one row, one dispatch."""
    with sessions() as session:
        first = _charge(session)
        again = _charge(session)
        session.commit()
    with sessions() as session:
        later = _charge(session)
        session.commit()
    dispatch.dispatcher().flush()
    assert first.id == again.id == later.id
    assert _count(sessions) == 1
    assert publisher.ids == [first.id]


class _Statements:
    """Records the SQL an engine sends (first word, upper case) while it is listening."""

    def __init__(self, engine):
        self.engine, self.sent = engine, []

    def __enter__(self):
        event.listen(self.engine, "before_cursor_execute", self._record)
        return self

    def __exit__(self, *exc):
        event.remove(self.engine, "before_cursor_execute", self._record)

    def _record(self, conn, cursor, statement, parameters, context, executemany):
        self.sent.append(statement.split(None, 1)[0].upper())

    def count(self, verb):
        return self.sent.count(verb)


def test_new_message_is_returned_without_reading_it_back(engine, publisher):
    """A new message costs one INSERT: no SELECT, no second INSERT at flush or commit; its
    attributes read fine after commit, as a loaded row's would."""
    sessions = make_sessionmaker(engine)
    with sessions() as session, _Statements(engine) as sql:
        message = _charge(session, correlation_id="req-7")
        session.flush()
        session.commit()
        assert (message.provider, message.operation, message.idempotency_key) == (
            "payments", "charge", "order-42-charge")
        assert message.payload == CHARGE and message.payload is not CHARGE
        assert (message.status, message.attempts, message.lease_token) == ("pending", 0, 0)
        assert message.correlation_id == "req-7" and message.created_at is not None
        assert message.queued_at is None and message.last_error is None
        assert message.label == f"payments.charge {message.id}"
    assert (sql.count("INSERT"), sql.count("SELECT"), sql.count("UPDATE")) == (1, 0, 0)
    assert message.status == "pending"     # session closed: still readable, nothing expired
    with sessions() as session:
        row = session.get(Message, message.id)
        assert (row.payload, row.correlation_id, row.created_at) == (
            CHARGE, "req-7", message.created_at)


def test_new_message_expires_on_commit_like_a_loaded_row(engine, publisher):
    """With expire_on_commit (the default) the returned message reloads from the database."""
    with Session(engine) as session:
        message = _charge(session)
        session.commit()
        dispatch.dispatcher().flush()   # its own statements are not the reload's
        with _Statements(engine) as sql:
            # Reloaded: it sees what the dispatch wrote after the commit.
            assert message.status == MessageStatus.QUEUED
        assert sql.count("SELECT") == 1


def test_repeated_key_selects_the_existing_row(engine, publisher):
    """The conflict path reads the existing row: same payload → that message, one row."""
    sessions = make_sessionmaker(engine)
    with sessions() as session:
        first = _charge(session)
        session.commit()
    dispatch.dispatcher().flush()   # the first commit's dispatch is not the conflict path's
    with sessions() as session, _Statements(engine) as sql:
        again = _charge(session)
        session.commit()
    assert again.id == first.id and again.payload == CHARGE
    assert sql.count("SELECT") == 1
    assert _count(sessions) == 1


def test_payload_key_order_does_not_matter(sessions, publisher):
    """The same payload with keys (and nested keys) in another order is the same message."""
    a = {"amount": 500, "currency": "eur", "metadata": {"a": "1", "b": "2"}}
    b = {"metadata": {"b": "2", "a": "1"}, "currency": "eur", "amount": 500}
    with sessions() as session:
        first = _charge(session, payload=a)
        session.commit()
    with sessions() as session:
        second = _charge(session, payload=b)
        session.commit()
    assert first.id == second.id
    assert _count(sessions) == 1


def test_same_key_different_payload_conflicts_and_keeps_the_transaction_usable(sessions, publisher):
    """IdempotencyConflict names the existing id; the caller's transaction can still write and commit."""
    with sessions() as session:
        original = _charge(session)
        session.commit()
    with sessions() as session:
        with pytest.raises(IdempotencyConflict) as info:
            _charge(session, payload={"amount": 2000, "currency": "usd"})
        assert info.value.existing_id == original.id
        assert info.value.provider == "payments"
        assert info.value.idempotency_key == "order-42-charge"
        other = _charge(session, key="order-43-charge")    # same transaction goes on
        session.commit()
    with sessions() as session:
        assert session.get(Message, other.id) is not None
        assert session.get(Message, original.id).payload == CHARGE   # untouched
    assert _count(sessions) == 2


def test_conflict_within_one_uncommitted_transaction(sessions, publisher):
    """The conflict is detected against the caller's own uncommitted row too, and the commit still works."""
    with sessions() as session:
        first = _charge(session)
        with pytest.raises(IdempotencyConflict):
            _charge(session, payload={"amount": 1, "currency": "usd"})
        session.commit()
    dispatch.dispatcher().flush()
    assert publisher.ids == [first.id]
    assert _count(sessions) == 1


def test_same_key_other_operation_conflicts(sessions, publisher):
    """The operation is part of what the key stands for: charge then refund under one key conflicts."""
    with sessions() as session:
        _charge(session, key="k1")
        session.commit()
    with sessions() as session:
        with pytest.raises(IdempotencyConflict):
            enqueue(session, provider="payments", operation="refund",
                    payload={"payment_intent": "pi_123"}, idempotency_key="k1")
    assert _count(sessions) == 1


def test_conflict_when_the_first_transaction_is_still_open(pg_url, publisher):
    """PostgreSQL: the second INSERT waits on the first's open row, then conflicts and goes on."""
    engine = make_engine(pg_url)
    sessions = make_sessionmaker(engine)
    try:
        first = sessions()
        original_id = _charge(first).id
        outcome = {}

        def other():
            with sessions() as session:
                try:
                    _charge(session, payload={"amount": 7, "currency": "usd"})
                except IdempotencyConflict as exc:
                    outcome["conflict"] = exc.existing_id
                    outcome["other"] = _charge(session, key="other").id
                    session.commit()

        thread = threading.Thread(target=other)
        thread.start()
        _wait_for(lambda: _lock_waiters(engine) >= 1, what="the second INSERT to wait on the key")
        first.commit()
        first.close()
        thread.join(10)
        assert outcome["conflict"] == original_id
        assert _count(sessions) == 2
    finally:
        engine.dispose()


# ---- validation --------------------------------------------------------------------------

@pytest.mark.parametrize("provider, operation, error", [
    ("fax", "charge", UnknownProvider),
    ("payments", "teleport", UnknownOperation),
])
def test_unknown_provider_or_operation(sessions, provider, operation, error):
    """Unknown names raise their InvalidMessage subclass listing what is known; nothing is written."""
    with sessions() as session:
        with pytest.raises(error) as info:
            enqueue(session, provider=provider, operation=operation, payload=CHARGE,
                    idempotency_key="k")
        session.commit()
    assert isinstance(info.value, InvalidMessage)
    assert "payments" in str(info.value) or "charge" in str(info.value)
    assert _count(sessions) == 0


@pytest.mark.parametrize("payload, path, secret", [
    ({"amount": -5, "currency": "usd"}, "$.amount", "-5"),
    ({"amount": "1999-TOPSECRET", "currency": "usd"}, "$.amount", "TOPSECRET"),
    ({"amount": 100, "currency": "US-SECRET"}, "$.currency", "US-SECRET"),
    ({"amount": 100, "currency": "usd", "metadata": {"order": 4242}}, "$.metadata.order", "4242"),
    ({"currency": "usd"}, "$", None),
    (["not", "an", "object"], "$", "not"),
])
def test_payload_failing_its_schema_names_the_path_not_the_value(sessions, payload, path, secret):
    """InvalidPayload carries the JSON path, its message names the path and never quotes the value."""
    with sessions() as session:
        with pytest.raises(InvalidPayload) as info:
            _charge(session, payload=payload)
        session.commit()
    assert info.value.path == path
    message = str(info.value)
    assert f"payments.charge: {path}:" in message
    if secret is not None:
        assert secret not in message
    assert _count(sessions) == 0


def test_missing_field_error_names_the_field(sessions):
    """A missing required property is named (the name is schema, not data)."""
    with sessions() as session:
        with pytest.raises(InvalidPayload, match="missing required property 'amount'"):
            _charge(session, payload={"currency": "usd"})


@pytest.mark.parametrize("key", [
    "", " ", "\t ", "a" * 256, "order\n42", "order\x00", "order\x7f", "tab\there", 42, None,
    "заказ-42", "order-42-café",
])
def test_bad_idempotency_keys_are_refused(sessions, key):
    """Empty, blank, over 255 chars, control or non-ASCII characters (the key goes in an HTTP
    header) or not a string → InvalidIdempotencyKey; zero rows."""
    with sessions() as session:
        with pytest.raises(InvalidIdempotencyKey):
            _charge(session, key=key)
        session.commit()
    assert _count(sessions) == 0


def test_key_of_255_characters_is_accepted(sessions, publisher):
    """255 characters is the limit, inclusive; the key is stored verbatim (any printable ASCII)."""
    key = "order 42/charge:#~" + "k" * 237
    with sessions() as session:
        message = _charge(session, key=key)
        session.commit()
    with sessions() as session:
        assert session.get(Message, message.id).idempotency_key == key
    assert len(key) == 255 and _count(sessions) == 1


def test_overlong_correlation_id_is_refused(sessions):
    """correlation_id over 255 characters is an InvalidMessage; nothing written."""
    with sessions() as session:
        with pytest.raises(InvalidMessage, match="correlation_id"):
            _charge(session, correlation_id="c" * 256)
        session.commit()
    assert _count(sessions) == 0


def test_keys_are_unique_per_provider_only(sessions, publisher):
    """The same key under two providers is two messages."""
    with sessions() as session:
        a = _charge(session, key="shared")
        b = enqueue(session, provider="payments", operation="refund",
                    payload={"payment_intent": "pi_1"}, idempotency_key="shared-2")
        session.commit()
    assert a.id != b.id and _count(sessions) == 2


# ---- concurrency on PostgreSQL -------------------------------------------------------------

def test_two_concurrent_enqueues_of_one_key_make_one_row(pg_url, publisher):
    """PostgreSQL: the second INSERT waits on the first's uncommitted key, then returns the same id."""
    engine = make_engine(pg_url)
    sessions = make_sessionmaker(engine)
    try:
        first = sessions()
        mine = _charge(first)
        result = {}

        def second():
            try:
                with sessions() as session:
                    result["id"] = _charge(session).id
                    session.commit()
            except Exception as exc:  # reported below
                result["error"] = exc

        thread = threading.Thread(target=second)
        thread.start()
        _wait_for(lambda: _lock_waiters(engine) >= 1, what="the second INSERT to block on the key")
        first.commit()
        first.close()
        thread.join(10)
        assert "error" not in result, result.get("error")
        assert result["id"] == mine.id
        assert _count(sessions) == 1
        dispatch.dispatcher().flush()
        assert publisher.ids == [mine.id]
    finally:
        engine.dispose()


def test_concurrent_enqueue_after_the_first_rolls_back_inserts_its_own(pg_url, publisher):
    """PostgreSQL: if the first transaction rolls back, the waiting one inserts a row of its own."""
    engine = make_engine(pg_url)
    sessions = make_sessionmaker(engine)
    try:
        first = sessions()
        lost_id = _charge(first).id
        result = {}

        def second():
            with sessions() as session:
                result["id"] = _charge(session).id
                session.commit()

        thread = threading.Thread(target=second)
        thread.start()
        _wait_for(lambda: _lock_waiters(engine) >= 1, what="the second INSERT to block on the key")
        first.rollback()
        first.close()
        thread.join(10)
        assert result["id"] != lost_id
        with sessions() as session:
            assert [m.id for m in session.scalars(select(Message))] == [result["id"]]
    finally:
        engine.dispose()


def test_many_threads_racing_on_one_key(pg_url, publisher):
    """PostgreSQL: 8 threads released together on one key all get the same id; one row."""
    engine = make_engine(pg_url)
    sessions = make_sessionmaker(engine)
    barrier = threading.Barrier(8)
    ids, errors = [], []

    def worker():
        try:
            with sessions() as session:
                barrier.wait(5)
                ids.append(_charge(session).id)
                session.commit()
        except Exception as exc:  # reported below
            errors.append(exc)

    try:
        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert errors == []
        assert len(ids) == 8 and len(set(ids)) == 1
        assert _count(sessions) == 1
    finally:
        engine.dispose()


# ---- payload intake: plain, bounded JSON data (outbox.payload) ---------------------------------

SURROGATE = "\ud800"


def _nested(depth: int):
    value: object = {}
    for _ in range(depth):
        value = {"a": value}
    return value


@pytest.mark.parametrize("payload, path, words", [
    ({"amount": 19.0, "currency": "usd"}, "$.amount", "no fraction"),
    ({"amount": float("nan"), "currency": "usd"}, "$.amount", "NaN"),
    ({"amount": float("inf"), "currency": "usd"}, "$.amount", "NaN and infinity"),
    ({"amount": 10 ** 5000, "currency": "usd"}, "$.amount", "out of range"),
    ({"amount": 100, "currency": "usd", "metadata": _nested(5000)}, "$.metadata.a.a.a", "nested"),
    ({"amount": 100, "currency": "us" + SURROGATE}, "$.currency", "surrogate"),
    ({"amount": 100, "currency": "usd", "metadata": {SURROGATE: "x"}}, "$.metadata[", "surrogate"),
    ({"amount": 100, "currency": "usd", "description": "a\x00b"}, "$.description", "NUL"),
    ({"amount": 100, "currency": "usd", "metadata": {1: "x"}}, "$.metadata", "keys must be strings"),
    ({"amount": 100, "currency": "usd", "metadata": {("t",): "x"}}, "$.metadata", "keys must be"),
    ({"amount": 100, "currency": ("u", "s", "d")}, "$.currency", "tuple is not JSON data"),
    ({"amount": 100, "currency": "usd", "metadata": {"s": {1, 2}}}, "$.metadata.s", "set is not"),
    ({"amount": 100, "currency": b"usd"}, "$.currency", "bytes is not"),
    ({"amount": 100, "currency": "usd", "description": "x" * 300_000}, "$", "262144-byte cap"),
    ({"amount": 100, "currency": "usd", "description": "x" * 100_000_000}, "$", "cap"),
])
def test_payloads_that_are_not_plain_bounded_json_are_refused(sessions, publisher, payload,
                                                              path, words):
    """Each raises InvalidPayload naming the path (never the value), writes nothing, and the
    caller's transaction stays usable."""
    with sessions() as session:
        with pytest.raises(InvalidPayload) as info:
            _charge(session, payload=payload)
        assert info.value.path.startswith(path) and words in str(info.value)
        assert "xxxx" not in str(info.value) and len(str(info.value)) < 400
        _charge(session, key="after")            # the transaction goes on
        session.commit()
    assert _count(sessions) == 1


def test_the_size_cap_is_configurable(sessions, publisher, monkeypatch):
    monkeypatch.setenv("OUTBOX_MAX_PAYLOAD_BYTES", "64")
    with sessions() as session:
        _charge(session, key="small")
        with pytest.raises(InvalidPayload, match="64"):
            _charge(session, key="big", payload={**CHARGE, "description": "d" * 60})
        session.commit()
    assert _count(sessions) == 1


def test_a_payload_at_the_cap_is_accepted(sessions, publisher, monkeypatch):
    """The cap is on the canonical UTF-8 text; exactly at it is fine, one byte over is not."""
    base = json.dumps({**CHARGE, "description": ""}, separators=(",", ":"), sort_keys=True)
    room = 1000 - len(base.encode())
    monkeypatch.setenv("OUTBOX_MAX_PAYLOAD_BYTES", "1000")
    with sessions() as session:
        _charge(session, key="at", payload={**CHARGE, "description": "é" * (room // 2)})
        with pytest.raises(InvalidPayload):
            _charge(session, key="over", payload={**CHARGE, "description": "é" * (room // 2 + 1)})
        session.commit()
    assert _count(sessions) == 1


@pytest.mark.parametrize("provider, operation", [
    ({"a": 1}, "charge"), (["payments"], "charge"), (None, "charge"), ("payments", {"x"}),
    ("payments", None),
])
def test_unhashable_or_non_string_names_are_invalid_messages(sessions, provider, operation):
    with sessions() as session:
        with pytest.raises(InvalidMessage):
            enqueue(session, provider=provider, operation=operation, payload=CHARGE,
                    idempotency_key="k")


@pytest.mark.parametrize("key", [" order-42", "order-42 ", " "])
def test_keys_with_spaces_at_either_end_are_refused(sessions, key):
    """The key becomes an HTTP header value, which cannot start or end with a space: the
    same rule (schemas/common/idempotency_key) the adapters apply before sending."""
    with sessions() as session:
        with pytest.raises(InvalidIdempotencyKey, match="no space at either end"):
            _charge(session, key=key)


@pytest.mark.parametrize("correlation_id", ["a\r\nb", "a\nb", "a\x00b", "", "\u2028"])
def test_correlation_ids_with_control_characters_are_refused(sessions, correlation_id):
    with sessions() as session:
        with pytest.raises(InvalidMessage, match="correlation_id"):
            _charge(session, correlation_id=correlation_id)


def test_text_and_html_are_bounded(sessions, publisher):
    """An e-mail body over 200,000 characters is refused at enqueue (it used to be accepted at
    100 MB); within the limit it is fine."""
    mail = {"to": "a@example.com", "subject": "s"}
    with sessions() as session:
        enqueue(session, provider="email", operation="send",
                payload={**mail, "text": "t" * 200_000}, idempotency_key="ok")
        with pytest.raises(InvalidPayload, match=r"\$.text: violates maxLength 200000"):
            enqueue(session, provider="email", operation="send",
                    payload={**mail, "text": "t" * 200_001}, idempotency_key="long")
        session.commit()
    assert _count(sessions) == 1


# ---- property: bad input never writes and never breaks the transaction ------------------------

json_leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                        st.text(max_size=20), st.binary(max_size=5),
                        st.sampled_from([SURROGATE, "a\x00", "usd\n", "a@example.com\n", 19.0]))
odd_keys = st.one_of(st.text(max_size=8), st.integers(), st.sampled_from([SURROGATE, "\x00"]))
values = st.recursive(json_leaves, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.tuples(inner),
    st.dictionaries(odd_keys, inner, max_size=4)), max_leaves=12)
charges = st.fixed_dictionaries(
    {"amount": st.one_of(st.integers(-5, 10 ** 20), st.floats(), st.just(19.0), st.text(max_size=3)),
     "currency": st.one_of(st.sampled_from(["usd", "eur", "usd\n", "USD", ""]), values)},
    optional={"customer": values, "description": values, "metadata": values, "extra": values})


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_bad_input_never_writes_and_never_breaks_the_transaction(request, backend, publisher):
    """For any payload, key and correlation id hypothesis makes up: enqueue either succeeds or
    raises an InvalidMessage (nothing else); after a refusal nothing was written and the same
    transaction still commits a valid message."""
    url = request.getfixturevalue("sqlite_url" if backend == "sqlite" else "pg_url")
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    counter = iter(range(10 ** 9))

    @settings(max_examples=150, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(payload=st.one_of(charges, values), key=st.one_of(st.text(max_size=300), values),
           correlation_id=st.one_of(st.none(), st.text(max_size=300), values))
    def check(payload, key, correlation_id):
        n = next(counter)
        with sessions() as session:
            before = session.scalar(select(func.count()).select_from(Message))
            try:
                enqueue(session, provider="payments", operation="charge", payload=payload,
                        idempotency_key=key, correlation_id=correlation_id)
                written = 1
            except IdempotencyConflict:
                written = 0
            except InvalidMessage as exc:
                written = 0
                assert len(str(exc)) < 500
                assert session.scalar(select(func.count()).select_from(Message)) == before
            _charge(session, key=f"valid-after-{n}")     # the transaction is usable
            session.commit()
            after = session.scalar(select(func.count()).select_from(Message))
        assert after in (before + 1 + written, before + written)   # a repeat key returns the row

    try:
        check()
    finally:
        engine.dispose()


# ---- isolation levels (PostgreSQL) -------------------------------------------------------------

@pytest.mark.parametrize("level", ["REPEATABLE READ", "SERIALIZABLE"])
def test_a_key_committed_before_the_snapshot_is_found_at_any_level(pg_url, publisher, level):
    """Same payload → the existing message; different payload → IdempotencyConflict; either
    way the caller's transaction goes on and commits."""
    engine = make_engine(pg_url, isolation_level=level)
    sessions = make_sessionmaker(engine)
    try:
        with sessions() as session:
            first = _charge(session).id
            session.commit()
        dispatch.dispatcher().flush()    # its row is marked queued: no change after this point
        with sessions() as session:
            assert _charge(session).id == first
            with pytest.raises(IdempotencyConflict):
                _charge(session, payload={"amount": 1, "currency": "usd"})
            _charge(session, key="next")
            session.commit()
        assert _count(sessions) == 2
    finally:
        engine.dispose()


@pytest.mark.parametrize("level", ["REPEATABLE READ", "SERIALIZABLE"])
def test_a_key_committed_after_the_snapshot_is_a_serialization_failure(pg_url, publisher, level):
    """Documented behaviour: at REPEATABLE READ or SERIALIZABLE, a key whose row another
    transaction inserted (or updated: marked queued, delivered) after ours took its snapshot
    is PostgreSQL's serialization failure (SQLSTATE 40001), raised by the driver as for any
    statement at those levels. Retrying the transaction returns the committed message; one
    row in all."""
    engine = make_engine(pg_url, isolation_level=level)
    sessions = make_sessionmaker(engine)
    try:
        with sessions() as late:
            late.execute(text("select 1"))                 # our snapshot is taken here
            with sessions() as early:
                committed = _charge(early).id
                early.commit()
            with pytest.raises(OperationalError) as info:
                _charge(late)
            assert info.value.orig.pgcode == "40001"
            late.rollback()
        dispatch.dispatcher().flush()   # else its 'queued' update can fail the retry as well
        with sessions() as retry:                          # what the caller's retry loop does
            assert _charge(retry).id == committed
            retry.commit()
        assert _count(sessions) == 1
    finally:
        engine.dispose()
