"""The archive at size: insert rate, query latency and a day's prune, by partitioned archive size.

    python bench/archive.py [--sizes 1000000,10000000] [--days 30] [--body-bytes 300]
                            [--repeat 7] [--database-url URL]

A fresh database migrated to head; rows generated inside PostgreSQL with
``INSERT ... SELECT generate_series`` (no HTTP) into ``deliveries`` spread evenly over ``--days``
daily partitions, growing to each size in ``--sizes`` in turn. At each size: the write path's
INSERT (the receiver's own statement, one transaction per delivery, into today's partition),
the archive's reads (a run's deliveries by run id, the newest /deliveries page, the newest
rejected page, one delivery by id), each the median of ``--repeat``, as ratios against the same
figures on the empty archive measured first in the same run; then the time to detach and drop
the oldest day. Once, at the first size, the same reads on the same rows laid out as one
monthly partition instead of daily ones (the granularity comparison in docs/scale-out.md).
Bodies are ``--body-bytes`` of filler: the figures are about row counts and indexes, and a
real archive's table size scales with the body sizes on top.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from receiver.db import plain_url, start_embedded  # noqa: E402
from receiver.ingest.store import _INSERT_DELIVERY  # noqa: E402
from receiver.migrations import upgrade  # noqa: E402
from receiver.retention import partition_name  # noqa: E402

RUNS = 200_000  # distinct run ids the generated rows spread over
READS = {
    "run's deliveries": (
        "SELECT id, received_at, outcome FROM deliveries WHERE run_id = $1"
        " ORDER BY received_at, id",
        "run",
    ),
    "newest /deliveries page": (
        "SELECT id, received_at, outcome FROM deliveries ORDER BY received_at DESC, id DESC"
        " LIMIT 51",
        None,
    ),
    "newest rejected page": (
        "SELECT id, received_at FROM deliveries WHERE outcome = 'rejected'"
        " ORDER BY received_at DESC, id DESC LIMIT 51",
        None,
    ),
    "one delivery by id": ("SELECT id, outcome FROM deliveries WHERE id = $1", "id"),
}


async def fill(conn: Any, *, start: int, count: int, days: int, body_bytes: int) -> None:
    """``count`` more rows over the last ``days`` days (ids from ``start``), in chunks."""
    now = datetime.now(UTC)
    chunk = 500_000
    for offset in range(0, count, chunk):
        n = min(chunk, count - offset)
        await conn.execute(
            "INSERT INTO deliveries (id, received_at, headers, content_type, body, body_sha256,"
            " body_size, signature, outcome, kind, run_id)"
            # A prime stride spreads consecutive ids over the whole window.
            " SELECT g, $2::timestamptz"
            " - (((g * 104729) % ($3::bigint * 86400)) * interval '1 second'),"
            " '{}'::jsonb, 'application/json', convert_to(repeat('x', $4), 'UTF8'),"
            " sha256(int8send(g)), $4, 'valid',"
            " CASE WHEN g % 50 = 0 THEN 'rejected' WHEN g % 7 = 0 THEN 'duplicate'"
            " ELSE 'stored' END, 'envelope', 'run_' || (g % $5)"
            " FROM generate_series($1::bigint, $1::bigint + $6 - 1) AS g",
            start + offset,
            now - timedelta(minutes=5),
            days,
            body_bytes,
            RUNS,
            n,
        )
    await conn.execute("ANALYZE deliveries")
    await conn.execute(f"SELECT setval('deliveries_id_seq', {start + count + 10})")


async def insert_rate(conn: Any, count: int, body_bytes: int) -> float:
    """Deliveries per second through the write path's INSERT, one transaction each."""
    body = b"x" * body_bytes
    began = time.perf_counter()
    for n in range(count):
        async with conn.transaction():
            await conn.fetchval(
                _INSERT_DELIVERY,
                None,
                datetime.now(UTC),
                f"req-{n}",
                "{}",
                "application/json",
                body,
                uuid.uuid4().bytes * 2,
                len(body),
                "valid",
                "stored",
                None,
                None,
                "envelope",
                f"run_new_{n}",
                None,
                None,
                "webhook",
            )
    return count / (time.perf_counter() - began)


async def read_latencies(conn: Any, repeat: int, max_id: int, table: str) -> dict[str, float]:
    out = {}
    for name, (sql, arg) in READS.items():
        sql = sql.replace("FROM deliveries", f"FROM {table}")
        # One untimed round first: the partitions' catalog entries load on first use.
        await conn.fetch(sql, *(["run_0"] if arg == "run" else [1] if arg else []))
        times = []
        for n in range(repeat):
            value = f"run_{(n * 7919) % RUNS}" if arg == "run" else max(1, max_id - n * 997)
            began = time.perf_counter()
            await conn.fetch(sql, *([value] if arg else []))
            times.append(time.perf_counter() - began)
        out[name] = statistics.median(times) * 1000
    return out


async def monthly_copy(conn: Any) -> None:
    """The same rows in one partition per 31 days: the granularity being compared."""
    await conn.execute(
        "CREATE TABLE deliveries_monthly (LIKE deliveries INCLUDING DEFAULTS)"
        " PARTITION BY RANGE (received_at)"
    )
    await conn.execute(
        "CREATE TABLE deliveries_monthly_a PARTITION OF deliveries_monthly"
        " FOR VALUES FROM (MINVALUE) TO (MAXVALUE)"
    )
    await conn.execute("ALTER TABLE deliveries_monthly ADD PRIMARY KEY (id, received_at)")
    for definition in (
        "(run_id, received_at)",
        "(outcome, received_at DESC, id DESC)",
        "(received_at DESC, id DESC)",
    ):
        await conn.execute(f"CREATE INDEX ON deliveries_monthly {definition}")
    await conn.execute("INSERT INTO deliveries_monthly SELECT * FROM deliveries")
    await conn.execute("ANALYZE deliveries_monthly")


async def prune_oldest(conn: Any) -> tuple[str, float, int]:
    oldest = await conn.fetchval(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'deliveries'::regclass AND c.relname LIKE 'deliveries_p%'"
        " ORDER BY c.relname LIMIT 1"
    )
    rows = await conn.fetchval(f"SELECT count(*) FROM {oldest}")
    began = time.perf_counter()
    async with conn.transaction():
        await conn.execute("SET LOCAL lock_timeout = '5s'")
        await conn.execute(f"ALTER TABLE deliveries DETACH PARTITION {oldest}")
        await conn.execute(f"DROP TABLE {oldest}")
    return oldest, (time.perf_counter() - began) * 1000, rows


async def bench(url: str, sizes: list[int], days: int, body_bytes: int, repeat: int) -> None:
    conn = await asyncpg.connect(plain_url(url))
    try:
        today = datetime.now(UTC).date()
        for n in range(days + 1):
            day = today - timedelta(days=n)
            start = datetime(day.year, day.month, day.day, tzinfo=UTC)
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {partition_name(day)} PARTITION OF deliveries"
                f" FOR VALUES FROM ('{start.isoformat()}')"
                f" TO ('{(start + timedelta(days=1)).isoformat()}')"
            )
        inserts = max(200, repeat * 100)
        base_rate = await insert_rate(conn, inserts, body_bytes)
        base_reads = await read_latencies(conn, repeat, 1, "deliveries")
        print(f"empty archive ({days + 1} daily partitions): insert {base_rate:.0f}/s")
        print("  " + ", ".join(f"{k} {v:.2f} ms" for k, v in base_reads.items()))
        have = 0
        for size in sizes:
            began = time.perf_counter()
            await fill(
                conn, start=10**9 + have, count=size - have, days=days, body_bytes=body_bytes
            )
            loaded = time.perf_counter() - began
            have = size
            rate = await insert_rate(conn, inserts, body_bytes)
            reads = await read_latencies(conn, repeat, 10**9 + size - 1, "deliveries")
            total = await conn.fetchval("SELECT pg_total_relation_size('deliveries_default')")
            parts = await conn.fetch(
                "SELECT sum(pg_total_relation_size(inhrelid))::bigint AS b FROM pg_inherits"
                " WHERE inhparent = 'deliveries'::regclass"
            )
            print(
                f"\n{size:,} rows over {days} days (generated in {loaded:.0f} s,"
                f" {(parts[0]['b'] + total) / 2**30:.2f} GiB with indexes):"
            )
            print(f"  insert {rate:.0f}/s = {rate / base_rate:.2f} x empty")
            for name, ms in reads.items():
                print(f"  {name}: {ms:.2f} ms = {ms / base_reads[name]:.1f} x empty")
            if size == sizes[0]:
                await monthly_copy(conn)
                monthly = await read_latencies(conn, repeat, 10**9 + size - 1, "deliveries_monthly")
                print("  the same rows in one monthly partition instead:")
                for name, ms in monthly.items():
                    print(f"    {name}: {ms:.2f} ms = {ms / reads[name]:.2f} x daily")
                await conn.execute("DROP TABLE deliveries_monthly")
        name, ms, rows = await prune_oldest(conn)
        print(f"\nprune of one day ({name}, {rows:,} rows): detach + drop in {ms:.1f} ms")
        sweep_began = time.perf_counter()
        deleted = await conn.fetchval(
            # By key, not ctid: a ctid names a row only within one partition.
            "WITH gone AS (DELETE FROM deliveries WHERE (id, received_at) IN"
            " (SELECT id, received_at FROM deliveries"
            " WHERE received_at < (SELECT min(received_at) FROM deliveries) + interval '1 day'"
            " LIMIT 100000) RETURNING 1) SELECT count(*) FROM gone"
        )
        sweep_ms = (time.perf_counter() - sweep_began) * 1000
        print(
            f"baseline: row DELETE of {deleted:,} rows of the next day took {sweep_ms:.0f} ms"
            f" ({sweep_ms / max(deleted, 1) * 1000:.1f} us/row; drop of a whole day:"
            f" {ms / max(rows, 1) * 1000:.3f} us/row, and leaves no dead rows to vacuum)"
        )
    finally:
        await conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000000,10000000")
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--body-bytes", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--database-url", help="a PostgreSQL server to create the database on")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    with tempfile.TemporaryDirectory(prefix="bench-archive-") as tmp:
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
            asyncio.run(bench(url, sizes, args.days, args.body_bytes, args.repeat))
        finally:
            asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
