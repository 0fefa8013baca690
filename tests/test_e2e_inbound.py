"""Inbound events with a real worker: a handler whose worker is SIGKILLed mid-transaction
is processed exactly once after recovery (its write and the processed mark commit
together, or neither does)."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa
from sqlalchemy import select

from outbox import inbound
from outbox.models import Attempt, Message
from tests.harness import ROOT, wait_until

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_handler_killed_mid_transaction_is_processed_once(procs, engine, sessions,
                                                           celery_publisher, tmp_path):
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE test_crash_effects (event_id VARCHAR(64))")
    env = {"OUTBOX_HANDLERS": "tests.inbound_crash_handlers", "PYTHONPATH": str(ROOT),
           "CRASH_MARKER": str(tmp_path / "crashed"), "OUTBOX_LEASE_TTL": "2"}
    first = procs.worker("w1", queues="inbound", **env)
    procs.relay(**env)
    with sessions() as s:
        message_id, _ = inbound.store(s, source="payments", event_id="evt_crash",
                                      event_type="payment_intent.succeeded",
                                      body=json.dumps({"id": "evt_crash"}), headers={})
        s.commit()
    wait_until(lambda: first.poll() is not None, 30, message="the worker to be killed")
    with engine.connect() as conn:   # the killed transaction left nothing
        assert conn.execute(sa.text("SELECT count(*) FROM test_crash_effects")).scalar() == 0
    procs.worker("w2", queues="inbound", **env)

    def processed():
        with sessions() as s:
            return inbound.status_of(s.get(Message, message_id)) == "processed"

    wait_until(processed, 60, message="the event to be processed after recovery")
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM test_crash_effects")).scalar() == 1
    with sessions() as s:
        outcomes = list(s.scalars(select(Attempt.outcome).where(Attempt.message_id == message_id)
                                  .order_by(Attempt.id)))
    assert outcomes == ["lost", "delivered"]
