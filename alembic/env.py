"""Alembic environment: the URL comes from receiver settings, never from alembic.ini."""

from __future__ import annotations

import asyncio

from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlmodel import SQLModel

import receiver.tables  # noqa: F401  (registers the tables on SQLModel.metadata)
from alembic import context
from receiver.db import create_engine, resolve_database_url
from receiver.settings import load_settings

target_metadata = SQLModel.metadata


def _run(connection: Connection) -> None:
    # Compare as tests/test_schema.py does, so `alembic check` and autogenerate see what it sees.
    # Partitions (the archive's days, made by receiver.retention) are data, not schema.
    partitions = {
        row[0]
        for row in connection.execute(text("SELECT relname FROM pg_class WHERE relispartition"))
    }

    def include_name(name: str | None, type_: str, parent_names: object) -> bool:
        return not (type_ == "table" and name in partitions)

    # The query above began a transaction: end it, so alembic's own begins each revision's
    # (an autocommit block, as 0013's concurrent index builds, needs alembic to hold it).
    connection.commit()
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        compare_server_default=True,
        include_name=include_name,
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_async(url: str) -> None:
    # Behind PgBouncer (transaction pooling) no statement may be cached on a server connection.
    engine = create_engine(url, pool_size=1, pgbouncer=load_settings().db_pgbouncer)
    async with engine.connect() as connection:
        await connection.run_sync(_run)
        await connection.commit()
    await engine.dispose()


def run_migrations_online() -> None:
    url = context.config.attributes.get("database_url")
    if url is None:
        url, _ = resolve_database_url(load_settings())
    asyncio.run(_run_async(url))


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run against a database")
run_migrations_online()
