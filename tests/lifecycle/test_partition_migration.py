"""Revision 0009 on a database that already has an archive: every row moves into its day, ids
go on from where the identity stopped, and the downgrade gives the plain table back."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from alembic import command
from receiver.migrations import alembic_config
from tests.support.database import connect, migrated_database

BEFORE = "0007"


@pytest.fixture
def old_url(server_url: str) -> Iterator[str]:
    with migrated_database(server_url, "rfmig", revision=BEFORE) as url:
        yield url


async def _one(url: str, sql: str) -> object:
    conn = await connect(url)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


async def test_existing_deliveries_move_into_daily_partitions_and_back(old_url: str) -> None:
    conn = await connect(old_url)
    try:
        ten_days_ago = datetime.now(UTC) - timedelta(days=10)
        for n, at in enumerate((ten_days_ago, ten_days_ago, datetime.now(UTC))):
            await conn.execute(
                "INSERT INTO deliveries (received_at, signature, outcome, run_id)"
                " VALUES ($1, 'valid', 'stored', $2)",
                at,
                f"run_{n}",
            )
        before = [tuple(r) for r in await conn.fetch("SELECT * FROM deliveries ORDER BY id")]
    finally:
        await conn.close()

    # env.py runs its own event loop, so Alembic goes to a thread from inside this test.
    await asyncio.to_thread(command.upgrade, alembic_config(old_url), "head")
    day = (datetime.now(UTC) - timedelta(days=10)).strftime("%Y%m%d")
    assert await _one(old_url, f"SELECT count(*) FROM deliveries_p{day}") == 2
    assert await _one(old_url, "SELECT count(*) FROM deliveries_default") == 0
    conn = await connect(old_url)
    try:
        after = [tuple(r) for r in await conn.fetch("SELECT * FROM deliveries ORDER BY id")]
        new_id = await conn.fetchval(
            "INSERT INTO deliveries (signature, outcome) VALUES ('valid', 'stored') RETURNING id"
        )
    finally:
        await conn.close()
    # Every row as it was; the columns later revisions add (0012's body_encoding) come last, null.
    width = len(before[0])
    assert [row[:width] for row in after] == before
    assert all(value is None for row in after for value in row[width:])
    assert new_id == max(row[0] for row in before) + 1

    await asyncio.to_thread(command.downgrade, alembic_config(old_url), BEFORE)
    assert (
        await _one(old_url, "SELECT relkind::text FROM pg_class WHERE relname = 'deliveries'")
        == "r"
    )
    assert await _one(old_url, "SELECT count(*) FROM deliveries") == 4
    identity = await _one(
        old_url,
        "SELECT is_identity FROM information_schema.columns"
        " WHERE table_name = 'deliveries' AND column_name = 'id'",
    )
    assert identity == "YES"
