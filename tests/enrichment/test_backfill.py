"""Backfill over several pages of Runflow's documented list API (fake), interrupted, resumed."""

from __future__ import annotations

import io
from datetime import timedelta

import asyncpg
import httpx
import pytest

from receiver.backfill import BackfillError, backfill
from receiver.db import plain_url
from tests.support.builders import T0, enrichment_settings, iso, run_object
from tests.support.database import received_bytes
from tests.support.fake_runflow import FakeRunflow, serve_fake


async def stored_per_run(url: str) -> dict[str, int]:
    conn = await asyncpg.connect(plain_url(url))
    try:
        rows = await conn.fetch(
            "SELECT run_id, count(*) AS n FROM deliveries WHERE source = 'backfill'"
            " AND outcome = 'stored' GROUP BY run_id"
        )
    finally:
        await conn.close()
    return {row["run_id"]: row["n"] for row in rows}


async def test_interrupted_backfill_resumes_and_imports_each_run_once(db, database_url):
    fake = FakeRunflow()
    for i in range(23):
        fake.runs[f"hist_{i:02d}"] = run_object(
            f"hist_{i:02d}", created_at=iso(T0 + timedelta(minutes=i))
        )
    fake.runs["too_old"] = run_object("too_old", created_at=iso(T0 - timedelta(days=2)))
    fake.fail_pages_after = 2  # the API breaks after two pages
    with serve_fake(fake) as url:
        settings = enrichment_settings(database_url, url, enrichment_max_attempts=2)
        since = T0 - timedelta(hours=1)
        with pytest.raises(BackfillError):
            await backfill(settings, db, since=since, page_size=5, out=io.StringIO())
        assert set(await stored_per_run(database_url)) == {f"hist_{i:02d}" for i in range(10)}

        fake.fail_pages_after = None
        out = io.StringIO()
        counts = await backfill(settings, db, since=since, page_size=5, out=out)
        assert counts["stored"] == 13 and counts["previously"] == 10
        assert "23 runs imported" in out.getvalue()

        again = await backfill(settings, db, since=since, page_size=5, out=io.StringIO())
        assert again["stored"] == 0

    assert await stored_per_run(database_url) == {f"hist_{i:02d}": 1 for i in range(23)}


async def test_a_malformed_listed_run_is_kept_as_rejected_and_the_backfill_goes_on(
    db, database_url
):
    fake = FakeRunflow()
    for i in range(7):
        fake.runs[f"ok_{i}"] = run_object(f"ok_{i}", created_at=iso(T0 + timedelta(minutes=i)))
    fake.runs["bad"] = run_object("bad", created_at=iso(T0), cost="not a number")
    with serve_fake(fake) as url:
        settings = enrichment_settings(database_url, url)
        counts = await backfill(
            settings, db, since=T0 - timedelta(hours=1), page_size=3, out=io.StringIO()
        )
    assert counts["stored"] == 7 and counts["rejected"] == 1
    assert await stored_per_run(database_url) == {f"ok_{i}": 1 for i in range(7)}
    conn = await asyncpg.connect(plain_url(database_url))
    try:
        rejected = await conn.fetch(
            "SELECT cause, body, body_encoding FROM deliveries"
            " WHERE outcome = 'rejected' AND source = 'backfill'"
        )
        stored_ids = {r["id"] for r in await conn.fetch("SELECT id FROM runs")}
    finally:
        await conn.close()
    assert [r["cause"] for r in rejected] == ["invalid_payload"]
    kept = received_bytes(rejected[0]["body"], rejected[0]["body_encoding"])
    assert kept is not None and b'"not a number"' in kept  # kept, so it can be replayed
    assert "bad" not in stored_ids


async def test_backfill_pages_with_q_sort_by_limit_and_pq_and_imports_every_run_once(
    db, database_url
):
    fake = FakeRunflow()
    for i in range(12):
        fake.runs[f"pg_{i:02d}"] = run_object(
            f"pg_{i:02d}", created_at=iso(T0 + timedelta(minutes=i))
        )
    fake.runs["later"] = run_object("later", created_at=iso(T0 + timedelta(days=1)))
    since, until = T0 - timedelta(hours=1), T0 + timedelta(hours=1)
    with serve_fake(fake) as url:
        settings = enrichment_settings(database_url, url)
        counts = await backfill(
            settings, db, since=since, until=until, page_size=5, out=io.StringIO()
        )
    assert counts["stored"] == 12
    assert await stored_per_run(database_url) == {f"pg_{i:02d}": 1 for i in range(12)}
    q = f"created_at>={since.isoformat()} AND created_at<{until.isoformat()}"
    assert [sorted(query) for query in fake.list_queries] == [
        ["limit", "q", "sort_by"],
        ["limit", "pq", "q", "sort_by"],
        ["limit", "pq", "q", "sort_by"],
    ]
    assert {query["q"] for query in fake.list_queries} == {q}
    assert {query["sort_by"] for query in fake.list_queries} == {"created_at:asc"}
    assert {query["limit"] for query in fake.list_queries} == {"5"}


@pytest.mark.parametrize(
    "params",
    [
        {"created_after": "2026-11-01T00:00:00+00:00"},
        {"created_before": "2026-11-01T00:00:00+00:00"},
        {"cursor": "5"},
        {"limit": "501"},
        {"q": "created_at>=2026-11-01T00:00:00+00:00 OR status_code=failed"},
        {"sort_by": "created_at"},
    ],
)
def test_the_fake_refuses_what_runflow_does_not_document(params):
    fake = FakeRunflow()
    with serve_fake(fake) as url:
        answer = httpx.get(
            f"{url}/v1/runs", params=params, headers={"authorization": "Bearer rf_test_key"}
        )
    assert answer.status_code == 400
