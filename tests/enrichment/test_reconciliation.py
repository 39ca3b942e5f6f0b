"""Reconciliation against the fake Runflow API and the real test database (and real serve)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from receiver.app import create_app
from receiver.db import plain_url
from receiver.reconciliation import OVERLAP, reconcile_once
from receiver.runflow_api import RunflowClient
from receiver.settings import Settings
from tests.support.apps import running_app
from tests.support.builders import (
    API_TOKEN,
    SIGNING_SECRET,
    auth,
    body_of,
    enrichment_settings,
    envelope,
    iso,
    post_delivery,
    run_object,
    signed_headers,
)
from tests.support.database import truncate_all
from tests.support.fake_runflow import FakeRunflow, serve_fake
from tests.support.processes import receiver_env, serving


async def rows(url: str, sql: str, *args: object) -> list[dict[str, object]]:
    conn = await asyncpg.connect(plain_url(url))
    try:
        return [dict(r) for r in await conn.fetch(sql, *args)]
    finally:
        await conn.close()


RECONCILED = (
    "SELECT run_id, outcome, count(*) AS n FROM deliveries WHERE source = 'reconciliation'"
    " GROUP BY run_id, outcome ORDER BY run_id, outcome"
)


def reconcile_settings(database_url: str, api_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "reconcile_interval_seconds": 300,
        "reconcile_lookback_seconds": 86400,
        "reconcile_stale_seconds": 1800,
        "reconcile_page_size": 3,
        "reconcile_lease_seconds": 30,
        "enrichment_max_attempts": 3,
        **overrides,
    }
    return enrichment_settings(database_url, api_url, **values)


def recent_run(run_id: str, minutes_ago: float, **fields: Any) -> dict[str, Any]:
    created = datetime.now(UTC) - timedelta(minutes=minutes_ago)
    times = {
        "created_at": iso(created),
        "started_at": iso(created + timedelta(seconds=1)),
        "completed_at": iso(created + timedelta(seconds=3)),
    }
    return run_object(run_id, **{**times, **fields})


@pytest.fixture
async def api(db, database_url, fake_url):
    """Settings, an app that runs no background work (tests drive passes), and a client."""
    settings = reconcile_settings(database_url, fake_url)
    async with (
        running_app(settings, run_worker=False) as (_app, client),
        RunflowClient(settings) as runflow,
    ):
        yield client, settings, runflow


async def test_lost_runs_are_imported_and_runs_stored_as_terminal_are_skipped_unwritten(
    api, fake, database_url, db
):
    client, settings, runflow = api
    for i in range(7):
        fake.runs[f"lost_{i}"] = recent_run(f"lost_{i}", 60 - i)
    # Known here already, terminal: listed (with other bytes) but never written again.
    fake.runs["known"] = recent_run("known", 30, duration_ms=999)
    await post_delivery(client, recent_run("known", 30))
    fake.runs["ancient"] = recent_run("ancient", 60 * 48)  # beyond the look-back
    before = await rows(database_url, "SELECT id FROM deliveries")

    result = await reconcile_once(settings, db, runflow, datetime.now(UTC))

    assert result.ran and result.error is None and result.listing_complete
    assert result.imported == 7 and result.skipped == 1
    assert await rows(database_url, RECONCILED) == [
        {"run_id": f"lost_{i}", "outcome": "stored", "n": 1} for i in range(7)
    ]
    known = await rows(database_url, "SELECT id FROM deliveries WHERE run_id = 'known'")
    assert known == before
    ids = {r["id"] for r in await rows(database_url, "SELECT id FROM runs")}
    assert ids == {f"lost_{i}" for i in range(7)} | {"known"}
    # Exactly the documented list API, paged with pq.
    assert {tuple(sorted(q)) for q in fake.list_queries[1:]} == {("limit", "pq", "q", "sort_by")}
    assert sorted(fake.list_queries[0]) == ["limit", "q", "sort_by"]
    assert fake.list_queries[0]["sort_by"] == "created_at:asc"
    assert len(fake.list_queries) == 3  # 8 listed runs, 3 a page


async def test_the_next_pass_lists_from_the_watermark_and_imports_nothing_twice(
    api, fake, database_url, db
):
    _, settings, runflow = api
    for i in range(4):
        fake.runs[f"w_{i}"] = recent_run(f"w_{i}", 20 - i)
    first_at = datetime.now(UTC)
    first = await reconcile_once(settings, db, runflow, first_at)
    assert first.imported == 4
    fake.runs["w_new"] = recent_run("w_new", 0.1)
    second = await reconcile_once(settings, db, runflow, first_at + timedelta(minutes=1))
    assert second.imported == 1 and second.run_ids == ["w_new"]
    start = (first_at - OVERLAP).isoformat()
    assert fake.list_queries[-1]["q"].startswith(f"created_at>={start} AND created_at<")
    [state] = await rows(database_url, "SELECT watermark, runs_imported FROM reconciliation_state")
    assert state == {"watermark": first_at + timedelta(minutes=1), "runs_imported": 5}
    assert len(await rows(database_url, RECONCILED)) == 5


async def test_a_run_left_running_is_brought_to_its_end_by_the_stale_refetch(
    api, fake, database_url, db
):
    client, settings, runflow = api
    # Created two days ago (outside the listing's look-back); only "running" ever arrived.
    running = recent_run("stuck", 60 * 48, status_code="running", completed_at=None)
    await post_delivery(client, running)
    fake.runs["stuck"] = recent_run(
        "stuck", 60 * 48, status_code="failed", failure_code="worker_lost"
    )
    # And one Runflow still reports as running: asked once per stale period, not every pass.
    fake.runs["slow"] = recent_run("slow", 60 * 48, status_code="running", completed_at=None)
    await post_delivery(client, fake.runs["slow"])  # the same bytes Runflow will answer with

    not_yet = await reconcile_once(settings, db, runflow, datetime.now(UTC))
    assert not_yet.refetched == 0 and fake.requests["stuck"] == 0  # not stale yet

    later = datetime.now(UTC) + timedelta(seconds=settings.reconcile_stale_seconds + 60)
    result = await reconcile_once(settings, db, runflow, later)
    assert result.error is None
    assert result.refetched == 1 and result.run_ids == ["stuck"]  # "slow" answered as before
    [run] = await rows(database_url, "SELECT status, failure_code FROM runs WHERE id = 'stuck'")
    assert run == {"status": "failed", "failure_code": "worker_lost"}
    assert "/v1/runs/stuck" in fake.paths
    again = await reconcile_once(settings, db, runflow, later + timedelta(seconds=5))
    assert again.refetched == 0
    assert fake.requests["stuck"] == 1 and fake.requests["slow"] == 1
    checks = await rows(database_url, "SELECT run_id, outcome FROM reconciliation_checks")
    assert sorted(checks, key=lambda c: str(c["run_id"])) == [
        {"run_id": "slow", "outcome": "duplicate"},
        {"run_id": "stuck", "outcome": "stored"},
    ]


async def test_two_reconcilers_racing_import_each_run_once(api, fake, database_url, db):
    _, settings, runflow = api
    for i in range(9):
        fake.runs[f"race_{i}"] = recent_run(f"race_{i}", 30 - i)
    fake.list_delay_seconds = 0.2
    now = datetime.now(UTC)
    async with RunflowClient(settings) as other:
        results = await asyncio.gather(
            reconcile_once(settings, db, runflow, now, owner="a"),
            reconcile_once(settings, db, other, now, owner="b"),
        )
    assert sorted(r.ran for r in results) == [False, True]
    assert sum(r.imported for r in results) == 9
    assert await rows(database_url, RECONCILED) == [
        {"run_id": f"race_{i}", "outcome": "stored", "n": 1} for i in range(9)
    ]


async def test_a_reconciler_whose_lease_was_taken_over_writes_nothing(api, fake, database_url, db):
    _, settings, runflow = api
    for i in range(5):
        fake.runs[f"slow_{i}"] = recent_run(f"slow_{i}", 30 - i)
    fake.list_delay_seconds = 0.5
    now = datetime.now(UTC)
    late = asyncio.create_task(reconcile_once(settings, db, runflow, now, owner="late"))
    await asyncio.sleep(0.15)  # "late" waits for its first page; its lease runs out meanwhile
    await rows(database_url, "UPDATE reconciliation_state SET lease_until = now()")
    async with RunflowClient(settings) as other:
        taker = await reconcile_once(settings, db, other, now, owner="taker")
    stalled = await late
    assert taker.ran and taker.imported == 5
    assert stalled.ran and stalled.imported == 0
    assert (stalled.error or "").startswith("lease_lost")
    assert await rows(database_url, RECONCILED) == [
        {"run_id": f"slow_{i}", "outcome": "stored", "n": 1} for i in range(5)
    ]
    [state] = await rows(
        database_url, "SELECT lease_owner, runs_imported FROM reconciliation_state"
    )
    assert state == {"lease_owner": None, "runs_imported": 5}


async def test_a_failing_api_ends_the_pass_with_its_error_and_keeps_the_watermark(
    api, fake, database_url, db
):
    client, settings, runflow = api
    fake.runs["r1"] = recent_run("r1", 10)
    fake.fail_first, fake.fail_status, fake.retry_after = 1000, 503, None
    result = await reconcile_once(settings, db, runflow, datetime.now(UTC))
    assert result.ran and result.error == "runflow_api: http_503"
    assert fake.requests["/v1/runs"] == settings.enrichment_max_attempts
    status = (await client.get("/reconciliation/status", headers=auth())).json()
    assert status["last_error"] == "runflow_api: http_503"
    assert status["watermark"] is None and status["last_success_at"] is None
    assert status["running"] is False and status["passes"] == 1


async def test_status_needs_a_token_and_reports_the_figures_also_in_metrics(
    api, fake, database_url, db
):
    client, settings, runflow = api
    assert (await client.get("/reconciliation/status")).status_code == 401
    wrong = await client.get("/reconciliation/status", headers=auth("nope"))
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "unauthorized"
    empty = (await client.get("/reconciliation/status", headers=auth())).json()
    assert empty["enabled"] is True and empty["passes"] == 0 and empty["runs_imported"] == 0

    for i in range(4):
        fake.runs[f"m_{i}"] = recent_run(f"m_{i}", 10 - i)
    now = datetime.now(UTC)
    await reconcile_once(settings, db, runflow, now)
    status = (await client.get("/reconciliation/status", headers=auth())).json()
    assert status["runs_imported"] == 4 and status["runs_refetched"] == 0
    assert status["passes"] == 1 and status["last_error"] is None and status["running"] is False
    assert datetime.fromisoformat(status["watermark"]) == now
    assert status["last_success_at"] is not None
    assert status["interval_seconds"] == 300 and status["stale_seconds"] == 1800

    metrics = (await client.get("/metrics")).text
    assert 'runflow_receiver_reconcile_runs_total{action="imported"} 4.0' in metrics
    assert 'runflow_receiver_reconcile_runs_total{action="refetched"} 0.0' in metrics
    success = datetime.fromisoformat(status["last_success_at"]).timestamp()
    [line] = [
        line
        for line in metrics.splitlines()
        if line.startswith("runflow_receiver_reconcile_last_success_timestamp_seconds ")
    ]
    assert float(line.split()[1]) == pytest.approx(success, abs=0.001)


@pytest.mark.slow
def test_runs_created_while_the_receiver_was_stopped_appear_after_it_restarts(
    database_url, tmp_path
):
    asyncio.run(truncate_all(database_url))
    fake = FakeRunflow()
    with serve_fake(fake) as fake_url:
        env = receiver_env(
            RECEIVER_DATABASE_URL=database_url,
            RECEIVER_SIGNING_SECRETS=SIGNING_SECRET,
            RECEIVER_API_TOKENS=API_TOKEN,
            RECEIVER_RUNFLOW_API_URL=fake_url,
            RECEIVER_RUNFLOW_API_KEY="rf_test_key",
            RECEIVER_RECONCILE_INTERVAL_SECONDS="0",
            RECEIVER_ENRICHMENT_CONCURRENCY="0",
        )
        # Up: two runs arrive as callbacks, as they should.
        with serving(env, tmp_path, workers=1) as (base, _), httpx.Client(base_url=base) as http:
            for run_id in ("seen_1", "seen_2"):
                fake.runs[run_id] = recent_run(run_id, 40)
                body = body_of(envelope(run_id))
                answer = http.post("/webhooks/runflow", content=body, headers=signed_headers(body))
                assert answer.status_code == 200
        # Down: these runs happen, and Runflow gives up on their callbacks.
        lost = [f"while_down_{i}" for i in range(5)]
        for i, run_id in enumerate(lost):
            fake.runs[run_id] = recent_run(run_id, 20 - i, status_code="failed")
        # Up again, two workers (two reconcilers), reconciliation on.
        env["RECEIVER_RECONCILE_INTERVAL_SECONDS"] = "1"
        with (
            serving(env, tmp_path, workers=2) as (base, _),
            httpx.Client(base_url=base, headers=auth()) as http,
        ):
            deadline = time.monotonic() + 60
            while True:
                found = http.get("/runs", params={"status": "failed"}).json()["items"]
                if sorted(r["id"] for r in found) == lost:
                    break
                assert time.monotonic() < deadline, f"not reconciled: {found}"
                time.sleep(0.2)
            time.sleep(2.5)  # let both workers try a few more passes
            status = http.get("/reconciliation/status").json()
            assert httpx.get(f"{base}/reconciliation/status").status_code == 401
            metrics = http.get("/metrics").text
    assert status["runs_imported"] == 5 and status["passes"] >= 2
    assert 'runflow_receiver_reconcile_runs_total{action="imported"} 5.0' in metrics
    reconciled = asyncio.run(rows(database_url, RECONCILED))
    assert reconciled == [{"run_id": run_id, "outcome": "stored", "n": 1} for run_id in lost]


async def test_a_stale_run_whose_id_cannot_form_a_url_is_recorded_not_requested(
    api, fake, database_url, db
):
    client, settings, runflow = api
    await post_delivery(
        client, recent_run("bad\x01id", 60 * 48, status_code="running", completed_at=None)
    )
    later = datetime.now(UTC) + timedelta(seconds=settings.reconcile_stale_seconds + 60)
    result = await reconcile_once(settings, db, runflow, later)
    assert result.error is None and result.refetched == 0
    [check] = await rows(database_url, "SELECT outcome FROM reconciliation_checks")
    assert str(check["outcome"]).startswith("invalid_run_id")
    assert not any(path.startswith("/v1/runs/") for path in fake.paths)


async def test_a_stop_ends_the_pass_after_the_page_in_hand_keeping_its_progress(
    api, fake, database_url, db
):
    _, settings, runflow = api
    for i in range(9):
        fake.runs[f"s_{i}"] = recent_run(f"s_{i}", 30 - i)
    stop = asyncio.Event()
    fake.list_delay_seconds = 0.3
    asyncio.get_running_loop().call_later(0.1, stop.set)  # while the first page is in flight
    result = await reconcile_once(settings, db, runflow, datetime.now(UTC), stop=stop)
    assert result.ran and result.error is None and not result.listing_complete
    assert result.pages == 1 and result.imported == 3
    [state] = await rows(
        database_url,
        "SELECT watermark, lease_owner, last_success_at, last_error FROM reconciliation_state",
    )
    third = datetime.fromisoformat(str(fake.runs["s_2"]["created_at"]))
    assert state == {
        "watermark": third,
        "lease_owner": None,
        "last_success_at": None,
        "last_error": None,
    }


async def test_the_app_runs_the_reconciler_and_its_shutdown_is_bounded(
    db, database_url, fake, fake_url
):
    fake.runs["bg_1"] = recent_run("bg_1", 5)
    settings = reconcile_settings(
        database_url,
        fake_url,
        reconcile_interval_seconds=1,
        enrichment_max_attempts=8,
        enrichment_backoff_max_seconds=3600,  # a Retry-After of an hour is honoured in full
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        deadline = time.monotonic() + 20
        while not await rows(database_url, "SELECT id FROM runs WHERE id = 'bg_1'"):
            assert time.monotonic() < deadline, "the background reconciler imported nothing"
            await asyncio.sleep(0.05)
        # Now make Runflow fail with long back-offs: shutdown must not wait them out.
        served = fake.requests["/v1/runs"]
        fake.retry_after, fake.fail_status, fake.fail_first = "3600", 503, 10**6
        deadline = time.monotonic() + 20
        while fake.requests["/v1/runs"] == served:  # the next pass asks, gets a 503 ...
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # ... and is now told to wait an hour
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 5

    off = reconcile_settings(database_url, fake_url, reconcile_interval_seconds=0)
    assert not off.reconcile_enabled
    assert not reconcile_settings(database_url, fake_url, runflow_api_key=None).reconcile_enabled
