"""Attempt totals: every attempt counted once and for all, for ``/metrics``.

Prometheus wants counters (``outbox_attempts_total``, the attempt-duration histogram)
that only ever rise. Counting the attempts table on each scrape would read millions of
rows and would go *down* when retention deletes old attempts. So attempts are rolled up
into ``outbox_attempt_totals`` (one row per provider, operation, outcome, error class,
status code and duration bucket), and a scrape reads the totals plus the few attempts
not yet rolled up, in one snapshot (an attempt is counted in exactly one of the two).

Rolling up must not skip an attempt whose transaction commits after a higher id has
committed (ids are handed out at insert, not at commit). So each roll-up counts only up
to the highest id the *previous* roll-up saw, at least ``SETTLE`` ago: a transaction
that had its id then has long committed (or rolled back) by now. The relay rolls up
every ``ROLLUP_EVERY_S``, before its scheduled prune, and ``outbox db prune`` rolls up
first too; several relays at once are safe (the progress row is updated with a guard, so
only one of them counts a range).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import (
    Connection,
    Engine,
    case,
    func,
    insert,
    literal,
    literal_column,
    select,
    union_all,
    update,
)
from sqlalchemy.exc import IntegrityError

from .clock import utcnow
from .models import Attempt, AttemptTotal, Message, Rollup

# Upper bounds of the attempt-duration histogram, in seconds (Prometheus ``le``); the
# bucket index ``len(BUCKETS_S)`` is +Inf.
BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SETTLE = timedelta(seconds=60)
ROLLUP_EVERY_S = 60.0
NAME = "attempts"


@dataclass(frozen=True)
class Total:
    """Attempts of one kind: how many, and their summed duration."""

    provider: str
    operation: str
    outcome: str
    error_class: str   # '' when the attempt had none (a delivery)
    status_code: int   # 0 when no HTTP status was received
    bucket: int        # index into BUCKETS_S; len(BUCKETS_S) is +Inf
    count: int
    duration_s_sum: float


def _bucket():
    return case(*((Attempt.duration_ms <= bound * 1000, i) for i, bound in enumerate(BUCKETS_S)),
                else_=len(BUCKETS_S))


_KEYS = (Message.provider, Message.operation, Attempt.outcome,
         func.coalesce(Attempt.error_class, ""), func.coalesce(Attempt.status_code, 0))


def _attempts_after(after_id, upto_id: int | None = None):
    """Attempts with ``after_id < id [<= upto_id]``, grouped as totals are."""
    bucket = _bucket()
    query = (select(*_KEYS, bucket, func.count(), func.sum(Attempt.duration_ms) / 1000.0)
             .join(Message, Message.id == Attempt.message_id)
             .where(Attempt.id > after_id))
    if upto_id is not None:
        query = query.where(Attempt.id <= upto_id)
    return query.group_by(*_KEYS, bucket)


def read(engine: Engine) -> list[Total]:
    """Every attempt ever recorded: the totals, plus those not rolled up yet.

    Both are read in one snapshot (a repeatable-read transaction on PostgreSQL; SQLite's
    read transactions are snapshots), so a roll-up committing meanwhile cannot count an
    attempt twice or not at all. The progress is read first and written into the second
    statement as a number, so the planner sees how few attempts the tail holds.
    """
    options = ({"isolation_level": "REPEATABLE READ"}
               if engine.dialect.name == "postgresql" else {})
    with engine.connect().execution_options(**options) as conn, conn.begin():
        last_id = int(conn.execute(select(Rollup.last_id).where(Rollup.name == NAME))
                      .scalar() or 0)
        both = union_all(
            select(AttemptTotal.provider, AttemptTotal.operation, AttemptTotal.outcome,
                   AttemptTotal.error_class, AttemptTotal.status_code, AttemptTotal.bucket,
                   AttemptTotal.count, AttemptTotal.duration_s_sum),
            _attempts_after(literal_column(str(last_id)))).subquery()
        cols = list(both.c)
        rows = conn.execute(
            select(*cols[:6], func.sum(cols[6]), func.sum(cols[7])).group_by(*cols[:6])).all()
    return [Total(p, o, out, ec or "", int(code or 0), int(b), int(n), float(s or 0.0))
            for p, o, out, ec, code, b, n, s in rows]


def roll_up(engine: Engine, now: datetime | None = None) -> int:
    """Count the settled attempts into the totals; return how many were counted (0 when
    another relay did it, or nothing has settled yet)."""
    now = now or utcnow()
    try:
        with engine.begin() as conn:
            return _roll_up(conn, now)
    except IntegrityError:   # two first roll-ups at once: the other one made the row
        return 0


def _roll_up(conn: Connection, now: datetime) -> int:
    progress = conn.execute(select(Rollup.last_id, Rollup.candidate_id, Rollup.candidate_at)
                            .where(Rollup.name == NAME)).first()
    highest = conn.execute(select(func.coalesce(func.max(Attempt.id), 0))).scalar_one()
    if progress is None:
        conn.execute(insert(Rollup).values(name=NAME, last_id=0, candidate_id=highest,
                                           candidate_at=now))
        return 0
    last_id, upto, seen_at = progress
    if now - seen_at < SETTLE:
        return 0
    moved = conn.execute(
        update(Rollup).where(Rollup.name == NAME, Rollup.last_id == last_id,
                             Rollup.candidate_id == upto)
        .values(last_id=max(last_id, upto), candidate_id=highest, candidate_at=now)).rowcount
    if not moved or upto <= last_id:
        return 0
    counted = 0
    for p, o, outcome, ec, code, bucket, n, seconds in conn.execute(
            _attempts_after(literal(last_id), upto)):
        key = dict(provider=p, operation=o, outcome=outcome, error_class=ec,
                   status_code=code, bucket=bucket)
        done = conn.execute(
            update(AttemptTotal)
            .where(*(getattr(AttemptTotal, k) == v for k, v in key.items()))
            .values(count=AttemptTotal.count + n,
                    duration_s_sum=AttemptTotal.duration_s_sum + (seconds or 0.0))).rowcount
        if not done:
            conn.execute(insert(AttemptTotal).values(**key, count=n,
                                                     duration_s_sum=seconds or 0.0))
        counted += n
    return counted
