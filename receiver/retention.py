"""Data lifecycle: the archive's daily partitions, made ahead and dropped past retention.

``deliveries`` is range-partitioned by ``received_at`` (revision 0009): one partition per UTC
day, ``deliveries_pYYYYMMDD`` covering ``[day, day + 1)``, and ``deliveries_default`` for rows
no day covers. Every process makes today's and the next ``partition_days_ahead`` days'
partitions at start (one at a time: ``pg_try_advisory_xact_lock`` inside that short
transaction; whoever loses skips, the winner made them). Once a day one process (a lease row in
``maintenance_state``, claimed in one statement) runs :func:`prune`:

- archive partitions whose whole day is older than ``retention_days`` are detached and dropped,
  one short transaction each (``lock_timeout`` bounds how long ingest may queue behind the
  lock); never a row delete, so no bloat and no vacuum debt;
- fingerprints of the same age are deleted in bounded batches (they cannot share the archive's
  partitions: the duplicate check needs a unique key on the hash alone), so the duplicate window
  is exactly what the archive retains; so are the batch links (``run_deliveries``), which would
  otherwise name deliveries no longer kept;
- done enrichment rows, sent or abandoned alert notifications and alert events older than their
  own settings, and, only when ``run_retention_days`` is set, runs idle that long with their node
  runs, logs and other per-run rows, are deleted in bounded batches.

Rows that landed in the default partition (maintenance did not run for days) are moved into
proper daily partitions the next time partitions are made; ``/metrics`` shows how many wait
there. Run rows never change when an archive partition goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from receiver.db import DATABASE_DOWN, driver_connection
from receiver.settings import Settings

log = logging.getLogger(__name__)

PARENT = "deliveries"
DEFAULT_PARTITION = "deliveries_default"
_DAY_NAME = re.compile(r"^deliveries_p(\d{8})$")
# The one lock that orders partition DDL between processes (transaction-scoped only).
_PARTITION_LOCK = (
    "SELECT pg_try_advisory_xact_lock(hashtextextended('runflow-receiver:partitions', 0))"
)
# Days found in the default partition that one pass moves into partitions of their own.
MAX_RESCUED_DAYS = 400
LEASE = "prune"
# Tables that hold rows per run beside ``runs`` (those present: a revision may drop one).
PER_RUN_TABLES = (
    ("node_runs", "run_id"),
    ("run_logs", "run_id"),
    ("run_deliveries", "run_id"),
    ("enrichment_queue", "run_id"),
    ("reconciliation_checks", "run_id"),
)


def day_start(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def partition_name(day: date) -> str:
    return f"deliveries_p{day:%Y%m%d}"


def retention_cutoff(now: datetime, days: int) -> datetime:
    """The oldest ``received_at`` kept: midnight UTC ``days`` days before today."""
    return day_start(now.astimezone(UTC).date() - timedelta(days=days))


@dataclass(frozen=True)
class Partition:
    name: str
    day: date

    @property
    def start(self) -> datetime:
        return day_start(self.day)

    @property
    def end(self) -> datetime:
        return day_start(self.day + timedelta(days=1))


async def daily_partitions(conn: Any) -> list[Partition]:
    """The archive's daily partitions, oldest first (other partitions are not ours to touch)."""
    rows = await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'public.deliveries'::regclass"
    )
    found = []
    for row in rows:
        match = _DAY_NAME.match(row["relname"])
        if match:
            found.append(Partition(row["relname"], datetime.strptime(match[1], "%Y%m%d").date()))
    return sorted(found, key=lambda p: p.day)


async def _lock_timeout(conn: Any, seconds: float) -> None:
    await conn.execute(f"SET LOCAL lock_timeout = '{int(seconds * 1000)}ms'")


async def ensure_partitions(
    engine: AsyncEngine, settings: Settings, *, today: date | None = None
) -> list[str]:
    """Make the daily partitions from today to ``partition_days_ahead`` ahead; the names made.

    Days that already have rows in the default partition get their partition too, with those
    rows moved into it. Returns [] when another process holds the partition lock right now.
    """
    today = today or datetime.now(UTC).date()
    made: list[str] = []
    async with driver_connection(engine) as conn, conn.transaction():
        await _lock_timeout(conn, settings.maintenance_lock_timeout_seconds)
        if not await conn.fetchval(_PARTITION_LOCK):
            return made
        have = {p.day for p in await daily_partitions(conn)}
        stranded = {
            row["day"]
            for row in await conn.fetch(
                "SELECT DISTINCT (received_at AT TIME ZONE 'UTC')::date AS day"
                f" FROM {DEFAULT_PARTITION} LIMIT {MAX_RESCUED_DAYS}"
            )
        }
        wanted = {today + timedelta(days=n) for n in range(settings.partition_days_ahead + 1)}
        for day in sorted((wanted | stranded) - have):
            part = Partition(partition_name(day), day)
            bounds = f"FOR VALUES FROM ('{part.start.isoformat()}') TO ('{part.end.isoformat()}')"
            if day in stranded:
                # CREATE ... PARTITION OF refuses while the default holds rows of the range:
                # build the table, move the rows, then attach it.
                await conn.execute(
                    f"CREATE TABLE {part.name} (LIKE {PARENT} INCLUDING DEFAULTS"
                    " INCLUDING GENERATED INCLUDING STORAGE)"
                )
                await conn.execute(
                    f"WITH moved AS (DELETE FROM {DEFAULT_PARTITION}"
                    " WHERE received_at >= $1 AND received_at < $2 RETURNING *)"
                    f" INSERT INTO {part.name} SELECT * FROM moved",
                    part.start,
                    part.end,
                )
                await conn.execute(f"ALTER TABLE {PARENT} ATTACH PARTITION {part.name} {bounds}")
            else:
                await conn.execute(f"CREATE TABLE {part.name} PARTITION OF {PARENT} {bounds}")
            made.append(part.name)
    if made:
        log.info("archive partitions made: %s", ", ".join(made))
    return made


@dataclass
class PruneReport:
    """What a prune dropped and deleted (or, dry, would)."""

    cutoff: datetime
    dry_run: bool
    partitions: list[tuple[str, int]] = field(default_factory=list)  # name, rows
    deleted: dict[str, int] = field(default_factory=dict)  # what -> rows

    def lines(self) -> list[str]:
        verb = "would drop" if self.dry_run else "dropped"
        out = [f"archive retained from {self.cutoff.isoformat()}"]
        out += [f"{verb} partition {name} ({rows} rows)" for name, rows in self.partitions]
        if not self.partitions:
            out.append("no archive partition is past retention")
        verb = "would delete" if self.dry_run else "deleted"
        out += [f"{verb} {rows} {what}" for what, rows in self.deleted.items()]
        return out

    def summary(self) -> dict[str, Any]:
        return {
            "cutoff": self.cutoff.isoformat(),
            "partitions": [name for name, _ in self.partitions],
            "deleted": self.deleted,
        }


@dataclass(frozen=True)
class _Sweep:
    """Rows of one table deleted in bounded batches once older than a cutoff."""

    what: str
    table: str
    key: str  # the columns that identify a row, for the batch's sub-select
    condition: str  # with $1 the cutoff


def _sweeps(settings: Settings, now: datetime) -> list[tuple[_Sweep, datetime]]:
    days = timedelta(days=1)
    archive_cutoff = retention_cutoff(now, settings.retention_days)
    return [
        (
            _Sweep("fingerprints", "delivery_fingerprints", "body_sha256", "received_at < $1"),
            archive_cutoff,
        ),
        (
            _Sweep(
                "batch links (run_deliveries)",
                "run_deliveries",
                "run_id, received_at, delivery_id",
                "received_at < $1",
            ),
            archive_cutoff,
        ),
        (
            _Sweep(
                "done enrichment rows",
                "enrichment_queue",
                "run_id",
                "state = 'done' AND updated_at < $1",
            ),
            now - days * settings.enrichment_done_retention_days,
        ),
        (
            _Sweep(
                "sent or abandoned alert notifications",
                "alert_notifications",
                "id",
                "state <> 'pending' AND COALESCE(sent_at, next_attempt_at, created_at) < $1",
            ),
            now - days * settings.alert_notification_retention_days,
        ),
        (
            _Sweep("alert events", "alert_events", "id", "at < $1"),
            now - days * settings.alert_event_retention_days,
        ),
    ]


async def _sweep(conn: Any, sweep: _Sweep, cutoff: datetime, settings: Settings, dry: bool) -> int:
    where = sweep.condition
    if dry:
        count: int = await conn.fetchval(
            f"SELECT count(*) FROM {sweep.table} WHERE {where}", cutoff
        )
        return count
    total = 0
    for _ in range(settings.prune_max_batches):
        done = await conn.fetchval(
            f"WITH gone AS (DELETE FROM {sweep.table} WHERE ({sweep.key}) IN"
            f" (SELECT {sweep.key} FROM {sweep.table} WHERE {where} LIMIT $2) RETURNING 1)"
            " SELECT count(*) FROM gone",
            cutoff,
            settings.prune_batch_rows,
        )
        total += done
        if done < settings.prune_batch_rows:
            break
    return total


async def _prune_runs(conn: Any, cutoff: datetime, settings: Settings, dry: bool) -> int:
    """Runs idle since before ``cutoff``, with every per-run row, in bounded batches."""
    if dry:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM runs WHERE last_received_at < $1", cutoff
        )
        return count
    present = [
        (table, column)
        for table, column in PER_RUN_TABLES
        if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"public.{table}")
    ]
    children = "".join(
        f", d{i} AS (DELETE FROM {table} WHERE {column} IN (SELECT id FROM gone))"
        for i, (table, column) in enumerate(present)
    )
    total = 0
    for _ in range(settings.prune_max_batches):
        done = await conn.fetchval(
            "WITH gone AS (DELETE FROM runs WHERE id IN (SELECT id FROM runs"
            " WHERE last_received_at < $1 ORDER BY last_received_at LIMIT $2) RETURNING id)"
            f"{children} SELECT count(*) FROM gone",
            cutoff,
            settings.prune_batch_rows,
        )
        total += done
        if done < settings.prune_batch_rows:
            break
    return total


async def prune(
    engine: AsyncEngine, settings: Settings, *, now: datetime | None = None, dry_run: bool = False
) -> PruneReport:
    """Drop archive partitions past retention and sweep the other growing tables."""
    now = now or datetime.now(UTC)
    cutoff = retention_cutoff(now, settings.retention_days)
    report = PruneReport(cutoff=cutoff, dry_run=dry_run)
    async with driver_connection(engine) as conn:
        expired = [p for p in await daily_partitions(conn) if p.end <= cutoff]
        for part in expired:
            if dry_run:
                rows = await conn.fetchval(f"SELECT count(*) FROM {part.name}")
            else:
                async with conn.transaction():
                    await _lock_timeout(conn, settings.maintenance_lock_timeout_seconds)
                    # The planner's estimate: counting a day of archive only to drop it is waste.
                    rows = await conn.fetchval(
                        "SELECT greatest(reltuples, 0)::bigint FROM pg_class"
                        " WHERE oid = $1::regclass",
                        part.name,
                    )
                    await conn.execute(f"ALTER TABLE {PARENT} DETACH PARTITION {part.name}")
                    await conn.execute(f"DROP TABLE {part.name}")
                log.info("archive partition %s dropped (about %d rows)", part.name, rows)
            report.partitions.append((part.name, rows))
        for sweep, sweep_cutoff in _sweeps(settings, now):
            report.deleted[sweep.what] = await _sweep(conn, sweep, sweep_cutoff, settings, dry_run)
        if settings.run_retention_days:
            run_cutoff = now - timedelta(days=settings.run_retention_days)
            report.deleted["runs (with their node runs, logs and queue rows)"] = await _prune_runs(
                conn, run_cutoff, settings, dry_run
            )
    return report


_CLAIM = """
INSERT INTO maintenance_state AS s (name, lease_owner, lease_until, last_started_at)
VALUES ($1, $2, now() + make_interval(secs => $3), now())
ON CONFLICT (name) DO UPDATE SET lease_owner = EXCLUDED.lease_owner,
    lease_until = EXCLUDED.lease_until, last_started_at = EXCLUDED.last_started_at,
    updated_at = now()
WHERE (s.lease_until IS NULL OR s.lease_until < now())
  AND (s.last_success_at IS NULL OR s.last_success_at <= now() - make_interval(secs => $4))
RETURNING s.name
"""
_FINISH = """
UPDATE maintenance_state
SET lease_owner = NULL, lease_until = NULL, last_error = $3, updated_at = now(),
    last_success_at = CASE WHEN $3::text IS NULL THEN now() ELSE last_success_at END,
    last_summary = COALESCE($4::jsonb, last_summary)
WHERE name = $1 AND lease_owner = $2
"""


async def claim_lease(engine: AsyncEngine, settings: Settings, owner: str, *, due: float) -> bool:
    """Take the prune lease when free and the last success is ``due`` seconds old or more."""
    async with driver_connection(engine) as conn:
        claimed = await conn.fetchval(_CLAIM, LEASE, owner, settings.maintenance_lease_seconds, due)
    return claimed is not None


async def release_lease(
    engine: AsyncEngine, owner: str, *, error: str | None, summary: dict[str, Any] | None
) -> None:
    async with driver_connection(engine) as conn:
        await conn.execute(
            _FINISH,
            LEASE,
            owner,
            error,
            None if summary is None else orjson.dumps(summary).decode(),
        )


def new_owner() -> str:
    return f"{socket.gethostname()}:{uuid.uuid4().hex[:12]}"


async def maintain(
    engine: AsyncEngine, settings: Settings, *, due: float, dry_run: bool = False
) -> PruneReport | None:
    """One maintenance pass under the lease: partitions ahead, then the prune; None if not ours.

    A dry run only reads, so it takes no lease and leaves the daily schedule as it was.
    """
    if dry_run:
        return await prune(engine, settings, dry_run=True)
    owner = new_owner()
    if not await claim_lease(engine, settings, owner, due=due):
        return None
    try:
        await ensure_partitions(engine, settings)
        report = await prune(engine, settings)
    except BaseException as exc:
        await release_lease(engine, owner, error=f"{type(exc).__name__}: {exc}", summary=None)
        raise
    await release_lease(engine, owner, error=None, summary=report.summary())
    return report


async def partitions_at_start(engine: AsyncEngine, settings: Settings) -> None:
    """The days ahead, made before the app serves; a failure is logged, never fatal (the
    default partition takes the rows and the daily pass tries again)."""
    try:
        await ensure_partitions(engine, settings)
    except DATABASE_DOWN as exc:
        log.warning("archive partitions not made: database unavailable: %s", exc)
    except Exception:
        log.exception("archive partitions not made")


async def run_maintenance(engine: AsyncEngine, settings: Settings, stop: Any) -> None:
    """Background loop in ``serve``: a maintenance pass whenever one is due (see above)."""
    interval = settings.prune_interval_seconds
    if interval <= 0:
        return
    # The first pass waits one poll: a process that restarts often still prunes once a day (the
    # lease row remembers the last success), and start-up stays light.
    for _ in range(10**9):
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=settings.maintenance_poll_seconds)
        if stop.is_set():
            return
        try:
            report = await maintain(engine, settings, due=interval)
            if report is not None:
                for line in report.lines():
                    log.info("prune: %s", line)
        except DATABASE_DOWN as exc:
            log.warning("prune skipped: database unavailable: %s", exc)
        except Exception:
            log.exception("prune failed; the next pass retries")


async def archive_status(engine: AsyncEngine) -> dict[str, Any]:
    """The archive's partitions for /metrics and the deliveries route."""
    async with driver_connection(engine) as conn:
        parts = await daily_partitions(conn)
        # Bounded: the figure is an alarm, not an inventory.
        stranded = await conn.fetchval(
            f"SELECT count(*) FROM (SELECT 1 FROM {DEFAULT_PARTITION} LIMIT 1000000) AS d"
        )
    return {
        "partitions": len(parts),
        "retained_since": parts[0].start if parts else None,
        "covered_until": parts[-1].end if parts else None,
        "default_partition_rows": stranded,
    }


async def retained_since(conn: Any) -> datetime | None:
    """The start of the oldest daily archive partition still kept."""
    parts = await daily_partitions(conn)
    return parts[0].start if parts else None


def prune_command(settings: Settings, *, dry_run: bool) -> int:
    """``runflow-receiver prune [--dry-run]``: one pass now, printing what goes."""
    from receiver.startup import open_engine

    engine = open_engine(settings)

    async def run() -> PruneReport | None:
        try:
            return await maintain(engine, settings, due=0, dry_run=dry_run)
        finally:
            await engine.dispose()

    report = asyncio.run(run())
    if report is None:
        print("another process is pruning right now (maintenance lease held); try later")
        return 1
    for line in report.lines():
        print(line)
    return 0
