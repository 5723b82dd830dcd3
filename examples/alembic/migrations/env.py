"""Alembic's async ``env.py`` (``alembic init -t async``), adapted to asyncorm.

Changes from the template:

* the engine is ``asyncorm.create_engine(url)``, so migrations run through the same driver
  and profile as the application; the URL comes from the ``ASYNCORM_URL`` environment
  variable (``sqlalchemy.url`` in alembic.ini is only the fallback);
* on SQLite the migration engine's connections have foreign keys off
  (``sqlite_foreign_keys=False``): a batch migration rebuilds a table (create a copy, copy
  the rows, drop the original, rename the copy), and with foreign keys on, dropping a parent
  table deletes its children (``ON DELETE CASCADE``) or fails. ``PRAGMA foreign_key_check``
  then runs at the end of the migration's transaction, so a migration that broke a
  reference rolls back instead of committing orphans;
* ``transactional_ddl=True``: Alembic assumes SQLite cannot roll DDL back (true of stock
  pysqlite, which sends no ``BEGIN`` before DDL, so each statement commits on its own);
  asyncorm sends a real ``BEGIN``, so on SQLite as on PostgreSQL the whole ``upgrade`` runs
  in one transaction and a failing migration leaves the database as it was. On SQLite that
  transaction begins ``BEGIN IMMEDIATE``, holding the write lock from its first statement.
"""

from __future__ import annotations

import asyncio
import os
from logging.config import fileConfig
from typing import Any

from alembic import context
from models import Base
from sqlalchemy import pool
from sqlalchemy.engine import Connection, make_url

import asyncorm

# the Alembic Config object: access to the values in the .ini file in use
config = context.config

# logging as configured in alembic.ini (skipped when a program running Alembic through its
# command API sets config.attributes["configure_logger"] = False and keeps its own)
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name)

# the models' metadata, for `alembic revision --autogenerate` and `alembic check`
target_metadata = Base.metadata


def database_url() -> str:
    """The URL to migrate: $ASYNCORM_URL, else sqlalchemy.url from alembic.ini."""
    url = os.environ.get("ASYNCORM_URL") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("Set ASYNCORM_URL (or sqlalchemy.url in alembic.ini) to the database URL.")
    return url


def backend_name(url: str) -> str:
    """``sqlite`` or ``postgresql`` (asyncorm also accepts ``postgres://``)."""
    name = make_url(url).get_backend_name()
    return "postgresql" if name == "postgres" else name


def run_migrations_offline() -> None:
    """Run migrations in 'offline' mode (``alembic upgrade head --sql``): print the SQL.

    Only the dialect is needed, no engine and no driver. (A SQLite batch migration needs
    the live table to copy, so it cannot be rendered offline.)
    """
    context.configure(
        dialect_name=backend_name(database_url()),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        transactional_ddl=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    """Run the migrations in one transaction on ``connection`` (in SQLAlchemy's greenlet)."""
    sqlite = connection.dialect.name == "sqlite"
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        transactional_ddl=True,  # asyncorm's SQLite profile makes DDL transactional
        render_as_batch=sqlite,  # autogenerate writes batch operations for SQLite
    )
    with context.begin_transaction():
        if sqlite:
            # take SQLite's write lock before the first read (asyncorm's own BEGIN would be
            # deferred, as the migration starts by reading alembic_version): another
            # process's writers then wait for the migration, or it for them, instead of
            # its first write failing on a stale snapshot
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        context.run_migrations()
        if sqlite:
            # foreign keys were off: check them before committing, roll back on a violation
            broken = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
            if broken:
                rows = ", ".join(f"{row[0]} rowid {row[1]} -> {row[2]}" for row in broken[:5])
                raise RuntimeError(
                    f"The migration left {len(broken)} row(s) referring to missing parents "
                    f"({rows}); rolled back. Fix the data in the migration and run it again."
                )


async def run_async_migrations() -> None:
    """Create an asyncorm engine and run the migrations on one of its connections."""
    url = database_url()
    options: dict[str, Any] = {"poolclass": pool.NullPool}
    if backend_name(url) == "sqlite":
        # rebuilding a parent table must not cascade to (or be refused for) its children
        options["sqlite_foreign_keys"] = False
    engine = asyncorm.create_engine(url, **options)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    """Run migrations in 'online' mode, against the database.

    A program that runs Alembic on a connection of its own (at start-up, in a test) passes
    it as ``config.attributes["connection"]`` from ``AsyncConnection.run_sync``; on SQLite
    it turns foreign keys off on that connection first (see docs/alembic.md).
    """
    connection = config.attributes.get("connection")
    if connection is None:
        asyncio.run(run_async_migrations())
    else:
        do_run_migrations(connection)


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
