"""Per-process resources of a worker: the database engine and sessions, created lazily.

Created on first use, after Celery has forked its pool processes, so no
connection is ever shared across a fork.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from functools import cache

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from integrations.protection import Protection, ProtectionSettings, store
from outbox.config import INBOUND, RelaySettings
from outbox.db import make_engine, make_sessionmaker
from outbox.leases import LeaseKeeper
from outbox.writer import GroupWriter


@cache
def engine() -> Engine:
    return make_engine()


@cache
def sessions() -> sessionmaker[Session]:
    return make_sessionmaker(engine())


@cache
def settings() -> RelaySettings:
    return RelaySettings.from_env()


def lease() -> timedelta:
    """A new claim's lease (renewed by ``lease_keeper()`` while the delivery runs)."""
    return settings().claim_lease()


@cache
def lease_keeper() -> LeaseKeeper:
    return LeaseKeeper(sessions(), settings())


@cache
def writer() -> GroupWriter:
    """Writes the claims and outcomes of this process's delivery threads, in batches."""
    return GroupWriter(sessions())


@cache
def inbound_protection() -> Protection:
    """The inbound events' own rate limit, concurrency cap and breaker, shared through Redis
    like a provider's (``OUTBOX_INBOUND_RATE_LIMIT`` and the rest)."""
    settings = ProtectionSettings.from_env(INBOUND)
    return Protection(settings, store.shared_redis(), lease_s=settings.max_wait_s + 60)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def reset() -> None:
    """Forget cached resources (tests that change the environment)."""
    if engine.cache_info().currsize:
        engine().dispose()
    for fn in (engine, sessions, settings, lease_keeper, writer, inbound_protection):
        fn.cache_clear()


os.register_at_fork(after_in_child=lambda: (engine.cache_clear(), sessions.cache_clear(),
                                             lease_keeper.cache_clear(), writer.cache_clear()))
