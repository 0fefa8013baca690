"""Group commit: a worker process's claims and outcomes, written by one thread in batches.

A delivery writes twice: the claim before the provider call and the outcome after it.
Written by each delivery thread in its own transaction, that is a BEGIN, a statement or
two and a COMMIT per write, and on SQLite eight threads queueing for the one write lock.
Here every delivery thread hands its write to the process's writer thread and waits for
the answer; the writer takes whatever has arrived meanwhile and writes it all in one
transaction: the claims as one ``UPDATE … WHERE id IN (…) RETURNING``, plain successes as
two executemany statements (``outbox.lifecycle.claim_many``, ``apply_delivered_many``),
everything else (failures, ordered messages) statement by statement. Nothing waits to
fill a batch: an idle writer takes the next write at once, and batches grow only while
it is busy, as a database's group commit does.

A batch is one serialisation of its writes (claims first, then outcomes), each of which
is the same fenced statement as when written alone. If the batch fails, each write is
tried again alone, so one bad write fails only its own delivery.

``Direct`` has the same three methods, each in its own transaction in the caller's
thread (tests, and callers without a worker's threads).
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from . import lifecycle
from .db import describe
from .decisions import Decision, Failure
from .lifecycle import Claim, Delivered

log = logging.getLogger("outbox.writer")

# Writes taken into one transaction at most (a worker has a few dozen threads at most).
MAX_BATCH = 64


class Direct:
    """Claims and outcomes, each in its own transaction, in the caller's thread."""

    def __init__(self, sessions: sessionmaker[Session]):
        self._sessions = sessions

    def claim(self, message_id: str, lease: timedelta, now: datetime) -> Claim | None:
        with self._sessions() as session:
            return lifecycle.claim(session, message_id, lease, now=now)

    def mark_delivered(self, claim: Claim, *, status_code: int, provider_ref: str | None,
                       now: datetime, worker: str | None) -> bool:
        with self._sessions() as session:
            return lifecycle.mark_delivered(session, claim, status_code=status_code,
                                            provider_ref=provider_ref, now=now, worker=worker)

    def record(self, claim: Claim, failure: Failure, decision: Decision, *, now: datetime,
               worker: str | None) -> bool:
        with self._sessions() as session:
            return lifecycle.record(session, claim, failure, decision, now=now, worker=worker)

    def advance_key(self, claim: Claim) -> bool:
        """``lifecycle.advance_key``, now (rare: after a spent key was verified not done)."""
        with self._sessions() as session:
            return lifecycle.advance_key(session, claim)


@dataclass
class _Claim:
    message_id: str
    lease: timedelta
    now: datetime
    future: Future


@dataclass
class _Delivered:
    item: Delivered
    future: Future


@dataclass
class _Failed:
    claim: Claim
    failure: Failure
    decision: Decision
    now: datetime
    worker: str | None
    future: Future


_Write = _Claim | _Delivered | _Failed


class GroupWriter:
    """``Direct``'s three methods, written in batches by one thread (see the module doc)."""

    def __init__(self, sessions: sessionmaker[Session], max_batch: int = MAX_BATCH):
        # A batch runs on a Core connection: a Session's own bookkeeping cost about a
        # third of a small batch. The rare writes that need a Session get one on it.
        self._engine = sessions.kw["bind"]
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[_Write] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.batches = 0   # transactions written, and the writes in them (for benchmarks)
        self.writes = 0

    def claim(self, message_id: str, lease: timedelta, now: datetime) -> Claim | None:
        return self._wait(_Claim(message_id, lease, now, Future()))

    def mark_delivered(self, claim: Claim, *, status_code: int, provider_ref: str | None,
                       now: datetime, worker: str | None) -> bool:
        return self._wait(_Delivered(Delivered(claim, status_code, provider_ref, now, worker),
                                     Future()))

    def record(self, claim: Claim, failure: Failure, decision: Decision, *, now: datetime,
               worker: str | None) -> bool:
        return self._wait(_Failed(claim, failure, decision, now, worker, Future()))

    def advance_key(self, claim: Claim) -> bool:
        """``lifecycle.advance_key`` in the caller's thread: rare, and it must be written
        before the send it precedes, not batched with outcomes."""
        with Session(self._engine) as session:
            return lifecycle.advance_key(session, claim)

    def _wait(self, write: _Write) -> Any:
        self._ensure_thread()
        self._queue.put(write)
        return write.future.result()   # the value, or the write's exception raised here

    def _ensure_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="outbox-writer",
                                                daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < self._max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._write(batch)

    def _write(self, batch: list[_Write]) -> None:
        """Write ``batch`` in one transaction and answer every write; never raises."""
        try:
            with self._engine.begin() as connection:
                results = _apply(connection, batch)
        except BaseException as exc:  # noqa: BLE001  (answered to the waiting threads)
            if len(batch) > 1:   # each alone: a bad write fails only its own delivery
                log.warning("a batch of %d writes failed (%s); writing them one by one",
                            len(batch), _described(exc))
                for write in batch:
                    self._write([write])
            else:
                batch[0].future.set_exception(exc)
            return
        self.batches += 1
        self.writes += len(batch)
        for write, result in zip(batch, results, strict=True):
            write.future.set_result(result)


def _described(exc: BaseException) -> str:
    """The error's type and, for a database error, the driver's first line: never the SQL
    or its parameters (an attempt's error text, a provider reference)."""
    if isinstance(exc, DBAPIError):
        return f"{type(exc).__name__}: {describe(exc)}"
    return type(exc).__name__


# What ``tasks.delivery.deliver_message`` writes through.
Writer = Direct | GroupWriter


def _apply(connection: Connection, batch: list[_Write]) -> list[Any]:
    """Run the batch's statements in ``connection``'s transaction; the result of each
    write."""
    results: dict[int, Any] = {}
    claims = [w for w in batch if isinstance(w, _Claim)]
    by_lease: dict[timedelta, list[_Claim]] = {}
    for write in claims:
        by_lease.setdefault(write.lease, []).append(write)
    for lease, group in by_lease.items():
        # One claim time for the statement: the latest, so every row due for any of these
        # threads is due for it.
        now = max(w.now for w in group)
        got = lifecycle.claim_many(connection, [w.message_id for w in group], lease, now)
        results.update({id(w): c for w, c in zip(group, got, strict=True)})
    plain = [w for w in batch
             if isinstance(w, _Delivered) and w.item.claim.ordering_key is None]
    recorded = lifecycle.apply_delivered_many(connection, [w.item for w in plain])
    results.update({id(w): ok for w, ok in zip(plain, recorded, strict=True)})
    rest = [w for w in batch if id(w) not in results]
    if not rest:
        return [results[id(w)] for w in batch]
    with Session(bind=connection) as session:   # joins the connection's transaction
        for write in rest:
            if isinstance(write, _Delivered):   # an ordered message: wakes its key's next
                item = write.item
                results[id(write)] = lifecycle.apply_delivered(
                    session, item.claim, status_code=item.status_code,
                    provider_ref=item.provider_ref, now=item.now, worker=item.worker)
            else:
                results[id(write)] = lifecycle.apply_record(
                    session, write.claim, write.failure, write.decision, now=write.now,
                    worker=write.worker)
    return [results[id(w)] for w in batch]
