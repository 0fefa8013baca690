"""Retention: delete delivered and discarded history older than a window, in small batches.

What goes, what stays:

* a ``delivered`` message whose ``delivered_at`` is older than its window, and a
  ``discarded`` message whose ``updated_at`` (the time it was discarded) is older than its
  window, go — with their ``outbox_attempts`` rows (the attempts first: they reference the
  message);
* ``dead`` (dead letters awaiting action), ``pending``, ``queued`` and ``in_flight``
  messages are never deleted, whatever their age: every statement names the status it
  deletes, and only those two;
* the audit trail (``outbox_audit``, who re-drove or discarded what, and why) is **never
  deleted**. An audit entry of a pruned message must stop referencing it (a foreign key),
  so its ``message_id`` becomes NULL and the id, with the message's label and the time of
  pruning, is written into the entry's ``details`` (``message_id``, ``message_label``,
  ``pruned_at``) — "who discarded 01J…, and why" stays answerable.

Each batch (``batch_size`` messages, default 500) is its own short transaction, so pruning
never holds locks for long; a pause between batches lets waiting writers in (SQLite has
one writer at a time). A batch's ids are read through the partial indexes of migration
0003 — ``ix_outbox_delivered_at`` (``delivered_at WHERE status = 'delivered'``) and
``ix_outbox_discarded_at`` (``updated_at WHERE status = 'discarded'``) — oldest first, and
on PostgreSQL ``FOR UPDATE SKIP LOCKED``: rows another transaction holds are left for the
next run instead of waited for, and several relays pruning at once share the work.

Space: deleted rows leave dead tuples, which only a ``VACUUM`` makes reusable. Left to
autovacuum (which waits for 20 % of a table to be dead, and may be switched off), a table
with this churn keeps growing; so on PostgreSQL every run that deleted something is
followed by ``VACUUM (ANALYZE)`` of the two tables (``vacuum``): it takes no lock that
reads or writes wait for. SQLite reuses freed pages by itself.

``PruneSchedule`` runs this from the relay (its vacuum in a thread of its own), at most
once per ``OUTBOX_PRUNE_INTERVAL`` and within a time budget per call, so pruning a large backlog never stalls relaying; see
``PruneSettings`` for the variables and ``OUTBOX_PRUNE=off``.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Engine, Select, bindparam, delete, func, literal_column, select, update
from sqlalchemy import exc as sa_exc

from integrations.errors import ConfigurationError

from .clock import iso, utcnow
from .config import env_str
from .models import Attempt, AuditEntry, Message, MessageStatus

log = logging.getLogger("outbox.retention")

DEFAULT_WINDOW = timedelta(days=30)
DEFAULT_INTERVAL = timedelta(hours=1)
DEFAULT_BATCH_SIZE = 500
MAX_BATCH_SIZE = 10_000          # ids are bound one parameter each; batches stay small
MAX_DURATION = timedelta(days=36_500)
DURATION_EXAMPLE = "expected a duration like 30d, 12h, 90m or 3600s"

_DURATION = re.compile(r"(\d{1,12})\s*([smhd]?)")
_UNITS = {"": "seconds", "s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_duration(text: str) -> timedelta:
    """``30d``, ``12h``, ``90m``, ``3600s`` or plain seconds (``3600``); 0 to 100 years.

    Raises:
        ValueError: anything else (the message says what is expected).
    """
    match = _DURATION.fullmatch(str(text).strip().lower())
    if not match:
        raise ValueError(f"{DURATION_EXAMPLE}, got {str(text)[:40]!r}")
    try:
        value = timedelta(**{_UNITS[match[2]]: int(match[1])})
    except OverflowError:
        value = MAX_DURATION + timedelta(days=1)
    if value > MAX_DURATION:
        raise ValueError(f"{DURATION_EXAMPLE}, at most 36500d; got {str(text)[:40]!r}")
    return value


def format_duration(value: timedelta) -> str:
    """The shortest exact form: ``30d``, ``12h``, ``90m``, ``45s``."""
    seconds = int(value.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


# ---- one prune ------------------------------------------------------------------------------

# Each prunable status, the column its age is measured on, and the partial index over it.
# The status is a literal in the SQL, not a bound parameter: SQLite uses a partial index
# only when the query's WHERE visibly implies the index's condition.
_KINDS = {
    MessageStatus.DELIVERED: (Message.delivered_at, "ix_outbox_delivered_at"),
    MessageStatus.DISCARDED: (Message.updated_at, "ix_outbox_discarded_at"),
}


def _where(status: MessageStatus, cutoff: datetime) -> list:
    column, _index = _KINDS[status]
    return [Message.status == literal_column(f"'{status.value}'"), column < cutoff]


def batch_select(status: MessageStatus, cutoff: datetime, limit: int) -> Select:
    """The ids of up to ``limit`` messages of ``status`` (delivered or discarded) older than
    ``cutoff``, oldest first, through that status's partial index; on PostgreSQL
    ``FOR UPDATE SKIP LOCKED`` (SQLAlchemy leaves the clause out on SQLite, whose
    ``BEGIN IMMEDIATE`` already makes the batch the only writer)."""
    column, _index = _KINDS[status]
    return (select(Message.id).where(*_where(status, cutoff))
            .order_by(column).limit(limit).with_for_update(skip_locked=True))


@dataclass
class PruneResult:
    """What a prune did (or, with ``dry_run``, would do).

    Attributes:
        delivered / discarded: messages deleted (would be deleted).
        attempts: their attempt rows deleted.
        audit_detached: audit entries kept and unlinked from a pruned message.
        batches: transactions that deleted rows (0 for a dry run).
        complete: False when the time budget ran out with old rows left.
    """

    delivered_cutoff: datetime
    discarded_cutoff: datetime
    delivered: int = 0
    discarded: int = 0
    attempts: int = 0
    audit_detached: int = 0
    batches: int = 0
    dry_run: bool = False
    complete: bool = True
    elapsed_s: float = 0.0

    @property
    def messages(self) -> int:
        return self.delivered + self.discarded

    def as_dict(self) -> dict:
        data = asdict(self)
        data.update(delivered_cutoff=iso(self.delivered_cutoff),
                    discarded_cutoff=iso(self.discarded_cutoff),
                    messages=self.messages, elapsed_s=round(self.elapsed_s, 3))
        return data

    def summary(self, delivered_window: timedelta, discarded_window: timedelta) -> str:
        """One line: ``pruned 120 delivered (older than 30d) and 4 discarded (older than 30d)
        message(s) with 300 attempt(s); audit kept, 4 entries unlinked; 2 batch(es) in 0.1 s``."""
        verb = "would prune" if self.dry_run else "pruned"
        line = (f"{verb} {self.delivered} delivered (older than "
                f"{format_duration(delivered_window)}) and {self.discarded} discarded (older "
                f"than {format_duration(discarded_window)}) message(s) with {self.attempts} "
                f"attempt(s); audit kept, {self.audit_detached} "
                f"{'entry' if self.audit_detached == 1 else 'entries'} "
                f"{'to unlink' if self.dry_run else 'unlinked'}")
        if not self.dry_run:
            line += f"; {self.batches} batch(es) in {self.elapsed_s:.1f} s"
        if not self.complete:
            line += "; stopped at the time budget, older rows remain"
        return line


def prune(engine: Engine, *, delivered_older_than: timedelta = DEFAULT_WINDOW,
          discarded_older_than: timedelta = DEFAULT_WINDOW,
          batch_size: int = DEFAULT_BATCH_SIZE, now: datetime | None = None,
          pause_s: float = 0.01, time_budget_s: float | None = None,
          dry_run: bool = False) -> PruneResult:
    """Delete delivered messages whose ``delivered_at`` is older than ``delivered_older_than``
    and discarded messages whose ``updated_at`` is older than ``discarded_older_than``,
    with their attempts, ``batch_size`` messages per transaction.

    Dead letters, pending, queued and in-flight messages are never deleted. Audit entries
    are never deleted either: an entry of a pruned message gets ``message_id = NULL`` (the
    foreign key would block the delete) and keeps the id and label in its ``details``
    (``message_id``, ``message_label``, ``pruned_at``).

    Args:
        now: the time the windows count back from (naive UTC; default now).
        pause_s: sleep between batches, so that waiting writers get their turn.
        time_budget_s: stop after the batch that exceeds this (``complete`` is then False
            if old rows may remain); None: run until nothing old is left.
        dry_run: count what would go, delete nothing.

    Batches already committed stay committed if a later one fails.
    """
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise ValueError(f"batch_size must be from 1 to {MAX_BATCH_SIZE}")
    now = now or utcnow()
    cutoffs = {MessageStatus.DELIVERED: now - delivered_older_than,
               MessageStatus.DISCARDED: now - discarded_older_than}
    result = PruneResult(cutoffs[MessageStatus.DELIVERED], cutoffs[MessageStatus.DISCARDED],
                         dry_run=dry_run)
    started = time.monotonic()
    if dry_run:
        _count(engine, cutoffs, result)
    else:
        left = list(cutoffs)            # statuses that may still have old rows
        while left:
            left = _one_batch(engine, cutoffs, left, batch_size, now, result)
            if not left:
                break
            if time_budget_s is not None and time.monotonic() - started >= time_budget_s:
                result.complete = False
                break
            if pause_s > 0:
                time.sleep(pause_s)
    result.elapsed_s = time.monotonic() - started
    return result


def vacuum(engine: Engine) -> float | None:
    """``VACUUM (ANALYZE)`` the pruned tables on PostgreSQL, so the space of deleted rows is
    reused and the tables stay flat; the seconds it took, or None (SQLite: nothing to do).
    Raises ``sqlalchemy.exc.SQLAlchemyError``."""
    if engine.dialect.name != "postgresql":
        return None
    started = time.monotonic()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.exec_driver_sql(f"VACUUM (ANALYZE) {Message.__tablename__}, "
                                   f"{Attempt.__tablename__}")
    return time.monotonic() - started


def _one_batch(engine, cutoffs, left, batch_size, now, result) -> list[MessageStatus]:
    """Delete one batch in its own transaction; return the statuses that may have more."""
    still = []
    with engine.begin() as conn:
        ids: dict[MessageStatus, list[str]] = {}
        room = batch_size
        for status in left:
            if room == 0:
                still.append(status)
                continue
            got = list(conn.scalars(batch_select(status, cutoffs[status], room)))
            ids[status] = got
            room -= len(got)
            if room == 0:   # a full batch: there may be more
                still.append(status)
        every = [i for got in ids.values() for i in got]
        if not every:
            return []
        result.audit_detached += _detach_audit(conn, every, now)
        result.attempts += conn.execute(
            delete(Attempt).where(Attempt.message_id.in_(every))).rowcount
        for status, got in ids.items():
            if got:   # the status and age again, in the statement that deletes
                deleted = conn.execute(delete(Message).where(
                    Message.id.in_(got), *_where(status, cutoffs[status]))).rowcount
                setattr(result, status.value, getattr(result, status.value) + deleted)
        result.batches += 1
    return still


def _detach_audit(conn, ids: list[str], now: datetime) -> int:
    """Unlink the audit entries of messages about to be deleted; keep the id in details."""
    entries = conn.execute(select(AuditEntry.id, AuditEntry.message_id, AuditEntry.details)
                           .where(AuditEntry.message_id.in_(ids))).all()
    if not entries:
        return 0
    labels = dict(conn.execute(
        select(Message.id, Message.provider + "." + Message.operation + " " + Message.id)
        .where(Message.id.in_({e.message_id for e in entries}))).all())
    conn.execute(
        update(AuditEntry).where(AuditEntry.id == bindparam("entry_id"))
        .values(message_id=None,
                details=bindparam("new_details", type_=AuditEntry.__table__.c.details.type)),
        [{"entry_id": e.id,
          "new_details": {**(e.details if isinstance(e.details, dict) else {}),
                          "message_id": e.message_id,
                          "message_label": labels.get(e.message_id), "pruned_at": iso(now)}}
         for e in entries])
    return len(entries)


def _count(engine, cutoffs, result) -> None:
    """Fill ``result`` with what a prune would delete, in one read."""
    with engine.connect() as conn:
        doomed = []
        for status, cutoff in cutoffs.items():
            setattr(result, status.value, conn.scalar(
                select(func.count()).select_from(Message).where(*_where(status, cutoff))))
            doomed.append(select(Message.id).where(*_where(status, cutoff)))
        for table, column, attribute in ((Attempt, Attempt.message_id, "attempts"),
                                         (AuditEntry, AuditEntry.message_id, "audit_detached")):
            setattr(result, attribute, sum(
                conn.scalar(select(func.count()).select_from(table).where(column.in_(ids)))
                for ids in doomed))


# ---- the relay's schedule -------------------------------------------------------------------

_OFF = {"off", "false", "no", "0"}
_ON = {"on", "true", "yes", "1"}


def _env_duration(name: str, default: timedelta, environ, *, positive: bool = False) -> timedelta:
    raw = env_str(name, "", environ)
    if not raw:
        return default
    try:
        value = parse_duration(raw)
    except ValueError as exc:
        raise ConfigurationError(f"{name}: {exc}") from None
    if positive and not value:
        raise ConfigurationError(f"{name} must be more than 0 (to turn pruning off, set "
                                 "OUTBOX_PRUNE=off)")
    return value


@dataclass(frozen=True)
class PruneSettings:
    """How the relay prunes, from the environment.

    ``OUTBOX_PRUNE``                    ``on`` (default) or ``off``: whether the relay prunes
                                        (``outbox db prune`` works either way)
    ``OUTBOX_PRUNE_INTERVAL``           time between runs (default 3600 s)
    ``OUTBOX_PRUNE_DELIVERED_AFTER``    delivered messages are kept this long (default 30d)
    ``OUTBOX_PRUNE_DISCARDED_AFTER``    discarded messages are kept this long (default 30d)
    ``OUTBOX_PRUNE_BATCH_SIZE``         messages per transaction (default 500, at most 10000)

    Durations: ``30d``, ``12h``, ``90m``, ``3600s`` or plain seconds.
    """

    enabled: bool = True
    interval: timedelta = DEFAULT_INTERVAL
    delivered_after: timedelta = DEFAULT_WINDOW
    discarded_after: timedelta = DEFAULT_WINDOW
    batch_size: int = DEFAULT_BATCH_SIZE

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> PruneSettings:
        """Raises ConfigurationError naming the variable."""
        switch = env_str("OUTBOX_PRUNE", "on", environ).lower()
        if switch not in _ON | _OFF:
            raise ConfigurationError(f"OUTBOX_PRUNE must be on or off, got {switch[:20]!r}")
        raw_batch = env_str("OUTBOX_PRUNE_BATCH_SIZE", str(DEFAULT_BATCH_SIZE), environ)
        if not (raw_batch.isdigit() and 1 <= int(raw_batch) <= MAX_BATCH_SIZE):
            raise ConfigurationError(f"OUTBOX_PRUNE_BATCH_SIZE must be a whole number from 1 "
                                     f"to {MAX_BATCH_SIZE}, got {raw_batch[:20]!r}")
        return cls(
            enabled=switch in _ON,
            interval=_env_duration("OUTBOX_PRUNE_INTERVAL", DEFAULT_INTERVAL, environ,
                                   positive=True),
            delivered_after=_env_duration("OUTBOX_PRUNE_DELIVERED_AFTER", DEFAULT_WINDOW, environ),
            discarded_after=_env_duration("OUTBOX_PRUNE_DISCARDED_AFTER", DEFAULT_WINDOW, environ),
            batch_size=int(raw_batch),
        )


@dataclass
class PruneSchedule:
    """Prunes from a long-running loop (the relay), at most once per interval.

    Call ``maybe_run(engine)`` on every pass: it returns None at once until the next run is
    due. A run spends at most ``time_budget_s`` per call; if old rows remain, the next call
    continues it (relaying goes on between calls), and the run's one log line, with its
    counts, is written when it completes. The first call runs at once, so a relay that
    restarts more often than the interval still prunes. A database error is logged (one
    line) and tried again after ``retry_after``; it is not raised.
    """

    settings: PruneSettings = field(default_factory=PruneSettings)
    time_budget_s: float = 1.0
    vacuum_after: bool = True   # ``vacuum`` after a run that deleted something
    pause_s: float = 0.01
    retry_after: timedelta = timedelta(minutes=1)
    next_run_at: datetime | None = None
    _run: PruneResult | None = field(default=None, init=False, repr=False)   # being continued
    _vacuuming: threading.Thread | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **kwargs) -> PruneSchedule:
        """Raises ConfigurationError (call it at start-up: a bad value stops the process)."""
        return cls(PruneSettings.from_env(environ), **kwargs)

    def maybe_run(self, engine: Engine, now: datetime | None = None) -> PruneResult | None:
        """Prune if a run is due (or one is being continued); the call's result, else None."""
        if not self.settings.enabled:
            return None
        now = now or utcnow()
        if self.next_run_at is not None and now < self.next_run_at:
            return None
        s = self.settings
        self.next_run_at = now + min(self.retry_after, s.interval)   # if this call fails
        try:
            result = prune(engine, delivered_older_than=s.delivered_after,
                           discarded_older_than=s.discarded_after, batch_size=s.batch_size,
                           now=now, pause_s=self.pause_s, time_budget_s=self.time_budget_s)
        except sa_exc.SQLAlchemyError as exc:
            done = f" after pruning {self._run.messages} message(s)" if self._run else ""
            self._run = None
            log.warning("prune failed%s (%s: %s); next try at %s", done, type(exc).__name__,
                        _first_line(exc), iso(self.next_run_at))
            return None
        total = self._accumulate(result)
        if not result.complete:
            self.next_run_at = now          # continue on the next call
            return result
        self._run = None
        self.next_run_at = now + s.interval
        log.info("%s; next run at %s", total.summary(s.delivered_after, s.discarded_after),
                 iso(self.next_run_at))
        if self.vacuum_after and total.messages:
            self._vacuum_in_background(engine)
        return result

    def _vacuum_in_background(self, engine: Engine) -> None:
        """``vacuum`` in a thread, so relaying goes on meanwhile; one at a time."""
        if self._vacuuming is not None and self._vacuuming.is_alive():
            return

        def run() -> None:
            try:
                took = vacuum(engine)
            except sa_exc.SQLAlchemyError as exc:
                log.warning("vacuum after pruning failed (%s: %s)", type(exc).__name__,
                            _first_line(exc))
            else:
                if took is not None:
                    log.info("vacuumed the outbox tables in %.1f s", took)

        self._vacuuming = threading.Thread(target=run, name="outbox-vacuum", daemon=True)
        self._vacuuming.start()

    def _accumulate(self, result: PruneResult) -> PruneResult:
        run = self._run
        if run is None:
            run = self._run = PruneResult(result.delivered_cutoff, result.discarded_cutoff)
        for name in ("delivered", "discarded", "attempts", "audit_detached", "batches",
                     "elapsed_s"):
            setattr(run, name, getattr(run, name) + getattr(result, name))
        run.delivered_cutoff = result.delivered_cutoff
        run.discarded_cutoff = result.discarded_cutoff
        return run


def _first_line(exc: sa_exc.SQLAlchemyError) -> str:
    from .db import describe

    if isinstance(exc, sa_exc.DBAPIError):
        return describe(exc)
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""
