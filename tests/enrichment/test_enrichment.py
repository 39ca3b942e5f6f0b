"""Enrichment from a fake Runflow API over real HTTP: fields filled, crashes, 429s, 401/404."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys
import time
from datetime import timedelta

import asyncpg
import pytest

from receiver.db import plain_url
from receiver.enrichment import Enricher, enqueue_unqueued
from receiver.settings import Settings
from tests.support.apps import running_app
from tests.support.builders import (
    T0,
    auth,
    enrichment_settings,
    envelope,
    iso,
    post_delivery,
    run_object,
)
from tests.support.processes import receiver_env, stop


@pytest.fixture
async def enriching_client(db, database_url, fake_url):
    """An app that queues envelope-only runs but runs no worker (tests drive it)."""
    settings = enrichment_settings(database_url, fake_url)
    async with running_app(settings, run_worker=False) as (app, client):
        yield client, settings, app.state.resources.engine


async def drain(settings: Settings, engine, seconds: float = 30) -> None:
    """Run a worker until nothing is pending any more."""
    stop_event = asyncio.Event()
    worker = asyncio.create_task(Enricher(settings, engine).run(stop_event))
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            async with engine.connect() as conn:
                from sqlalchemy import text

                pending = (
                    await conn.execute(
                        text("SELECT count(*) FROM enrichment_queue WHERE state = 'pending'")
                    )
                ).scalar_one()
            if pending == 0:
                return
            await asyncio.sleep(0.05)
        raise AssertionError("the queue did not drain")
    finally:
        stop_event.set()
        await worker


async def fetch(url: str, sql: str, *args):
    conn = await asyncpg.connect(plain_url(url))
    try:
        return [dict(r) for r in await conn.fetch(sql, *args)]
    finally:
        await conn.close()


def full_run(run_id: str, **fields):
    return run_object(
        run_id,
        status_code="failed",
        failure_code="out_of_memory",
        failure_message="CUDA out of memory",
        failure_stage_code="execution",
        client_ref=f"order-{run_id}",
        cost="0.0420",
        model={"id": "mdl_flux", "slug": "flux-dev"},
        node_runs=[
            {"id": f"{run_id}_n1", "node_id": "load", "status_code": "succeeded"},
            {
                "id": f"{run_id}_n2",
                "node_id": "sample",
                "status_code": "failed",
                "failure_code": "out_of_memory",
            },
        ],
        **fields,
    )


async def test_envelope_only_failed_run_gains_run_object_fields(
    enriching_client, fake, database_url
):
    client, settings, engine = enriching_client
    fake.runs["enr_1"] = full_run("enr_1")
    response = await post_delivery(client, envelope("enr_1", status="failed", output=None))
    assert response.status_code == 200
    before = (await client.get("/runs/enr_1", headers=auth())).json()
    assert before["failure_code"] is None and before["client_ref"] is None
    queued = await fetch(database_url, "SELECT run_id, state FROM enrichment_queue")
    assert queued == [{"run_id": "enr_1", "state": "pending"}]

    await drain(settings, engine)

    run = (await client.get("/runs/enr_1", headers=auth())).json()
    assert run["failure_code"] == "out_of_memory"
    assert run["failure_stage"] == "execution"
    assert run["client_ref"] == "order-enr_1"
    assert run["cost"] == "0.0420"
    assert run["model"] == "flux-dev"
    assert run["enriched_at"] is not None and run["enrichment_error"] is None
    assert [n["id"] for n in run["node_runs"]] == ["enr_1_n1", "enr_1_n2"]
    assert fake.requests["enr_1"] == 1

    # The query API and analytics see the enriched values.
    by_code = (await client.get("/runs?failure_code=out_of_memory", headers=auth())).json()
    assert [r["id"] for r in by_code["items"]] == ["enr_1"]
    by_ref = (await client.get("/runs?client_ref=order-enr_1", headers=auth())).json()
    assert [r["id"] for r in by_ref["items"]] == ["enr_1"]
    after, before = iso(T0 - timedelta(hours=1)), iso(T0 + timedelta(hours=1))
    window = f"created_after={after}&created_before={before}"
    failures = (
        await client.get(f"/analytics/failures?{window.replace('+', '%2B')}", headers=auth())
    ).json()
    assert failures["groups"] == [
        {"failure_code": "out_of_memory", "failure_stage": "execution", "count": 1, "share": 1.0}
    ]
    status = (await client.get("/enrichment/status", headers=auth())).json()
    assert status == {
        "enabled": True,
        "pending": 0,
        "done": 1,
        "failed": 0,
        "oldest_pending_seconds": None,
    }


async def test_runs_seen_as_run_objects_are_not_queued(enriching_client, database_url):
    client, _, _ = enriching_client
    await post_delivery(client, run_object("already_full"))
    await post_delivery(client, envelope("already_full", status="succeeded"))
    assert await fetch(database_url, "SELECT run_id FROM enrichment_queue") == []


async def test_429s_back_off_then_complete_without_duplicate_merges(
    enriching_client, fake, database_url
):
    client, settings, engine = enriching_client
    ids = [f"busy_{i}" for i in range(3)]
    for run_id in ids:
        fake.runs[run_id] = full_run(run_id)
        await post_delivery(client, envelope(run_id, status="failed", output=None))
    fake.fail_first = 6
    await drain(settings, engine)
    assert sum(fake.requests.values()) <= 6 + len(ids) + 2
    merges = await fetch(
        database_url,
        "SELECT run_id, count(*) AS n FROM deliveries WHERE source = 'enrichment'"
        " AND outcome = 'stored' GROUP BY run_id ORDER BY run_id",
    )
    assert merges == [{"run_id": run_id, "n": 1} for run_id in sorted(ids)]
    attempts = await fetch(database_url, "SELECT attempts FROM enrichment_queue")
    assert sum(a["attempts"] for a in attempts) > len(ids)  # it did retry


async def test_404_ends_the_item_with_a_recorded_reason(enriching_client, database_url):
    client, settings, engine = enriching_client
    await post_delivery(client, envelope("ghost", status="failed", output=None))
    await drain(settings, engine)
    [item] = await fetch(database_url, "SELECT state, last_error FROM enrichment_queue")
    assert item["state"] == "failed" and item["last_error"].startswith("not_found")
    run = (await client.get("/runs/ghost", headers=auth())).json()
    assert run["enrichment_error"].startswith("not_found")


async def test_refused_key_ends_the_item_and_pauses_the_worker(
    enriching_client, fake, database_url
):
    client, settings, engine = enriching_client
    fake.api_key = "a_different_key"
    for run_id in ("k1", "k2"):
        fake.runs[run_id] = full_run(run_id)
        await post_delivery(client, envelope(run_id, status="failed", output=None))
    enricher = Enricher(settings, engine)
    claimed = await enricher.claim()
    assert claimed is not None
    assert await enricher.process(*claimed) == "failed"
    assert enricher.paused_until > time.monotonic() + 60
    states = await fetch(
        database_url, "SELECT state, last_error FROM enrichment_queue ORDER BY state"
    )
    assert states[0]["state"] == "failed" and states[0]["last_error"].startswith("http_401")
    assert states[1]["state"] == "pending"  # the paused worker did not hammer the API
    assert sum(fake.requests.values()) == 1
    await enricher.client.aclose()


async def test_http_only_serve_still_queues_for_separate_workers(db, database_url, fake, fake_url):
    settings = enrichment_settings(database_url, fake_url, enrichment_concurrency=0)
    fake.runs["split_1"] = full_run("split_1")
    async with running_app(settings) as (_app, client):  # serve with no worker tasks of its own
        await post_delivery(client, envelope("split_1", status="failed", output=None))
        status = (await client.get("/enrichment/status", headers=auth())).json()
    assert status["enabled"] is True and status["pending"] == 1
    assert fake.requests["split_1"] == 0

    # A separate worker process (here: a worker with tasks) takes the item.
    await drain(enrichment_settings(database_url, fake_url), db)
    [run] = await fetch(database_url, "SELECT failure_code, client_ref FROM runs")
    assert run == {"failure_code": "out_of_memory", "client_ref": "order-split_1"}


async def wait_for(url: str, sql: str, expected: object, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while (await fetch(url, sql)) != expected:
        assert time.monotonic() < deadline, f"timed out waiting for {sql}"
        await asyncio.sleep(0.05)


async def test_runs_kept_before_the_key_was_set_are_enriched_when_a_worker_starts(
    client, db, database_url, fake, fake_url
):
    # `client` is an app without an API key: nothing is queued at ingest.
    for run_id in ("old_1", "old_2"):
        fake.runs[run_id] = full_run(run_id)
        await post_delivery(client, envelope(run_id, status="failed", output=None))
    await post_delivery(client, run_object("old_full"))
    assert await fetch(database_url, "SELECT run_id FROM enrichment_queue") == []

    settings = enrichment_settings(database_url, fake_url)
    stop_event = asyncio.Event()
    worker = asyncio.create_task(Enricher(settings, db).run(stop_event))
    try:
        await wait_for(
            database_url,
            "SELECT id FROM runs WHERE enriched_at IS NOT NULL ORDER BY id",
            [{"id": "old_1"}, {"id": "old_2"}],
        )
    finally:
        stop_event.set()
        await worker
    runs = await fetch(database_url, "SELECT id, failure_code FROM runs ORDER BY id")
    assert runs == [
        {"id": "old_1", "failure_code": "out_of_memory"},
        {"id": "old_2", "failure_code": "out_of_memory"},
        {"id": "old_full", "failure_code": None},
    ]
    assert fake.requests["old_full"] == 0  # a run seen as a Run object is not fetched
    assert await enqueue_unqueued(db) == 0  # a later start queues nothing again


async def test_a_worker_whose_lease_ran_out_cannot_merge_a_second_time(
    enriching_client, fake, database_url
):
    client, settings, engine = enriching_client
    fake.runs["slow"] = full_run("slow")
    await post_delivery(client, envelope("slow", status="failed", output=None))
    late, other = Enricher(settings, engine), Enricher(settings, engine)
    try:
        late_claim = await late.claim()
        assert late_claim == ("slow", 1)
        # The late worker stalls past its lease; another worker takes the item and finishes.
        await fetch(database_url, "UPDATE enrichment_queue SET locked_until = now()")
        other_claim = await other.claim()
        assert other_claim == ("slow", 2)
        assert await other.process(*other_claim) == "done"

        # What the late worker now fetches differs, so it would be stored, not a duplicate.
        fake.runs["slow"] = full_run("slow", duration_ms=2500)
        assert await late.process(*late_claim) == "lost"
    finally:
        await late.client.aclose()
        await other.client.aclose()
    merges = await fetch(
        database_url,
        "SELECT run_id, outcome FROM deliveries WHERE source = 'enrichment'",
    )
    assert merges == [{"run_id": "slow", "outcome": "stored"}]
    assert await fetch(database_url, "SELECT duration_ms FROM runs") == [{"duration_ms": 2000}]
    [item] = await fetch(database_url, "SELECT state, attempts FROM enrichment_queue")
    assert item == {"state": "done", "attempts": 2}


async def test_a_refused_key_is_logged_once_however_many_tasks_saw_it(
    enriching_client, fake, caplog
):
    client, settings, engine = enriching_client
    fake.api_key = "a_different_key"
    for run_id in ("r1", "r2", "r3"):
        await post_delivery(client, envelope(run_id, status="failed", output=None))
    enricher = Enricher(settings, engine)
    try:
        claims = [await enricher.claim() for _ in range(3)]
        caplog.set_level(logging.ERROR, logger="receiver.enrichment")
        results = await asyncio.gather(*(enricher.process(*c) for c in claims if c))
    finally:
        await enricher.client.aclose()
    assert results == ["failed", "failed", "failed"]
    refused = [r for r in caplog.records if "refused the key" in r.getMessage()]
    assert len(refused) == 1


def _worker(env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "receiver", "worker", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


async def test_killed_worker_loses_nothing_and_merges_each_run_once(
    enriching_client, fake, fake_url, database_url
):
    client, _, _ = enriching_client
    ids = [f"crash_{i:02d}" for i in range(24)]
    for run_id in ids:
        fake.runs[run_id] = full_run(run_id)
        await post_delivery(client, envelope(run_id, status="failed", output=None))
    fake.delay_seconds = 0.15
    env = receiver_env(
        RECEIVER_DATABASE_URL=database_url,
        RECEIVER_RUNFLOW_API_URL=fake_url,
        RECEIVER_RUNFLOW_API_KEY="rf_test_key",
        RECEIVER_ENRICHMENT_CONCURRENCY="4",
        RECEIVER_ENRICHMENT_LEASE_SECONDS="2",
        RECEIVER_ENRICHMENT_POLL_SECONDS="0.1",
    )
    count_done = "SELECT count(*) AS n FROM enrichment_queue WHERE state = 'done'"
    first = _worker(env)
    try:
        deadline = time.monotonic() + 60
        while (await fetch(database_url, count_done))[0]["n"] < 4:
            assert time.monotonic() < deadline, "the worker made no progress"
            await asyncio.sleep(0.05)
    finally:
        stop(first, sig=signal.SIGKILL)
    done_at_kill = (await fetch(database_url, count_done))[0]["n"]
    assert done_at_kill < len(ids), "killed too late to test anything"

    # The restart takes its task count from the flag (serve can keep 0 in a shared env).
    second = _worker({**env, "RECEIVER_ENRICHMENT_CONCURRENCY": "0"}, "--concurrency", "3")
    try:
        deadline = time.monotonic() + 90
        while (await fetch(database_url, count_done))[0]["n"] < len(ids):
            assert time.monotonic() < deadline, "the queue was not finished after the restart"
            await asyncio.sleep(0.1)
    finally:
        stop(second)
    merges = await fetch(
        database_url,
        "SELECT run_id, count(*) AS n FROM deliveries WHERE source = 'enrichment'"
        " AND outcome = 'stored' GROUP BY run_id ORDER BY run_id",
    )
    assert merges == [{"run_id": run_id, "n": 1} for run_id in ids]
    enriched = await fetch(
        database_url, "SELECT count(*) AS n FROM runs WHERE enriched_at IS NOT NULL"
    )
    assert enriched[0]["n"] == len(ids)


async def test_a_traversal_run_id_is_fetched_as_one_encoded_segment(
    enriching_client, fake, database_url
):
    client, settings, engine = enriching_client
    sneaky = "../../admin/keys?dump=1#"
    fake.runs[sneaky] = full_run(sneaky)
    await post_delivery(client, envelope(sneaky, status="failed", output=None))
    await drain(settings, engine)
    assert fake.paths == ["/v1/runs/..%2F..%2Fadmin%2Fkeys%3Fdump%3D1%23"]
    [item] = await fetch(database_url, "SELECT state FROM enrichment_queue")
    assert item == {"state": "done"}
    [run] = await fetch(database_url, "SELECT id, failure_code FROM runs")
    assert run == {"id": sneaky, "failure_code": "out_of_memory"}


async def test_a_run_id_that_cannot_form_a_url_ends_its_item_without_a_request(
    enriching_client, fake, database_url
):
    client, settings, engine = enriching_client
    response = await post_delivery(client, envelope("bad\x01id\n", status="failed", output=None))
    assert response.status_code == 200
    await drain(settings, engine)
    [item] = await fetch(database_url, "SELECT state, attempts, last_error FROM enrichment_queue")
    assert item["state"] == "failed" and item["attempts"] == 1
    assert item["last_error"].startswith("invalid_run_id")
    [run] = await fetch(database_url, "SELECT enrichment_error FROM runs")
    assert run["enrichment_error"].startswith("invalid_run_id")
    assert fake.paths == []


async def test_broken_answers_count_toward_the_attempt_limit(enriching_client, fake, database_url):
    client, settings, engine = enriching_client
    fake.runs["flaky"] = full_run("flaky")
    fake.fail_first, fake.fail_status, fake.retry_after = 1000, 503, None
    await post_delivery(client, envelope("flaky", status="failed", output=None))
    await drain(
        enrichment_settings(database_url, settings.runflow_api_url, enrichment_max_attempts=3),
        engine,
    )
    [item] = await fetch(database_url, "SELECT state, attempts, last_error FROM enrichment_queue")
    assert item == {"state": "failed", "attempts": 3, "last_error": "http_503"}
    assert fake.requests["flaky"] == 3


async def test_an_item_whose_workers_kept_dying_ends_without_another_fetch(
    enriching_client, fake, database_url
):
    client, settings, engine = enriching_client
    fake.runs["poison"] = full_run("poison")
    await post_delivery(client, envelope("poison", status="failed", output=None))
    limit = settings.enrichment_max_attempts
    # Every earlier claim's worker died before recording an outcome.
    await fetch(database_url, "UPDATE enrichment_queue SET attempts = $1", limit)
    enricher = Enricher(settings, engine)
    try:
        claimed = await enricher.claim()
        assert claimed == ("poison", limit + 1)
        assert await enricher.process(*claimed) == "failed"
    finally:
        await enricher.client.aclose()
    [item] = await fetch(database_url, "SELECT state, last_error FROM enrichment_queue")
    assert item["state"] == "failed" and item["last_error"].startswith("attempts_exhausted")
    assert fake.requests["poison"] == 0
