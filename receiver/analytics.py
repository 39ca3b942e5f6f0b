"""The analytics queries: failure breakdowns, time series, duration percentiles and costs.

All of them read the runs table within ``[created_after, created_before)`` on ``sort_at``
(created_at, or first received when Runflow never said), through the indexes of revision 0002.
Percentiles are exact: the nearest-rank value actually observed (as ``percentile_disc``).
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from decimal import MAX_PREC, Decimal, localcontext
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from receiver.errors import InvalidQuery
from receiver.queries import read_connection, run_filters
from receiver.queryparams import DIMENSIONS, RunFilters
from receiver.vocabulary import TERMINAL_STATUSES

BUCKETS = {"minute": timedelta(minutes=1), "hour": timedelta(hours=1), "day": timedelta(days=1)}
BUCKET_SQL = {"minute": "1 minute", "hour": "1 hour", "day": "1 day"}
MAX_BUCKETS = 1500
# Points of a grouped time series (buckets x groups) one answer may hold.
MAX_POINTS = 50_000
PERCENTILES = (("p50_ms", 0.5), ("p90_ms", 0.9), ("p95_ms", 0.95), ("p99_ms", 0.99))


# Windows longer than this are read as two halves on two connections at once: PostgreSQL's own
# parallel plans do not help these aggregates on a small machine, two sessions do.
SPLIT_ABOVE = timedelta(days=1)


def window_parts(filters: RunFilters) -> list[RunFilters]:
    """The window as one part, or two adjacent halves when it is long."""
    after, before = filters.created_after, filters.created_before
    if after is None or before is None or before - after <= SPLIT_ABOVE:
        return [filters]
    middle = after + (before - after) / 2
    return [
        RunFilters(dict(filters.values), after, middle),
        RunFilters(dict(filters.values), middle, before),
    ]


async def _fetch_parts(
    engine: AsyncEngine, filters: RunFilters, sql: str, **kwargs: Any
) -> list[Any]:
    """Rows of ``sql`` (with ``{where}``) over each part of the window, concatenated."""
    parts = []
    for part in window_parts(filters):
        where = run_filters(part)
        parts.append(_fetch(engine, sql.replace("{where}", where.sql()), where.args, **kwargs))
    return [row for rows in await asyncio.gather(*parts) for row in rows]


def _select_dims(group_by: list[str]) -> str:
    return "".join(f"{DIMENSIONS[name]} AS {name}, " for name in group_by)


def _group_clause(group_by: list[str]) -> str:
    return ("GROUP BY " + ", ".join(DIMENSIONS[n] for n in group_by)) if group_by else ""


async def _fetch(
    engine: AsyncEngine, sql: str, args: list[Any], *, work_mem: str | None = None
) -> list[Any]:
    async with read_connection(engine) as conn:
        if work_mem is not None:
            # Percentiles sort the whole window; the default 4MB spills 7 days to disk.
            await conn.execute(f"SET LOCAL work_mem = '{work_mem}'")
        return list(await conn.fetch(sql, *args))


async def failures(engine: AsyncEngine, filters: RunFilters, group_by: list[str]) -> dict[str, Any]:
    failed_where = run_filters(filters)
    failed_where.add("status = {}", "failed")
    # The window count reads every run, the breakdown only the failed ones (from the status
    # index); they run on separate connections at once. failed_runs is the breakdown's sum:
    # every failed run falls in exactly one group, NULL values included.
    totals, rows = await asyncio.gather(
        _fetch_parts(engine, filters, "SELECT count(*) AS total FROM runs WHERE {where}"),
        _fetch(
            engine,
            f"SELECT {_select_dims(group_by)}count(*) AS count FROM runs"
            f" WHERE {failed_where.sql()} {_group_clause(group_by)}"
            " ORDER BY count DESC" + "".join(f", {n} NULLS LAST" for n in group_by),
            failed_where.args,
        ),
    )
    failed = sum(int(row["count"]) for row in rows)
    groups = []
    for row in rows:
        if not row["count"]:  # no GROUP BY over no rows still yields one row
            continue
        group = {name: row[name] for name in group_by}
        group["count"] = int(row["count"])
        group["share"] = row["count"] / failed
        groups.append(group)
    total = sum(int(row["total"]) for row in totals)
    return {"total_runs": total, "failed_runs": failed, "groups": groups}


def bucket_starts(bucket: str, after: datetime, before: datetime) -> list[datetime]:
    """Every bucket start from the one holding ``after`` up to before ``before``."""
    step = BUCKETS[bucket]
    if bucket == "day":
        start = after.replace(hour=0, minute=0, second=0, microsecond=0)
    elif bucket == "hour":
        start = after.replace(minute=0, second=0, microsecond=0)
    else:
        start = after.replace(second=0, microsecond=0)
    count = -(-(before - start) // step)  # ceiling division of timedeltas
    if count > MAX_BUCKETS:
        raise InvalidQuery(
            f"the window holds {count} {bucket} buckets; at most {MAX_BUCKETS}: "
            "use a larger bucket or a shorter window",
            [{"param": "bucket", "value": bucket}],
        )
    return [start + i * step for i in range(count)]


async def timeseries(
    engine: AsyncEngine, filters: RunFilters, bucket: str, group_by: list[str]
) -> dict[str, Any]:
    assert filters.created_after is not None and filters.created_before is not None
    starts = bucket_starts(bucket, filters.created_after, filters.created_before)
    counts = ", ".join(
        f"count(*) FILTER (WHERE status = '{status}') AS {status}" for status in TERMINAL_STATUSES
    )
    rows = await _fetch_parts(
        engine,
        filters,
        # date_bin, unlike date_trunc(.., 'UTC'), needs no time zone work per row: twice as fast.
        f"SELECT date_bin('{BUCKET_SQL[bucket]}', sort_at, TIMESTAMPTZ '2000-01-01 00:00:00+00')"
        f" AS ts, {_select_dims(group_by)}"
        f"count(*) AS total, {counts} FROM runs WHERE {{where}}"
        f" GROUP BY 1{''.join(f', {DIMENSIONS[n]}' for n in group_by)}"
        # No more rows than an answer may have points, plus one to notice more.
        f" LIMIT {MAX_POINTS + 1}",
    )
    series: dict[tuple[Any, ...], dict[datetime, dict[str, int]]] = {}
    for row in rows:
        key = tuple(row[name] for name in group_by)
        # A bucket cut by the split between window halves arrives twice: add them up.
        sums = series.setdefault(key, {}).setdefault(row["ts"], {})
        for name in ("total", *TERMINAL_STATUSES):
            sums[name] = sums.get(name, 0) + int(row[name])
    if not group_by:
        series.setdefault((), {})
    if len(series) * len(starts) > MAX_POINTS or len(rows) > MAX_POINTS:
        raise InvalidQuery(
            f"the answer would hold more than {MAX_POINTS} points ({len(starts)} buckets"
            f" x {len(series)}{'+' if len(rows) > MAX_POINTS else ''} groups): use a larger"
            " bucket, a shorter window or a filter",
            [{"param": "group_by"}],
        )
    out = []
    for key in sorted(series, key=lambda k: tuple((v is None, v or "") for v in k)):
        points = []
        for ts in starts:
            found = series[key].get(ts, {})
            point: dict[str, Any] = {"ts": ts, "total": found.get("total", 0)}
            for status in TERMINAL_STATUSES:
                point[status] = found.get(status, 0)
            terminal = sum(point[s] for s in TERMINAL_STATUSES)
            point["failure_rate"] = point["failed"] / terminal if terminal else None
            points.append(point)
        out.append({"key": dict(zip(group_by, key, strict=True)), "points": points})
    return {"bucket": bucket, "series": out}


async def durations(
    engine: AsyncEngine, filters: RunFilters, group_by: list[str]
) -> dict[str, Any]:
    terminal = "'{" + ",".join(TERMINAL_STATUSES) + "}'::text[]"
    fractions = ",".join(str(fraction) for _, fraction in PERCENTILES)
    where = run_filters(filters)
    # percentile_disc is the nearest rank: the smallest value with at least that fraction of
    # the values at or below it. PostgreSQL sorts each group itself (spilling to disk past
    # work_mem), so a year's window never has to fit in this process; and because
    # percentiles of two halves do not combine, the window is read in one statement.
    rows = await _fetch(
        engine,
        f"SELECT {_select_dims(group_by)}count(*) AS count,"
        f" percentile_disc(ARRAY[{fractions}]::float8[]) WITHIN GROUP (ORDER BY duration_ms)"
        f" AS percentiles, max(duration_ms) AS max_ms FROM runs"
        f" WHERE {where.sql()} AND status = ANY({terminal}) AND duration_ms IS NOT NULL"
        f" {_group_clause(group_by)}",
        where.args,
        work_mem="64MB",
    )
    groups = []
    for row in rows:
        if not row["count"]:  # no GROUP BY over no rows still yields one row
            continue
        group: dict[str, Any] = {name: row[name] for name in group_by}
        group["count"] = int(row["count"])
        for (name, _), value in zip(PERCENTILES, row["percentiles"], strict=True):
            group[name] = value
        group["max_ms"] = row["max_ms"]
        groups.append(group)
    groups.sort(key=lambda g: (-g["count"], *((g[n] is None, g[n] or "") for n in group_by)))
    return {"groups": groups}


async def costs(engine: AsyncEngine, filters: RunFilters, group_by: list[str]) -> dict[str, Any]:
    rows = await _fetch_parts(
        engine,
        filters,
        f"SELECT {_select_dims(group_by)}count(*) AS runs, COALESCE(sum(cost), 0) AS cost"
        f" FROM runs WHERE {{where}} {_group_clause(group_by)}",
    )
    sums: dict[tuple[Any, ...], tuple[int, Decimal]] = {}
    # NUMERIC is unbounded; the default 28 significant digits would round a sum that PostgreSQL
    # computed exactly, so Python adds at full precision too.
    with localcontext(prec=MAX_PREC):
        for row in rows:
            if not row["runs"]:  # no GROUP BY over no rows still yields one row
                continue
            key = tuple(row[name] for name in group_by)
            runs, cost = sums.get(key, (0, Decimal(0)))
            sums[key] = (runs + int(row["runs"]), cost + row["cost"])
        total = sum((cost for _, cost in sums.values()), Decimal(0))
    ordered = sorted(
        sums.items(), key=lambda item: (-item[1][1], *((v is None, v or "") for v in item[0]))
    )
    groups = []
    for key, (runs, cost) in ordered:
        group: dict[str, Any] = dict(zip(group_by, key, strict=True))
        group["runs"] = runs
        group["cost"] = str(cost)
        groups.append(group)
    return {"total": str(total), "groups": groups}


async def failures_last_day(engine: AsyncEngine) -> list[Any]:
    """Failed runs of the last 24 hours by code and stage (for /metrics)."""
    return await _fetch(
        engine,
        "SELECT failure_code, failure_stage, count(*) AS n FROM runs WHERE status = 'failed'"
        " AND sort_at >= now() - interval '24 hours' GROUP BY 1, 2",
        [],
    )
