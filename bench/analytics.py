"""Analytics and /runs latency at 1,000,000 runs, against naive queries in the same run.

    python bench/analytics.py [--runs 1000000] [--repeat 7] [--explain] [--database-url URL]

Loads synthetic runs over 30 days with COPY (85% succeeded, 10% failed over 12 codes and four
stages, 5% cancelled; 50 models) into a fresh database (an embedded server in a temp dir by
default), serves it with ``runflow-receiver serve`` on 127.0.0.1, and times every analytics
route over HTTP for a 24-hour and a 7-day window, plus /runs pages with single filters.
The naive baseline runs the same questions as plain GROUP BY / ORDER BY queries over a copy of
the table that has no index, in the same database, from the same process. Medians of --repeat.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from receiver.db import plain_url, start_embedded  # noqa: E402
from receiver.migrations import upgrade  # noqa: E402
from tests.support.processes import receiver_env, serving  # noqa: E402

TOKEN = "bench-token"
CODES = [
    ("out_of_memory", "execution"),
    ("model_timeout", "execution"),
    ("nsfw_blocked", "execution"),
    ("cuda_error", "execution"),
    ("invalid_input", "dispatch"),
    ("no_capacity", "dispatch"),
    ("quota_exceeded", "dispatch"),
    ("callback_unreachable", "callback"),
    ("callback_timeout", "callback"),
    ("lost_worker", "reconciliation"),
    ("stale_run", "reconciliation"),
    ("unknown_error", "execution"),
]
MODELS = [f"model-{i:02d}" for i in range(50)]
COLUMNS = (
    "id",
    "org_id",
    "status",
    "target_type",
    "model",
    "model_id",
    "client_ref",
    "source",
    "failure_code",
    "failure_message",
    "failure_stage",
    "duration_ms",
    "cost",
    "created_at",
    "started_at",
    "completed_at",
    "first_received_at",
    "last_received_at",
    "delivery_count",
)


def synthetic_rows(count: int, now: datetime, seed: int = 1):
    rng = random.Random(seed)
    span = 30 * 24 * 3600
    for i in range(count):
        created = now - timedelta(seconds=rng.random() * span)
        roll = rng.random()
        status = "succeeded" if roll < 0.85 else "failed" if roll < 0.95 else "cancelled"
        code, stage = rng.choice(CODES) if status == "failed" else (None, None)
        duration = int(rng.lognormvariate(8.5, 0.9))
        model = MODELS[min(49, int(rng.expovariate(1 / 12)))]
        done = created + timedelta(milliseconds=duration)
        yield (
            f"run_{i:08d}",
            f"org_{i % 7}",
            status,
            rng.choice(["model", "model", "flow", "comfyui"]),
            model,
            f"mdl_{model}",
            f"order-{rng.randrange(10**7)}",
            rng.choice(["api", "api", "playground", "flow-node"]),
            code,
            code.replace("_", " ") if code else None,
            stage,
            duration,
            Decimal(rng.randrange(1, 250000)) / Decimal(1_000_000),
            created,
            created + timedelta(milliseconds=200),
            done,
            done,
            done,
            1,
        )


async def load(url: str, count: int, now: datetime) -> None:
    conn = await asyncpg.connect(plain_url(url))
    try:
        started = time.perf_counter()
        batch: list[tuple] = []
        for row in synthetic_rows(count, now):
            batch.append(row)
            if len(batch) == 50_000:
                await conn.copy_records_to_table("runs", records=batch, columns=COLUMNS)
                batch.clear()
        if batch:
            await conn.copy_records_to_table("runs", records=batch, columns=COLUMNS)
        await conn.execute("CREATE TABLE runs_naive AS SELECT * FROM runs")
        await conn.execute("VACUUM ANALYZE runs")
        await conn.execute("VACUUM ANALYZE runs_naive")
        print(f"loaded {count} runs with COPY in {time.perf_counter() - started:.0f}s", flush=True)
    finally:
        await conn.close()


NAIVE = {
    "failures": [
        "SELECT count(*), count(*) FILTER (WHERE status = 'failed') FROM runs_naive"
        " WHERE created_at >= $1 AND created_at < $2",
        "SELECT failure_code, failure_stage, count(*) FROM runs_naive WHERE status = 'failed'"
        " AND created_at >= $1 AND created_at < $2 GROUP BY 1, 2 ORDER BY 3 DESC",
    ],
    "timeseries": [
        "SELECT date_bin('1 hour', created_at, TIMESTAMPTZ '2000-01-01 00:00:00+00'), count(*),"
        " count(*) FILTER (WHERE status = 'succeeded'), count(*) FILTER (WHERE status = 'failed'),"
        " count(*) FILTER (WHERE status = 'cancelled') FROM runs_naive"
        " WHERE created_at >= $1 AND created_at < $2 GROUP BY 1",
    ],
    "durations": [
        "SELECT model, count(*), percentile_disc(ARRAY[0.5, 0.9, 0.95, 0.99]) WITHIN GROUP"
        " (ORDER BY duration_ms), max(duration_ms) FROM runs_naive WHERE created_at >= $1"
        " AND created_at < $2 AND status IN ('succeeded', 'failed', 'cancelled',"
        " 'partial_succeeded') AND duration_ms IS NOT NULL GROUP BY model",
    ],
    "costs": [
        "SELECT model, count(*), sum(cost) FROM runs_naive WHERE created_at >= $1"
        " AND created_at < $2 GROUP BY model",
    ],
}
ROUTES = {
    "failures": "/analytics/failures",
    "timeseries": "/analytics/timeseries?bucket=hour",
    "durations": "/analytics/durations?group_by=model",
    "costs": "/analytics/costs?group_by=model",
}
RUNS_FILTERS = [
    ("status", "failed"),
    ("failure_code", "out_of_memory"),
    ("failure_stage", "dispatch"),
    ("model", "model-30"),
    ("target_type", "comfyui"),
    ("source", "playground"),
    ("org_id", "org_3"),
    # One filter with two values: read as two index ranges merged in order.
    ("model", "model-45,model-46"),
    ("status", "failed,cancelled"),
]


def q(moment: datetime) -> str:
    return moment.isoformat().replace("+", "%2B")


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


async def time_http(client: httpx.AsyncClient, path: str, repeat: int) -> float:
    await client.get(path)  # warm: connection, prepared statement, cache
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        response = await client.get(path)
        samples.append(time.perf_counter() - started)
        response.raise_for_status()
    return median_ms(samples)


async def time_sql(conn: asyncpg.Connection, sqls: list[str], args: list, repeat: int) -> float:
    for sql in sqls:
        await conn.fetch(sql, *args)
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        for sql in sqls:
            await conn.fetch(sql, *args)
        samples.append(time.perf_counter() - started)
    return median_ms(samples)


async def measure(base: str, url: str, now: datetime, repeat: int, explain: bool) -> None:
    conn = await asyncpg.connect(plain_url(url))
    headers = {"authorization": f"Bearer {TOKEN}"}
    rows = []
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60) as client:
        for label, span in (("24h", timedelta(hours=24)), ("7d", timedelta(days=7))):
            after, before = now - span, now
            for name, path in ROUTES.items():
                sep = "&" if "?" in path else "?"
                ours = await time_http(
                    client,
                    f"{path}{sep}created_after={q(after)}&created_before={q(before)}",
                    repeat,
                )
                naive = await time_sql(conn, NAIVE[name], [after, before], repeat)
                rows.append((f"{name} {label}", ours, naive))
        for param, value in RUNS_FILTERS:
            first = await time_http(client, f"/runs?{param}={value}", repeat)
            cursor = None
            for _ in range(5):
                suffix = f"&cursor={cursor}" if cursor else ""
                cursor = (await client.get(f"/runs?{param}={value}{suffix}")).json()["next_cursor"]
            later = await time_http(client, f"/runs?{param}={value}&cursor={cursor}", repeat)
            naive_sql = (
                f"SELECT * FROM runs_naive WHERE {param} = ANY($1::text[])"
                " ORDER BY created_at DESC, id DESC LIMIT 51 OFFSET {offset}"
            )
            values = [value.split(",")]
            naive = await time_sql(conn, [naive_sql.format(offset=0)], values, repeat)
            naive_later = await time_sql(conn, [naive_sql.format(offset=250)], values, repeat)
            rows.append((f"/runs {param}={value} first page", first, naive))
            rows.append((f"/runs {param}={value} page 6", later, naive_later))
    print(f"\n{'query':52} {'receiver ms':>12} {'naive ms':>10} {'naive/receiver':>15}")
    for name, ours, naive in rows:
        print(f"{name:52} {ours:12.1f} {naive:10.1f} {naive / ours:15.1f}")
    await compare_durations(conn, now, repeat)
    if explain:
        await print_plans(conn, now)
    await conn.close()


DURATIONS_IN_SQL = (
    "SELECT model, count(*), percentile_disc(ARRAY[0.5,0.9,0.95,0.99]::float8[]) WITHIN GROUP"
    " (ORDER BY duration_ms), max(duration_ms) FROM runs WHERE sort_at >= $1 AND sort_at < $2"
    " AND status = ANY($3) AND duration_ms IS NOT NULL GROUP BY model"
)
DURATIONS_AS_ARRAYS = (
    "SELECT model, array_agg(duration_ms) AS durations FROM runs WHERE sort_at >= $1"
    " AND sort_at < $2 AND status = ANY($3) AND duration_ms IS NOT NULL GROUP BY model"
)


async def compare_durations(conn: asyncpg.Connection, now: datetime, repeat: int) -> None:
    """Percentiles by percentile_disc in PostgreSQL (the receiver since the query-bounds
    change) against the earlier way: every duration handed over by array_agg, sorted in Python.
    Same table, indexes and connection; both give the same nearest-rank values."""
    import math
    import tracemalloc

    terminal = ["succeeded", "failed", "cancelled", "partial_succeeded"]
    await conn.execute("SET work_mem = '64MB'")  # as receiver.analytics sets for durations

    async def in_python(after: datetime, before: datetime) -> dict[str, list[int]]:
        out = {}
        for row in await conn.fetch(DURATIONS_AS_ARRAYS, after, before, terminal):
            ordered = sorted(row["durations"])
            ranks = [
                ordered[max(0, math.ceil(f * len(ordered)) - 1)] for f in (0.5, 0.9, 0.95, 0.99)
            ]
            out[row["model"]] = [len(ordered), *ranks, ordered[-1]]
        return out

    async def in_sql(after: datetime, before: datetime) -> dict[str, list[int]]:
        rows = await conn.fetch(DURATIONS_IN_SQL, after, before, terminal)
        return {r["model"]: [r["count"], *r["percentile_disc"], r["max"]] for r in rows}

    print(
        f"\n{'durations per model':30} {'sql ms':>9} {'python ms':>10} {'python/sql':>11}"
        f" {'sql peak MiB':>13} {'python peak MiB':>16}"
    )
    for label, span in (("7d", timedelta(days=7)), ("30d", timedelta(days=30))):
        after, before = now - span, now
        assert await in_sql(after, before) == await in_python(after, before), label
        timings, peaks = {}, {}
        for name, fn in (("sql", in_sql), ("python", in_python)):
            samples = []
            for _ in range(repeat):
                started = time.perf_counter()
                await fn(after, before)
                samples.append(time.perf_counter() - started)
            tracemalloc.start()
            await fn(after, before)
            peaks[name] = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
            timings[name] = median_ms(samples)
        print(
            f"{label:30} {timings['sql']:9.1f} {timings['python']:10.1f}"
            f" {timings['python'] / timings['sql']:11.2f} {peaks['sql']:13.1f}"
            f" {peaks['python']:16.1f}"
        )
    await conn.execute("RESET work_mem")


async def print_plans(conn: asyncpg.Connection, now: datetime) -> None:
    from receiver import analytics as a
    from receiver.queryparams import RunFilters

    after, before = now - timedelta(days=7), now
    plans = {
        "failures 7d (breakdown)": (
            "SELECT failure_code, failure_stage, count(*) FROM runs WHERE sort_at >= $1"
            " AND sort_at < $2 AND status = 'failed' GROUP BY 1, 2",
            [after, before],
        ),
        "failures 7d (window count; the route reads it as two halves at once)": (
            "SELECT count(*) FROM runs WHERE sort_at >= $1 AND sort_at < $2",
            [after, before],
        ),
        "timeseries 7d (the route reads it as two halves at once)": (
            "SELECT date_bin('1 hour', sort_at, TIMESTAMPTZ '2000-01-01 00:00:00+00'), count(*),"
            " count(*) FILTER (WHERE status = 'succeeded'), count(*) FILTER (WHERE status ="
            " 'failed'), count(*) FILTER (WHERE status = 'cancelled'), count(*) FILTER (WHERE"
            " status = 'partial_succeeded') FROM runs WHERE sort_at >= $1 AND sort_at < $2"
            " GROUP BY 1",
            [after, before],
        ),
        "durations 7d (percentile_disc per model, in one statement)": (
            DURATIONS_IN_SQL,
            [after, before, ["succeeded", "failed", "cancelled", "partial_succeeded"]],
        ),
        "costs 7d by model (the route reads it as two halves at once)": (
            "SELECT model, count(*), COALESCE(sum(cost), 0) FROM runs WHERE sort_at >= $1"
            " AND sort_at < $2 GROUP BY model",
            [after, before],
        ),
        "/runs model=model-30": (
            "SELECT * FROM runs WHERE model = $1 ORDER BY sort_at DESC, id DESC LIMIT 51",
            ["model-30"],
        ),
        "/runs model=model-45,model-46 (one index range per value, merged)": (
            "SELECT * FROM ((SELECT * FROM runs WHERE model = $1 ORDER BY sort_at DESC, id DESC"
            " LIMIT 51) UNION ALL (SELECT * FROM runs WHERE model = $2 ORDER BY sort_at DESC,"
            " id DESC LIMIT 51)) AS page ORDER BY sort_at DESC, id DESC LIMIT 51",
            ["model-45", "model-46"],
        ),
    }
    del a, RunFilters
    await conn.execute("SET work_mem = '64MB'")  # as receiver.analytics sets for durations
    for name, (sql, args) in plans.items():
        print(f"\n-- EXPLAIN ANALYZE {name}")
        for row in await conn.fetch("EXPLAIN (ANALYZE, BUFFERS OFF) " + sql, *args):
            print(row[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--explain", action="store_true", help="print EXPLAIN ANALYZE plans")
    parser.add_argument("--database-url", help="a PostgreSQL server to create the database on")
    args = parser.parse_args()
    now = datetime.now(UTC).replace(microsecond=0)
    with tempfile.TemporaryDirectory(prefix="bench-analytics-") as tmp:
        server = args.database_url or start_embedded(Path(tmp) / "data")
        name = f"bench_{uuid.uuid4().hex[:8]}"

        async def admin(sql: str) -> None:
            conn = await asyncpg.connect(plain_url(server))
            await conn.execute(sql)
            await conn.close()

        asyncio.run(admin(f'CREATE DATABASE "{name}"'))
        base_url, _, query = plain_url(server).partition("?")
        url = base_url.rsplit("/", 1)[0] + f"/{name}" + (f"?{query}" if query else "")
        try:
            upgrade(url)
            asyncio.run(load(url, args.runs, now))
            env = receiver_env(
                RECEIVER_DATABASE_URL=url,
                RECEIVER_API_TOKENS=TOKEN,
                RECEIVER_SIGNING_SECRETS="whsec_bench",
            )
            with serving(env, Path(tmp), workers=1) as (base, _):
                asyncio.run(measure(base, url, now, args.repeat, args.explain))
        finally:
            asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
