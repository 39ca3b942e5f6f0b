"""Revision 0008 on a database with history: ranks come from the stored patches, and the
merge after the upgrade honours them (a stale payload still only fills nulls)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

import asyncpg
import orjson

from alembic import command
from receiver.db import create_engine
from receiver.ingest.archive import ArchiveEntry
from receiver.ingest.batcher import write_items
from receiver.ingest.payloads import parse_payload
from receiver.ingest.store import Item
from receiver.migrations import alembic_config
from receiver.vocabulary import SignatureVerdict
from tests.support.builders import T0
from tests.support.database import admin_sql, with_database


def test_0008_ranks_existing_runs_from_their_patches(server_url):
    name = f"rftest_mig_{uuid.uuid4().hex[:10]}"
    admin_sql(server_url, f'CREATE DATABASE "{name}"')
    url = with_database(server_url, name)
    try:
        command.upgrade(alembic_config(url), "0007")
        asyncio.run(_history(url))
        command.upgrade(alembic_config(url), "head")
        row, tables = asyncio.run(_stale_after_upgrade(url))
        assert dict(row) == {
            "status": "succeeded",
            "client_ref": "final",
            "flow_id": "f9",
            "delivery_count": 3,
        }
        assert "run_patches" not in tables and "run_deliveries" in tables
    finally:
        admin_sql(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _history(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        # Before 0008: a terminal Run object (received first) and a stale "running" one.
        await conn.execute(
            "INSERT INTO runs (id, status, client_ref, first_received_at, last_received_at,"
            " delivery_count) VALUES ('m1', 'succeeded', 'final', $1, $2, 2)",
            T0,
            T0 + timedelta(seconds=5),
        )
        await conn.execute(
            "INSERT INTO run_patches (run_id, delivery_id, received_at, precedence, patch)"
            " VALUES ('m1', 1, $1, 3, $2::jsonb), ('m1', 2, $3, 2, $4::jsonb)",
            T0,
            orjson.dumps(
                {"status": "succeeded", "client_ref": "final", "completed_at": T0.isoformat()}
            ).decode(),
            T0 + timedelta(seconds=5),
            orjson.dumps({"status": "running", "failure_code": "from_stale"}).decode(),
        )
    finally:
        await conn.close()


async def _stale_after_upgrade(url: str) -> tuple[Any, set[str]]:
    # Another stale payload after the upgrade: it may fill a null, never overwrite.
    body = orjson.dumps(
        {"id": "m1", "status_code": "queued", "client_ref": "stale", "flow_id": "f9"}
    )
    entry = ArchiveEntry.of(
        body, signature=SignatureVerdict.VALID, received_at=T0 + timedelta(seconds=9)
    )
    engine = create_engine(url, pool_size=1)
    try:
        await write_items(engine, [Item(entry, parse_payload(orjson.loads(body)))])
    finally:
        await engine.dispose()
    conn = await asyncpg.connect(url)
    try:
        row = await conn.fetchrow(
            "SELECT status, client_ref, flow_id, delivery_count FROM runs WHERE id = 'm1'"
        )
        tables = {
            r["tablename"]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        }
    finally:
        await conn.close()
    return row, tables
