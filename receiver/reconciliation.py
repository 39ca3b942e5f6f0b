"""Reconciliation: bring back what Runflow gave up delivering.

Runflow retries a failed callback only a few times; a receiver that was down longer loses
those callbacks. With an API key set, a reconciler runs in the background of every process,
and one pass at a time runs across all of them:

1. **Claim** the lease in ``reconciliation_state`` (one short ``INSERT .. ON CONFLICT DO
   UPDATE .. WHERE`` statement: free or expired, and, for the background loop, a pass is due).
   No transaction is held across an HTTP call; the lease is renewed by every write.
2. **List** ``GET /v1/runs?q=created_at>=START AND created_at<NOW&sort_by=created_at:asc
   &limit=N`` and then ``&pq=<next_pq>`` until ``next_pq`` is null. ``START`` is the persisted
   watermark less a small overlap, never earlier than ``NOW - RECEIVER_RECONCILE_LOOKBACK_
   SECONDS``. A listed run already stored as terminal is skipped without writing anything, as
   is one whose listed status is not ahead of the stored (non-terminal) one; the rest (runs
   never heard of, runs Runflow has moved on) go through ``receiver.ingest.store_parsed``,
   archived with source ``reconciliation``. The watermark advances after every page.
3. **Re-fetch** ``GET /v1/runs/{id}`` for runs that have stayed non-terminal (or without a
   status) for longer than ``RECEIVER_RECONCILE_STALE_SECONDS`` since the receiver last heard
   of them, at most ``RECEIVER_RECONCILE_REFETCH_LIMIT`` per pass; ``reconciliation_checks``
   records each check, so a run Runflow still reports as running is asked again only once per
   stale period.

Every write is fenced: it commits only while this process still holds the lease (the same
transaction renews it), so a reconciler whose lease ran out and was taken over stops without
importing anything twice. Errors are counted per attempt by the API client's retries; a pass
that cannot finish records ``last_error`` and leaves the watermark where it got to.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy.ext.asyncio import AsyncEngine

from receiver.db import driver_connection
from receiver.errors import InvalidPayload, ReceiverError
from receiver.ingest import ArchiveEntry, StoreResult, archive_rejection, store_parsed
from receiver.ingest.payloads import ParsedPayload, parse_payload
from receiver.ingest.store import RUN_OBJECT_FIELDS
from receiver.runflow_api import (
    ApiKeyRefused,
    Fetched,
    RunflowApiError,
    RunflowClient,
    TransientApiError,
    created_between,
)
from receiver.settings import Settings
from receiver.vocabulary import (
    STATUSES,
    DeliverySource,
    SignatureVerdict,
    is_terminal,
    precedence,
)

log = logging.getLogger(__name__)

NAME = "runflow"
# Runs created just before the last pass ended may not have been listed yet (clock skew,
# Runflow's index): each pass lists this much before the watermark again. Cheap: those runs
# are terminal here by now and skipped without a write.
OVERLAP = timedelta(minutes=5)
MAX_PAGES = 2000  # per pass; the watermark keeps what was done, the next pass goes on
_NON_TERMINAL = [status for status in STATUSES if not is_terminal(status)]

_CLAIM = """
INSERT INTO reconciliation_state AS s (name, lease_owner, lease_until, last_started_at)
VALUES ($1, $2, now() + make_interval(secs => $3), now())
ON CONFLICT (name) DO UPDATE SET lease_owner = EXCLUDED.lease_owner,
    lease_until = EXCLUDED.lease_until, last_started_at = EXCLUDED.last_started_at,
    updated_at = now()
WHERE (s.lease_until IS NULL OR s.lease_until < now())
  AND ($4::float8 IS NULL OR s.last_started_at IS NULL
       OR s.last_started_at <= now() - make_interval(secs => $4::float8))
RETURNING s.watermark
"""

# Renews the lease (and moves the watermark forward, adds to the totals) only while this
# process holds it. The owner is the fence: a claim replaces it in the same row, so "UPDATE 0"
# means another process took the pass over. A lease that ran out during a long back-off but was
# not taken is simply renewed (the row lock orders this against a concurrent claim).
_RENEW = """
UPDATE reconciliation_state
SET lease_until = now() + make_interval(secs => $3),
    watermark = GREATEST(watermark, $4::timestamptz),
    runs_imported = runs_imported + $5, runs_refetched = runs_refetched + $6, updated_at = now()
WHERE name = $1 AND lease_owner = $2
"""

_FINISH = """
UPDATE reconciliation_state
SET lease_owner = NULL, lease_until = NULL, watermark = GREATEST(watermark, $3::timestamptz),
    last_finished_at = now(), last_error = $4, passes = passes + 1,
    last_success_at = CASE WHEN $5 THEN now() ELSE last_success_at END,
    updated_at = now()
WHERE name = $1 AND lease_owner = $2
"""

_STALE = """
SELECT r.id FROM runs r
WHERE (r.status IS NULL OR r.status = ANY($1::text[]))
  AND r.last_received_at < $2
  AND NOT EXISTS (
    SELECT 1 FROM reconciliation_checks c WHERE c.run_id = r.id AND c.checked_at >= $2
  )
ORDER BY r.last_received_at
LIMIT $3
"""

_CHECKED = """
INSERT INTO reconciliation_checks (run_id, checked_at, outcome) VALUES ($1, $2, $3)
ON CONFLICT (run_id) DO UPDATE SET checked_at = EXCLUDED.checked_at, outcome = EXCLUDED.outcome
"""


class LeaseLost(Exception):
    """Another process took the reconciliation lease; this pass stops."""


@dataclass
class PassResult:
    """What one call of :func:`reconcile_once` did."""

    ran: bool  # False: another process holds the lease (or, for the loop, no pass is due)
    imported: int = 0
    refetched: int = 0
    skipped: int = 0  # listed runs already terminal (or not behind) here: nothing written
    rejected: int = 0
    pages: int = 0
    listing_complete: bool = False
    error: str | None = None
    owner: str = ""
    run_ids: list[str] = field(default_factory=list)  # imported or refetched


def process_owner() -> str:
    """A lease owner name unique to this process (host, pid, and a random part)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class _Pass:
    def __init__(
        self,
        settings: Settings,
        engine: AsyncEngine,
        client: RunflowClient,
        now: datetime,
        owner: str,
        stop: asyncio.Event | None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.client = client
        self.now = now
        self.owner = owner
        self.stop = stop
        self.result = PassResult(ran=True, owner=owner)

    def stopping(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    async def renew(
        self,
        conn: Any = None,
        *,
        watermark: datetime | None = None,
        imported: int = 0,
        refetched: int = 0,
    ) -> None:
        args = (
            NAME,
            self.owner,
            self.settings.reconcile_lease_seconds,
            watermark,
            imported,
            refetched,
        )
        if conn is not None:
            status = await conn.execute(_RENEW, *args)
        else:
            async with driver_connection(self.engine) as own:
                status = await own.execute(_RENEW, *args)
        if status == "UPDATE 0":
            raise LeaseLost(self.owner)

    async def call(self, make: Callable[[], Awaitable[Any]]) -> Any:
        return await self.client.with_retries(make, stop=self.stop, before_attempt=self.renew)

    # -- listing -----------------------------------------------------------------------------

    def window_start(self, watermark: datetime | None) -> datetime:
        earliest = self.now - timedelta(seconds=self.settings.reconcile_lookback_seconds)
        if watermark is None:
            return earliest
        return max(earliest, min(watermark, self.now) - OVERLAP)

    async def list_and_import(self, watermark: datetime | None) -> None:
        q = created_between(self.window_start(watermark), self.now)
        pq: str | None = None
        for _ in range(MAX_PAGES):
            page = await self.call(
                functools.partial(
                    self.client.list_runs,
                    q=q,
                    sort_by="created_at:asc",
                    limit=self.settings.reconcile_page_size,
                    pq=pq,
                )
            )
            self.result.pages += 1
            reached = await self.import_page(page.items)
            await self.renew(watermark=reached)
            if not page.next_pq or page.next_pq == pq:
                self.result.listing_complete = True
                return
            pq = page.next_pq
            if self.stopping():
                return

    async def stored_statuses(self, items: list[Any]) -> dict[str, tuple[str | None, bool]]:
        ids = [i["id"] for i in items if isinstance(i, dict) and isinstance(i.get("id"), str)]
        if not ids:
            return {}
        has_object = " OR ".join(f"{name} IS NOT NULL" for name in RUN_OBJECT_FIELDS)
        async with driver_connection(self.engine) as conn:
            rows = await conn.fetch(
                f"SELECT id, status, ({has_object}) AS full FROM runs WHERE id = ANY($1::text[])",
                ids,
            )
        return {row["id"]: (row["status"], bool(row["full"])) for row in rows}

    async def import_page(self, items: list[Any]) -> datetime | None:
        """Import a page's new or advanced runs; returns the latest created_at handled."""
        stored = await self.stored_statuses(items)
        reached: datetime | None = None
        for item in items:
            body = orjson.dumps(item)
            entry = ArchiveEntry.of(
                body,
                signature=SignatureVerdict.NOT_APPLICABLE,
                source=DeliverySource.RECONCILIATION,
            )
            try:
                if not isinstance(item, dict):
                    raise InvalidPayload("a listed run is not a JSON object")
                parsed = parse_payload(item)
                if parsed.kind != "run_object" or parsed.run_id is None:
                    raise InvalidPayload("a listed run has no id")
            except ReceiverError as error:
                await self.reject(entry, error)
                continue
            fields = parsed.runs[0].fields
            created = fields.get("created_at")
            if isinstance(created, datetime):
                reached = created if reached is None else max(reached, created)
            known = stored.get(parsed.run_id)
            if known is not None:
                status, full = known
                behind = precedence(fields.get("status")) <= precedence(status)
                if is_terminal(status) or (behind and full):
                    self.result.skipped += 1
                    continue
            await self.store(entry, parsed, action="imported")
        return reached

    async def reject(self, entry: ArchiveEntry, error: ReceiverError) -> None:
        """Keep a malformed listed run once (a later pass lists the same bytes again)."""
        self.result.rejected += 1
        async with driver_connection(self.engine) as conn:
            kept = await conn.fetchval(
                "SELECT 1 FROM deliveries WHERE source = $1 AND outcome = 'rejected'"
                " AND body_sha256 = $2 LIMIT 1",
                DeliverySource.RECONCILIATION.value,
                entry.body_sha256,
            )
        if not kept:
            await self.renew()
            await archive_rejection(self.engine, entry, error)

    async def store(self, entry: ArchiveEntry, parsed: ParsedPayload, *, action: str) -> None:
        run_id = parsed.run_id
        assert run_id is not None

        async def fenced(conn: Any, result: StoreResult) -> None:
            changed = 1 if result.outcome == "stored" else 0
            if action == "refetched":
                await conn.execute(_CHECKED, run_id, self.now, result.outcome)
            await self.renew(
                conn,
                imported=changed if action == "imported" else 0,
                refetched=changed if action == "refetched" else 0,
            )

        result = await store_parsed(self.engine, entry, parsed, also=fenced)
        if result.outcome == "stored":
            setattr(self.result, action, getattr(self.result, action) + 1)
            self.result.run_ids.append(run_id)

    # -- stale runs --------------------------------------------------------------------------

    async def refetch_stale(self) -> None:
        limit = self.settings.reconcile_refetch_limit
        if limit == 0:
            return
        threshold = self.now - timedelta(seconds=self.settings.reconcile_stale_seconds)
        async with driver_connection(self.engine) as conn:
            rows = await conn.fetch(_STALE, _NON_TERMINAL, threshold, limit)
        for row in rows:
            if self.stopping():
                return
            run_id: str = row["id"]
            try:
                fetched = await self.call(functools.partial(self.client.get_run, run_id))
            except (ApiKeyRefused, TransientApiError):
                raise  # the API is refusing or failing: end the pass, try again next interval
            except RunflowApiError as error:  # invalid id, 404: recorded, asked again later
                async with driver_connection(self.engine) as conn:
                    await conn.execute(_CHECKED, run_id, self.now, error.reason[:200])
                continue
            await self.store_fetched(run_id, fetched)

    async def store_fetched(self, run_id: str, fetched: Fetched) -> None:
        entry = ArchiveEntry.of(
            fetched.body,
            signature=SignatureVerdict.NOT_APPLICABLE,
            source=DeliverySource.RECONCILIATION,
            request_id=fetched.request_id,
            headers={"url": fetched.url},
        )
        try:
            document = fetched.document
            if not isinstance(document, dict):
                raise InvalidPayload("Runflow answered with something that is not a Run object")
            document.setdefault("id", run_id)
            parsed = parse_payload(document)
            if parsed.kind != "run_object" or parsed.run_id != run_id:
                raise InvalidPayload(f"expected the Run object of {run_id}")
        except ReceiverError as error:
            async with driver_connection(self.engine) as conn:
                await conn.execute(_CHECKED, run_id, self.now, f"invalid_run_object: {error}")
            await self.reject(entry, error)
            return
        await self.store(entry, parsed, action="refetched")


async def claim(
    engine: AsyncEngine, owner: str, lease_seconds: float, *, due_after: float | None = None
) -> tuple[bool, datetime | None]:
    """Take the lease if free (and, with ``due_after``, a pass is due); returns (claimed, mark)."""
    async with driver_connection(engine) as conn:
        row = await conn.fetchrow(_CLAIM, NAME, owner, lease_seconds, due_after)
    return (row is not None, row["watermark"] if row is not None else None)


async def reconcile_once(
    settings: Settings,
    engine: AsyncEngine,
    client: RunflowClient,
    now: datetime,
    *,
    owner: str | None = None,
    stop: asyncio.Event | None = None,
    due_after: float | None = None,
) -> PassResult:
    """One reconciliation pass at ``now``, unless another process holds the lease.

    ``due_after`` (the background loop passes the interval) also skips the pass when one
    started less than that many seconds ago, whichever process ran it.
    """
    owner = owner or process_owner()
    claimed, watermark = await claim(
        engine, owner, settings.reconcile_lease_seconds, due_after=due_after
    )
    if not claimed:
        return PassResult(ran=False, owner=owner)
    work = _Pass(settings, engine, client, now, owner, stop)
    try:
        await work.list_and_import(watermark)
        if not work.stopping():
            await work.refetch_stale()
    except LeaseLost:
        work.result.error = "lease_lost: another process took over the pass"
    except RunflowApiError as error:
        work.result.error = f"runflow_api: {error.reason}"[:500]
    except Exception as exc:  # recorded; the loop goes on at the next interval
        log.exception("reconciliation pass failed")
        work.result.error = f"unexpected: {type(exc).__name__}: {exc}"[:500]
    done = work.result
    if not done.error and not done.listing_complete and not work.stopping():
        done.error = f"listing not finished after {MAX_PAGES} pages; the next pass goes on"
    if done.error and done.error.startswith("lease_lost"):
        return done  # the state row is the new holder's now
    mark = now if done.listing_complete else None
    success = done.error is None and done.listing_complete and not work.stopping()
    with contextlib.suppress(Exception):  # if this fails too, the lease simply runs out
        async with driver_connection(engine) as conn:
            await conn.execute(_FINISH, NAME, owner, mark, done.error, success)
    return done


async def run_reconciler(
    settings: Settings,
    engine: AsyncEngine,
    stop: asyncio.Event,
    client: RunflowClient | None = None,
) -> None:
    """Try a pass every little while until ``stop``; one runs per interval across processes."""
    api = client or RunflowClient(settings)
    owner = process_owner()
    interval = settings.reconcile_interval_seconds
    log.info("reconciler started (every %.0fs, one process at a time)", interval)
    try:
        while not stop.is_set():
            try:
                result = await reconcile_once(
                    settings,
                    engine,
                    api,
                    datetime.now(UTC),
                    owner=owner,
                    stop=stop,
                    due_after=interval,
                )
            except Exception:  # the database is away: try again later
                log.exception("reconciliation could not start")
            else:
                if result.ran:
                    log.log(
                        logging.WARNING if result.error else logging.INFO,
                        "reconciliation: %d imported, %d re-fetched, %d skipped%s",
                        result.imported,
                        result.refetched,
                        result.skipped,
                        f"; {result.error}" if result.error else "",
                    )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=min(interval, 60.0))
    finally:
        if client is None:
            await api.aclose()


async def reconcile_status(settings: Settings, engine: AsyncEngine) -> dict[str, Any]:
    """The state row for ``GET /reconciliation/status`` (zeros before the first pass)."""
    async with driver_connection(engine) as conn:
        row = await conn.fetchrow(
            "SELECT watermark, last_started_at, last_finished_at, last_success_at, last_error,"
            " runs_imported, runs_refetched, passes,"
            " (lease_until IS NOT NULL AND lease_until > now()) AS running"
            " FROM reconciliation_state WHERE name = $1",
            NAME,
        )
    state = dict(row) if row is not None else {}
    return {
        "enabled": settings.reconcile_enabled,
        "interval_seconds": settings.reconcile_interval_seconds,
        "lookback_seconds": settings.reconcile_lookback_seconds,
        "stale_seconds": settings.reconcile_stale_seconds,
        "running": bool(state.get("running", False)),
        "watermark": state.get("watermark"),
        "last_started_at": state.get("last_started_at"),
        "last_finished_at": state.get("last_finished_at"),
        "last_success_at": state.get("last_success_at"),
        "last_error": state.get("last_error"),
        "runs_imported": state.get("runs_imported", 0),
        "runs_refetched": state.get("runs_refetched", 0),
        "passes": state.get("passes", 0),
    }


async def metric_families(settings: Settings, engine: AsyncEngine) -> list[Metric]:
    """The reconciler's figures for /metrics, read from the state row (exact across processes)."""
    status = await reconcile_status(settings, engine)
    runs = CounterMetricFamily(
        "runflow_receiver_reconcile_runs",
        "Runs reconciliation stored from Runflow's API: imported from the list, or re-fetched",
        labels=["action"],
    )
    runs.add_metric(["imported"], status["runs_imported"])
    runs.add_metric(["refetched"], status["runs_refetched"])
    success = GaugeMetricFamily(
        "runflow_receiver_reconcile_last_success_timestamp_seconds",
        "When the last reconciliation pass finished without an error (0: never)",
    )
    last = status["last_success_at"]
    success.add_metric([], last.timestamp() if last is not None else 0.0)
    watermark = GaugeMetricFamily(
        "runflow_receiver_reconcile_watermark_timestamp_seconds",
        "Runs created before this have been listed by reconciliation (0: never)",
    )
    mark = status["watermark"]
    watermark.add_metric([], mark.timestamp() if mark is not None else 0.0)
    return [runs, success, watermark]
