"""Alembic migrations for the outbox tables, configured in code (no alembic.ini needed)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).resolve().parent))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision``; the one place that creates a database
    (a SQLite file and its folder)."""
    from ..db import make_engine

    make_engine(url, create=True).dispose()
    command.upgrade(alembic_config(url), revision)
