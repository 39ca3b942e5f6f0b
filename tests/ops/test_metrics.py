"""/metrics: exact counters (also summed across two workers) and figures from the database."""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
from collections import Counter
from pathlib import Path

import asyncpg
import httpx
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from receiver.alerts.evaluate import evaluate_once
from receiver.alerts.store import upsert_rule
from receiver.app import create_app
from receiver.db import plain_url
from receiver.settings import Settings
from receiver.simulate import generate_traffic, send
from tests.support.apps import running_app
from tests.support.builders import (
    API_TOKEN,
    SIGNING_SECRET,
    envelope,
    post_delivery,
    rule,
    run_object,
)
from tests.support.database import truncate_all
from tests.support.processes import receiver_env, serving


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


async def test_scrape_without_the_database_still_reports_the_counters(settings):
    unreachable = settings.model_copy(
        update={"database_url": "postgresql://postgres@127.0.0.1:9/nothing"}
    )
    async with running_app(unreachable, run_worker=False) as (_app, client):
        before = await scrape(client)
        assert (await post_delivery(client, envelope("lost"))).status_code == 503
        after = await scrape(client)
    name = "runflow_receiver_deliveries_total"
    labels = {"outcome": "unavailable", "cause": "unavailable"}
    assert value(after, name, **labels) - value(before, name, **labels) == 1
    assert value(after, "runflow_receiver_database_up") == 0
    assert not any(key[0] == "runflow_receiver_failures_24h" for key in after)


async def test_alert_states_of_enabled_rules_only(db, settings, client):
    from datetime import UTC, datetime

    await upsert_rule(db, rule(name="watching", threshold=0))
    await upsert_rule(db, rule(name="switched-off", threshold=0))
    await post_delivery(client, run_object("f", status_code="failed"))
    await evaluate_once(settings, db, datetime.now(UTC))
    await upsert_rule(db, rule(name="switched-off", threshold=0, enabled=False))
    found = await scrape(client)
    state = "runflow_receiver_alert_state"
    assert value(found, state, rule="watching", group="", state="firing") == 1
    assert not any(key[0] == state and ("rule", "switched-off") in key[1] for key in found)


async def archive_counts(url: str) -> dict[tuple[str, str], int]:
    conn = await asyncpg.connect(plain_url(url))
    try:
        rows = await conn.fetch(
            "SELECT outcome, coalesce(cause, '') AS cause, count(*) AS n FROM deliveries"
            " GROUP BY 1, 2"
        )
    finally:
        await conn.close()
    return {(r["outcome"], r["cause"]): r["n"] for r in rows}


def per_worker(directory: Path, name: str) -> dict[str, float]:
    """``name`` as each worker process counted it, from its own multiprocess files."""
    files: dict[str, list[Path]] = {}
    for path in directory.glob("*.db"):  # prometheus_client names the files <kind>_<pid>.db
        files.setdefault(path.stem.rsplit("_", 1)[-1], []).append(path)
    out = {}
    for pid, paths in files.items():
        with tempfile.TemporaryDirectory() as alone:
            for path in paths:
                os.symlink(path, Path(alone, path.name))
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=alone)
            out[pid] = value(samples(generate_latest(registry).decode()), name)
    return out


def test_counters_are_exact_across_two_workers(database_url, tmp_path):
    asyncio.run(truncate_all(database_url))
    data_dir = tmp_path / "data"
    env = receiver_env(
        RECEIVER_DATABASE_URL=database_url,
        RECEIVER_SIGNING_SECRETS=SIGNING_SECRET,
        RECEIVER_DATA_DIR=str(data_dir),
    )
    handled_by = "runflow_receiver_ingest_seconds_count"
    outcomes: Counter[str] = Counter()
    with serving(env, tmp_path, workers=2) as (base, _):
        url = f"{base}/webhooks/runflow"
        # Until both workers have answered a share (the kernel may hand one worker a whole
        # round), so that every scrape below really sums two processes' counts.
        for round_ in range(10):
            traffic = generate_traffic(
                count=60, seed=21 + round_, duplicate_rate=0.1, prefix=f"r{round_}"
            )
            report = asyncio.run(send(url, traffic, secret=SIGNING_SECRET, concurrency=16))
            assert report.acknowledged == 60, report.summary()
            outcomes += report.outcomes
            handled = per_worker(data_dir / "metrics", handled_by)
            if len(handled) == 2 and all(handled.values()):
                break
        assert len(handled) == 2 and all(handled.values()), handled
        bad = asyncio.run(send(url, traffic[:7], secret="whsec_wrong", concurrency=4))
        assert bad.outcomes["rejected"] == 7
        # Scrape several times: whichever worker answers, the sums are the same.
        scrapes = [samples(httpx.get(f"{base}/metrics", timeout=10).text) for _ in range(6)]
    sent = outcomes["stored"] + outcomes["duplicate"] + 7
    assert sum(per_worker(data_dir / "metrics", handled_by).values()) == sent
    expected = {
        ("stored", ""): outcomes["stored"],
        ("duplicate", ""): outcomes["duplicate"],
        ("rejected", "invalid_signature"): 7,
    }
    # The archive, counted independently of the server's counters, agrees; refused
    # requests (the bad signatures) are counted but never kept.
    kept = {key: n for key, n in expected.items() if key != ("rejected", "invalid_signature")}
    assert asyncio.run(archive_counts(database_url)) == kept
    name = "runflow_receiver_deliveries_total"
    for found in scrapes:
        counted = {
            (dict(labels)["outcome"], dict(labels)["cause"]): n
            for (metric, labels), n in found.items()
            if metric == name
        }
        assert counted == expected
        assert value(found, handled_by) == sent
        assert value(found, "runflow_receiver_database_up") == 1


PROMETHEUS_RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus-alerts.yaml"


async def test_the_prometheus_rules_in_deploy_use_only_metrics_the_receiver_exposes(client):
    groups = yaml.safe_load(PROMETHEUS_RULES.read_text())["groups"]
    alerts = [alert for group in groups for alert in group["rules"]]
    assert alerts and all({"alert", "expr"} <= set(alert) for alert in alerts)
    await post_delivery(client, run_object("any", status_code="failed"))
    exposed = set(re.findall(r"runflow_receiver_\w+", (await client.get("/metrics")).text))
    for alert in alerts:
        for name in re.findall(r"runflow_receiver_\w+", alert["expr"]):
            assert name in exposed, f"{alert['alert']}: {name} is not exposed"
