"""Group commit: the deliveries in flight in one worker are written in one transaction.

Each delivery waits for the commit of the batch it rode in, so a 2xx still leaves only once
the delivery is durable. A flusher takes whatever is queued (up to ``batch_max``) as soon as
it is free; ``flushers`` of them run at once per worker, so one batch commits while the next
fills. No timer: an idle receiver writes a lone delivery at once.

One bad item must not fail its neighbours: when a batch's transaction fails, its items are
written again one by one, each in its own transaction, and only an item that still fails sees
the error. Deadlocks and serialization failures are retried a bounded number of times.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from receiver.db import CONNECTION_LOST, DATABASE_DOWN, driver_connection, timed_transaction
from receiver.ingest import store
from receiver.ingest.store import Item, StoreResult

log = logging.getLogger(__name__)

# 40P01 deadlock_detected, 40001 serialization_failure: the transaction can simply run again.
RETRYABLE: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
)
ATTEMPTS = 4
# Errors that say the database cannot be reached, not that an item is bad. A lock timeout, a
# deadlock past its retries or running out of lock memory may be one item's doing: isolate.
_UNREACHABLE: tuple[type[BaseException], ...] = tuple(
    kind
    for kind in (*DATABASE_DOWN, *CONNECTION_LOST)
    if not issubclass(
        kind,
        asyncpg.exceptions.LockNotAvailableError
        | asyncpg.exceptions.TransactionRollbackError
        | asyncpg.exceptions.InsufficientResourcesError,
    )
)

Also = Callable[[Any, StoreResult], Awaitable[None]]

# How long a flusher keeps one pooled connection while batches keep coming (Batcher).
HOLD_SECONDS = 1.0


async def write_items(
    engine: AsyncEngine, items: Sequence[Item], *, also: Also | None = None
) -> list[StoreResult]:
    """Store ``items`` in one transaction (retried on deadlock or serialization failure).

    ``also`` runs more statements in the same transaction with the first item's result.
    """
    async with driver_connection(engine) as conn:
        return await write_on(conn, engine, items, also=also)


async def write_on(
    conn: Any, engine: AsyncEngine, items: Sequence[Item], *, also: Also | None = None
) -> list[StoreResult]:
    """:func:`write_items` on a connection the caller holds (``driver_connection``)."""
    for attempt in range(ATTEMPTS):
        try:
            async with timed_transaction(conn, engine):
                results = await store.store_items(conn, items)
                if also is not None:
                    await also(conn, results[0])
                return results
        except RETRYABLE as exc:
            if attempt == ATTEMPTS - 1:
                raise
            log.warning("ingest transaction retried after %s", type(exc).__name__)
            await asyncio.sleep(random.uniform(0, 0.005 * 2**attempt))
    raise AssertionError("unreachable")


@dataclass
class _Pending:
    item: Item
    future: asyncio.Future[StoreResult]


@dataclass
class Batcher:
    """One per engine and event loop (see :func:`batcher_for`)."""

    engine: AsyncEngine
    loop: asyncio.AbstractEventLoop | None = None
    batch_max: int = 64
    flushers: int = 2
    queue: deque[_Pending] = field(default_factory=deque)
    active: int = 0
    batches: int = 0  # committed batches, for tests and metrics
    largest: int = 0
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def submit(self, item: Item) -> StoreResult:
        """Store one delivery with whatever else is in flight; returns once it committed."""
        future: asyncio.Future[StoreResult] = asyncio.get_running_loop().create_future()
        self.queue.append(_Pending(item, future))
        if self.active < self.flushers:
            self.active += 1
            task = asyncio.create_task(self._flush_loop())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    async def _flush_loop(self) -> None:
        try:
            while self.queue:
                await self._flush_held()
        finally:
            self.active -= 1

    def _take(self) -> list[_Pending]:
        return [self.queue.popleft() for _ in range(min(len(self.queue), self.batch_max))]

    async def _flush_held(self) -> None:
        """Write batches on one connection while more are queued, for up to ``HOLD_SECONDS``.

        Taking a connection from the pool and giving it back costs about as much CPU as a
        round trip (150-180 us here), once per batch. A failed batch leaves through
        ``driver_connection`` (which drops a dead connection) and is then dealt with by
        :meth:`_flush` on connections of its own, as every batch was before.
        """
        batch = self._take()
        results: list[StoreResult] | None = None
        try:
            async with driver_connection(self.engine) as conn:
                until = time.monotonic() + HOLD_SECONDS
                while True:
                    results = await write_on(conn, self.engine, [p.item for p in batch])
                    if not self.queue or time.monotonic() >= until:
                        break
                    self._settled(batch, results)
                    batch, results = self._take(), None
            # The last batch is answered once the connection is back in the pool, as every
            # batch was before: whoever waits on it may dispose of the engine next.
            self._settled(batch, results)
        except Exception as exc:
            if results is not None:
                # Committed; only giving the connection back failed.
                log.warning("ingest connection not returned cleanly: %r", exc)
                self._settled(batch, results)
            else:
                await self._flush(batch, exc)
        except BaseException as exc:  # cancelled mid-flush: nobody may wait forever
            if results is not None:
                self._settled(batch, results)
            else:
                for pending in batch:
                    _fail(pending, exc)
            raise

    def _settled(self, batch: list[_Pending], results: Sequence[StoreResult]) -> None:
        self.batches += 1
        self.largest = max(self.largest, len(batch))
        for pending, result in zip(batch, results, strict=True):
            _settle(pending, result)

    async def _flush(self, batch: list[_Pending], failed: Exception | None = None) -> None:
        """Write ``batch`` on a connection of its own; ``failed``: how it already failed once
        on a held connection, so it goes straight to the failure handling."""
        try:
            try:
                if failed is not None:
                    raise failed
                results = await write_items(self.engine, [p.item for p in batch])
            except Exception as exc:
                if len(batch) == 1 or isinstance(exc, _UNREACHABLE):
                    # The database itself is away: writing the items one by one would only
                    # wait out the same failure once per item. Each caller decides (503).
                    for pending in batch:
                        _fail(pending, exc)
                    return
                log.warning(
                    "a batch of %d deliveries failed (%s); writing them one by one",
                    len(batch),
                    type(exc).__name__,
                )
                for pending in batch:
                    try:
                        (result,) = await write_items(self.engine, [pending.item])
                    except Exception as item_exc:
                        _fail(pending, item_exc)
                    else:
                        _settle(pending, result)
                return
            self._settled(batch, results)
        except BaseException as exc:  # cancelled mid-flush: nobody may wait forever
            for pending in batch:
                _fail(pending, exc)
            raise


def _settle(pending: _Pending, result: StoreResult) -> None:
    if not pending.future.done():  # the request may have gone (client disconnect)
        pending.future.set_result(result)


def _fail(pending: _Pending, exc: BaseException) -> None:
    if not pending.future.done():
        if isinstance(exc, asyncio.CancelledError):
            pending.future.cancel()
        else:
            pending.future.set_exception(exc)


_BATCHERS: weakref.WeakKeyDictionary[AsyncEngine, dict[int, Batcher]] = weakref.WeakKeyDictionary()


def batcher_for(engine: AsyncEngine, *, batch_max: int, flushers: int) -> Batcher:
    """The batcher of this engine on the running event loop."""
    loop = asyncio.get_running_loop()
    per_loop = _BATCHERS.setdefault(engine, {})
    batcher = per_loop.get(id(loop))
    if (
        batcher is None
        or batcher.loop is not loop
        or batcher.batch_max != batch_max
        or batcher.flushers != flushers
    ):
        if len(per_loop) > 8:  # loops come and go in tests; keep the map small
            per_loop.clear()
        batcher = Batcher(engine, loop, batch_max=batch_max, flushers=flushers)
        per_loop[id(loop)] = batcher
    return batcher
