"""Lease renewal: a worker process keeps the rows it is delivering, and only those.

A claim lasts ``OUTBOX_LEASE_TTL`` (15 s). While the delivery runs, one thread per process
extends every lease it holds, in one statement, each third of that, but never past
``OUTBOX_LEASE`` (120 s) after the claim: a delivery stuck beyond it is taken over by the
relay, as before. A worker that is killed stops renewing, so its rows are recovered
within the TTL instead of the whole lease.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from .clock import utcnow
from .config import RelaySettings
from .lifecycle import Claim, renew

log = logging.getLogger("outbox.leases")


class LeaseKeeper:
    """Renews the leases of the claims held inside ``hold()``, from one daemon thread."""

    def __init__(self, sessions: sessionmaker[Session], settings: RelaySettings):
        self._sessions = sessions
        self._ttl = timedelta(seconds=settings.lease_ttl_s)
        self._cap = timedelta(seconds=settings.lease_s)
        self._held: dict[str, Claim] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._interval_s = settings.lease_ttl_s / 3

    @contextmanager
    def hold(self, claim: Claim) -> Iterator[None]:
        """Keep ``claim``'s lease alive until the block ends."""
        with self._lock:
            self._held[claim.id] = claim
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="outbox-leases",
                                                daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._held.pop(claim.id, None)

    def renew_now(self, now: datetime | None = None) -> None:
        """One renewal round (the thread's work; callable from tests)."""
        now = now or utcnow()
        with self._lock:
            held = [(c.id, c.lease_token, min(now + self._ttl, c.claimed_at + self._cap))
                    for c in self._held.values() if c.claimed_at + self._cap > now]
        if held:
            with self._sessions() as session:
                renew(session, held)

    def _run(self) -> None:
        while True:
            time.sleep(self._interval_s)
            try:
                self.renew_now()
            except Exception as exc:   # the database is down: the leases run out, as designed
                log.warning("could not renew %d lease(s): %s", len(self._held),
                            type(exc).__name__)
