"""Polling, for providers without webhooks or when webhooks are missed: the cursor and the
backoff, kept in the database (``outbox_poll_cursors``, one row per source).

A poll cycle pages through the provider's list of events from the cursor on, stores each
page's events as inbound events (``outbox.inbound.store``: the same handlers, and the same
deduplication by event id, so an event seen by webhook and by poll is processed once) and
moves the cursor **in the same transaction** as the page's events: a poller killed at any
moment neither skips nor repeats an event. The provider side (which endpoint, which
pagination) is ``integrations.polling``.

While cycles find nothing new, the interval doubles up to ``OUTBOX_<NAME>_POLL_MAX_INTERVAL``
(default 300 s); a cycle that finds something returns it to ``OUTBOX_<NAME>_POLL_INTERVAL``
(default 10 s).

``outbox poll`` (a Procfile process) runs ``Poller`` for every provider that has an events
list (``integrations.polling.SOURCES``; today payments: Stripe's ``GET /v1/events``),
unless ``OUTBOX_<NAME>_POLL=off``. A process rather than Celery beat: a poller keeps a
per-provider interval that grows and shrinks with what it finds, which beat's fixed
schedules cannot; a Redis lock per provider lets several ``outbox poll`` processes run
without polling one provider twice at once. With no cursor yet, a poller reads back
``OUTBOX_<NAME>_POLL_LOOKBACK`` seconds (default one day), then sets the cursor to the
newest event.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

import redis
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from integrations.errors import IntegrationError

from . import inbound
from .clock import utcnow
from .config import env_float
from .models import PollCursor

log = logging.getLogger("outbox.poll")

DEFAULT_INTERVAL_S, DEFAULT_MAX_INTERVAL_S = 10.0, 300.0
DEFAULT_LOOKBACK_S = 86400


@dataclass(frozen=True)
class PollSettings:
    interval_s: float = DEFAULT_INTERVAL_S
    max_interval_s: float = DEFAULT_MAX_INTERVAL_S

    @classmethod
    def from_env(cls, source: str, environ: Mapping[str, str] | None = None) -> PollSettings:
        prefix = f"OUTBOX_{source.upper()}_POLL_"
        base = env_float(prefix + "INTERVAL", DEFAULT_INTERVAL_S, environ)
        most = env_float(prefix + "MAX_INTERVAL", max(DEFAULT_MAX_INTERVAL_S, base), environ)
        return cls(base, max(base, most))


def cursor(session: Session, source: str) -> PollCursor | None:
    return session.get(PollCursor, source)


def due(session: Session, source: str, now: datetime | None = None) -> bool:
    row = cursor(session, source)
    return row is None or row.next_poll_at <= (now or utcnow())


def store_page(session: Session, source: str, events: Iterable[Mapping],
               new_cursor: str | None, now: datetime | None = None) -> int:
    """Store a page of the provider's events (oldest first) and, if given, move the cursor
    to ``new_cursor``, in ``session``'s transaction (the caller commits). Returns how many
    events were new."""
    now = now or utcnow()
    new = 0
    for event in events:
        _, stored = inbound.store(session, source=source, event_id=event["id"],
                                  event_type=event["type"], body=json.dumps(event),
                                  headers={"polled": "true"}, now=now)
        new += stored
    if new_cursor is not None:
        row = cursor(session, source)
        if row is None:
            session.add(PollCursor(source=source, cursor=new_cursor, interval_s=0.0,
                                   next_poll_at=now, updated_at=now))
        else:
            row.cursor, row.updated_at = new_cursor, now
    return new


def finish_cycle(session: Session, source: str, found: int, settings: PollSettings,
                 now: datetime | None = None) -> float:
    """Record a cycle's end: back to the base interval if it found something, else double
    it (up to the maximum). Returns the interval until the next cycle. The caller commits."""
    now = now or utcnow()
    row = cursor(session, source)
    if row is None:
        row = PollCursor(source=source, cursor=None, interval_s=0.0, next_poll_at=now,
                         updated_at=now)
        session.add(row)
    interval = (settings.interval_s if found or not row.interval_s
                else min(row.interval_s * 2, settings.max_interval_s))
    row.interval_s, row.next_poll_at, row.updated_at = (
        interval, now + timedelta(seconds=interval), now)
    return interval


def sources_with_cursors(session: Session) -> list[str]:
    return list(session.scalars(select(PollCursor.source).order_by(PollCursor.source)))


def poll_once(sessions: sessionmaker[Session], name: str, source, settings: PollSettings,
              lookback_s: float = DEFAULT_LOOKBACK_S, clock: Callable[[], float] = time.time
              ) -> tuple[int, float]:
    """One cycle for provider ``name``: (new events stored, seconds until the next cycle)."""
    with sessions() as session:
        row = cursor(session, name)
        position = row.cursor if row is not None else None
    found = 0
    try:
        if position is None:
            newest = None
            for page in source.since(int(clock() - lookback_s)):
                newest = newest or page[-1]["id"]
                with sessions() as session:   # the cursor only once the walk is complete
                    found += store_page(session, name, page, None)
                    session.commit()
            if newest is not None:
                with sessions() as session:
                    store_page(session, name, [], newest)
                    session.commit()
        else:
            for page, newest in source.newer(position):
                with sessions() as session:   # the page's events and the cursor together
                    found += store_page(session, name, page, newest)
                    session.commit()
    except IntegrationError as exc:
        log.warning("poll %s: %s %s; backing off", name, exc.error_class.value, exc.label())
    with sessions() as session:
        interval = finish_cycle(session, name, found, settings)
        session.commit()
    if found:
        log.info("poll %s: %d new event(s)", name, found)
    return found, interval


class Poller:
    """Polls each enabled provider when its cursor says it is due (``outbox poll``)."""

    def __init__(self, sessions: sessionmaker[Session], providers: Mapping[str, object],
                 lock_client: redis.Redis, environ: Mapping[str, str] | None = None):
        env = os.environ if environ is None else environ
        self._sessions = sessions
        self._lock = lock_client
        # A killed poller's lock lapses after this long (renewed while a cycle runs).
        self._lock_ttl_s = env_float("OUTBOX_POLL_LOCK_TTL", 15.0, env)
        from integrations.polling import SOURCES

        self.sources = {
            name: (SOURCES[name](provider), PollSettings.from_env(name, env),
                   float(env.get(f"OUTBOX_{name.upper()}_POLL_LOOKBACK") or DEFAULT_LOOKBACK_S))
            for name, provider in providers.items()
            if name in SOURCES and env.get(f"OUTBOX_{name.upper()}_POLL", "on").lower()
            not in ("off", "0", "false", "no")}

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.run_due()
            stop.wait(0.5)

    def run_due(self) -> dict[str, int]:
        """Poll every provider that is due and whose lock this process gets."""
        done = {}
        for name, (source, settings, lookback) in self.sources.items():
            with self._sessions() as session:
                if not due(session, name):
                    continue
            with _Lease(self._lock, f"outbox:poll:{name}:lock", self._lock_ttl_s) as held:
                if held:
                    done[name], _ = poll_once(self._sessions, name, source, settings, lookback)
        return done


class _Lease:
    """A Redis lock kept alive by a thread while held, so a poll cycle may run long, yet a
    killed poller's lock lapses within ``ttl_s``. Released only by its holder."""

    _RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then redis.call('del', KEYS[1]) end"
    _RENEW = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
              "redis.call('pexpire', KEYS[1], ARGV[2]) end")

    def __init__(self, client: redis.Redis, key: str, ttl_s: float):
        self._client, self._key, self._ttl_ms = client, key, int(ttl_s * 1000)
        self._token = os.urandom(8).hex()
        self._done = threading.Event()

    def __enter__(self) -> bool:
        if not self._client.set(self._key, self._token, nx=True, px=self._ttl_ms):
            return False
        threading.Thread(target=self._renew, daemon=True, name="outbox-poll-lease").start()
        self._held = True
        return True

    def _renew(self) -> None:
        while not self._done.wait(self._ttl_ms / 3000):
            try:
                self._client.eval(self._RENEW, 1, self._key, self._token, self._ttl_ms)
            except redis.RedisError:
                pass   # the lock lapses; another poller may take over, and dedup holds

    def __exit__(self, *exc) -> None:
        self._done.set()
        if getattr(self, "_held", False):
            self._client.eval(self._RELEASE, 1, self._key, self._token)
