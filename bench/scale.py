"""``python -m bench scale``: does the outbox cost what is live, or what is history?

Issue 7 §3. On PostgreSQL (scratch databases, migrated by ``outbox.migrations``, filled with
``INSERT … SELECT generate_series``, then ``VACUUM ANALYZE`` as autovacuum would leave them),
three ratios with targets and one for information, both sides measured in the same run,
medians of ``--runs`` runs taken alternately (small, large, small, …) so that a busy
neighbour slows both sides alike:

(a) history: one relay pass on a table of 1,000,000 rows (mostly delivered history,
    10,000 due) ÷ the same on a table of 10,000 rows (1,000 due). Both have more due rows
    than one pass takes, so both passes do the same work (the rows taken per pass are
    printed; a difference is flagged). Target ≤ 1.5.
(b) due backlog: one relay pass with 100,000 rows due ÷ with 1,000 due, over the same
    history (100,000 delivered rows). Target ≤ 1.5.
(c) ``outbox status``: ``outbox.status.report`` (its queries and the health computation
    behind it, with the providers' live state given, so no Redis) at 1,000,000 rows ÷ at
    10,000 rows — the tables of (a). Target < 2.
(d) for information: ``outbox status`` over the tables of (b). A due backlog is live work,
    counted exactly (queue depth), so this one grows with the backlog, by design.

Every table holds the same live working set besides the due rows: 200 retries scheduled,
20 queued, 10 queued long ago (lost by the broker: due again), 50 in flight, 30 dead
letters, 10 discarded, and 1,200 deliveries in the last hour (100 in the last 5 minutes);
history is one delivered row and one attempt row per message over the last 30 days. Rows
are spread evenly over the providers that have schemas.

A relay pass is ``relay_pass`` below (today ``outbox.relay.take_due(session, settings)``
with the default settings: per provider, up to ``max_queued`` less what is queued, at most
``batch_size``), run in a transaction that is rolled back, so every pass finds the same rows.
The scans each measured call's statements use (``EXPLAIN ANALYZE`` on the large side) are
printed under each ratio; ``--explain`` prints the whole plans.

``--quick`` and ``--smoke`` (tiny tables, seconds: proves the benchmark still runs) shrink
the tables; their ratios say little. ``--keep`` leaves the scratch databases for a look.
The server is ``BENCH_SCALE_DATABASE_URL``, else ``BENCH_DATABASE_URL``, else
``postgresql://postgres@127.0.0.1:5432/test`` (an account that may create databases).
Results go to ``var/bench-scale.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Engine, event
from sqlalchemy.orm import Session

import schemas
from outbox import relay, status
from outbox.clock import utcnow
from outbox.config import RelaySettings

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "var" / "bench-scale.json"
DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
# Every provider the outbox knows (those with operation schemas), and an operation of each.
PROVIDERS = tuple(sorted(schemas.operations()))
OPERATIONS = tuple(sorted(schemas.operations()[p])[0] for p in PROVIDERS)
TARGET_RELAY, TARGET_STATUS = 1.5, 2.0

# The live working set every table holds besides its due rows (see the module docstring).
LIVE = {"retry_scheduled": 200, "queued": 20, "queued_lost": 10, "in_flight": 50,
        "dead": 30, "discarded": 10, "recent_delivered": 1200}

# The providers' live state as ``outbox status`` gathers it (from Redis): given here, so that
# the health computation runs in full and the benchmark measures the database side only.
FACTS = {name: {"protection": {"rate_limit": "50/s", "operation_rate_limits": {},
                               "breaker": {"state": "closed", "failures": 0}},
                "credential": None, "settings_error": None} for name in PROVIDERS}


def relay_pass(session: Session, settings: RelaySettings) -> int:
    """One relay pass: what the relay does each poll to find and take due rows. Returns the
    number of rows taken. (The one place to adapt when ``take_due``'s signature changes.)"""
    return len(relay.take_due(session, settings))


def status_report(session: Session) -> dict:
    """``outbox status``'s computation: the figures and the health behind them."""
    return status.report(session, facts=FACTS)


# ---- building tables ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    """A table to build: ``total`` messages, ``due`` of them pending and due, the live
    working set ``LIVE``, and delivered history for the rest."""

    name: str
    total: int
    due: int

    @property
    def history(self) -> int:
        return self.total - self.due - sum(LIVE.values())


_T = "make_interval(secs => {})"

# kind → (status, column → SQL expression); ``f`` runs from 0 to 1 over the kind's rows,
# ``:now`` is the build's time. Columns not named take their defaults below.
_KINDS: dict[str, tuple[str, dict[str, str]]] = {
    # Delivered over the last 30 days, the newest an hour ago.
    "history": ("delivered", {
        "created_at": ":now - " + _T.format("3600 + 2588400 * (1 - f)"),
        "delivered_at": ":now - " + _T.format("3598.5 + 2588400 * (1 - f)"),
        "attempts": "1", "last_status_code": "200", "provider_ref": "'pi_' || i"}),
    # Delivered during the last hour (100 of them in the last 5 minutes).
    "recent_delivered": ("delivered", {
        "created_at": ":now - " + _T.format("3600 * (1 - f)"),
        "delivered_at": ":now - " + _T.format("3600 * (1 - f) - 1"),
        "attempts": "1", "last_status_code": "200", "provider_ref": "'pi_' || i"}),
    # Pending and due: lost after-commit dispatches and retries whose time came, due for up
    # to an hour (the relay should have sent them: the broker was down, say).
    "due": ("pending", {
        "created_at": ":now - " + _T.format("7200 - 3600 * f"),
        "next_attempt_at": ":now - " + _T.format("60 + 3540 * (1 - f)"),
        "attempts": "i % 2", "last_status_code": "CASE WHEN i % 2 = 1 THEN 503 END",
        "last_error_class": "CASE WHEN i % 2 = 1 THEN 'transient' END"}),
    "retry_scheduled": ("pending", {
        "created_at": ":now - " + _T.format("600"),
        "updated_at": ":now - " + _T.format("60 + 3540 * f"),
        "next_attempt_at": ":now + " + _T.format("60 + 600 * f"),
        "attempts": "1", "last_status_code": "503", "last_error_class": "'transient'"}),
    "queued": ("queued", {
        "created_at": ":now - " + _T.format("30 * (1 - f) + 1"),
        "queued_at": ":now - " + _T.format("30 * (1 - f)")}),
    "queued_lost": ("queued", {
        "created_at": ":now - " + _T.format("1800"),
        "queued_at": ":now - " + _T.format("900 + 600 * f")}),
    "in_flight": ("in_flight", {
        "created_at": ":now - " + _T.format("60"),
        "updated_at": ":now - " + _T.format("20 * f"),
        "lease_expires_at": ":now + " + _T.format("100 + 20 * f"), "lease_token": "1"}),
    "dead": ("dead", {
        "created_at": ":now - " + _T.format("6 * 3600 * (1 - f) + 60"),
        "dead_at": ":now - " + _T.format("6 * 3600 * (1 - f)"),
        "attempts": "1", "last_status_code": "402", "last_error_class": "'client_error'",
        "last_error": "'402: card_declined'"}),
    "discarded": ("discarded", {
        "created_at": ":now - " + _T.format("3 * 86400"),
        "dead_at": ":now - " + _T.format("2 * 86400"),
        "updated_at": ":now - " + _T.format("86400 * (1 - f / 2)"),
        "attempts": "1", "last_status_code": "402", "last_error_class": "'client_error'"}),
}

_DEFAULTS = {
    "id": "'01' || lpad(i::text, 24, '0')",
    "provider": "(ARRAY['{}'])[k + 1]".format("','".join(PROVIDERS)),
    "operation": "(ARRAY['{}'])[k + 1]".format("','".join(OPERATIONS)),
    "idempotency_key": "'order-' || i",
    "payload": """('{"amount": ' || (100 + i % 5000) || ', "currency": "usd", "customer": "cus_'
                  || (i % 100000) || '", "description": "Order ' || i || ', 2 items", '
                  || '"metadata": {"order": "' || i || '", "channel": "web"}}')::json""",
    "payload_sha256": "lpad(to_hex(i), 64, '0')",
    "attempts": "0", "rate_limited_count": "0", "lease_token": "0", "needs_review": "false",
    "updated_at": "COALESCE({delivered_at}, {queued_at}, {dead_at}, {created_at})",
    "next_attempt_at": "{created_at}", "budget_started_at": "{created_at}",
    "queued_at": "NULL", "delivered_at": "NULL", "dead_at": "NULL", "lease_expires_at": "NULL",
    "last_status_code": "NULL", "last_error_class": "NULL", "last_error": "NULL",
    "provider_ref": "NULL",
}


def _insert_sql(kind: str) -> str:
    state, columns = _KINDS[kind]
    values = {**_DEFAULTS, **columns, "status": f"'{state}'"}
    # ``{column}`` in an expression stands for that column's expression (one level deep).
    resolved = {name: re.sub(r"\{(\w+)\}", lambda m: f"({values[m[1]]})", expr)
                for name, expr in values.items()}
    names = ", ".join(resolved)
    exprs = ", ".join(resolved.values())
    return (f"INSERT INTO outbox_messages ({names}) SELECT {exprs} FROM ("
            f"SELECT i, (i - :first)::float8 / :count AS f, i % {len(PROVIDERS)} AS k "
            "FROM generate_series(:first, :first + :count - 1) AS i) AS g")


# One attempt per message that has been tried, at its last change: what its history holds.
_ATTEMPTS_SQL = """
INSERT INTO outbox_attempts (message_id, lease_token, started_at, duration_ms, outcome,
                             status_code, error_class, error, next_attempt_at, worker)
SELECT id, 1, COALESCE(delivered_at, dead_at, updated_at) - interval '180 milliseconds', 180.0,
       CASE status WHEN 'delivered' THEN 'delivered' WHEN 'pending' THEN 'retry' ELSE 'dead' END,
       last_status_code, last_error_class, last_error,
       CASE status WHEN 'pending' THEN next_attempt_at END, 'bench@scale'
FROM outbox_messages WHERE attempts > 0 ORDER BY id
"""
# ``retries`` failed attempts (503, retried) before each delivery: a history with more
# attempts than messages (``bench web``: 5,000,000 attempts for 1,000,000 messages).
_RETRIES_SQL = """
INSERT INTO outbox_attempts (message_id, lease_token, started_at, duration_ms, outcome,
                             status_code, error_class, error, next_attempt_at, worker)
SELECT id, 1, delivered_at - make_interval(secs => 60 * r), 30.0 + r, 'retry', 503,
       'transient', '503: Service Unavailable', delivered_at - make_interval(secs => 60 * r - 30),
       'bench@scale'
FROM outbox_messages, generate_series(1, :retries) AS r WHERE status = 'delivered'
"""


def build(engine: Engine, shape: Shape, now: datetime, *, extra: dict[str, int] | None = None,
          retries: int = 0) -> None:
    """Fill the (migrated, empty) database behind ``engine`` with ``shape``'s rows, as they
    would be at ``now``, then ``VACUUM ANALYZE`` it.

    Constraints and indexes are dropped during the load and added again from their own
    definitions afterwards: building an index once is much faster than maintaining it row
    by row (a million rows load in about 20 s instead of a minute).

    ``extra`` adds rows of other kinds (``{"dead": 100_000}``); ``retries`` adds that many
    failed attempts before each delivery.
    """
    if shape.history < 0:
        raise ValueError(f"{shape.name}: {shape.total} rows cannot hold {shape.due} due and "
                         f"the live set of {sum(LIVE.values())}")
    plan = [("history", shape.history), ("due", shape.due), *LIVE.items(),
            *(extra or {}).items()]
    with engine.begin() as conn:
        conn.exec_driver_sql("SET LOCAL maintenance_work_mem = '128MB'")
        conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
        # Foreign keys first, primary keys and unique constraints last (they are re-added
        # in the opposite order), then every other index.
        constraints = conn.execute(sa.text(
            "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) "
            "FROM pg_constraint, (SELECT ARRAY['outbox_messages'::regclass, "
            "'outbox_attempts'::regclass] AS tables) AS t WHERE contype IN ('f', 'p', 'u') "
            "AND (conrelid = ANY(t.tables) OR confrelid = ANY(t.tables)) "
            "ORDER BY contype = 'f' DESC")).all()
        indexes = conn.execute(sa.text(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema() "
            "AND tablename IN ('outbox_messages', 'outbox_attempts') "
            "AND indexname NOT IN (SELECT conname FROM pg_constraint)")).all()
        for table, name, _definition in constraints:
            conn.exec_driver_sql(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
        for name, _definition in indexes:
            conn.exec_driver_sql(f'DROP INDEX "{name}"')
        first = 1
        for kind, count in plan:
            if count:
                conn.execute(sa.text(_insert_sql(kind)),
                             {"now": now, "first": first, "count": count})
            first += count
        conn.execute(sa.text(_ATTEMPTS_SQL))
        if retries:
            conn.execute(sa.text(_RETRIES_SQL), {"retries": retries})
        for table, name, definition in reversed(constraints):
            conn.exec_driver_sql(f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {definition}')
        for _name, definition in indexes:
            conn.exec_driver_sql(definition)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM (ANALYZE) outbox_messages")
        conn.exec_driver_sql("VACUUM (ANALYZE) outbox_attempts")


class Scratch:
    """Scratch PostgreSQL databases on the server of ``admin_url``, migrated; dropped by
    ``close`` (unless ``keep``)."""

    def __init__(self, admin_url: str, keep: bool = False):
        self.admin_url, self.keep = admin_url, keep
        self.admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
        self.names: list[str] = []
        self.engines: list[Engine] = []
        self.tag = uuid.uuid4().hex[:8]

    def database(self, label: str) -> Engine:
        from outbox.db import make_engine
        from outbox.migrations import upgrade

        name = f"outbox_scale_{self.tag}_{label}"
        with self.admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        self.names.append(name)
        url = sa.engine.make_url(self.admin_url).set(database=name)
        url_text = url.render_as_string(hide_password=False)
        upgrade(url_text)
        engine = make_engine(url_text, pool_size=2, max_overflow=2)
        self.engines.append(engine)
        return engine

    def close(self) -> None:
        for engine in self.engines:
            engine.dispose()
        if self.keep:
            if self.names:
                print(f"scale: kept {', '.join(self.names)}", file=sys.stderr)
        else:
            with self.admin.connect() as conn:
                for name in self.names:
                    conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.admin.dispose()


# ---- measuring ---------------------------------------------------------------------------------

def time_relay_pass(engine: Engine, settings: RelaySettings) -> tuple[float, int]:
    """Seconds one relay pass takes, and the rows it took; rolled back afterwards."""
    with engine.connect() as conn:
        outer = conn.begin()
        try:
            with Session(bind=conn, join_transaction_mode="create_savepoint") as session:
                started = time.perf_counter()
                taken = relay_pass(session, settings)
                elapsed = time.perf_counter() - started
        finally:
            outer.rollback()
    return elapsed, taken


def time_status(engine: Engine) -> tuple[float, dict]:
    """Seconds ``outbox status``'s computation takes, and its result."""
    with engine.connect() as conn, Session(bind=conn) as session:
        started = time.perf_counter()
        data = status_report(session)
        elapsed = time.perf_counter() - started
        session.rollback()
    return elapsed, data


def alternate(small: Callable[[], float], large: Callable[[], float],
              runs: int) -> tuple[list[float], list[float]]:
    """``runs`` timings of each, alternating, after one warm-up of each."""
    small(), large()
    a, b = [], []
    for _ in range(runs):
        a.append(small())
        b.append(large())
    return a, b


@dataclass
class Explained:
    """One statement a measured call ran, and its ``EXPLAIN (ANALYZE, BUFFERS)`` plan."""

    sql: str
    plan: str
    scans: list[str] = field(default_factory=list)

    @property
    def seq_scans(self) -> list[str]:
        return [s for s in self.scans if s.startswith("Seq Scan")]


_SCAN = re.compile(r"((?:Parallel )?(?:Seq Scan|Index Scan|Index Scan Backward|Index Only Scan|"
                   r"Index Only Scan Backward|Bitmap Heap Scan|Bitmap Index Scan)"
                   r"(?: using \S+)? on \S+)")
_DML = ("SELECT", "UPDATE", "INSERT", "DELETE", "WITH")


def explain_calls(engine: Engine, call: Callable[[Session], Any]) -> list[Explained]:
    """Run ``call(session)`` in a transaction that is rolled back, recording the statements
    it sends; then ``EXPLAIN (ANALYZE, BUFFERS)`` each one with its parameters, each in a
    transaction rolled back too (an UPDATE explained is an UPDATE run). PostgreSQL only."""
    sent: list[tuple[str, Any]] = []

    def record(conn, cursor, statement, parameters, context, executemany):
        if not executemany and statement.lstrip().split(None, 1)[0].upper() in _DML:
            sent.append((statement, parameters))

    with engine.connect() as conn:
        event.listen(conn, "before_cursor_execute", record)
        outer = conn.begin()
        try:
            with Session(bind=conn, join_transaction_mode="create_savepoint") as session:
                call(session)
        finally:
            event.remove(conn, "before_cursor_execute", record)
            outer.rollback()
        explained = []
        for sql, parameters in sent:
            with conn.begin() as trans:
                rows = conn.exec_driver_sql(f"EXPLAIN (ANALYZE, BUFFERS) {sql}",
                                            parameters or {}).scalars().all()
                trans.rollback()
            plan = "\n".join(rows)
            explained.append(Explained(" ".join(sql.split()), plan, _SCAN.findall(plan)))
    return explained


def scan_summary(explained: Iterable[Explained]) -> list[str]:
    """Each distinct scan on the outbox tables, in the order first seen."""
    seen: dict[str, None] = {}
    for e in explained:
        for scan in e.scans:
            if " on outbox_" in scan or scan.startswith("Bitmap Index Scan"):
                seen.setdefault(scan)
    return list(seen)


# ---- the run -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sizes:
    hist_small: Shape
    hist_large: Shape
    backlog_small: Shape
    backlog_large: Shape


def sizes(mode: str) -> Sizes:
    """The tables of (a)/(c) and of (b) for ``full``, ``quick`` or ``smoke``."""
    live = sum(LIVE.values())
    if mode == "smoke":
        small, large, h, d_small, d_large, due_small, due_large = (
            4_000, 20_000, 2_000, 600, 5_000, 600, 1_500)
    elif mode == "quick":
        small, large, h, d_small, d_large, due_small, due_large = (
            10_000, 200_000, 20_000, 1_000, 20_000, 1_000, 5_000)
    else:
        small, large, h, d_small, d_large, due_small, due_large = (
            10_000, 1_000_000, 100_000, 1_000, 100_000, 1_000, 10_000)
    return Sizes(Shape("hist_small", small, due_small), Shape("hist_large", large, due_large),
                 Shape("backlog_small", h + live + d_small, d_small),
                 Shape("backlog_large", h + live + d_large, d_large))


def _ms(seconds: Iterable[float]) -> float:
    return round(statistics.median(seconds) * 1000, 3)


def _line(label: str, small: Shape, large: Shape, t_small: float, t_large: float,
          target: float | None, strict: bool = False) -> tuple[str, float, bool]:
    ratio = t_large / t_small if t_small else float("inf")
    if target is None:
        verdict, met = "(for information)", True
    else:
        met = ratio < target if strict else ratio <= target
        verdict = f"target {'<' if strict else '≤'} {target:g}: {'met' if met else 'MISSED'}"
    text = (f"{label:<34}{t_small:>9.2f} ms {_rows(small):>18}   {t_large:>9.2f} ms "
            f"{_rows(large):>18}   ratio {ratio:>6.2f}  {verdict}")
    return text, round(ratio, 3), met


def _counts(values: list[int]) -> str:
    return " or ".join(str(v) for v in values) or "none"


def _rows(shape: Shape) -> str:
    return f"({_short(shape.total)} rows, {_short(shape.due)} due)"


def _short(n: int) -> str:
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 1000 and n % 1000 == 0:
        return f"{n // 1000}k"
    return f"{n:,}"


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench scale", description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=7, help="timed runs per side; medians count")
    p.add_argument("--database-url",
                   default=os.environ.get("BENCH_SCALE_DATABASE_URL")
                   or os.environ.get("BENCH_DATABASE_URL") or DEFAULT_ADMIN_URL,
                   help="PostgreSQL server and an account that may create databases "
                        "(default %(default)s)")
    p.add_argument("--explain", action="store_true",
                   help="print the EXPLAIN ANALYZE plans of the large sides")
    p.add_argument("--keep", action="store_true", help="keep the scratch databases")
    p.add_argument("--quick", action="store_true", help="smaller tables (200k rows)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny tables, seconds: only proves the benchmark still runs (make test)")
    p.add_argument("--max-seconds", type=int, default=600, help="hard stop for the whole run")
    args = p.parse_args(argv)
    args.mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    if args.smoke:
        args.runs, args.max_seconds = 3, min(args.max_seconds, 120)
    return args


class _Timeout(Exception):
    pass


def _on_alarm(*_):
    raise _Timeout


def main(argv: list[str] | None = None) -> int:
    return on_scratch("scale", _args(argv), _run)


def on_scratch(prog: str, args: argparse.Namespace,
               run: Callable[[argparse.Namespace, Scratch], int]) -> int:
    """Run ``run(args, scratch)`` on scratch databases of ``args.database_url``, stopped
    after ``args.max_seconds``; the databases are dropped afterwards (unless ``--keep``).
    Exit 2 without PostgreSQL, 3 on the time limit."""
    if not args.database_url.startswith("postgresql"):
        print(f"{prog}: needs PostgreSQL (--database-url or BENCH_SCALE_DATABASE_URL)",
              file=sys.stderr)
        return 2
    scratch = Scratch(args.database_url, keep=args.keep)
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(args.max_seconds)
    try:
        return run(args, scratch)
    except _Timeout:
        print(f"{prog}: stopped after --max-seconds={args.max_seconds}", file=sys.stderr)
        return 3
    except sa.exc.OperationalError as exc:
        print(f"{prog}: PostgreSQL: {str(exc.orig or exc).splitlines()[0]}", file=sys.stderr)
        return 2
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        scratch.close()


def _run(args: argparse.Namespace, scratch: Scratch) -> int:
    started = time.monotonic()
    shapes = sizes(args.mode)
    settings = RelaySettings()
    now = utcnow()
    engines: dict[str, Engine] = {}
    for shape in (shapes.hist_small, shapes.hist_large, shapes.backlog_small,
                  shapes.backlog_large):
        t0 = time.monotonic()
        print(f"scale: building {shape.name}: {shape.total:,} rows ({shape.due:,} due) …",
              end="", flush=True)
        engines[shape.name] = scratch.database(shape.name)
        build(engines[shape.name], shape, now)
        print(f" {time.monotonic() - t0:.1f} s", flush=True)

    taken: dict[str, set[int]] = {}

    def relay_timer(name: str) -> Callable[[], float]:
        def run() -> float:
            elapsed, n = time_relay_pass(engines[name], settings)
            taken.setdefault(name, set()).add(n)
            return elapsed
        return run

    def status_timer(name: str) -> Callable[[], float]:
        return lambda: time_status(engines[name])[0]

    cases = [
        ("(a) relay pass, history", "relay_history", shapes.hist_small, shapes.hist_large,
         relay_timer, TARGET_RELAY, False, lambda s: relay_pass(s, settings)),
        ("(b) relay pass, due backlog", "relay_backlog", shapes.backlog_small,
         shapes.backlog_large, relay_timer, TARGET_RELAY, False,
         lambda s: relay_pass(s, settings)),
        ("(c) outbox status", "status", shapes.hist_small, shapes.hist_large, status_timer,
         TARGET_STATUS, True, status_report),
        # Not a target: the backlog is live, and its depth is counted exactly.
        ("(d) outbox status, due backlog", "status_backlog", shapes.backlog_small,
         shapes.backlog_large, status_timer, None, False, status_report),
    ]
    results: dict[str, Any] = {"config": {
        "mode": args.mode, "runs": args.runs, "batch_size": settings.batch_size,
        "live_set": LIVE, "python": platform.python_version(), "cpus": os.cpu_count(),
        "shapes": {s.name: {"total": s.total, "due": s.due, "history": s.history}
                   for s in (shapes.hist_small, shapes.hist_large, shapes.backlog_small,
                             shapes.backlog_large)}}}
    lines, plans = [], []
    all_met = True
    for label, key, small, large, timer, target, strict, call in cases:
        print(f"scale: {label}: {args.runs} runs per side …", flush=True)
        with engines[small.name].connect() as conn:
            server = conn.exec_driver_sql("SHOW server_version").scalar()
        results["config"]["postgresql"] = server
        t_small, t_large = alternate(timer(small.name), timer(large.name), args.runs)
        text, ratio, met = _line(label, small, large, _ms(t_small), _ms(t_large), target,
                                 strict)
        all_met &= met
        explained = explain_calls(engines[large.name], call)
        scans = scan_summary(explained)
        lines.append(text)
        if key.startswith("relay"):
            rows = {side.name: sorted(taken.get(side.name, ())) for side in (small, large)}
            lines.append(f"    rows taken per pass: {_counts(rows[small.name])} (small), "
                         f"{_counts(rows[large.name])} (large)")
            if rows[small.name] != rows[large.name]:
                lines.append("    NOTE: the two sides took different numbers of rows: the "
                             "ratio compares unequal work")
            results.setdefault("rows_taken", {}).update(rows)
        lines.append(f"    scans at {_short(large.total)} rows: " + "; ".join(scans))
        if any(e.seq_scans for e in explained):
            lines.append("    NOTE: a Seq Scan on an outbox table: its cost follows the table "
                         "(on a small table the planner may rightly prefer one)")
        plans += [f"-- {label}, {large.name}:\n{e.sql}\n{e.plan}\n" for e in explained]
        results[key] = {"small_ms": _ms(t_small), "large_ms": _ms(t_large), "ratio": ratio,
                        "target": target, "met": met,
                        "small_runs_ms": [round(t * 1000, 3) for t in t_small],
                        "large_runs_ms": [round(t * 1000, 3) for t in t_large],
                        "scans": scans, "plans": [{"sql": e.sql, "plan": e.plan}
                                                  for e in explained]}
    results["elapsed_s"] = round(time.monotonic() - started, 1)

    print()
    print(f"scale (PostgreSQL {results['config']['postgresql']}, medians of {args.runs} runs, "
          f"relay batch {settings.batch_size}{'; ' + args.mode + ' mode: ratios say little' if args.mode != 'full' else ''})")
    print(f"{'':<34}{'small':>12}{'':>19}   {'large':>12}")
    for line in lines:
        print(line)
    if args.explain:
        print()
        print("\n".join(plans))
    print(f"{'all targets met' if all_met else 'some targets MISSED'}; "
          f"{results['elapsed_s']:.0f} s")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"results: {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
