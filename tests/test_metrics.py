"""/metrics: exact counters (also summed across two workers) and figures from the database."""

from __future__ import annotations

import asyncio

import httpx
from prometheus_client.parser import text_string_to_metric_families

from receiver.app import create_app
from receiver.settings import Settings
from receiver.simulate import generate_traffic, send
from tests.builders import (
    API_TOKEN,
    SIGNING_SECRET,
    envelope,
    post_delivery,
    run_object,
)
from tests.conftest import truncate_all
from tests.serve_process import receiver_env, serving


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(found, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(client) -> dict:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return samples(response.text)


async def test_delivery_counters_count_each_outcome_and_cause(client):
    before = await scrape(client)
    raw = envelope("m_dup")
    await post_delivery(client, envelope("m_1"))
    await post_delivery(client, raw)
    await post_delivery(client, raw)
    await post_delivery(client, envelope("m_2"), secret="whsec_wrong")
    await post_delivery(client, b"{not json")
    after = await scrape(client)

    def delta(outcome: str, cause: str) -> float:
        name = "runflow_receiver_deliveries_total"
        return value(after, name, outcome=outcome, cause=cause) - value(
            before, name, outcome=outcome, cause=cause
        )

    assert delta("stored", "") == 2
    assert delta("duplicate", "") == 1
    assert delta("rejected", "invalid_signature") == 1
    assert delta("rejected", "invalid_json") == 1
    count = "runflow_receiver_ingest_seconds_count"
    assert value(after, count) - value(before, count) == 5
    terminal = "runflow_receiver_runs_terminal_total"
    assert (
        value(after, terminal, status="succeeded") - value(before, terminal, status="succeeded")
        == 2
    )


async def test_failures_gauge_folds_codes_past_top_n_into_other(db, database_url):
    from datetime import UTC, datetime

    settings = Settings(
        database_url=database_url,
        signing_secrets=[SIGNING_SECRET],
        api_tokens=[API_TOKEN],
        metrics_top_failure_codes=2,
    )
    app = create_app(settings, run_worker=False)
    now = datetime.now(UTC).isoformat()
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            for i, code in enumerate(["oom"] * 3 + ["timeout"] * 2 + ["nsfw", "quota"]):
                doc = run_object(
                    f"g{i}",
                    status_code="failed",
                    failure_code=code,
                    failure_stage_code="execution",
                    created_at=now,
                )
                await post_delivery(client, doc)
            found = await scrape(client)
    gauge = "runflow_receiver_failures_24h"
    assert value(found, gauge, failure_code="oom", failure_stage="execution") == 3
    assert value(found, gauge, failure_code="timeout", failure_stage="execution") == 2
    assert value(found, gauge, failure_code="other", failure_stage="execution") == 2
    assert value(found, "runflow_receiver_enrichment_queue_depth") == 0


def test_counters_are_exact_across_two_workers(database_url, tmp_path):
    asyncio.run(truncate_all(database_url))
    traffic = generate_traffic(count=120, seed=21, duplicate_rate=0.1)
    env = receiver_env(
        RECEIVER_DATABASE_URL=database_url,
        RECEIVER_SIGNING_SECRETS=SIGNING_SECRET,
        RECEIVER_DATA_DIR=str(tmp_path / "data"),
    )
    with serving(env, tmp_path, workers=2) as (base, _):
        report = asyncio.run(
            send(f"{base}/webhooks/runflow", traffic, secret=SIGNING_SECRET, concurrency=16)
        )
        bad = asyncio.run(
            send(f"{base}/webhooks/runflow", traffic[:7], secret="whsec_wrong", concurrency=4)
        )
        assert report.acknowledged == 120 and bad.outcomes["rejected"] == 7
        # Scrape several times: whichever worker answers, the sums are the same.
        scrapes = [samples(httpx.get(f"{base}/metrics", timeout=10).text) for _ in range(6)]
    name = "runflow_receiver_deliveries_total"
    for found in scrapes:
        assert value(found, name, outcome="stored", cause="") == report.outcomes["stored"]
        assert value(found, name, outcome="duplicate", cause="") == report.outcomes["duplicate"]
        assert value(found, name, outcome="rejected", cause="invalid_signature") == 7
        assert value(found, "runflow_receiver_ingest_seconds_count") == 127
