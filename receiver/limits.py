"""Bounded concurrency for expensive requests (analytics), per process.

An analytics request can scan a week of runs and hold up to three connections and a core for
a second or more; a dashboard opening sixteen panels at once would otherwise take the CPU
that ingest needs. Requests past the limit wait a moment for a slot, then get 503 +
Retry-After (the dashboard retries), rather than queueing without bound.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from receiver.errors import Unavailable


class Busy(Unavailable):
    """503 ``unavailable``: the process already runs as many of these requests as it allows."""

    retry_after_seconds = 2


class ConcurrencyLimit:
    """At most ``slots`` holders at once; a would-be holder waits up to ``wait_seconds``."""

    def __init__(self, slots: int, wait_seconds: float) -> None:
        self.slots = slots
        self.wait_seconds = wait_seconds
        self._semaphore = asyncio.Semaphore(slots)
        self.running = 0
        self.refused = 0

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        try:
            await asyncio.wait_for(self._semaphore.acquire(), timeout=self.wait_seconds)
        except TimeoutError:
            self.refused += 1
            raise Busy(
                f"{self.slots} analytics requests are already running here; retry shortly"
            ) from None
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._semaphore.release()
