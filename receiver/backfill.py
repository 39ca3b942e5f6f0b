"""``runflow-receiver backfill``: import history from Runflow's API through the merge path.

Pages through Runflow's documented list API with ``receiver.runflow_api``:
``GET {api}/v1/runs?q=created_at>=SINCE AND created_at<UNTIL&sort_by=created_at:asc&limit=N``
then ``&pq=<next_pq>`` until ``next_pq`` is null (answer ``{"items", "next_pq", "prev_pq"}``),
and stores every Run object exactly as ingest would, archived as a delivery whose source is
``backfill``. ``next_pq`` is kept in ``backfill_progress`` after each page, keyed by the ``q``
expression, so an interrupted backfill resumes where it stopped; a page re-read after an
interruption is answered as duplicates, never merged twice. A listed run that fails validation
is kept as a rejected delivery (replayable) and the backfill goes on. 429, 5xx, timeouts and
broken answers are retried with the shared back-off, up to ``enrichment_max_attempts`` a page.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from datetime import datetime
from typing import Any, TextIO

import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from receiver.db import driver_connection
from receiver.errors import InvalidPayload, ReceiverError
from receiver.ingest import ArchiveEntry, archive_rejection, store_parsed
from receiver.ingest.payloads import parse_payload
from receiver.runflow_api import RunflowApiError, RunflowClient, created_between
from receiver.settings import Settings
from receiver.vocabulary import DeliverySource, SignatureVerdict


class BackfillError(Exception):
    """The API kept failing; progress so far is kept and a rerun resumes."""


def progress_key(since: datetime, until: datetime | None) -> str:
    # Keyed by what is sent: progress kept by the old, undocumented parameters (which stopped
    # after one page and called it finished) is not mistaken for a finished backfill.
    return "q=" + created_between(since, until)


async def _load_progress(engine: AsyncEngine, key: str) -> tuple[str | None, int, bool]:
    async with driver_connection(engine) as conn:
        row = await conn.fetchrow(
            "SELECT cursor, imported, finished FROM backfill_progress WHERE key = $1", key
        )
    return (row["cursor"], row["imported"], row["finished"]) if row else (None, 0, False)


async def _save_progress(
    engine: AsyncEngine, key: str, cursor: str | None, imported: int, finished: bool
) -> None:
    async with driver_connection(engine) as conn:
        await conn.execute(
            "INSERT INTO backfill_progress (key, cursor, imported, finished, updated_at)"
            " VALUES ($1, $2, $3, $4, now()) ON CONFLICT (key) DO UPDATE SET cursor = $2,"
            " imported = $3, finished = $4, updated_at = now()",
            key,
            cursor,
            imported,
            finished,
        )


async def _import(engine: AsyncEngine, item: Any) -> str:
    """Store one listed run like a posted Run object; a malformed one is kept as rejected."""
    body = orjson.dumps(item)
    entry = ArchiveEntry.of(
        body, signature=SignatureVerdict.NOT_APPLICABLE, source=DeliverySource.BACKFILL
    )
    try:
        if not isinstance(item, dict):
            raise InvalidPayload("a listed run is not a JSON object")
        parsed = parse_payload(item)
    except ReceiverError as error:
        await archive_rejection(engine, entry, error)  # kept and replayable, like ingest's
        return "rejected"
    result = await store_parsed(engine, entry, parsed)
    return result.outcome


async def backfill(
    settings: Settings,
    engine: AsyncEngine,
    *,
    since: datetime,
    until: datetime | None = None,
    page_size: int = 500,
    client: RunflowClient | None = None,
    out: TextIO = sys.stderr,
    progress: Callable[[int, dict[str, int]], None] | None = None,
) -> dict[str, int]:
    """Import every run created in ``[since, until)``; returns counts by outcome.

    After each page, ``progress(imported, counts)`` if given, else a status line on ``out``.
    """
    key = progress_key(since, until)
    cursor, imported, finished = await _load_progress(engine, key)
    counts = {"stored": 0, "duplicate": 0, "rejected": 0, "previously": imported}
    if finished:
        print(f"backfill {key} already finished ({imported} runs)", file=out)
        return counts
    api = client or RunflowClient(settings)
    q = created_between(since, until)
    try:
        while True:
            try:
                page = await api.with_retries(
                    functools.partial(
                        api.list_runs, q=q, sort_by="created_at:asc", limit=page_size, pq=cursor
                    )
                )
            except RunflowApiError as error:
                raise BackfillError(
                    f"Runflow API: {error.reason}; {imported} runs imported, rerun to resume"
                ) from error
            for item in page.items:
                counts[await _import(engine, item)] += 1
            imported += len(page.items)
            cursor = page.next_pq
            await _save_progress(engine, key, cursor, imported, finished=not cursor)
            if progress is not None:
                progress(imported, counts)
            else:
                print(
                    f"\rbackfill: {imported} runs imported"
                    f" ({counts['stored']} stored, {counts['duplicate']} already known)",
                    end="",
                    file=out,
                    flush=True,
                )
            if not cursor:
                break
    finally:
        if progress is None:
            print(file=out)
        if client is None:
            await api.aclose()
    return counts
