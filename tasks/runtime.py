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

from outbox.config import RelaySettings
from outbox.db import make_engine, make_sessionmaker


@cache
def engine() -> Engine:
    return make_engine()


@cache
def sessions() -> sessionmaker[Session]:
    return make_sessionmaker(engine())


@cache
def lease() -> timedelta:
    return timedelta(seconds=RelaySettings.from_env().lease_s)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def reset() -> None:
    """Forget cached resources (tests that change the environment)."""
    if engine.cache_info().currsize:
        engine().dispose()
    for fn in (engine, sessions, lease):
        fn.cache_clear()


os.register_at_fork(after_in_child=lambda: (engine.cache_clear(), sessions.cache_clear()))
