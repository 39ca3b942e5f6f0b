"""One delivery's journey: signature → content type → JSON → shape → archive and merge.

Framework-free: the webhook route and ``replay`` both call in here. Every request that gets
past the body-size cap is archived before it is answered; a 2xx leaves only after the
transaction that made the delivery durable has committed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from receiver.db import CONNECTION_LOST, DATABASE_DOWN, driver_connection
from receiver.errors import (
    InvalidJson,
    InvalidPayload,
    InvalidSignature,
    NotFound,
    NotReplayable,
    ReceiverError,
    UnsupportedMediaType,
)
from receiver.ingest import store
from receiver.ingest.archive import ArchiveEntry, RawDelivery, archive_entry, decode_body
from receiver.ingest.batcher import batcher_for, write_items
from receiver.ingest.payloads import ParsedPayload, parse_payload
from receiver.ingest.signature import verify_signature
from receiver.ingest.store import StoreResult
from receiver.settings import Settings
from receiver.vocabulary import DeliveryOutcome, DeliverySource, SignatureVerdict

log = logging.getLogger(__name__)


def signature_status(
    settings: Settings, body: bytes, header: str | None
) -> SignatureVerdict | None:
    """``valid`` or ``unsigned`` when the request may proceed, None when it must be refused.

    A presented signature must verify: allowing unsigned deliveries never lets a wrong or
    unverifiable one through (with or without a secret configured).
    """
    if header is not None and header.strip():
        valid = verify_signature(body, header, settings.signing_secrets)
        return SignatureVerdict.VALID if valid else None
    if settings.allow_unsigned:
        return SignatureVerdict.UNSIGNED
    return None


def check_content_type(content_type: str | None) -> None:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media == "application/json" or media == "text/json" or media.endswith("+json"):
        return
    raise UnsupportedMediaType(
        f"content type must be application/json, got {content_type or 'none'}"
    )


def decode_json(body: bytes) -> dict[str, Any]:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidJson(f"body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidJson(f"body must be a JSON object, got {type(document).__name__}")
    return document


# Deeper than any real Run object, far below orjson's encoder limit (255) and Python's stack.
MAX_DEPTH = 64


def bounded_document(document: dict[str, Any], *, scrub_nul: bool = True) -> dict[str, Any]:
    """The document with NUL replaced by U+FFFD (PostgreSQL text cannot hold NUL), checked to
    nest at most :data:`MAX_DEPTH` levels. Iterative: no input can exhaust the stack."""
    stack: list[tuple[Any, int, str | None]] = [(document, 1, None)]
    for _ in range(10_000_000):  # bound: far more nodes than a capped body can hold
        if not stack:
            return document
        value, depth, top = stack.pop()
        if depth > MAX_DEPTH:
            raise InvalidPayload(
                f"payload nests deeper than {MAX_DEPTH} levels",
                [{"loc": top or "(body)", "msg": f"nests deeper than {MAX_DEPTH} levels"}],
            )
        if isinstance(value, dict):
            for key in list(value):
                item = value[key]
                if scrub_nul and "\x00" in key:
                    del value[key]
                    key = key.replace("\x00", "\ufffd")
                    value[key] = item
                if isinstance(item, str):
                    if scrub_nul and "\x00" in item:
                        value[key] = item.replace("\x00", "\ufffd")
                elif isinstance(item, dict | list):
                    stack.append((item, depth + 1, top or key))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, str):
                    if scrub_nul and "\x00" in item:
                        value[index] = item.replace("\x00", "\ufffd")
                elif isinstance(item, dict | list):
                    stack.append((item, depth + 1, top))
    raise InvalidPayload("payload has too many values")


def parse_body(content_type: str | None, body: bytes) -> ParsedPayload:
    """The pure part of the pipeline after the signature: raises a ReceiverError to reject."""
    check_content_type(content_type)
    document = decode_json(body)
    # JSON can only carry NUL escaped; the archive keeps the exact bytes regardless.
    scrub_nul = b"\\u0000" in body
    # Nesting needs an opening bracket per level: a body with few of them (as every real one
    # has) cannot nest too deep, and need not be walked unless it holds NUL to replace.
    if scrub_nul or body.count(b"{") + body.count(b"[") > MAX_DEPTH:
        document = bounded_document(document, scrub_nul=scrub_nul)
    return parse_payload(document)


async def archive_rejection(
    engine: AsyncEngine, entry: ArchiveEntry, error: ReceiverError, *, keep_body: bool = True
) -> ReceiverError:
    """Keep a rejected request with its cause; returns the error, now carrying the delivery id."""
    async with driver_connection(engine) as conn:
        error.delivery_id = await store.insert_delivery(
            conn,
            entry,
            outcome=DeliveryOutcome.REJECTED,
            keep_body=keep_body,
            cause=error.code,
            cause_detail={"message": error.message, "details": error.details},
        )
    return error


# Errors that already say what happened (a rejection, the database being away): not bugs.
_PASSED_ON: tuple[type[BaseException], ...] = (ReceiverError, *DATABASE_DOWN, *CONNECTION_LOST)


def refusal(settings: Settings) -> InvalidSignature:
    return InvalidSignature(
        "missing or invalid Runflow-Signature"
        if settings.signing_secrets or settings.allow_unsigned
        else "no signing secret is configured and unsigned deliveries are not allowed"
    )


# Compressing a large body on the event loop would stall every request of this worker (5 MiB
# takes about 150 ms at zlib level 6); zlib lets go of the GIL, so those go to a thread.
_COMPRESS_ON_A_THREAD_FROM = 64 * 1024


async def receive(engine: AsyncEngine, settings: Settings, raw: RawDelivery) -> StoreResult:
    """Handle one webhook request end to end. Raises ReceiverError.

    A request that fails the signature leaves nothing behind (anyone can send those; the
    route counts and logs them). Every signed one is archived whatever happens next: a
    rejection with its cause, and even an unexpected error (``internal_error``, replayable).
    """
    signature = signature_status(settings, raw.body, raw.headers.get("runflow-signature"))
    if signature is None:
        raise refusal(settings)
    entry = archive_entry(raw, signature, keep_body=True)
    if len(raw.body) >= _COMPRESS_ON_A_THREAD_FROM:
        await asyncio.to_thread(entry.stored_body)
    try:
        parsed = parse_body(raw.content_type, raw.body)
    except ReceiverError as error:
        raise await archive_rejection(engine, entry, error) from None
    except Exception as exc:
        raise await _archive_internal_error(engine, entry, exc) from exc
    try:
        try:
            result = await _store(engine, settings, entry, parsed)
        except CONNECTION_LOST as exc:
            # A pooled connection died (database restart, failover). Trying once more on a
            # fresh one is safe even if the first commit went through: the fingerprint makes
            # the second attempt a duplicate, and the delivery is durable either way.
            log.warning("connection lost while storing (%s); retrying once", type(exc).__name__)
            result = await _store(engine, settings, entry, parsed)
    except _PASSED_ON:
        raise
    except Exception as exc:
        # Group commit already wrote this item alone after its batch failed: it is the one
        # that fails, and is archived as internal_error while its neighbours are stored.
        raise await _archive_internal_error(engine, entry, exc) from exc
    if result.outcome == DeliveryOutcome.REJECTED:
        rejection = InvalidPayload(
            (result.cause_detail or {}).get("message", "payload rejected"),
            (result.cause_detail or {}).get("details", []),
        )
        rejection.delivery_id = result.delivery_id
        raise rejection
    return result


async def _archive_internal_error(
    engine: AsyncEngine, entry: ArchiveEntry, exc: BaseException
) -> ReceiverError:
    """The last line of defence: a bug never loses a signed delivery.

    The failed transaction rolled back, so the delivery is kept in a transaction of its own,
    rejected with cause ``internal_error`` and its body, ready for a replay after the fix.
    """
    log.error("internal error while ingesting: %s: %s", type(exc).__name__, str(exc)[:500])
    error = ReceiverError(
        "internal error; the delivery is archived and can be replayed",
        [{"loc": "(server)", "msg": type(exc).__name__}],
    )
    return await archive_rejection(engine, entry, error)


async def store_parsed(
    engine: AsyncEngine,
    entry: ArchiveEntry,
    parsed: ParsedPayload,
    *,
    replay_of: int | None = None,
    enrich: bool = False,
    also: Callable[[Any, StoreResult], Awaitable[None]] | None = None,
) -> StoreResult:
    """Archive and merge a valid payload in one transaction; ``replay_of`` updates that row.

    ``enrich`` queues runs that have only been seen in envelopes for a fetch from Runflow's
    API; ``also`` runs more statements in the same transaction (the enrichment worker marks
    its queue item done there, so a merge and its bookkeeping commit together or not at all).
    """
    item = store.Item(entry, parsed, replay_of=replay_of, enrich=enrich)
    (result,) = await write_items(engine, [item], also=also)
    return result


async def _store(
    engine: AsyncEngine, settings: Settings, entry: ArchiveEntry, parsed: ParsedPayload
) -> StoreResult:
    """A webhook delivery, written with the others in flight in this worker (group commit)."""
    batcher = batcher_for(
        engine, batch_max=settings.ingest_batch_max, flushers=settings.ingest_flushers
    )
    return await batcher.submit(store.Item(entry, parsed, enrich=settings.enrichment_queueing))


async def replay(
    engine: AsyncEngine, delivery_id: int, *, enrich: bool = False, allow_unsigned: bool = False
) -> StoreResult:
    """Run a kept delivery through parsing and merging again; returns the new outcome.

    ``enrich`` queues envelope-only runs for enrichment, as ``receive`` does. A delivery kept
    as ``unsigned`` is replayed only while unsigned deliveries are allowed (``allow_unsigned``,
    the current setting), so turning that off also closes the door on what it let in.
    """
    async with driver_connection(engine) as conn:
        row = await conn.fetchrow(
            "SELECT id, received_at, body, body_encoding, content_type, signature, source,"
            " outcome, run_id, batch_id, duplicate_of FROM deliveries WHERE id = $1",
            delivery_id,
        )
    if row is None:
        raise NotFound(f"delivery {delivery_id} not found")
    if row["outcome"] in (DeliveryOutcome.STORED, DeliveryOutcome.DUPLICATE):
        # Already merged: replaying is a no-op that reports what happened.
        return StoreResult(
            row["outcome"],
            row["id"],
            run_id=row["run_id"],
            batch_id=row["batch_id"],
            duplicate_of=row["duplicate_of"],
        )
    if row["signature"] == SignatureVerdict.UNSIGNED and not allow_unsigned:
        raise NotReplayable(
            f"delivery {delivery_id} was accepted unsigned and unsigned deliveries are not"
            " allowed now (RECEIVER_ALLOW_UNSIGNED)"
        )
    if row["body"] is None:
        raise NotReplayable(f"delivery {delivery_id} kept no body (it failed the signature check)")
    body = decode_body(bytes(row["body"]), row["body_encoding"])
    entry = ArchiveEntry.of(
        body,
        signature=SignatureVerdict(row["signature"]),
        source=DeliverySource(row["source"]),
        received_at=row["received_at"],
        content_type=row["content_type"],
    )
    try:
        parsed = parse_body(row["content_type"], body)
    except ReceiverError as error:
        result = StoreResult(
            DeliveryOutcome.REJECTED,
            delivery_id,
            cause=error.code,
            cause_detail={"message": error.message, "details": error.details},
        )
        async with driver_connection(engine) as conn:
            await store.update_delivery(conn, delivery_id, result, None)
        return result
    return await store_parsed(engine, entry, parsed, replay_of=delivery_id, enrich=enrich)


async def replayable_rejections(engine: AsyncEngine) -> list[int]:
    """Ids of the rejected deliveries that kept their body, oldest first."""
    async with driver_connection(engine) as conn:
        return await store.replayable_rejections(conn)
