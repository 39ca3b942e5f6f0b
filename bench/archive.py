"""The archive at size: insert rate, query latency and a day's prune, by partitioned archive size.

    python bench/archive.py [--sizes 1000000,10000000,100000000] [--days 30] [--body-bytes 300]
                            [--repeat 7] [--min-free-gib 15] [--database-url URL]

A fresh database migrated to head, with one daily partition for each of the last ``--days``
whole UTC days and today. Rows are generated inside PostgreSQL (no HTTP, no client-side
rows), spread evenly in time from the oldest day's midnight to a few minutes ago, ids
increasing with ``received_at``, ``DELIVERIES_PER_RUN`` consecutive deliveries per run id.
Each partition is loaded on its own: detached, its indexes dropped, ``INSERT ... SELECT
generate_series`` into the bare table, attached again (which builds the parent's indexes on
it in one sort each). That was measured the fastest way here (docs/scale-out.md): a COPY from
the client is bound by generating rows in Python, and inserting into indexed partitions
maintains four B-trees row by row. Freshly built indexes are more compact than ones grown by
inserts, so the sizes printed are a lower bound (the docs give the ratio).

The archive grows to each size in ``--sizes`` in turn. At each size: the write path's INSERT
(the receiver's own statement, one transaction per delivery, into today's partition; the
median of three rounds) and the archive's reads (a run's deliveries by run id, the newest
/deliveries page, the newest rejected page, one delivery by id; each the median of
``--repeat``), as ratios against the same figures on an empty twin of the archive (same
partitions and indexes) measured at the same moment, so the machine's load, printed beside
them, cancels out. Once, at the first size, the same reads on the same rows laid out as one
monthly partition instead of daily ones (the granularity comparison in docs/scale-out.md).
At the end, a day's
prune through the receiver's own ``receiver.retention.prune`` against the baseline it replaces:
a row ``DELETE`` of the next whole day and the ``VACUUM`` that must follow it.

Bodies are ``--body-bytes`` of filler: the figures are about row counts and indexes, and a real
archive's table size scales with the body sizes on top. The embedded server's data directory is
a temporary directory, removed with the server stopped at the end, on failure or on Ctrl-C /
SIGTERM alike; loading stops (and cleans up) when the disk's free space falls below
``--min-free-gib``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from receiver.db import create_engine, embedded_server, plain_url  # noqa: E402
from receiver.ingest.store import _INSERT_DELIVERY  # noqa: E402
from receiver.migrations import upgrade  # noqa: E402
from receiver.retention import Partition, daily_partitions, partition_name, prune  # noqa: E402
from receiver.settings import Settings  # noqa: E402

DELIVERIES_PER_RUN = 5  # consecutive ids share a run id: a run hears of itself a few times
FIRST_ID = 10**9
GENERATED = (
    "id, received_at, headers, content_type, body, body_sha256, body_size, signature, outcome,"
    " kind, run_id"
)
# $1 first id, $2 the partition's first instant, $3 its span in microseconds, $4 rows,
# $5 body bytes: rows evenly spaced over [$2, $2 + $3), always inside the partition's bounds.
GENERATE = f"""
SELECT $1::bigint + k, $2::timestamptz + (k * $3::bigint / $4) * interval '1 microsecond',
    '{{}}'::jsonb, 'application/json', convert_to(repeat('x', $5), 'UTF8'),
    sha256(int8send($1::bigint + k)), $5, 'valid',
    CASE WHEN ($1::bigint + k) % 50 = 0 THEN 'rejected'
         WHEN ($1::bigint + k) % 7 = 0 THEN 'duplicate' ELSE 'stored' END,
    'envelope', 'run_' || (($1::bigint + k) / {DELIVERIES_PER_RUN})
FROM generate_series(0::bigint, $4::bigint - 1) AS k
"""
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


# The baseline: the same partitioned table, indexes and days, kept (nearly) empty, measured
# beside the archive at every size.
TWIN = "deliveries_twin"
ROUNDS = 3


class OutOfDisk(RuntimeError):
    """Free space fell below --min-free-gib: the run stops before it fills the disk."""


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


def window_days(today: date, days: int) -> list[Partition]:
    """The bench's partitions: ``days`` whole days back, and today, oldest first."""
    return [
        Partition(partition_name(today - timedelta(days=n)), today - timedelta(days=n))
        for n in range(days, -1, -1)
    ]


def spread(
    parts: list[Partition], start: datetime, end: datetime, count: int
) -> list[tuple[Partition, datetime, int, int]]:
    """``count`` rows spread evenly over [start, end): per partition, its first instant, its
    span in microseconds and its share of the rows (the shares add up to ``count``)."""
    span = _micros(end - start)
    out = []
    taken = 0
    for part in parts:
        lo, hi = max(part.start, start), min(part.end, end)
        if hi <= lo:
            continue
        # Rows k with start + k * span / count in [lo, hi): exact in integers.
        upto = -(-_micros(hi - start) * count // span)
        out.append((part, lo, _micros(hi - lo), upto - taken))
        taken = upto
    return out


def _micros(delta: timedelta) -> int:
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


async def load_partition(
    conn: Any, part: Partition, *, first_id: int, at: datetime, span: int, rows: int, body: int
) -> None:
    """``rows`` more rows into one daily partition, its indexes built again after."""
    await conn.execute(f"ALTER TABLE deliveries DETACH PARTITION {part.name}")
    for row in await conn.fetch(
        "SELECT conname FROM pg_constraint WHERE conrelid = $1::regclass AND contype IN ('p', 'u')",
        part.name,
    ):
        await conn.execute(f'ALTER TABLE {part.name} DROP CONSTRAINT "{row["conname"]}"')
    for row in await conn.fetch(
        "SELECT indexrelid::regclass::text AS name FROM pg_index WHERE indrelid = $1::regclass",
        part.name,
    ):
        await conn.execute(f"DROP INDEX {row['name']}")
    await conn.execute(
        f"INSERT INTO {part.name} ({GENERATED}) {GENERATE}", first_id, at, span, rows, body
    )
    # Attaching builds every index of the parent on the partition; the bounds are checked by
    # one scan of the rows just written.
    await conn.execute(
        f"ALTER TABLE deliveries ATTACH PARTITION {part.name}"
        f" FOR VALUES FROM ('{part.start.isoformat()}') TO ('{part.end.isoformat()}')"
    )


async def fill(
    conn: Any,
    parts: list[Partition],
    *,
    have: int,
    count: int,
    body: int,
    free_gib: Callable[[], float | None],
    min_free_gib: float,
) -> None:
    """``count`` more rows over the bench's window (ids from ``FIRST_ID + have``)."""
    start = parts[0].start
    end = datetime.now(UTC) - timedelta(minutes=5)
    first_id = FIRST_ID + have
    await conn.execute("SET maintenance_work_mem = '512MB'")
    for part, at, span, rows in spread(parts, start, end, count):
        free = free_gib()
        if free is not None and free < min_free_gib:
            raise OutOfDisk(f"{free:.1f} GiB free, below --min-free-gib {min_free_gib}")
        if rows:
            await load_partition(
                conn, part, first_id=first_id, at=at, span=span, rows=rows, body=body
            )
        first_id += rows
    await conn.execute("ANALYZE deliveries")
    await conn.execute(f"SELECT setval('deliveries_id_seq', {first_id + 10})")


async def insert_rate(conn: Any, table: str, count: int, body_bytes: int) -> float:
    """Deliveries per second through the write path's INSERT, one transaction each."""
    sql = _INSERT_DELIVERY.replace("INSERT INTO deliveries", f"INSERT INTO {table}")
    body = b"x" * body_bytes
    began = time.perf_counter()
    for n in range(count):
        async with conn.transaction():
            await conn.fetchval(
                sql,
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
                None,  # body_encoding: the filler is kept as it is
            )
    return count / (time.perf_counter() - began)


async def insert_rates(conn: Any, count: int, body_bytes: int) -> tuple[float, float]:
    """The archive's insert rate and the empty twin's, in alternating rounds: the same moment
    of a shared machine for both, so their ratio is about the archive, not the load."""
    archive, twin = [], []
    for _ in range(ROUNDS):
        twin.append(await insert_rate(conn, TWIN, count // ROUNDS, body_bytes))
        archive.append(await insert_rate(conn, "deliveries", count // ROUNDS, body_bytes))
    # Both planned with statistics (the archive's other days were analyzed when loaded).
    await conn.execute(f"ANALYZE {TWIN}, {partition_name(datetime.now(UTC).date())}")
    return statistics.median(archive), statistics.median(twin)


async def read_latencies(
    conn: Any, repeat: int, tables: dict[str, int]
) -> dict[str, dict[str, float]]:
    """Median ms of each read on each table (name: its generated rows), the tables taking
    turns query by query so that each sees the same moment of the machine; the ids and runs
    asked for are spread over the whole table."""
    out: dict[str, dict[str, float]] = {table: {} for table in tables}
    for name, (sql, arg) in READS.items():

        def value(n: int, rows: int, arg: str | None = arg) -> list[Any]:
            delivery = FIRST_ID + (n * 104_729 * 7_919) % max(rows, 1)
            if arg == "run":
                return [f"run_{delivery // DELIVERIES_PER_RUN}"]
            return [delivery] if arg else []

        times: dict[str, list[float]] = {table: [] for table in tables}
        for n in range(-1, repeat):  # round -1 is untimed: catalog entries load on first use
            for table, rows in tables.items():
                query = sql.replace("FROM deliveries", f"FROM {table}")
                args = value(n, rows)
                began = time.perf_counter()
                await conn.fetch(query, *args)
                if n >= 0:
                    times[table].append(time.perf_counter() - began)
        for table in tables:
            out[table][name] = statistics.median(times[table]) * 1000
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
    await conn.execute("INSERT INTO deliveries_monthly SELECT * FROM deliveries")
    await conn.execute("ALTER TABLE deliveries_monthly ADD PRIMARY KEY (id, received_at)")
    for definition in (
        "(run_id, received_at)",
        "(outcome, received_at DESC, id DESC)",
        "(received_at DESC, id DESC)",
    ):
        await conn.execute(f"CREATE INDEX ON deliveries_monthly {definition}")
    await conn.execute("ANALYZE deliveries_monthly")


async def archive_gib(conn: Any) -> float:
    total: int = await conn.fetchval(
        "SELECT sum(pg_total_relation_size(inhrelid))::bigint FROM pg_inherits"
        " WHERE inhparent = 'deliveries'::regclass"
    )
    return total / 2**30


async def day_prune(url: str, conn: Any, parts: list[Partition], days: int) -> None:
    """The receiver's prune dropping the oldest day, against a row DELETE of the next one."""
    oldest, following = parts[0], parts[1]
    rows = await conn.fetchval(f"SELECT count(*) FROM {oldest.name}")
    size = await conn.fetchval("SELECT pg_total_relation_size($1::regclass)", oldest.name)
    # Retention of days - 1 puts the cutoff at the oldest day's end: exactly that day goes.
    settings = Settings(database_url=url, retention_days=days - 1)
    engine = create_engine(url, pool_size=1)
    try:
        began = time.perf_counter()
        report = await prune(engine, settings)
        prune_ms = (time.perf_counter() - began) * 1000
    finally:
        await engine.dispose()
    dropped = [name for name, _ in report.partitions]
    assert dropped == [oldest.name], dropped
    print(
        f"\na day's prune (receiver.retention.prune; {oldest.name}, {rows:,} rows,"
        f" {size / 2**30:.2f} GiB): {prune_ms:.1f} ms, {load()}"
    )

    rows = await conn.fetchval(f"SELECT count(*) FROM {following.name}")
    began = time.perf_counter()
    status = await conn.execute(
        "DELETE FROM deliveries WHERE received_at >= $1 AND received_at < $2",
        following.start,
        following.end,
    )
    delete_s = time.perf_counter() - began
    began = time.perf_counter()
    await conn.execute(f"VACUUM {following.name}")
    vacuum_s = time.perf_counter() - began
    deleted = int(status.split()[-1])
    ratio = (delete_s + vacuum_s) * 1000 / prune_ms
    print(
        f"baseline: row DELETE of the next day ({following.name}, {deleted:,} of {rows:,} rows)"
        f" {delete_s:.2f} s ({delete_s / max(deleted, 1) * 1e6:.2f} us/row), then VACUUM"
        f" {vacuum_s:.2f} s; (delete + vacuum) / prune = {ratio:.0f} x, {load()}"
    )


async def make_twin(conn: Any) -> None:
    """The archive's twin: the same columns, indexes and partitions (the days ahead that the
    migration made and the default one included), and no rows."""
    await conn.execute(
        f"CREATE TABLE {TWIN} (LIKE deliveries INCLUDING DEFAULTS INCLUDING INDEXES)"
        " PARTITION BY RANGE (received_at)"
    )
    for part in await daily_partitions(conn):
        await conn.execute(
            f"CREATE TABLE {TWIN}_{part.day:%Y%m%d} PARTITION OF {TWIN}"
            f" FOR VALUES FROM ('{part.start.isoformat()}') TO ('{part.end.isoformat()}')"
        )
    await conn.execute(f"CREATE TABLE {TWIN}_default PARTITION OF {TWIN} DEFAULT")


async def measure(conn: Any, rows: int, inserts: int, body_bytes: int, repeat: int) -> None:
    """Inserts and reads on the archive of ``rows`` rows against the empty twin, now."""
    rate, twin_rate = await insert_rates(conn, inserts, body_bytes)
    print(
        f"  insert {rate:.0f}/s, empty twin {twin_rate:.0f}/s: {rate / twin_rate:.2f} x, {load()}"
    )
    both = await read_latencies(conn, repeat, {"deliveries": rows, TWIN: 1})
    reads, twin = both["deliveries"], both[TWIN]
    for name, ms in reads.items():
        print(f"  {name}: {ms:.2f} ms, empty twin {twin[name]:.2f} ms: {ms / twin[name]:.1f} x")
    print(f"  ({load()})")


async def bench(
    url: str,
    sizes: list[int],
    days: int,
    body_bytes: int,
    repeat: int,
    free_gib: Callable[[], float | None],
    min_free_gib: float,
) -> None:
    conn = await asyncpg.connect(plain_url(url), command_timeout=None)
    try:
        parts = window_days(datetime.now(UTC).date(), days)
        for part in parts:
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {part.name} PARTITION OF deliveries"
                f" FOR VALUES FROM ('{part.start.isoformat()}') TO ('{part.end.isoformat()}')"
            )
        await make_twin(conn)
        inserts = max(300, repeat * 100)
        count = await conn.fetchval(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'deliveries'::regclass"
        )
        print(
            f"\nempty archive ({count} partitions: {len(parts)} days of data to come, the"
            f" days ahead, the default), {load()}"
        )
        await measure(conn, 1, inserts, body_bytes, repeat)
        have = 0
        for size in sizes:
            began = time.perf_counter()
            await fill(
                conn,
                parts,
                have=have,
                count=size - have,
                body=body_bytes,
                free_gib=free_gib,
                min_free_gib=min_free_gib,
            )
            loaded = time.perf_counter() - began
            print(
                f"\n{size:,} rows over {days} days and today: {size - have:,} generated in"
                f" {loaded:.0f} s ({(size - have) / loaded:,.0f} rows/s), {load()}"
            )
            have = size
            gib = await archive_gib(conn)
            database = await conn.fetchval("SELECT pg_database_size(current_database())")
            free = free_gib()
            print(
                f"  {gib:.2f} GiB with indexes (database {database / 2**30:.2f} GiB"
                + (f", {free:.1f} GiB free on disk)" if free is not None else ")")
            )
            await measure(conn, size, inserts, body_bytes, repeat)
            if size == sizes[0]:
                await monthly_copy(conn)
                both = await read_latencies(
                    conn, repeat, {"deliveries": size, "deliveries_monthly": size}
                )
                daily, monthly = both["deliveries"], both["deliveries_monthly"]
                print("  the same rows in one monthly partition instead:")
                for name, ms in monthly.items():
                    print(
                        f"    {name}: {ms:.2f} ms, daily {daily[name]:.2f} ms:"
                        f" {ms / daily[name]:.2f} x daily"
                    )
                await conn.execute("DROP TABLE deliveries_monthly")
        await day_prune(url, conn, parts, days)
    finally:
        await conn.close()


def _interrupted(signum: int, frame: object) -> None:
    # SIGTERM unwinds like Ctrl-C, so the server stops and its directory goes.
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000000,10000000")
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--body-bytes", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--min-free-gib", type=float, default=15.0)
    parser.add_argument("--database-url", help="a PostgreSQL server to create the database on")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    if args.days < 2:
        parser.error("--days must be at least 2 (a day is dropped, the next one deleted)")
    signal.signal(signal.SIGTERM, _interrupted)
    print("python bench/archive.py " + " ".join(sys.argv[1:]), flush=True)
    began = time.perf_counter()
    if args.database_url:
        run(args, sizes, plain_url(args.database_url), lambda: None)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-archive-") as tmp:

            def free_gib() -> float:
                return shutil.disk_usage(tmp).free / 2**30

            print(f"embedded PostgreSQL under {tmp}: {free_gib():.1f} GiB free on disk")
            # Stopped on leaving the block, before its directory is removed.
            with embedded_server(Path(tmp) / "data") as server:
                run(args, sizes, plain_url(server.get_uri("postgres")), free_gib)
        free = shutil.disk_usage(tempfile.gettempdir()).free / 2**30
        print(f"data directory removed: {free:.1f} GiB free on disk")
    print(f"\ndone in {time.perf_counter() - began:.0f} s")
    return 0


def run(args: Any, sizes: list[int], server: str, free_gib: Callable[[], float | None]) -> None:
    """The bench on a database of its own on ``server``, dropped at the end whatever happens."""
    name = f"bench_{uuid.uuid4().hex[:8]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(server)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    base_url, _, query = server.partition("?")
    url = base_url.rsplit("/", 1)[0] + f"/{name}" + (f"?{query}" if query else "")
    try:
        upgrade(url)
        asyncio.run(
            bench(
                url,
                sizes,
                args.days,
                args.body_bytes,
                args.repeat,
                free_gib,
                args.min_free_gib,
            )
        )
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


if __name__ == "__main__":
    raise SystemExit(main())
