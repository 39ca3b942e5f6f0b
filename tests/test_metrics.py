"""/metrics: exact delivery counts in-process and summed over two real worker processes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from receiver.app import create_app
from receiver.db import plain_url
from receiver.metrics import fold_failures
from receiver.settings import Settings
from receiver.simulate import SimDelivery, generate_traffic, send
from tests.builders import SIGNING_SECRET, body_of, envelope, failed_envelope, post_delivery
from tests.conftest import truncate_all
from tests.serve_process import receiver_env, serving

Labels = tuple[tuple[str, str], ...]


def samples(text: str, name: str) -> dict[Labels, float]:
    """Every sample called ``name`` in an exposition, keyed by its sorted labels."""
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


def deliveries(text: str) -> dict[tuple[str, str], float]:
    found = samples(text, "runflow_receiver_deliveries_total")
    return {(dict(k)["outcome"], dict(k)["cause"]): v for k, v in found.items()}


def single(text: str, name: str) -> float:
    found = samples(text, name)
    assert list(found) == [()], found
    return found[()]


@asynccontextmanager
async def serving_in_process(settings: Settings, **kw) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, **kw)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://receiver.test") as c:
            yield c


async def scrape(client: httpx.AsyncClient) -> str:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


async def test_delivery_counters_are_exact_per_outcome_and_cause(client):
    first, second = envelope(), failed_envelope()
    assert (await post_delivery(client, first)).json()["status"] == "stored"
    assert (await post_delivery(client, second)).json()["status"] == "stored"
    assert (await post_delivery(client, first)).json()["status"] == "duplicate"
    assert (await post_delivery(client, envelope(), secret="whsec_wrong")).status_code == 401
    assert (await post_delivery(client, b"{not json")).status_code == 400
    plain = {"content-type": "text/plain"}
    assert (await post_delivery(client, envelope(), headers=plain)).status_code == 415

    text = await scrape(client)
    assert deliveries(text) == {
        ("stored", ""): 2,
        ("duplicate", ""): 1,
        ("rejected", "invalid_signature"): 1,
        ("rejected", "invalid_json"): 1,
        ("rejected", "unsupported_media_type"): 1,
    }
    assert single(text, "runflow_receiver_ingest_seconds_count") == 6
    assert single(text, "runflow_receiver_ingest_seconds_sum") > 0
    assert single(text, "runflow_receiver_database_up") == 1
    # Scraping counts nothing: a second scrape reads the same numbers.
    assert deliveries(await scrape(client)) == deliveries(text)


async def test_failures_24h_by_code_and_stage_fold_past_top_n_into_other(db, settings):
    now = datetime.now(UTC)
    recent = {"created_at": now - timedelta(hours=1), "completed_at": now - timedelta(minutes=59)}
    old = {"created_at": now - timedelta(hours=30), "completed_at": now - timedelta(hours=29)}
    sent = [
        *[failed_envelope(code="oom", stage="execution", **recent) for _ in range(4)],
        *[failed_envelope(code="timeout", stage="execution", **recent) for _ in range(2)],
        failed_envelope(code="timeout", stage="dispatch", **recent),
        *[failed_envelope(code="no_capacity", stage="dispatch", **recent) for _ in range(2)],
        failed_envelope(code="lost_worker", stage="reconciliation", **recent),
        # Outside the window: would make no_capacity the top code if it were counted.
        *[failed_envelope(code="no_capacity", stage="dispatch", **old) for _ in range(5)],
        envelope(status="succeeded", **recent),
        envelope(status="cancelled", **recent),
    ]
    top2 = settings.model_copy(update={"metrics_top_failure_codes": 2})
    async with serving_in_process(top2) as client:
        for doc in sent:
            assert (await post_delivery(client, doc)).json()["status"] == "stored"
        text = await scrape(client)

    failures = {
        (dict(k)["failure_code"], dict(k)["failure_stage"]): v
        for k, v in samples(text, "runflow_receiver_failures_24h").items()
    }
    assert failures == {
        ("oom", "execution"): 4,
        ("timeout", "execution"): 2,
        ("timeout", "dispatch"): 1,
        ("other", "dispatch"): 2,
        ("other", "reconciliation"): 1,
    }
    runs = {dict(k)["status"]: v for k, v in samples(text, "runflow_receiver_runs_24h").items()}
    assert runs == {"failed": 10, "succeeded": 1, "cancelled": 1, "partial_succeeded": 0}


def test_fold_failures_ranks_codes_over_all_stages_and_breaks_ties_by_name():
    rows = [("b", "x", 2), ("b", "y", 2), ("a", "x", 3), ("c", "x", 3), (None, None, 1)]
    assert fold_failures(rows, 2) == {
        ("b", "x"): 2,
        ("b", "y"): 2,
        ("a", "x"): 3,
        ("other", "x"): 3,
        ("other", ""): 1,
    }
    assert fold_failures(rows, 10)[("", "")] == 1


async def test_enrichment_queue_gauges_read_the_queue(db, settings):
    enriching = settings.model_copy(update={"runflow_api_key": "rk_test"})
    async with serving_in_process(enriching, run_worker=False) as client:
        assert single(await scrape(client), "runflow_receiver_enrichment_queue_depth") == 0
        for _ in range(3):
            # Envelopes only: each run waits for its Run object from Runflow's API.
            assert (await post_delivery(client, envelope())).status_code == 200
        text = await scrape(client)
    assert single(text, "runflow_receiver_enrichment_queue_depth") == 3
    assert 0 <= single(text, "runflow_receiver_enrichment_queue_oldest_seconds") < 60


async def test_scrape_without_the_database_still_reports_process_counters(settings):
    unreachable = "postgresql://postgres@127.0.0.1:9/nothing"
    async with serving_in_process(settings, database_url=unreachable) as client:
        # Even a refusal is archived before it is answered: with no database, a 503.
        assert (await post_delivery(client, envelope(), secret="whsec_wrong")).status_code == 503
        text = await scrape(client)
    assert single(text, "runflow_receiver_database_up") == 0
    assert deliveries(text) == {("error", "unavailable"): 1}
    assert "runflow_receiver_failures_24h" not in text


async def fetch(url: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(plain_url(url))
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


def pids_in(directory: Path) -> set[str]:
    return {path.stem.rsplit("_", 1)[-1] for path in directory.glob("*.db")}


@pytest.mark.slow
def test_two_workers_metrics_equal_what_was_sent_on_every_scrape(database_url, tmp_path):
    asyncio.run(truncate_all(database_url))
    data_dir = tmp_path / "data"
    env = receiver_env(
        RECEIVER_DATABASE_URL=database_url,
        RECEIVER_SIGNING_SECRETS=SIGNING_SECRET,
        RECEIVER_DATA_DIR=str(data_dir),
    )
    traffic = generate_traffic(count=120, seed=23, prefix="metrics")
    not_json = [SimDelivery(b"{oops", None), SimDelivery(body_of([1, 2]), None)]
    with serving(env, tmp_path, workers=2) as (base, _):
        url = f"{base}/webhooks/runflow"
        good = asyncio.run(send(url, traffic, secret=SIGNING_SECRET, concurrency=16))
        forged = asyncio.run(send(url, traffic[:3], secret="whsec_forged", concurrency=3))
        broken = asyncio.run(send(url, not_json, secret=SIGNING_SECRET, concurrency=2))
        # A new connection each time: uvicorn hands each to either worker.
        scrapes = [httpx.get(f"{base}/metrics", timeout=10).text for _ in range(10)]
        writers = pids_in(data_dir / "metrics")

    assert good.acknowledged == good.sent == 120, good.summary()
    assert forged.statuses == {401: 3} and broken.statuses == {400: 2}
    expected = {
        ("stored", ""): good.outcomes["stored"],
        ("duplicate", ""): good.outcomes["duplicate"],
        ("rejected", "invalid_signature"): 3,
        ("rejected", "invalid_json"): 2,
    }
    # The archive agrees, independently of the server's own counting.
    archive = asyncio.run(
        fetch(
            database_url,
            "SELECT outcome, coalesce(cause, '') AS cause, count(*) AS n FROM deliveries"
            " GROUP BY 1, 2",
        )
    )
    assert {(r["outcome"], r["cause"]): r["n"] for r in archive} == expected
    assert len(writers) == 2, writers  # both workers answered deliveries
    for text in scrapes:
        assert deliveries(text) == expected
        assert single(text, "runflow_receiver_ingest_seconds_count") == 125
        assert single(text, "runflow_receiver_database_up") == 1

    # A restarted server starts its counters at zero: serve empties the directory first.
    with serving(env, tmp_path, workers=2) as (base, _):
        text = httpx.get(f"{base}/metrics", timeout=10).text
    assert deliveries(text) == {}
    assert samples(text, "runflow_receiver_ingest_seconds_count") in ({}, {(): 0.0})
