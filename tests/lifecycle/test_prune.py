"""The archive by day: partitions made ahead, stray rows rescued, whole days dropped past retention.

Each test here works on a database of its own (partitions outlive TRUNCATE, and dropping them
must not disturb the session's database).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from receiver.db import create_engine
from receiver.retention import claim_lease, ensure_partitions, run_maintenance
from receiver.settings import Settings
from tests.support.apps import running_app
from tests.support.builders import API_TOKEN, SIGNING_SECRET, auth, post_delivery
from tests.support.database import behind_pgbouncer, connect, migrated_database
from tests.support.processes import receiver_env, run_cli

TODAY = datetime.now(UTC).date()


@pytest.fixture
def own_url(server_url: str) -> Iterator[str]:
    with migrated_database(server_url, "rflife") as url:
        yield url


@pytest.fixture
async def own_engine(own_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(own_url, pool_size=3, pgbouncer=behind_pgbouncer())
    yield engine
    await engine.dispose()


def _env(url: str, **values: str) -> dict[str, str]:
    pooled = {"RECEIVER_DB_PGBOUNCER": "true"} if behind_pgbouncer() else {}
    return receiver_env(RECEIVER_DATABASE_URL=url, **pooled, **values)


def _settings(url: str, **extra: Any) -> Settings:
    return Settings(
        database_url=url, signing_secrets=[SIGNING_SECRET], api_tokens=[API_TOKEN], **extra
    )


async def _sql(url: str, sql: str, *args: Any) -> list[Any]:
    conn = await connect(url)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def _partitions(url: str) -> set[str]:
    rows = await _sql(
        url,
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'deliveries'::regclass",
    )
    return {row["relname"] for row in rows}


def _noon(days_ago: int) -> datetime:
    day = TODAY - timedelta(days=days_ago)
    return datetime(day.year, day.month, day.day, 12, tzinfo=UTC)


def _name(day: date) -> str:
    return "deliveries_p" + day.strftime("%Y%m%d")


async def _archive_row(url: str, run_id: str, received_at: datetime, body: bytes) -> None:
    """A stored delivery and its fingerprint, written directly (not through HTTP)."""
    await _sql(
        url,
        "WITH d AS (INSERT INTO deliveries (received_at, body, body_sha256, body_size, signature,"
        " outcome, kind, run_id) VALUES ($1, $2, sha256($2), length($2), 'valid', 'stored',"
        " 'envelope', $3) RETURNING id, received_at, body_sha256)"
        " INSERT INTO delivery_fingerprints SELECT body_sha256, id, received_at FROM d",
        received_at,
        body,
        run_id,
    )


async def _batch_row(url: str, batch_id: str, run_ids: list[str], received_at: datetime) -> None:
    """A batch callback's archive row and its link to each run it touched (not through HTTP)."""
    await _sql(
        url,
        "WITH d AS (INSERT INTO deliveries (received_at, body, body_sha256, body_size, signature,"
        " outcome, kind, batch_id) VALUES ($1, $2, sha256($2), length($2), 'valid', 'stored',"
        " 'batch_envelope', $3) RETURNING id, received_at)"
        " INSERT INTO run_deliveries (run_id, received_at, delivery_id)"
        " SELECT r, d.received_at, d.id FROM d, unnest($4::text[]) AS r",
        received_at,
        f'{{"batch_id": "{batch_id}"}}'.encode(),
        batch_id,
        run_ids,
    )


async def _run_row(url: str, run_id: str, first: datetime) -> None:
    await _sql(
        url,
        "INSERT INTO runs (id, status, created_at, first_received_at, last_received_at,"
        " delivery_count, cost) VALUES ($1, 'succeeded', $2, $2, $2, 1, 0.25)",
        run_id,
        first,
    )


async def test_a_migrated_archive_is_partitioned_by_day_with_a_default(own_url: str) -> None:
    kind = await _sql(
        own_url, "SELECT relkind::text AS k FROM pg_class WHERE relname = 'deliveries'"
    )
    assert kind[0]["k"] == "p"
    key = await _sql(own_url, "SELECT pg_get_partkeydef('deliveries'::regclass) AS key")
    assert key[0]["key"] == "RANGE (received_at)"
    found = await _partitions(own_url)
    assert "deliveries_default" in found
    # Revision 0009 makes today and a week ahead.
    assert {_name(TODAY + timedelta(days=n)) for n in range(8)} <= found


async def test_serve_makes_the_days_ahead_and_moves_stray_rows_out_of_the_default(
    own_url: str,
) -> None:
    # Rows from days no partition covers (maintenance stopped) land in the default partition.
    await _archive_row(own_url, "run_stray", _noon(3), b'{"stray": 1}')
    await _archive_row(own_url, "run_stray", _noon(3) + timedelta(hours=1), b'{"stray": 2}')
    in_default = await _sql(own_url, "SELECT count(*) AS n FROM deliveries_default")
    assert in_default[0]["n"] == 2

    settings = _settings(own_url, partition_days_ahead=10)
    async with running_app(settings) as (_, client):
        metrics = (await client.get("/metrics")).text
    found = await _partitions(own_url)
    assert {_name(TODAY + timedelta(days=n)) for n in range(11)} <= found
    assert _name(TODAY - timedelta(days=3)) in found
    moved = await _sql(own_url, f"SELECT count(*) AS n FROM {_name(TODAY - timedelta(days=3))}")
    assert moved[0]["n"] == 2
    assert (await _sql(own_url, "SELECT count(*) AS n FROM deliveries_default"))[0]["n"] == 0
    assert (await _sql(own_url, "SELECT count(*) AS n FROM deliveries"))[0]["n"] == 2
    assert "runflow_receiver_archive_default_partition_rows 0.0" in metrics


async def test_metrics_count_rows_waiting_in_the_default_partition(own_url: str) -> None:
    far = datetime.now(UTC) + timedelta(days=60)  # beyond every partition made ahead
    await _archive_row(own_url, "run_future", far, b'{"future": 1}')
    async with running_app(_settings(own_url), run_worker=False) as (_, client):
        metrics = (await client.get("/metrics")).text
    assert "runflow_receiver_archive_default_partition_rows 1.0" in metrics


async def test_prune_drops_exactly_the_days_past_retention_and_keeps_every_run(
    own_url: str, own_engine: AsyncEngine, tmp_path: Path
) -> None:
    ages = (45, 32, 31, 30, 29, 1, 0)  # days ago, one delivery each
    for age in ages:
        run_id = f"run_age_{age}"
        await _run_row(own_url, run_id, _noon(age))
        await _archive_row(own_url, run_id, _noon(age), f'{{"age": {age}}}'.encode())
    await ensure_partitions(own_engine, _settings(own_url))  # the old days get partitions
    before_parts = await _partitions(own_url)
    runs_before = await _sql(own_url, "SELECT * FROM runs ORDER BY id")
    # Retention 30 days keeps every day from 30 days ago on; days 31 or more ago go.
    expected = {_name(TODAY - timedelta(days=age)) for age in (45, 32, 31)}
    assert expected <= before_parts

    env = _env(own_url, RECEIVER_RETENTION_DAYS="30")
    dry = run_cli("prune", "--dry-run", env=env, cwd=tmp_path)
    assert {line.split()[3] for line in dry.splitlines() if "would drop partition" in line} == (
        expected
    )
    assert await _partitions(own_url) == before_parts  # a dry run drops nothing
    # ... and does not count as the day's pass.
    assert await _sql(own_url, "SELECT * FROM maintenance_state") == []

    out = run_cli("prune", env=env, cwd=tmp_path)
    dropped = {line.split()[2] for line in out.splitlines() if line.startswith("dropped partition")}
    assert dropped == expected
    assert "deleted 3 fingerprints" in out
    assert await _partitions(own_url) == before_parts - expected
    state = await _sql(own_url, "SELECT last_success_at, last_summary FROM maintenance_state")
    assert state[0]["last_success_at"] is not None

    kept = await _sql(own_url, "SELECT run_id FROM deliveries ORDER BY run_id")
    assert [row["run_id"] for row in kept] == sorted(f"run_age_{a}" for a in (30, 29, 1, 0))
    prints = await _sql(own_url, "SELECT count(*) AS n FROM delivery_fingerprints")
    assert prints[0]["n"] == 4
    assert await _sql(own_url, "SELECT * FROM runs ORDER BY id") == runs_before

    # A second pass finds nothing more to drop.
    again = run_cli("prune", env=env, cwd=tmp_path)
    assert "no archive partition is past retention" in again

    async with running_app(_settings(own_url), run_worker=False) as (_, client):
        old = (await client.get("/runs/run_age_45/deliveries", headers=auth())).json()
        new = (await client.get("/runs/run_age_1/deliveries", headers=auth())).json()
    assert old["items"] == [] and old["aged_out"] is True
    assert datetime.fromisoformat(old["retained_since"]) == datetime(
        *(TODAY - timedelta(days=30)).timetuple()[:3], tzinfo=UTC
    )
    assert len(new["items"]) == 1 and new["aged_out"] is False


async def test_batch_links_go_with_their_archive_days_and_runs_stay(
    own_url: str, own_engine: AsyncEngine, tmp_path: Path
) -> None:
    ages = (45, 31, 30, 29, 0)  # days ago, one batch callback each touching two runs
    for age in ages:
        runs = [f"run_b{age}_a", f"run_b{age}_b"]
        for run_id in runs:
            await _run_row(own_url, run_id, _noon(age))
        await _batch_row(own_url, f"batch_{age}", runs, _noon(age))
    await ensure_partitions(own_engine, _settings(own_url))
    runs_before = await _sql(own_url, "SELECT * FROM runs ORDER BY id")
    links_before = await _sql(own_url, "SELECT * FROM run_deliveries ORDER BY run_id")
    env = _env(own_url, RECEIVER_RETENTION_DAYS="30")

    dry = run_cli("prune", "--dry-run", env=env, cwd=tmp_path)
    assert "would delete 4 batch links (run_deliveries)" in dry
    assert await _sql(own_url, "SELECT * FROM run_deliveries ORDER BY run_id") == links_before

    out = run_cli("prune", env=env, cwd=tmp_path)
    assert "deleted 4 batch links (run_deliveries)" in out
    links = await _sql(own_url, "SELECT run_id FROM run_deliveries ORDER BY run_id")
    assert [row["run_id"] for row in links] == sorted(
        f"run_b{age}_{x}" for age in (30, 29, 0) for x in "ab"
    )
    assert await _sql(own_url, "SELECT * FROM runs ORDER BY id") == runs_before

    async with running_app(_settings(own_url), run_worker=False) as (_, client):
        kept = (await client.get("/runs/run_b29_a/deliveries", headers=auth())).json()
        gone = (await client.get("/runs/run_b45_a/deliveries", headers=auth())).json()
    assert [item["batch_id"] for item in kept["items"]] == ["batch_29"]
    assert gone["items"] == [] and gone["aged_out"] is True


async def test_the_same_bytes_after_the_retention_window_are_stored_again(
    own_url: str, own_engine: AsyncEngine, tmp_path: Path
) -> None:
    body = b'{"run_id": "run_window", "status": "succeeded", "event": "run.completed"}'
    await _archive_row(own_url, "run_window", _noon(40), body)
    await ensure_partitions(own_engine, _settings(own_url))
    run_cli("prune", env=_env(own_url), cwd=tmp_path)
    async with running_app(_settings(own_url), run_worker=False) as (_, client):
        first = await post_delivery(client, body)
        second = await post_delivery(client, body)
    assert first.json()["status"] == "stored"  # the fingerprint aged out with its day
    assert second.json()["status"] == "duplicate"


async def test_other_tables_are_swept_by_their_own_windows(
    own_url: str, own_engine: AsyncEngine, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    await _sql(
        own_url,
        "INSERT INTO enrichment_queue (run_id, state, updated_at) VALUES"
        " ('e_old_done', 'done', $1), ('e_new_done', 'done', $2), ('e_old_pending', 'pending', $1)",
        now - timedelta(days=8),
        now - timedelta(days=6),
    )
    await _sql(
        own_url,
        "INSERT INTO alert_notifications (url, format, body, state, created_at, sent_at) VALUES"
        " ('http://127.0.0.1:9/a', 'json', 'x', 'sent', $1, $1),"
        " ('http://127.0.0.1:9/b', 'json', 'x', 'sent', $2, $2),"
        " ('http://127.0.0.1:9/c', 'json', 'x', 'pending', $1, NULL)",
        now - timedelta(days=31),
        now - timedelta(days=29),
    )
    await _sql(
        own_url,
        "INSERT INTO alert_events (rule_id, rule_name, group_key, from_state, to_state,"
        " threshold, notified, at) VALUES (1, 'r', '{}', 'ok', 'firing', 1, true, $1),"
        " (1, 'r', '{}', 'firing', 'ok', 1, true, $2)",
        now - timedelta(days=91),
        now - timedelta(days=89),
    )
    for run_id, age in (("run_idle", 400), ("run_recent", 2)):
        await _run_row(own_url, run_id, now - timedelta(days=age))
        await _sql(
            own_url,
            "INSERT INTO node_runs (id, run_id) VALUES ($1, $2)",
            f"node_of_{run_id}",
            run_id,
        )
        await _sql(
            own_url, "INSERT INTO run_logs (id, run_id) VALUES ($1, $2)", f"log_{run_id}", run_id
        )

    # Runs are kept unless RECEIVER_RUN_RETENTION_DAYS is set.
    run_cli("prune", env=_env(own_url), cwd=tmp_path)
    queue = await _sql(own_url, "SELECT run_id FROM enrichment_queue ORDER BY run_id")
    assert [row["run_id"] for row in queue] == ["e_new_done", "e_old_pending"]
    sent = await _sql(own_url, "SELECT url FROM alert_notifications ORDER BY url")
    assert [row["url"] for row in sent] == ["http://127.0.0.1:9/b", "http://127.0.0.1:9/c"]
    events = await _sql(own_url, "SELECT to_state FROM alert_events")
    assert [row["to_state"] for row in events] == ["ok"]
    runs = await _sql(own_url, "SELECT id FROM runs ORDER BY id")
    assert [row["id"] for row in runs] == ["run_idle", "run_recent"]

    env = _env(own_url, RECEIVER_RUN_RETENTION_DAYS="365")
    out = run_cli("prune", env=env, cwd=tmp_path)
    assert "deleted 1 runs" in out
    for table in ("runs", "node_runs", "run_logs"):
        column = "id" if table == "runs" else "run_id"
        left = await _sql(own_url, f"SELECT {column} AS r FROM {table}")
        assert [row["r"] for row in left] == ["run_recent"], table


async def test_one_process_at_a_time_holds_the_prune_lease(
    own_url: str, own_engine: AsyncEngine
) -> None:
    settings = _settings(own_url)
    claims = await asyncio.gather(
        *(claim_lease(own_engine, settings, f"owner-{n}", due=0) for n in range(4))
    )
    assert sorted(claims) == [False, False, False, True]


async def test_serve_prunes_once_a_day_whichever_process_gets_there_first(
    own_url: str, own_engine: AsyncEngine
) -> None:
    await _archive_row(own_url, "run_loop", _noon(40), b'{"loop": 1}')
    await ensure_partitions(own_engine, _settings(own_url))
    old = _name(TODAY - timedelta(days=40))
    assert old in await _partitions(own_url)
    settings = _settings(own_url, maintenance_poll_seconds=0.05)
    stop = asyncio.Event()
    loops = [asyncio.create_task(run_maintenance(own_engine, settings, stop)) for _ in range(2)]
    try:
        for _ in range(200):  # bounded: at most 10 s
            if old not in await _partitions(own_url):
                break
            await asyncio.sleep(0.05)
        first = await _sql(own_url, "SELECT last_started_at FROM maintenance_state")
        await asyncio.sleep(0.5)  # ten more polls in each loop: nothing is due for a day
        later = await _sql(own_url, "SELECT last_started_at FROM maintenance_state")
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*loops), timeout=10)
    assert old not in await _partitions(own_url)
    assert len(first) == 1 and later == first
