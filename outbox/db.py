"""Engines and sessions for SQLite (embedded default) and PostgreSQL, and the readiness check.

Only ``outbox db upgrade`` creates a database (``make_engine(create=True)``): every other
process refuses a missing SQLite file or an un-migrated schema with one line that says
what to run, instead of creating an empty file (or folders, for a mistyped path) and
failing later with "no such table".
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, exc
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from integrations.errors import ConfigurationError
from integrations.sanitize import sanitize

from . import config
from .errors import DatabaseNotReady

NOT_MIGRATED = "database not migrated: run outbox db upgrade"


def make_engine(url: str | None = None, *, create: bool = False, **kwargs) -> Engine:
    """Create an engine for ``url`` (default ``DATABASE_URL``).

    SQLite gets WAL, a 30 s busy timeout and ``BEGIN IMMEDIATE`` transactions:
    several worker processes write to one file, and a deferred transaction that
    upgrades to a write lock fails at once instead of waiting. A plain
    ``postgresql://`` URL uses psycopg 3 (SQLAlchemy's default for it);
    ``postgresql+psycopg2://`` uses psycopg2.

    Args:
        url: a SQLAlchemy database URL.
        create: allow creating a SQLite file and its folder (``outbox db upgrade`` only).

    Raises:
        ConfigurationError: the URL is malformed or names an unknown driver.
        DatabaseNotReady: a SQLite file that does not exist, without ``create``.
    """
    url = url or config.database_url()
    try:
        parsed = make_url(url)
    except exc.ArgumentError:
        raise ConfigurationError("DATABASE_URL is not a database URL (e.g. "
                                 "postgresql://user@host/db or sqlite:////path/outbox.db)") from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            path = Path(parsed.database)
            if create:
                path.parent.mkdir(parents=True, exist_ok=True)
            elif not path.exists():
                raise DatabaseNotReady(f"{NOT_MIGRATED} ({path.resolve()} does not exist)"
                                       + _old_default_hint(url))
        engine = _create(parsed, connect_args={"timeout": 30}, **kwargs)
        _tune_sqlite(engine)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 20)
    return _create(parsed, **kwargs)


OLD_DEFAULT = Path("var/outbox.db")


def _old_default_hint(url: str) -> str:
    """Until issue 6 the default database was ``var/outbox.db`` in the working directory: if
    one is here while the new default is missing, say how to keep using it."""
    if url == config.default_database_url() and OLD_DEFAULT.exists():
        return (f"; {OLD_DEFAULT.resolve()} is the old default location: set "
                f"DATABASE_URL=sqlite:///{OLD_DEFAULT.resolve()} to keep using it")
    return ""


def _create(url, **kwargs) -> Engine:
    try:
        return create_engine(url, **kwargs)
    except (exc.NoSuchModuleError, ModuleNotFoundError) as error:
        raise ConfigurationError(f"DATABASE_URL: no driver for {url.drivername!r} "
                                 f"({type(error).__name__})") from None


def _tune_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None   # we issue BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded attributes after commit (rows are read after the transaction)."""
    return sessionmaker(engine, expire_on_commit=False)


def check_migrated(engine: Engine) -> None:
    """Make sure the database answers and its schema is at the latest migration.

    Raises:
        DatabaseNotReady: unreachable or missing database (the driver's first line, no
            credentials), or a schema behind the code (``outbox db upgrade``).
    """
    from alembic.runtime.migration import MigrationContext

    try:
        with engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
    except exc.DBAPIError as error:
        raise DatabaseNotReady(f"database unreachable: {describe(error)}") from None
    if current != _head_revision():
        state = "empty" if current is None else f"at revision {current}, code needs {_head_revision()}"
        raise DatabaseNotReady(f"{NOT_MIGRATED} (schema {state})")


def describe(error: exc.DBAPIError) -> str:
    """The driver's own first line for a database error, sanitised: never the SQL, its
    parameters (they may hold a payload) or a password."""
    text = str(error.orig).strip().splitlines()
    return sanitize(text[0] if text else type(error.orig).__name__, 300)


@cache
def _head_revision() -> str:
    from alembic.script import ScriptDirectory

    from .migrations import alembic_config

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
