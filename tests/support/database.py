"""Database helpers for tests: scratch databases on the test server, and emptying tables."""

from __future__ import annotations

import asyncio
import os
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

import asyncpg

from receiver.db import plain_url


def received_bytes(stored: bytes | None, encoding: str | None) -> bytes | None:
    """A kept body as it was received: the archive keeps some zlib-compressed (RFC 1950) and
    marks them ``body_encoding = 'zlib'``; a null encoding is the bytes as they came."""
    if stored is None or encoding is None:
        return None if stored is None else bytes(stored)
    assert encoding == "zlib", encoding
    return zlib.decompress(stored)


def behind_pgbouncer() -> bool:
    """RECEIVER_DB_PGBOUNCER is on: the test server is a PgBouncer in transaction pooling."""
    return os.environ.get("RECEIVER_DB_PGBOUNCER", "").lower() in ("1", "true", "yes", "on")


async def connect(url: str) -> asyncpg.Connection:
    """A plain asyncpg connection; without a statement cache behind PgBouncer."""
    if behind_pgbouncer():
        return await asyncpg.connect(plain_url(url), statement_cache_size=0)
    return await asyncpg.connect(plain_url(url))


def admin_url(server_url: str) -> str:
    """Where CREATE/DROP DATABASE go: RECEIVER_TEST_ADMIN_DATABASE_URL when set (the server
    behind a pooler that refuses them), else the test server itself."""
    return os.environ.get("RECEIVER_TEST_ADMIN_DATABASE_URL") or server_url


def with_database(url: str, name: str) -> str:
    base, sep, query = plain_url(url).partition("?")
    return base.rsplit("/", 1)[0] + "/" + name + (sep + query if sep else "")


def admin_sql(server_url: str, sql: str) -> None:
    """Run one statement (CREATE/DROP DATABASE) on the server, outside any transaction."""

    async def run() -> None:
        conn = await connect(admin_url(server_url))
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


async def truncate_all(url: str) -> None:
    conn = await connect(url)
    try:
        tables = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            " AND tablename <> 'alembic_version'"
        )
        if tables:
            names = ", ".join(f'"{row["tablename"]}"' for row in tables)
            await conn.execute(f"TRUNCATE {names} RESTART IDENTITY CASCADE")
    finally:
        await conn.close()


@contextmanager
def migrated_database(
    server_url: str, prefix: str = "rfscratch", revision: str | None = None
) -> Iterator[str]:
    """A database of its own, migrated to head (or to ``revision``), dropped when the block
    ends."""
    from alembic import command
    from receiver.migrations import alembic_config, upgrade

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin_sql(server_url, f'CREATE DATABASE "{name}"')
    try:
        url = with_database(server_url, name)
        if revision is None:
            upgrade(url)
        else:
            command.upgrade(alembic_config(url), revision)
        yield url
    finally:
        admin_sql(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
