"""Time limits on the ingest path, in-process against the real database: a request waiting on
a lock another client holds is answered 503 + Retry-After within seconds, never held."""

from __future__ import annotations

import time

import asyncpg
import httpx
import pytest

from receiver.db import plain_url
from tests.support.builders import envelope, post_delivery

pytestmark = pytest.mark.faults

LOCK_TIMEOUT_S = 2.0  # RECEIVER_INGEST_LOCK_TIMEOUT_SECONDS's default


async def test_a_run_locked_by_a_stuck_client_is_answered_503_with_retry_after(
    client: httpx.AsyncClient, database_url: str
) -> None:
    first = await post_delivery(client, envelope("locked-run", status="running", event="x"))
    assert first.status_code == 200, first.text
    stuck = await asyncpg.connect(plain_url(database_url))
    try:
        transaction = stuck.transaction()
        await transaction.start()
        # A client that took the run's locks and then stopped: its per-run advisory lock and
        # the run's row lock, held until it goes away.
        await stuck.execute("SELECT pg_advisory_xact_lock(hashtextextended('locked-run', 0))")
        await stuck.execute("SELECT 1 FROM runs WHERE id = 'locked-run' FOR UPDATE")
        started = time.monotonic()
        answer = await post_delivery(client, envelope("locked-run"))
        waited = time.monotonic() - started
        await transaction.rollback()
    finally:
        await stuck.close()
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["code"] == "unavailable"
    assert int(answer.headers["retry-after"]) > 0
    assert LOCK_TIMEOUT_S * 0.9 < waited < LOCK_TIMEOUT_S + 10, waited

    # Once the lock is gone the same delivery, sent again as Runflow would, is stored.
    again = await post_delivery(client, envelope("locked-run"))
    assert again.status_code == 200, again.text
    assert again.json()["status"] == "stored"
