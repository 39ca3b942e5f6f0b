"""RECEIVER_READ_DATABASE_URL: the query and analytics routes work on a connection that refuses
writes, while the webhook keeps writing through the primary URL."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from receiver.db import plain_url
from receiver.settings import Settings
from tests.support.apps import running_app
from tests.support.builders import auth, failed_envelope, post_delivery
from tests.support.database import admin_sql, connect


def _as_role(url: str, role: str, password: str) -> str:
    parts = urlsplit(plain_url(url))
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{role}:{password}@{host}"))


@pytest.fixture
def reader_url(database_url: str) -> Iterator[str]:
    """A login role that can read every table and write none (default_transaction_read_only)."""
    role, password = f"rf_reader_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    database = urlsplit(plain_url(database_url)).path.lstrip("/")
    admin_sql(database_url, f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    admin_sql(database_url, f"ALTER ROLE {role} SET default_transaction_read_only = on")
    admin_sql(database_url, f'GRANT CONNECT ON DATABASE "{database}" TO {role}')
    admin_sql(database_url, f"GRANT USAGE ON SCHEMA public TO {role}")
    admin_sql(database_url, f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}")
    try:
        yield _as_role(database_url, role, password)
    finally:
        admin_sql(database_url, f"DROP OWNED BY {role}")
        admin_sql(database_url, f"DROP ROLE {role}")


async def test_the_reader_refuses_writes(reader_url: str, db: AsyncEngine) -> None:
    conn = await connect(reader_url)
    try:
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            await conn.execute("INSERT INTO runs (id) VALUES ('nope')")
    finally:
        await conn.close()


async def test_query_and_analytics_routes_answer_through_a_read_only_connection(
    db: AsyncEngine, settings: Settings, reader_url: str
) -> None:
    split = settings.model_copy(update={"read_database_url": reader_url})
    async with running_app(split) as (_, client):
        stored = await post_delivery(client, failed_envelope("run_replica_1"))
        assert stored.status_code == 200, stored.text
        delivery_id = stored.json()["delivery_id"]
        window = (
            "created_after=2026-10-01T00:00:00%2B00:00&created_before=2026-12-01T00:00:00%2B00:00"
        )
        paths = [
            "/runs",
            "/runs?status=failed&model=a,b",
            "/runs/run_replica_1",
            "/runs/run_replica_1/deliveries",
            "/deliveries",
            "/deliveries?outcome=stored",
            f"/deliveries/{delivery_id}",
            f"/analytics/failures?{window}",
            f"/analytics/timeseries?bucket=day&{window}",
            f"/analytics/durations?group_by=model&{window}",
            f"/analytics/costs?group_by=model&{window}",
        ]
        answers = {path: await client.get(path, headers=auth()) for path in paths}
        # The reads went to the reader: its role holds pooled connections now.
        conn = await connect(settings.database_url or "")
        try:
            role = urlsplit(reader_url).username
            readers = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = $1", role
            )
        finally:
            await conn.close()
    assert readers >= 1
    assert {path: r.status_code for path, r in answers.items()} == dict.fromkeys(paths, 200)
    assert [run["id"] for run in answers["/runs"].json()["items"]] == ["run_replica_1"]
    failures = answers[f"/analytics/failures?{window}"].json()
    assert failures["failed_runs"] == 1
