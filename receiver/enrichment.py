"""Enrichment: fetch Run objects from Runflow's API for runs only seen in callback envelopes.

Envelopes carry no failure code, stage, client_ref, cost, model or node runs; the Run object
does. Queued runs (``enrichment_queue``, filled at ingest) are claimed with FOR UPDATE SKIP
LOCKED under a lease, fetched from ``GET {api}/v1/runs/{id}``, validated with the same Run
model as ingest and merged through the same path (archived as a delivery whose signature is
``enrichment``); the queue item is closed in that same transaction. A worker that dies holding
an item loses nothing: the lease runs out and another worker takes it. Each claim bumps
``attempts``, which fences the claimant: a worker whose lease ran out and was taken over
cannot commit its merge or reschedule the item (its transaction rolls back), so a run is
merged once per enrichment however slow a worker was. On start the worker also queues stored
runs that were never queued (kept before the API key was set, or replayed without it).

Fetches go through ``receiver.runflow_api`` (the run id percent-encoded as one path
segment). Retries: 429 (honouring Retry-After, both forms), 5xx, timeouts, connection errors,
invalid JSON and unexpected exceptions back off with the shared full-jitter back-off, and every
one counts toward ``enrichment_max_attempts`` (so does a claim whose worker died: an item
claimed more often than that ends without another fetch). 404 ends the item; so does a run id
that cannot form a URL (``invalid_run_id``, nothing is sent). 401/403 end the item too and
pause the worker, with one log line, instead of hammering the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from receiver.db import driver_connection
from receiver.errors import ReceiverError
from receiver.ingest import ArchiveEntry, store, store_parsed
from receiver.ingest.payloads import parse_payload
from receiver.ingest.store import RUN_OBJECT_FIELDS, StoreResult
from receiver.runflow_api import (
    ApiKeyRefused,
    Fetched,
    InvalidRunId,
    RunflowApiError,
    RunflowClient,
    RunNotFound,
    TransientApiError,
)
from receiver.settings import Settings
from receiver.vocabulary import DeliverySource, SignatureVerdict

log = logging.getLogger(__name__)

_CLAIM = """
UPDATE enrichment_queue q
SET locked_until = now() + make_interval(secs => $1), attempts = q.attempts + 1,
    updated_at = now()
WHERE q.run_id = (
    SELECT run_id FROM enrichment_queue
    WHERE state = 'pending' AND next_attempt_at <= now()
      AND (locked_until IS NULL OR locked_until < now())
    ORDER BY next_attempt_at
    LIMIT 1
    FOR UPDATE SKIP LOCKED
)
RETURNING q.run_id, q.attempts
"""


# Runs that lack every Run-object field (the same test as at ingest) and were never queued.
# Sorted like the ingest enqueue (byte order: COLLATE "C" here, ``store.byte_order`` there),
# so the two never wait on each other's rows in a cycle.
_SWEEP = f"""
INSERT INTO enrichment_queue (run_id)
SELECT r.id FROM runs r
WHERE {" AND ".join(f"r.{name} IS NULL" for name in RUN_OBJECT_FIELDS)}
  AND NOT EXISTS (SELECT 1 FROM enrichment_queue q WHERE q.run_id = r.id)
ORDER BY r.id COLLATE "C"
ON CONFLICT (run_id) DO NOTHING
"""
_SWEEP_LOCK = 0x5E0F_E4C4  # advisory lock: one sweep at a time across processes


class LeaseLost(Exception):
    """Another worker claimed the item after this one's lease ran out."""


@dataclass
class Outcome:
    """What one fetch ended as: done, retry later, or given up (with a reason)."""

    kind: str  # "done" | "retry" | "failed"
    reason: str | None = None
    retry_after: float | None = None
    pause: bool = False


class Enricher:
    """The queue worker: ``run`` until ``stop`` is set; ``drain`` for tests and one-shot use."""

    def __init__(
        self, settings: Settings, engine: AsyncEngine, client: RunflowClient | None = None
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.client = client or RunflowClient(settings)
        self.paused_until = 0.0

    async def claim(self) -> tuple[str, int] | None:
        async with driver_connection(self.engine) as conn:
            row = await conn.fetchrow(_CLAIM, self.settings.enrichment_lease_seconds)
        return (row["run_id"], row["attempts"]) if row else None

    async def fetch(self, run_id: str) -> tuple[Outcome, Fetched | None]:
        try:
            return Outcome("done"), await self.client.get_run(run_id)
        except TransientApiError as error:
            return Outcome("retry", error.reason, error.retry_after), None
        except ApiKeyRefused as error:
            return Outcome("failed", error.reason, pause=True), None
        except (InvalidRunId, RunNotFound, RunflowApiError) as error:
            return Outcome("failed", error.reason), None

    async def process(self, run_id: str, attempts: int) -> str:
        """Fetch and merge one claimed item; returns done, retry, failed or lost."""
        limit = self.settings.enrichment_max_attempts
        try:
            if attempts > limit:
                # Claimed again after leases ran out without an outcome (a worker died on it):
                # those claims were attempts too, so this item ends here instead of looping.
                reason = f"attempts_exhausted: claimed {attempts} times without an outcome"
                await self.give_up(run_id, attempts, reason)
                return "failed"
            try:
                outcome, fetched = await self.fetch(run_id)
                if outcome.kind == "done":
                    assert fetched is not None
                    try:
                        await self.merge(run_id, attempts, fetched)
                        return "done"
                    except (ReceiverError, ValueError) as exc:
                        outcome = Outcome("failed", f"invalid_run_object: {exc}")
            except LeaseLost:
                raise
            except Exception as exc:  # counted toward the limit like every other failure
                log.exception("enrichment of %s failed unexpectedly", run_id)
                outcome = Outcome("retry", f"unexpected: {type(exc).__name__}: {exc}")
            if outcome.pause:
                self.pause(outcome.reason)
            if outcome.kind == "retry" and attempts < limit:
                delay = self.client.backoff(attempts, outcome.retry_after)
                await self.reschedule(run_id, attempts, delay, outcome.reason)
                return "retry"
            await self.give_up(run_id, attempts, outcome.reason or "unknown")
            return "failed"
        except LeaseLost:
            log.warning("enrichment of %s: lease ran out and another worker took it", run_id)
            return "lost"

    def pause(self, reason: str | None) -> None:
        """Stop fetching for a while after a refused key; one log line per pause."""
        now = time.monotonic()
        already = self.paused_until > now
        self.paused_until = now + self.settings.enrichment_auth_pause_seconds
        if not already:
            log.error(
                "Runflow API refused the key (%s); enrichment paused for %.0fs: "
                "check RECEIVER_RUNFLOW_API_KEY",
                reason,
                self.settings.enrichment_auth_pause_seconds,
            )

    async def merge(self, run_id: str, attempts: int, fetched: Fetched) -> None:
        body = fetched.body
        document = fetched.document
        if not isinstance(document, dict):
            raise ValueError("Runflow answered with something that is not a Run object")
        document.setdefault("id", run_id)
        parsed = parse_payload(document)
        if parsed.kind != "run_object" or parsed.run_id != run_id:
            raise ValueError(f"expected the Run object of {run_id}")
        entry = ArchiveEntry.of(
            body,
            signature=SignatureVerdict.NOT_APPLICABLE,
            source=DeliverySource.ENRICHMENT,
            request_id=fetched.request_id,
            headers={"url": fetched.url},
        )

        async def close_item(conn: Any, result: StoreResult) -> None:
            status = await conn.execute(
                "UPDATE enrichment_queue SET state = 'done', locked_until = NULL,"
                " last_error = NULL, updated_at = now()"
                " WHERE run_id = $1 AND state = 'pending' AND attempts = $2",
                run_id,
                attempts,
            )
            if status == "UPDATE 0":
                raise LeaseLost(run_id)  # rolls the merge back: the new claimant merges
            await conn.execute(
                "UPDATE runs SET enriched_at = now(), enrichment_error = NULL WHERE id = $1",
                run_id,
            )

        await store_parsed(self.engine, entry, parsed, also=close_item)

    async def reschedule(
        self, run_id: str, attempts: int, delay: float, reason: str | None
    ) -> None:
        async with driver_connection(self.engine) as conn:
            status = await conn.execute(
                "UPDATE enrichment_queue SET next_attempt_at = now() + make_interval(secs => $3),"
                " locked_until = NULL, last_error = $4, updated_at = now()"
                " WHERE run_id = $1 AND state = 'pending' AND attempts = $2",
                run_id,
                attempts,
                delay,
                reason,
            )
        if status == "UPDATE 0":
            raise LeaseLost(run_id)

    async def give_up(self, run_id: str, attempts: int, reason: str) -> None:
        async with driver_connection(self.engine) as conn, conn.transaction():
            # The ingest order: the run's bucket lock, the run row, then its queue row.
            await store.lock_runs(conn, [run_id])
            await conn.execute(
                "UPDATE runs SET enrichment_error = $2 WHERE id = $1", run_id, reason
            )
            status = await conn.execute(
                "UPDATE enrichment_queue SET state = 'failed', locked_until = NULL,"
                " last_error = $3, updated_at = now()"
                " WHERE run_id = $1 AND state = 'pending' AND attempts = $2",
                run_id,
                attempts,
                reason,
            )
            if status == "UPDATE 0":
                raise LeaseLost(run_id)
        log.warning("enrichment of %s ended: %s", run_id, reason)

    async def _task(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            pause = self.paused_until - time.monotonic()
            if pause > 0:
                await _sleep_or_stop(stop, pause)
                continue
            try:
                claimed = await self.claim()
                if claimed is None:
                    await _sleep_or_stop(stop, self.settings.enrichment_poll_seconds)
                    continue
                await self.process(*claimed)
            except Exception:  # keep the worker alive; the lease returns the item
                log.exception("enrichment worker error")
                await _sleep_or_stop(stop, self.settings.enrichment_poll_seconds)

    async def run(self, stop: asyncio.Event) -> None:
        """Work the queue with ``enrichment_concurrency`` tasks until ``stop`` is set."""
        log.info("enrichment worker started (%d tasks)", self.settings.enrichment_concurrency)
        try:
            queued = await enqueue_unqueued(self.engine)
        except Exception:  # the queue filled at ingest still gets worked
            log.exception("could not queue earlier runs for enrichment")
        else:
            if queued:
                log.info("queued %d earlier runs for enrichment", queued)
        tasks = [
            asyncio.create_task(self._task(stop))
            for _ in range(self.settings.enrichment_concurrency)
        ]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await self.client.aclose()


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


async def enqueue_unqueued(engine: AsyncEngine) -> int:
    """Queue every stored run that lacks the Run-object fields and was never queued."""
    async with driver_connection(engine) as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _SWEEP_LOCK)
        status: str = await conn.execute(_SWEEP)
    return int(status.rsplit(" ", 1)[-1])


async def queue_status(engine: AsyncEngine) -> dict[str, Any]:
    """Queue depth, oldest pending item's age, and counts by state."""
    async with driver_connection(engine) as conn:
        row = await conn.fetchrow(
            "SELECT count(*) FILTER (WHERE state = 'pending') AS pending,"
            " count(*) FILTER (WHERE state = 'done') AS done,"
            " count(*) FILTER (WHERE state = 'failed') AS failed,"
            " extract(epoch FROM now() - min(enqueued_at) FILTER (WHERE state = 'pending'))"
            " AS oldest FROM enrichment_queue"
        )
    oldest = row["oldest"]
    return {
        "pending": row["pending"],
        "done": row["done"],
        "failed": row["failed"],
        "oldest_pending_seconds": None if oldest is None else float(oldest),
    }
