"""Alembic environment: runs migrations on the URL set by ``outbox.migrations.alembic_config``."""

from alembic import context

from outbox.db import make_engine
from outbox.models import Base

config = context.config


def run_migrations_online() -> None:
    engine = make_engine(config.get_main_option("sqlalchemy.url"), create=True)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata,
                          render_as_batch=connection.dialect.name == "sqlite")
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported; run `outbox db upgrade`")
run_migrations_online()
