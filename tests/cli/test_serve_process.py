"""The real server: two worker processes, restarts on the embedded database, simulate."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections import defaultdict
from dataclasses import dataclass

import asyncpg
import orjson
import pytest

from receiver.db import plain_url
from receiver.ingest.merge import StoredPatch, fold_run, rank_key
from receiver.ingest.payloads import RUN_FIELDS, parse_payload
from receiver.simulate import SendReport, SimDelivery, generate_traffic, send
from tests.support.builders import SIGNING_SECRET
from tests.support.database import received_bytes, truncate_all
from tests.support.processes import (
    embedded_postgres_running,
    embedded_url,
    postmaster_pid,
    receiver_env,
    run_cli,
    serving,
    stop,
    wait_for,
)

pytestmark = pytest.mark.slow


async def fetch(url: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(plain_url(url))
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


def expected_rows(stored: list[asyncpg.Record]) -> dict[str, dict[str, object]]:
    """What the merge rules predict from the stored deliveries, in the order the server saw."""
    patches: dict[str, list[StoredPatch]] = defaultdict(list)
    for row in stored:
        parsed = parse_payload(orjson.loads(row["body"]))
        for patch in parsed.runs:
            assert patch.run_id is not None
            patches[patch.run_id].append(StoredPatch(patch.fields, row["received_at"], row["id"]))
    return {run_id: fold_run(found).fields for run_id, found in patches.items()}


NODE_COLUMNS = ("run_id", "node_id", "node_type", "status", "failure_code", "duration_ms")
LOG_COLUMNS = ("run_id", "level", "message")


def expected_children(
    stored: list[asyncpg.Record],
) -> tuple[dict[str, dict[str, object]], dict[str, dict[str, object]]]:
    """Node runs and logs by id: each Run object's non-null values, folded in its run rank."""
    ranked = []
    for row in stored:
        parsed = parse_payload(orjson.loads(row["body"]))
        if parsed.kind == "run_object":
            [patch] = parsed.runs
            key = rank_key(StoredPatch(patch.fields, row["received_at"], row["id"]))
            ranked.append((key, patch.run_id, parsed))
    nodes: dict[str, dict[str, object]] = defaultdict(dict)
    logs: dict[str, dict[str, object]] = defaultdict(dict)
    for _, run_id, parsed in sorted(ranked, key=lambda item: item[0]):
        for found, children, columns in (
            (nodes, parsed.node_runs, NODE_COLUMNS),
            (logs, parsed.logs, LOG_COLUMNS),
        ):
            for child in children:
                values = {**child, "run_id": run_id}
                found[child["id"]].update(
                    (name, values[name]) for name in columns if values.get(name) is not None
                )
    return dict(nodes), dict(logs)


@dataclass
class Fired:
    """200 concurrent deliveries for 20 runs against two workers, and what was stored."""

    traffic: list[SimDelivery]
    report: SendReport
    archive: list[asyncpg.Record]
    stored: list[asyncpg.Record]
    runs: list[asyncpg.Record]
    nodes: list[asyncpg.Record]
    logs: list[asyncpg.Record]
    batches: list[asyncpg.Record]


@pytest.fixture(scope="module")
def fired(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Fired:
    asyncio.run(truncate_all(database_url))
    traffic = generate_traffic(count=200, runs=20, seed=11, duplicate_rate=0.1, batch_rate=0.05)
    env = receiver_env(RECEIVER_DATABASE_URL=database_url, RECEIVER_SIGNING_SECRETS=SIGNING_SECRET)
    with serving(env, tmp_path_factory.mktemp("fired"), workers=2) as (base, _):
        report = asyncio.run(
            send(f"{base}/webhooks/runflow", traffic, secret=SIGNING_SECRET, concurrency=200)
        )

    def rows(sql: str) -> list[asyncpg.Record]:
        return asyncio.run(fetch(database_url, sql))

    return Fired(
        traffic=traffic,
        report=report,
        archive=rows("SELECT id, outcome FROM deliveries"),
        stored=[
            {**r, "body": received_bytes(r["body"], r["body_encoding"])}
            for r in rows(
                "SELECT id, received_at, body, body_encoding FROM deliveries"
                " WHERE outcome = 'stored'"
            )
        ],
        runs=rows("SELECT * FROM runs"),
        nodes=rows(f"SELECT id, {', '.join(NODE_COLUMNS)} FROM node_runs"),
        logs=rows(f"SELECT id, {', '.join(LOG_COLUMNS)} FROM run_logs"),
        batches=rows("SELECT id, total, delivery_count FROM batches"),
    )


def test_two_workers_200_concurrent_deliveries_for_20_runs(fired: Fired) -> None:
    traffic, report = fired.traffic, fired.report
    assert len({d.run_id for d in traffic if d.run_id}) == 20
    # The mix the issue asks for: Run objects, stale "running" ones, batches, duplicates.
    kinds = {d.kind for d in traffic}
    assert kinds == {"run_envelope", "run_object", "batch_envelope"}
    assert b'"status_code":"running"' in b"".join(d.body for d in traffic)
    assert report.statuses == {200: 200}, report.summary()
    assert report.outcomes["duplicate"] == len(traffic) - len({d.body for d in traffic}) > 0

    # The archive holds exactly one row per 2xx answer.
    assert sorted(r["id"] for r in fired.archive) == sorted(report.delivery_ids)

    expected = expected_rows(fired.stored)
    assert {r["id"] for r in fired.runs} == set(expected)
    for row in fired.runs:
        want = expected[row["id"]]
        got = {name: row[name] for name in RUN_FIELDS if row[name] is not None}
        for name in ("cost_breakdown", "input", "output", "metadata"):
            if name in got and isinstance(got[name], str):
                got[name] = orjson.loads(got[name])
        assert got == want, row["id"]
        assert row["delivery_count"] == sum(
            1
            for s in fired.stored
            for p in parse_payload(orjson.loads(s["body"])).runs
            if p.run_id == row["id"]
        )


def test_two_workers_batches_are_stored_once_each(fired: Fired) -> None:
    sent = {
        d.batch_id: len(orjson.loads(d.body)["output"]["items"])
        for d in fired.traffic
        if d.batch_id
    }
    assert sent, "the traffic should carry batch callbacks"
    assert {r["id"]: r["total"] for r in fired.batches} == sent
    assert all(r["delivery_count"] == 1 for r in fired.batches)


def test_two_workers_node_runs_and_logs_follow_the_winning_run_object(fired: Fired) -> None:
    """A stale ``running`` Run object that lands after a terminal one must not win."""
    nodes, logs = expected_children(fired.stored)
    assert nodes and logs
    got_nodes = {
        r["id"]: {k: v for k, v in r.items() if k != "id" and v is not None} for r in fired.nodes
    }
    got_logs = {
        r["id"]: {k: v for k, v in r.items() if k != "id" and v is not None} for r in fired.logs
    }
    assert got_nodes == nodes
    assert got_logs == logs


def test_acknowledged_deliveries_survive_restarts_of_server_and_embedded_database(tmp_path):
    data_dir = tmp_path / "data"
    env = receiver_env(RECEIVER_DATA_DIR=str(data_dir), RECEIVER_SIGNING_SECRETS=SIGNING_SECRET)
    acknowledged: list[int] = []
    for round_no, how in enumerate(["graceful", "crash"]):
        traffic = generate_traffic(count=60, seed=100 + round_no, prefix=f"r{round_no}")
        with serving(env, tmp_path, workers=2) as (base, process):
            report = asyncio.run(
                send(f"{base}/webhooks/runflow", traffic, secret=SIGNING_SECRET, concurrency=16)
            )
            assert report.acknowledged == report.sent == 60
            acknowledged += report.delivery_ids
            if how == "crash":
                # No shutdown at all: kill the receiver and the database server outright.
                database_pid = postmaster_pid(data_dir)
                stop(process, sig=signal.SIGKILL)
                os.kill(database_pid, signal.SIGKILL)

    with serving(env, tmp_path, workers=1):
        url = embedded_url(data_dir)
        kept = asyncio.run(fetch(url, "SELECT id FROM deliveries"))
        runs = asyncio.run(fetch(url, "SELECT id FROM runs"))
    # The last serve stops the server it found, although the crashed one never let go of it.
    assert wait_for(lambda: not embedded_postgres_running(data_dir), seconds=30)
    assert sorted(r["id"] for r in kept) == sorted(acknowledged)
    sent_runs = {
        d.run_id
        for seed in (100, 101)
        for d in generate_traffic(count=60, seed=seed, prefix=f"r{seed - 100}")
        if d.run_id
    }
    assert sent_runs <= {r["id"] for r in runs}


def test_simulate_against_serve_on_a_fresh_data_directory_stores_everything(tmp_path):
    data_dir = tmp_path / "fresh"
    env = receiver_env(RECEIVER_DATA_DIR=str(data_dir))
    with serving(env, tmp_path, workers=2) as (base, _):
        # No secret configured anywhere: serve generated one; simulate finds it in the data dir.
        assert (data_dir / "signing_secret").stat().st_mode & 0o777 == 0o600
        out = run_cli(
            "simulate",
            "--url",
            f"{base}/webhooks/runflow",
            "--count",
            "300",
            "--concurrency",
            "24",
            env=env,
            cwd=tmp_path,
        )
        counts = dict(re.findall(r"(sent|acknowledged|rejected|errors) (\d+)", out))
        assert counts == {"sent": "300", "acknowledged": "300", "rejected": "0", "errors": "0"}
        kept = asyncio.run(fetch(embedded_url(data_dir), "SELECT outcome FROM deliveries"))
    assert len(kept) == 300
    assert {r["outcome"] for r in kept} <= {"stored", "duplicate"}
