"""Dispatch: hand committed message ids to the broker, right after commit, without blocking.

The core knows no Celery. It publishes through a ``Publisher`` (``tasks``
provides one, found through the ``outbox.publishers`` entry point) from one
background thread per process, so a web request pays only for its INSERT; the
thread then marks the rows ``queued``. If that hand-off is lost (crash, broker
down), the relay finds the rows still ``pending`` and sends them.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Protocol

from sqlalchemy import Engine, bindparam, event, update
from sqlalchemy.orm import Session

from .clock import utcnow
from .config import RelaySettings
from .errors import ConfigurationError
from .lifecycle import relay_due
from .models import Message, MessageStatus

log = logging.getLogger("outbox.dispatch")

_SESSION_KEY = "outbox.dispatch"
# Refs per publish-then-mark cycle: rows are marked queued soon after their publish, so the
# relay (which re-sends rows still pending after its grace) does not send them a second time.
CHUNK = 100


@dataclass(frozen=True)
class MessageRef:
    """What a broker message carries: the row id and a readable label, never the payload."""

    id: str
    provider: str
    operation: str

    @property
    def label(self) -> str:
        return f"{self.provider}.{self.operation} {self.id}"


class Publisher(Protocol):
    """What the core needs from a broker (``tasks.publisher.CeleryPublisher`` is the one shipped)."""

    def publish(self, refs: Sequence[MessageRef]) -> None:
        """Send one delivery message per ref (its id and label only). Raises on broker
        failure: the rows stay due and the relay sends them later."""

    def publish_dead_letter(self, message_id: str, label: str) -> None:
        """Announce one dead letter (the ``dead_letter`` queue, seen in Flower). Raises on
        broker failure; the dead letter itself is already recorded in the database."""

    # Optional: ``depth(provider) -> int | None``, the messages waiting in the provider's
    # queue. With it the relay re-sends lost messages within seconds and dispatch keeps the
    # broker's backlog bounded (``outbox.relay.take_due``); without it, after
    # ``OUTBOX_RELAY_REQUEUE_AFTER``.


def load_publisher() -> Publisher | None:
    """The publisher registered under the ``outbox.publishers`` entry point, or None."""
    for entry in entry_points(group="outbox.publishers"):
        try:
            return entry.load()()
        except Exception as exc:  # a broken plugin must not break enqueue: the relay delivers
            log.error("cannot load publisher %r (%s: %s); messages wait for the relay",
                      entry.name, type(exc).__name__, exc)
    return None


_T = Message.__table__
# Only rows as enqueue or a re-drive left them: pending, not rescheduled by a worker. A
# worker may claim, fail and reschedule a row before this runs; that row must stay pending
# (due at its retry time), not become queued and wait for the relay's requeue delay.
_MARK_QUEUED = (
    update(_T)
    .where(_T.c.id.in_(bindparam("ids", expanding=True)),
           _T.c.status == MessageStatus.PENDING,
           _T.c.next_attempt_at <= _T.c.updated_at)
    .values(status=MessageStatus.QUEUED, queued_at=bindparam("now"), updated_at=bindparam("now"))
)


def mark_queued(engine: Engine | None, ids: Sequence[str]) -> None:
    """Record that ``ids`` were handed to the broker (only rows still pending as enqueued)."""
    if engine is None or not ids:
        return
    with engine.begin() as connection:
        connection.execute(_MARK_QUEUED, {"ids": list(ids), "now": utcnow()})


_HAND_TO_RELAY = (
    update(_T)
    .where(_T.c.id.in_(bindparam("ids", expanding=True)),
           _T.c.status == MessageStatus.PENDING,
           _T.c.next_attempt_at <= _T.c.updated_at)
    .values(next_attempt_at=bindparam("due"), updated_at=bindparam("now"))
)


def hand_to_relay(engine: Engine | None, ids: Sequence[str]) -> None:
    """Leave ``ids`` (rows still pending as enqueued) to the relay, due at its next pass."""
    if engine is None or not ids:
        return
    now = utcnow()
    try:
        with engine.begin() as connection:
            connection.execute(_HAND_TO_RELAY, {"ids": list(ids), "now": now,
                                                "due": relay_due(now)})
    except Exception as exc:   # the relay takes them after its grace period anyway
        log.warning("could not hand %d message(s) to the relay: %s", len(ids),
                    type(exc).__name__)


@dataclass
class _Work:
    engine: Engine | None
    refs: list[MessageRef]
    done: threading.Event | None = None   # set once everything before it was handled


class Dispatcher:
    """Publishes refs from a background thread, in batches, then marks them queued."""

    def __init__(self, publisher: Publisher | None = None):
        self._publisher = publisher
        self._load_failed = False   # look for the plugin once, not on every commit
        self._queue: queue.Queue[_Work] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._max_queued: int | None = None

    @property
    def publisher(self) -> Publisher | None:
        if self._publisher is None and not self._load_failed:
            self._publisher = load_publisher()
            self._load_failed = self._publisher is None
        return self._publisher

    def submit(self, engine: Engine | None, refs: list[MessageRef]) -> None:
        """Queue refs for publishing; returns at once."""
        if not refs:
            return
        self._ensure_thread()
        self._queue.put(_Work(engine, refs))

    def depth(self, provider: str) -> int | None:
        """Messages waiting in ``provider``'s broker queue, or None if unknown."""
        publisher = self.publisher
        depth = getattr(publisher, "depth", None)
        if depth is None:
            return None
        try:
            return depth(provider)
        except Exception as exc:
            log.warning("cannot read the depth of queue %s: %s", provider, type(exc).__name__)
            return None

    def publish_now(self, engine: Engine | None, refs: list[MessageRef]) -> bool:
        """Publish in the caller's thread (CLI, relay). Returns False if it could not."""
        publisher = self.publisher
        if publisher is None or not refs:
            return False
        try:
            publisher.publish(refs)
        except Exception as exc:
            log.warning("dispatch failed, the relay will send %d message(s): %s",
                        len(refs), type(exc).__name__)
            return False
        try:
            mark_queued(engine, [r.id for r in refs])
        except Exception as exc:  # published already; the worker's claim does not need this
            log.warning("could not mark %d message(s) queued: %s", len(refs), type(exc).__name__)
        return True

    def announce_dead_letter(self, message_id: str, label: str) -> None:
        """Publish one dead letter's event (``Publisher.publish_dead_letter``), in the caller's
        thread. The dead letter is already committed, so a broker failure is logged, not
        raised: the count awaiting action lives in the database."""
        publisher = self.publisher
        try:
            if publisher is None:
                raise RuntimeError("no publisher installed")
            publisher.publish_dead_letter(message_id, label)
        except Exception as exc:
            log.error("dead letter %s recorded but its event was not published: %s", label,
                      type(exc).__name__)

    def flush(self, timeout_s: float = 5.0) -> None:
        """Wait until everything submitted so far was published (or failed)."""
        if self._thread is not None:
            done = threading.Event()
            self._queue.put(_Work(None, [], done))
            done.wait(timeout_s)

    def _within_room(self, engine: Engine | None, refs: list[MessageRef]) -> list[MessageRef]:
        """The refs the broker has room for (``OUTBOX_RELAY_MAX_QUEUED`` per provider queue);
        the others are left to the relay, due at once, so a burst waits in the database."""
        if self._max_queued is None:
            try:
                self._max_queued = RelaySettings.from_env().max_queued
            except ConfigurationError as exc:
                log.error("%s; using the default", exc)
                self._max_queued = RelaySettings().max_queued
        by_provider: dict[str, list[MessageRef]] = {}
        for ref in refs:
            by_provider.setdefault(ref.provider, []).append(ref)
        sent: list[MessageRef] = []
        for provider, group in by_provider.items():
            waiting = self.depth(provider)
            room = len(group) if waiting is None else max(0, self._max_queued - waiting)
            sent += group[:room]
            if group[room:]:
                hand_to_relay(engine, [r.id for r in group[room:]])
        return sent

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="outbox-dispatch",
                                                daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            work = _drain(self._queue, limit=500)
            batches: dict[Engine | None, list[MessageRef]] = {}
            for item in work:
                batches.setdefault(item.engine, []).extend(item.refs)
            for engine, refs in batches.items():
                refs = self._within_room(engine, refs)
                for start in range(0, len(refs), CHUNK):
                    self.publish_now(engine, refs[start:start + CHUNK])
            for item in work:
                if item.done is not None:
                    item.done.set()


def _drain(q: queue.Queue[_Work], limit: int) -> list[_Work]:
    """Block for one item, then take whatever else is already waiting (up to ``limit``)."""
    items = [q.get()]
    while len(items) < limit:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            break
    return items


_dispatcher = Dispatcher()


def dispatcher() -> Dispatcher:
    """The process's dispatcher."""
    return _dispatcher


def use_publisher(publisher: Publisher | None) -> None:
    """Set the process's publisher explicitly (tests, or an app that builds its own)."""
    global _dispatcher
    _dispatcher = Dispatcher(publisher)


def _reset_after_fork() -> None:
    global _dispatcher
    _dispatcher = Dispatcher(_dispatcher._publisher)


os.register_at_fork(after_in_child=_reset_after_fork)
atexit.register(lambda: _dispatcher.flush(timeout_s=2.0))


# ---- the after-commit hook -------------------------------------------------

def dispatch_after_commit(session: Session, ref: MessageRef) -> None:
    """Publish ``ref`` once ``session`` commits; forget it if the session rolls back."""
    refs = session.info.get(_SESSION_KEY)
    if refs is None:
        refs = session.info[_SESSION_KEY] = []
    refs.append(ref)


# Listening on the Session class once costs every commit a dict lookup; listening on each
# session that enqueues cost each new session (each web request) ~15 µs.
@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    refs = session.info.get(_SESSION_KEY)
    if not refs:
        return
    session.info[_SESSION_KEY] = []
    bind = session.get_bind()
    _dispatcher.submit(bind if isinstance(bind, Engine) else getattr(bind, "engine", None),
                       list(refs))


@event.listens_for(Session, "after_rollback")
def _after_rollback(session: Session) -> None:
    if session.info.get(_SESSION_KEY):
        session.info[_SESSION_KEY] = []
