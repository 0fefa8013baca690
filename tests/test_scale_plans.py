"""Issue 7 §3: on PostgreSQL, ``outbox status`` and the relay read what is live through the
partial indexes, never the whole table of history.

A table of 50,000 delivered rows plus the benchmark's live working set and 2,000 due rows
(built by ``bench.scale.build``, then ``VACUUM ANALYZE``); each statement the status report
and a relay pass send is run again under ``EXPLAIN ANALYZE`` and its plan read.
"""

from __future__ import annotations

import re
import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from bench.scale import LIVE, PROVIDERS, Shape, build, explain_calls, relay_pass, status_report
from outbox import status
from outbox.clock import utcnow
from outbox.config import RelaySettings
from outbox.db import make_engine
from outbox.migrations import upgrade
from tests.harness import PG_ADMIN_URL, _pg_admin_engine

DUE = 2_000
HISTORY = 50_000
BUILT_AT: list = []     # the time the table was built for (its rows' ages count from it)


@pytest.fixture(scope="module")
def engine():
    """One migrated PostgreSQL database for the module (building the table is most of the
    time); dropped afterwards."""
    admin = _pg_admin_engine()
    name = f"outbox_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        url = sa.engine.make_url(PG_ADMIN_URL).set(database=name).render_as_string(
            hide_password=False)
        upgrade(url)
        engine = make_engine(url)
        BUILT_AT.append(utcnow())
        build(engine, Shape("plans", HISTORY + DUE + sum(LIVE.values()), DUE), BUILT_AT[-1])
        yield engine
        engine.dispose()
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def _seq_scans(explained):
    return [(e.sql, scan) for e in explained for scan in e.seq_scans if " on outbox_" in scan]


def test_status_and_relay_read_the_partial_indexes(engine):
    """No statement of the status report or of a relay pass scans outbox_messages or
    outbox_attempts sequentially; each working state is read through its partial index."""
    report = explain_calls(engine, status_report)
    assert not _seq_scans(report), "\n\n".join(e.plan for e in report)
    used = " ".join(scan for e in report for scan in e.scans)
    for index in ("ix_outbox_pending_due", "ix_outbox_queued", "ix_outbox_in_flight",
                  "ix_outbox_dead", "ix_outbox_attempts_started_at"):
        assert index in used, f"{index} unused:\n" + "\n\n".join(e.plan for e in report)

    passed = explain_calls(engine, lambda session: relay_pass(session, RelaySettings()))
    assert passed, "a relay pass sent no statement"
    assert not _seq_scans(passed), "\n\n".join(e.plan for e in passed)
    assert "ix_outbox_pending_due" in " ".join(s for e in passed for s in e.scans), \
        "\n\n".join(e.plan for e in passed)


def test_status_figures_exact_where_they_count(engine):
    """Working states and dead letters are exact; delivered history over the exact limit is
    PostgreSQL's estimate, flagged in by_status_estimated and shown as ~N in the text."""
    with Session(engine) as session:
        data = status.report(session, now=BUILT_AT[-1], facts={})
    per = {name: data["providers"][name] for name in PROVIDERS}
    by_status = [e["by_status"] for e in per.values()]
    assert sum(s["pending"] for s in by_status) == DUE + LIVE["retry_scheduled"]
    assert sum(e["retry_scheduled"] for e in per.values()) == LIVE["retry_scheduled"]
    assert sum(s["queued"] for s in by_status) == LIVE["queued"] + LIVE["queued_lost"]
    assert sum(s["in_flight"] for s in by_status) == LIVE["in_flight"]
    assert sum(s["dead"] for s in by_status) == data["dead_awaiting"] == LIVE["dead"]
    assert sum(s["discarded"] for s in by_status) == LIVE["discarded"]
    assert sum(e["delivered_5m"] for e in per.values()) == 100
    for e in per.values():
        assert e["by_status_estimated"] == ["delivered"]      # 25,000+ rows each: estimated
        assert e["depth"] == e["by_status"]["pending"] + e["by_status"]["queued"] \
            + e["by_status"]["in_flight"]
        assert e["oldest_due_age_s"] > 3500                    # the oldest due row: ~1 hour
    delivered = sum(s["delivered"] for s in by_status)
    actual = HISTORY + LIVE["recent_delivered"]
    assert abs(delivered - actual) < actual * 0.2, (delivered, actual)
    text = "\n".join(status.render(data, {}))
    for name in PROVIDERS:      # pending queued flight retry@ deliv. dead disc.
        assert re.search(rf"^{name}\s+(\d+\s+){{4}}~\d+k\s+\d+\s+\d+\s", text, re.M), text
