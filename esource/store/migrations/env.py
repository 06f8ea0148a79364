"""Alembic environment for the esource store.

Used two ways:
- from code (`esource.store.migrate.upgrade`): the caller passes an open connection in
  `config.attributes["connection"]`, inside a transaction it commits;
- from the alembic CLI for development, e.g. a new revision:
  `alembic -c esource/store/alembic.ini -x url=sqlite:///dev.db revision --autogenerate -m "..."`
  (the URL comes from `-x url=...`, else `sqlalchemy.url`).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from esource.store.engine import make_engine
from esource.store.schema import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database URL: pass -x url=... or set sqlalchemy.url")
    return url


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        # SQLite cannot ALTER most things: later migrations use batch mode (copy and move) there.
        render_as_batch=connection.dialect.name == "sqlite",
    )


def run_migrations_offline() -> None:
    """Emit the SQL instead of running it (`alembic upgrade head --sql`), e.g. for a DBA to review."""
    url = _url()
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=url.startswith("sqlite"),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(_url())
    try:
        with engine.begin() as conn:
            _configure(conn)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
