"""Group commit and the set-based write path: isolation, duplicates, big batches, retries."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

import orjson
import pytest

from receiver.db import driver_connection
from receiver.ingest.archive import ArchiveEntry
from receiver.ingest.batcher import Batcher, write_items
from receiver.ingest.payloads import parse_payload
from receiver.ingest.store import Item
from receiver.vocabulary import SignatureVerdict
from tests.support.builders import T0, auth, batch_envelope, envelope, post_delivery, run_object


def item(doc: dict, seconds: int = 0) -> Item:
    body = orjson.dumps(doc)
    entry = ArchiveEntry.of(
        body, signature=SignatureVerdict.VALID, received_at=T0 + timedelta(seconds=seconds)
    )
    return Item(entry, parse_payload(orjson.loads(body)))


async def sql(engine, query: str, *args):
    async with driver_connection(engine) as conn:
        return await conn.fetch(query, *args)


@pytest.fixture
async def poison(db):
    """A real trigger that makes any write of run 'poison' fail (dropped afterwards)."""
    async with driver_connection(db) as conn:
        await conn.execute(
            "CREATE FUNCTION poison_run() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN IF NEW.id = 'poison' THEN RAISE EXCEPTION 'poisoned row'; END IF;"
            " RETURN NEW; END $$;"
            " CREATE TRIGGER poison BEFORE INSERT OR UPDATE ON runs"
            " FOR EACH ROW EXECUTE FUNCTION poison_run()"
        )
    yield db
    async with driver_connection(db) as conn:
        await conn.execute("DROP TRIGGER poison ON runs; DROP FUNCTION poison_run()")


async def test_one_failing_item_does_not_fail_its_neighbours_in_a_batch(poison, caplog):
    batcher = Batcher(poison, asyncio.get_running_loop(), batch_max=10, flushers=1)
    docs = [envelope(f"good_{i}") for i in range(4)]
    docs.insert(2, envelope("poison"))
    with caplog.at_level(logging.WARNING, logger="receiver.ingest.batcher"):
        outcomes = await asyncio.gather(
            *(batcher.submit(item(doc, i)) for i, doc in enumerate(docs)),
            return_exceptions=True,
        )
    assert "a batch of 5 deliveries failed" in caplog.text  # they did ride together
    assert isinstance(outcomes[2], Exception) and "poisoned row" in str(outcomes[2])
    good = [o for i, o in enumerate(outcomes) if i != 2]
    assert [getattr(o, "outcome", o) for o in good] == ["stored"] * 4
    rows = await sql(poison, "SELECT id FROM runs ORDER BY id")
    assert [r["id"] for r in rows] == [f"good_{i}" for i in range(4)]
    archived = await sql(poison, "SELECT run_id, outcome FROM deliveries ORDER BY run_id")
    assert [(r["run_id"], r["outcome"]) for r in archived] == [
        (f"good_{i}", "stored") for i in range(4)
    ]


async def test_the_same_bytes_twice_in_one_batch_are_stored_once(db):
    doc = envelope("twice")
    first, second = await write_items(db, [item(doc), item(doc)])
    assert (first.outcome, second.outcome) == ("stored", "duplicate")
    assert second.duplicate_of == first.delivery_id
    rows = await sql(db, "SELECT delivery_count FROM runs WHERE id = 'twice'")
    assert rows[0]["delivery_count"] == 1
    kept = await sql(db, "SELECT outcome, body IS NOT NULL AS kept FROM deliveries ORDER BY id")
    assert [(r["outcome"], r["kept"]) for r in kept] == [("stored", True), ("duplicate", False)]


async def test_a_stale_partial_batch_arriving_last_does_not_overwrite_a_later_success(client, db):
    items = [{"run_id": "bi_1", "status_code": "succeeded"}]
    later = batch_envelope("b_order", items, event="batch.succeeded")
    later["completed_at"] = (T0 + timedelta(seconds=20)).isoformat()
    later["output"]["succeeded"] = 2
    stale = batch_envelope("b_order", items, event="batch.partial_succeeded")
    stale["completed_at"] = (T0 + timedelta(seconds=10)).isoformat()
    stale["output"]["succeeded"] = 1
    for doc in (later, stale):
        assert (await post_delivery(client, orjson.dumps(doc))).status_code == 200
    rows = await sql(db, "SELECT status, event, succeeded FROM batches WHERE id = 'b_order'")
    assert dict(rows[0]) == {"status": "succeeded", "event": "batch.succeeded", "succeeded": 2}


async def test_a_10000_item_batch_callback_is_stored(client, db):
    items = [{"run_id": f"big_{i:05d}", "status_code": "succeeded"} for i in range(10_000)]
    body = orjson.dumps(batch_envelope("b_big", items))
    response = await post_delivery(client, body)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "stored"
    counts = await sql(
        db,
        "SELECT (SELECT count(*) FROM runs WHERE batch_id = 'b_big') AS runs,"
        " (SELECT count(*) FROM run_deliveries) AS links",
    )
    assert dict(counts[0]) == {"runs": 10_000, "links": 10_000}
    # The batch callback is among each item's deliveries.
    listed = await client.get("/runs/big_04242/deliveries", headers=auth())
    assert [d["kind"] for d in listed.json()["items"]] == ["batch_envelope"]


async def test_a_serialization_failure_is_retried(db):
    """A real 40001 raised by the database on the first attempt only."""
    async with driver_connection(db) as conn:
        # Count attempts outside the ingest transaction via a sequence (not rolled back).
        await conn.execute(
            "CREATE SEQUENCE flaky_attempts;"
            " CREATE FUNCTION flaky() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN IF NEW.id = 'flaky' AND nextval('flaky_attempts') = 1 THEN"
            "   RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END IF;"
            " RETURN NEW; END $$;"
            " CREATE TRIGGER flaky BEFORE INSERT ON runs FOR EACH ROW EXECUTE FUNCTION flaky()"
        )
    try:
        (result,) = await write_items(db, [item(run_object("flaky"))])
        assert result.outcome == "stored"
        rows = await sql(db, "SELECT last_value FROM flaky_attempts")
        assert rows[0]["last_value"] == 2  # failed once, then committed
        assert len(await sql(db, "SELECT 1 FROM runs WHERE id = 'flaky'")) == 1
    finally:
        async with driver_connection(db) as conn:
            await conn.execute(
                "DROP TRIGGER flaky ON runs; DROP FUNCTION flaky(); DROP SEQUENCE flaky_attempts"
            )


async def test_over_http_the_failing_item_is_archived_and_its_neighbours_answered_2xx(
    poison, client
):
    docs = [envelope(f"web_{i}") for i in range(4)] + [envelope("poison")]
    responses = await asyncio.gather(*(post_delivery(client, orjson.dumps(doc)) for doc in docs))
    assert [r.status_code for r in responses[:4]] == [200] * 4
    assert responses[4].status_code == 500
    assert responses[4].json()["error"]["code"] == "internal_error"
    archived = await sql(
        poison, "SELECT run_id, outcome, cause, body IS NOT NULL AS kept FROM deliveries"
    )
    by_outcome = sorted((r["outcome"], r["cause"], r["kept"]) for r in archived)
    assert by_outcome == [("rejected", "internal_error", True)] + [("stored", None, True)] * 4
