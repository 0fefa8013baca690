"""The example shop: one transaction per order, idempotent retries, and clear 4xx answers.

The HTTP tests run the real application under uvicorn on a loopback port, against SQLite
and PostgreSQL (``db_url``), with a RecordingPublisher in place of the broker. Every one
of them also checks the log: no ERROR, no traceback, no customer id.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa
import uvicorn
from cryptography.fernet import Fernet
from sqlalchemy import func, select

from examples import driver
from examples.shop import (
    MAX_BODY_BYTES,
    Order,
    OrderConflict,
    create_tables,
    make_app,
    place_order,
)
from integrations.secretbox import SecretBox
from outbox import InvalidMessage, Message, dispatch, endpoints
from outbox.db import make_engine, make_sessionmaker

ROOT = Path(__file__).resolve().parent.parent
CUSTOMER = "cus_private_7"   # must never appear in a log line
ORDER = {"reference": "A-1001", "amount": 1999, "currency": "usd", "customer": CUSTOMER}


# ---- fixtures and helpers ------------------------------------------------------------------

@pytest.fixture
def shop(engine, sessions, publisher):
    """The shop's table in this test's database; returns the sessionmaker."""
    create_tables(engine)
    return sessions


@pytest.fixture
def shop_url(shop, caplog):
    """The shop application served by uvicorn in a thread, on an ephemeral loopback port."""
    caplog.set_level(logging.INFO)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)   # connections wait in the backlog until uvicorn accepts them
    config = uvicorn.Config(make_app(shop), log_config=None, access_log=False,
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    _wait_until(lambda: server.started or not thread.is_alive(), "uvicorn to start")
    assert server.started, "uvicorn did not start; see the captured log"
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    server.should_exit = True
    thread.join()
    listener.close()


def _wait_until(condition, what: str, limit_s: float = 30.0) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` if it never does."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.01)


def _post(url: str, body=None, **kwargs) -> requests.Response:
    if body is not None:
        kwargs["json"] = body
    return requests.post(f"{url}/orders", timeout=30, **kwargs)


def _counts(sessions) -> tuple[int, int]:
    """(order rows, payments.charge rows)."""
    with sessions() as s:
        return (s.scalar(select(func.count()).select_from(Order)),
                s.scalar(select(func.count()).select_from(Message)
                         .where(Message.provider == "payments")))


def _published_charges(publisher) -> list[str]:
    """Ids of the payments messages handed to the (recording) broker so far."""
    dispatch.dispatcher().flush()
    return [ref.id for ref in publisher.published if ref.provider == "payments"]


def _assert_quiet(caplog) -> None:
    """No ERROR, no traceback, and no customer id in anything logged during the test."""
    loud = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not loud, [r.getMessage() for r in loud]
    assert "Traceback" not in caplog.text
    assert CUSTOMER not in caplog.text


def _assert_json_error(response: requests.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert isinstance(body["error"], str) and body["error"]
    return body


# ---- place_order: the function to copy ----------------------------------------------------

def test_an_order_commits_with_its_charge_receipt_contact_and_webhooks(shop):
    """Commit → 1 order row and its outbox rows: payments.charge, email.send,
    crm.upsert_contact, and one order.created webhook per subscribed endpoint."""
    with shop() as session:
        endpoint, _ = endpoints.add(session, "http://127.0.0.1:9/hook", ["order.created"],
                                    box=SecretBox([Fernet.generate_key().decode()]),
                                    allow_hosts=["127.0.0.1"])
        endpoints.add(session, "http://127.0.0.1:9/other", ["invoice.paid"],
                      box=SecretBox([Fernet.generate_key().decode()]), allow_hosts=["127.0.0.1"])
        session.commit()
        order, created = place_order(session, reference="A-1", amount=1999, currency="usd")
        session.commit()
    assert created
    with shop() as s:
        keys = sorted(s.scalars(select(Message.idempotency_key)))
        charge = s.get(Message, order.charge_message_id)
        hook = s.scalars(select(Message).where(Message.provider == "webhooks")).one()
    assert keys == ["order-A-1-charge", "order-A-1-contact", f"order-A-1-created:{endpoint.id}",
                    "order-A-1-receipt"]
    assert charge.payload == {"amount": 1999, "currency": "usd", "metadata": {"order": "A-1"}}
    assert hook.payload == {"endpoint_id": endpoint.id, "event_type": "order.created",
                            "data": {"order": "A-1", "amount": 1999, "currency": "usd"}}


def test_a_failed_order_leaves_no_charge_behind(shop):
    """An invalid amount fails enqueue; rolling back removes the order too: nothing to send."""
    with shop() as session:
        with pytest.raises(InvalidMessage):
            place_order(session, reference="A-2", amount=-5, currency="usd")
        session.rollback()
    assert _counts(shop) == (0, 0)
    with shop() as s:
        assert s.scalar(select(func.count()).select_from(Message)) == 0


def test_placing_an_order_again_returns_it_or_refuses_another_body(shop):
    """Same details → the existing order, nothing written; other details → OrderConflict."""
    with shop() as session:
        first, _ = place_order(session, reference="A-3", amount=500, currency="eur")
        session.commit()
    with shop() as session:
        again, created = place_order(session, reference="A-3", amount=500, currency="eur")
        assert (again.id, created) == (first.id, False)
        with pytest.raises(OrderConflict):
            place_order(session, reference="A-3", amount=501, currency="eur")
    assert _counts(shop) == (1, 1)


@pytest.mark.parametrize("second_amount", [700, 701], ids=["same-body", "other-body"])
def test_the_savepoint_absorbs_a_concurrent_insert_on_postgresql(pg_url, publisher,
                                                                 second_amount):
    """The race a check-then-insert misses, made deterministic on PostgreSQL.

    Transaction A inserts the order and does not commit yet. Transaction B checks, finds
    nothing (A is uncommitted), and its INSERT waits on the unique index. A commits; B's
    INSERT fails inside its SAVEPOINT, B reads A's order and goes on: the same body gives
    the existing order, another body OrderConflict. (SQLite cannot reach this point: the
    outbox engine begins every transaction IMMEDIATE, so B waits before its check.)
    """
    engine = make_engine(pg_url)
    sessions = make_sessionmaker(engine)
    create_tables(engine)
    outcome = {}

    def transaction_b():
        with sessions() as session:
            try:
                order, created = place_order(session, reference="R-1", amount=second_amount,
                                             currency="usd")
                session.commit()
                outcome["result"] = (order.id, created)
            except OrderConflict as exc:
                outcome["result"] = exc

    try:
        with sessions() as a:
            order_a, _ = place_order(a, reference="R-1", amount=700, currency="usd")
            b = threading.Thread(target=transaction_b)
            b.start()
            _wait_until(lambda: _lock_waiters(engine) == 1, "transaction B to block")
            a.commit()
        b.join()
        if second_amount == 700:
            assert outcome["result"] == (order_a.id, False)
        else:
            assert isinstance(outcome["result"], OrderConflict)
        assert _counts(sessions) == (1, 1)
    finally:
        engine.dispose()


def _lock_waiters(engine) -> int:
    """Sessions of this database waiting for a lock (a new transaction each time: PostgreSQL
    keeps one pg_stat_activity snapshot per transaction)."""
    with engine.connect() as conn:
        return conn.scalar(sa.text("select count(*) from pg_stat_activity where datname = "
                                   "current_database() and wait_event_type = 'Lock'"))


def test_a_table_from_an_older_shop_is_refused_with_a_clear_message(engine):
    """create_tables names the missing columns instead of failing on the first order."""
    with engine.begin() as conn:
        conn.execute(sa.text("create table shop_orders (id integer primary key, "
                             "reference varchar(100) unique, amount integer, currency varchar(3))"))
    with pytest.raises(SystemExit, match="no column charge_message_id, created_at, customer"):
        create_tables(engine)


# ---- POST /orders over real HTTP -----------------------------------------------------------

def test_201_then_200_for_the_same_body(shop_url, shop, publisher, caplog):
    """A retry with the same body is answered like the first time, with 200, and adds nothing."""
    first = _post(shop_url, ORDER)
    assert first.status_code == 201, first.text
    body = first.json()
    assert body == {"order_id": body["order_id"], "reference": "A-1001", "amount": 1999,
                    "currency": "usd", "customer": CUSTOMER,
                    "charge_message_id": body["charge_message_id"]}
    again = _post(shop_url, ORDER)
    assert again.status_code == 200, again.text
    assert again.json() == body
    assert _counts(shop) == (1, 1)
    assert _published_charges(publisher) == [body["charge_message_id"]]
    _assert_quiet(caplog)


def test_409_for_a_different_body_under_the_same_reference(shop_url, shop, caplog):
    assert _post(shop_url, ORDER).status_code == 201
    for change in ({"amount": 2000}, {"currency": "eur"}, {"customer": "cus_other"},
                   {"customer": None}):
        body = _assert_json_error(_post(shop_url, {**ORDER, **change}), 409)
        assert "different" in body["error"]
    assert _counts(shop) == (1, 1)
    _assert_quiet(caplog)


@pytest.mark.parametrize("change, field", [
    ({"amount": 1e23}, "amount"),
    ({"amount": 19.5}, "amount"),
    ({"amount": "19"}, "amount"),
    ({"amount": True}, "amount"),
    ({"amount": 0}, "amount"),
    ({"amount": 100_000_000}, "amount"),
    ({"reference": ""}, "reference"),
    ({"reference": " A-1"}, "reference"),
    ({"reference": "A-1 "}, "reference"),
    ({"reference": "Å-1"}, "reference"),
    ({"reference": "x" * 101}, "reference"),
    ({"reference": 1001}, "reference"),
    ({"currency": "usd\n"}, "currency"),
    ({"currency": "USD"}, "currency"),
    ({"customer": "cus 1"}, "customer"),
    ({"coupon": "FREE"}, "body"),
])
def test_422_names_the_field_and_the_rule(shop_url, shop, caplog, change, field):
    """Strict validation: no coercion, no unknown fields; nothing is written."""
    body = _assert_json_error(_post(shop_url, {**ORDER, **change}), 422)
    assert body["error"] == "invalid order"
    assert [p["field"] for p in body["problems"]] == [field]
    assert all(set(p) == {"field", "reason"} for p in body["problems"])
    assert _counts(shop) == (0, 0)
    _assert_quiet(caplog)


def test_422_never_echoes_the_submitted_values(shop_url, shop, caplog):
    secrets = {"reference": "SECRET-REF ", "amount": "SECRET-AMOUNT",
               "currency": "SECRET-CURRENCY", "customer": "SECRET CUSTOMER",
               "SECRET-FIELD": "SECRET-VALUE"}
    response = _post(shop_url, secrets)
    body = _assert_json_error(response, 422)
    assert "SECRET" not in response.text
    assert sorted(p["field"] for p in body["problems"]) == [
        "amount", "body", "currency", "customer", "reference"]
    assert "SECRET" not in caplog.text
    _assert_quiet(caplog)


def test_invalid_json_is_named_as_such(shop_url, shop, caplog):
    body = _assert_json_error(_post(shop_url, data=b'{"reference": "A-1", ',
                                    headers={"Content-Type": "application/json"}), 422)
    assert body["problems"] == [{"field": "body", "reason": "not valid JSON"}]
    _assert_quiet(caplog)


@pytest.mark.parametrize("data, headers", [
    (b'{"reference": "A-1", ', {"Content-Type": "application/json"}),
    (b'[1, 2]', {"Content-Type": "application/json"}),
    (b'', {"Content-Type": "application/json"}),
    (json.dumps(ORDER).encode(), {"Content-Type": "text/plain"}),
], ids=["truncated-json", "json-list", "empty", "not-json-content-type"])
def test_422_for_a_body_that_is_not_a_json_object(shop_url, shop, caplog, data, headers):
    body = _assert_json_error(_post(shop_url, data=data, headers=headers), 422)
    assert body["problems"][0]["field"] == "body"
    assert _counts(shop) == (0, 0)
    _assert_quiet(caplog)


def _padded_order(size: int) -> bytes:
    """A valid order, padded with JSON whitespace to exactly ``size`` bytes."""
    raw = json.dumps({**ORDER, "reference": f"PAD-{size}"}).encode()
    return raw[:-1] + b" " * (size - len(raw)) + b"}"


def _chunks(data: bytes, size: int = 4096):
    """``data`` as a generator, so requests sends it chunked (no Content-Length)."""
    for start in range(0, len(data), size):
        yield data[start:start + size]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_413_for_a_body_over_the_limit(shop_url, shop, caplog, chunked):
    """1 MB → 413 (JSON), with or without Content-Length; exactly the limit is accepted."""
    headers = {"Content-Type": "application/json"}
    megabyte = _padded_order(1024 * 1024)
    over, limit = _padded_order(MAX_BODY_BYTES + 1), _padded_order(MAX_BODY_BYTES)
    assert len(limit) == MAX_BODY_BYTES
    send = _chunks if chunked else bytes
    _assert_json_error(_post(shop_url, data=send(megabyte), headers=headers), 413)
    _assert_json_error(_post(shop_url, data=send(over), headers=headers), 413)
    assert _counts(shop) == (0, 0)
    assert _post(shop_url, data=send(limit), headers=headers).status_code == 201
    _assert_quiet(caplog)


def test_an_oversized_content_length_is_refused_before_the_body_is_sent(shop_url, caplog):
    """Only the headers go out: the 413 arrives without the shop waiting for any body."""
    port = int(shop_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(b"POST /orders HTTP/1.1\r\nHost: shop\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1048576\r\n\r\n")
        response = http.client.HTTPResponse(conn)
        response.begin()
        assert response.status == 413
        assert response.getheader("content-type") == "application/json"
        assert json.loads(response.read()) == {
            "error": f"request body over {MAX_BODY_BYTES} bytes"}
    _assert_quiet(caplog)


def test_other_routes_and_methods_answer_json(shop_url, caplog):
    _assert_json_error(requests.get(f"{shop_url}/", timeout=30), 404)
    _assert_json_error(requests.post(f"{shop_url}/order", json=ORDER, timeout=30), 404)
    for method in ("GET", "PUT", "DELETE"):
        response = requests.request(method, f"{shop_url}/orders", timeout=30)
        _assert_json_error(response, 405)
        assert response.headers["allow"] == "POST"
    _assert_quiet(caplog)


def test_a_fault_of_the_shop_is_a_json_500(shop_url, shop, engine):
    """Not the client's fault (here: the table is gone): 500, still JSON; the server logs it."""
    with engine.begin() as conn:
        conn.execute(sa.text("drop table shop_orders"))
    response = _post(shop_url, ORDER)
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"error": "internal error"}


def test_simultaneous_identical_requests_give_one_201_and_one_200(shop_url, shop, publisher,
                                                                 caplog):
    """Two threads released together by a barrier, five times: one order, one charge each."""
    for round_ in range(5):
        order = {**ORDER, "reference": f"RACE-{round_}"}
        barrier = threading.Barrier(2)
        answers = []

        def place(order=order, barrier=barrier, answers=answers):
            barrier.wait()
            answers.append(_post(shop_url, order))

        threads = [threading.Thread(target=place) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(a.status_code for a in answers) == [200, 201], [a.text for a in answers]
        assert answers[0].json() == answers[1].json()
    assert _counts(shop) == (5, 5)
    assert len(set(_published_charges(publisher))) == len(_published_charges(publisher)) == 5
    _assert_quiet(caplog)


@pytest.mark.parametrize("header, kept", [
    ("req-42/abc", True),
    ("x" * 255, True),
    ("x" * 256, False),
    ("réq-42", False),
    ("", False),
])
def test_x_request_id_becomes_the_correlation_id(shop_url, shop, caplog, header, kept):
    response = _post(shop_url, ORDER, headers={"X-Request-ID": header})
    assert response.status_code == 201, response.text
    with shop() as s:
        correlation_ids = set(s.scalars(select(Message.correlation_id)))
    assert len(correlation_ids) == 1   # the charge and the receipt share it
    (correlation_id,) = correlation_ids
    if kept:
        assert correlation_id == header
    else:
        assert len(correlation_id) == 32 and correlation_id.isalnum()
    _assert_quiet(caplog)


def test_the_driver_orders_are_accepted(shop_url, shop, caplog):
    """examples/driver.py finds the shop and its orders (faults or not) pass validation."""
    driver.wait_for(f"{shop_url}/")
    for n in range(1, 14):
        order, _fault = driver.order_for(n, "d1e2f3")
        response = _post(shop_url, order)
        assert response.status_code == 201, (n, response.text)
    assert _counts(shop)[0] == 13
    _assert_quiet(caplog)


def test_python_m_examples_shop_serves_on_shop_port(db_url, redis_url, tmp_path):
    """The Procfile's command: creates its table, listens on 127.0.0.1:$SHOP_PORT.

    It runs with the real Celery publisher, pointed at this test's flushed Redis database.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log_path = tmp_path / "shop.log"
    env = {**os.environ, "DATABASE_URL": db_url, "REDIS_URL": redis_url, "SHOP_PORT": str(port)}
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "examples.shop"], cwd=ROOT, env=env,
                                   stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        def answers() -> bool:
            assert process.poll() is None, log_path.read_text()
            try:
                return requests.get(f"{url}/", timeout=5).status_code == 404
            except requests.ConnectionError:
                return False

        _wait_until(answers, "python -m examples.shop to listen")
        assert _post(url, ORDER).status_code == 201
        assert _post(url, ORDER).status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=30)
    output = log_path.read_text()
    # The shop's own lines; the outbox dispatcher also loads and uses the Celery publisher here.
    shop_errors = [line for line in output.splitlines()
                   if " ERROR examples.shop" in line or " ERROR uvicorn" in line]
    assert "Traceback" not in output and not shop_errors, output
    assert CUSTOMER not in output
    assert '"POST /orders' not in output   # no access log: it would record client addresses
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            assert conn.scalar(sa.text("select count(*) from shop_orders")) == 1
    finally:
        engine.dispose()
