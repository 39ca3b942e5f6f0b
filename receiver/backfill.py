"""``runflow-receiver backfill``: import history from Runflow's API through the merge path.

Pages through ``GET {api}/v1/runs?created_after=..&created_before=..&limit=..&cursor=..``
(response ``{"items": [Run], "next_cursor": str | null}``) and stores every Run object exactly
as ingest would, archived as a delivery whose signature is ``backfill``. The cursor is kept in
``backfill_progress`` after each page, so an interrupted backfill resumes where it stopped; a
page re-read after an interruption is answered as duplicates, never merged twice. A listed run
that fails validation is kept as a rejected delivery (replayable) and the backfill goes on.
"""

from __future__ import annotations

import asyncio
import sys
from datetime import datetime
from typing import Any, TextIO

import httpx
import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from receiver.db import driver_connection
from receiver.enrichment import Enricher, RateLimiter, backoff_seconds
from receiver.errors import InvalidPayload, ReceiverError
from receiver.ingest import ArchiveEntry, archive_rejection, store_parsed
from receiver.ingest.payloads import parse_payload
from receiver.settings import Settings
from receiver.vocabulary import DeliverySource, SignatureVerdict


class BackfillError(Exception):
    """The API kept failing; progress so far is kept and a rerun resumes."""


def progress_key(since: datetime, until: datetime | None) -> str:
    return f"{since.isoformat()}|{until.isoformat() if until else ''}"


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


async def _get_page(
    client: httpx.AsyncClient, settings: Settings, params: dict[str, Any], limiter: RateLimiter
) -> dict[str, Any]:
    for attempt in range(1, settings.enrichment_max_attempts + 1):
        await limiter.acquire()
        try:
            response = await client.get("/v1/runs", params=params)
        except (httpx.TimeoutException, httpx.TransportError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        else:
            if response.status_code == 200:
                page: dict[str, Any] = orjson.loads(response.content)
                return page
            if response.status_code in (401, 403, 404) or 400 <= response.status_code < 429:
                raise BackfillError(
                    f"Runflow API answered {response.status_code}: {response.text[:200]}"
                )
            reason = f"http_{response.status_code}"
            retry_after = response.headers.get("retry-after")
            if retry_after and retry_after.replace(".", "", 1).isdigit():
                await asyncio.sleep(
                    min(float(retry_after), settings.enrichment_backoff_max_seconds)
                )
                continue
        await asyncio.sleep(backoff_seconds(settings, attempt))
    raise BackfillError(f"Runflow API kept failing ({reason}); rerun to resume")


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
    client: httpx.AsyncClient | None = None,
    out: TextIO = sys.stderr,
) -> dict[str, int]:
    """Import every run created in ``[since, until)``; returns counts by outcome."""
    key = progress_key(since, until)
    cursor, imported, finished = await _load_progress(engine, key)
    counts = {"stored": 0, "duplicate": 0, "rejected": 0, "previously": imported}
    if finished:
        print(f"backfill {key} already finished ({imported} runs)", file=out)
        return counts
    own_client = client is None
    client = client or Enricher.make_client(settings)
    limiter = RateLimiter(settings.enrichment_rps)
    try:
        while True:
            params: dict[str, Any] = {"created_after": since.isoformat(), "limit": page_size}
            if until is not None:
                params["created_before"] = until.isoformat()
            if cursor:
                params["cursor"] = cursor
            page = await _get_page(client, settings, params, limiter)
            for item in page.get("items", []):
                counts[await _import(engine, item)] += 1
            imported += len(page.get("items", []))
            cursor = page.get("next_cursor")
            await _save_progress(engine, key, cursor, imported, finished=not cursor)
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
        print(file=out)
        if own_client:
            await client.aclose()
    return counts
