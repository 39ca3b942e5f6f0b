"""The stored rows follow the merge rules field by field, ties included, in any arrival order.

Runs, batches, node runs and logs are each checked against a model of SPEC section 2 stated
here, not taken from the receiver: rank = status precedence, then (between terminal payloads)
completed_at, then the time the receiver received the payload; each field holds the value of
the highest-ranked payload that carried it non-null. Payloads are written in a random order
(some together in one group-commit transaction, the rest one by one) with their received
times fixed up front, as deliveries do when concurrent flushers commit out of order.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from receiver.db import create_engine, driver_connection
from receiver.ingest.archive import ArchiveEntry
from receiver.ingest.batcher import write_items
from receiver.ingest.payloads import parse_payload
from receiver.ingest.store import Item
from receiver.vocabulary import SignatureVerdict

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)

# SPEC section 2, rule 1, written out independently of receiver.vocabulary.
LEVEL = {
    None: -1,  # no status says nothing about progress: it only fills gaps
    "queued": 0,
    "dispatching": 1,
    "running": 2,
    "succeeded": 3,
    "failed": 3,
    "cancelled": 3,
    "partial_succeeded": 3,
}
STATUSES = list(LEVEL)
# Few completed_at values, so terminal ties (equal completed_at) are common.
COMPLETED = [None, 10, 20]
WORDS = [None, "a", "b"]

HYPOTHESIS = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def rank(status: str | None, completed: int | None, received: int) -> tuple[int, int, int, int]:
    """Rules 1 and 2: a terminal payload with completed_at outranks a terminal one without
    (so the order is total); equal or missing completed_at, the later received wins."""
    level = LEVEL[status]
    if level == 3 and completed is not None:
        return (level, 1, completed, received)
    return (level, 0, 0, received)


def expected(payloads: list[dict[str, Any]], fields: list[str]) -> dict[str, Any]:
    """Rule 3 per field: the value of the highest-ranked payload that carries it non-null."""
    best_first = sorted(payloads, key=lambda p: p["rank"], reverse=True)
    return {
        name: next((p[name] for p in best_first if p.get(name) is not None), None)
        for name in fields
    }


def entry(body: bytes, received: int) -> ArchiveEntry:
    return ArchiveEntry.of(
        body, signature=SignatureVerdict.VALID, received_at=T0 + timedelta(seconds=received)
    )


async def write_in_order(
    database_url: str, bodies: list[tuple[bytes, int]], together: int, query: str, key: str
) -> dict[str, Any]:
    """Write ``bodies`` (``together`` of them first as one transaction); the row ``query``
    selects by ``key``."""
    engine = create_engine(database_url, pool_size=2)
    try:
        items = [Item(entry(body, at), parse_payload(orjson.loads(body))) for body, at in bodies]
        if together:
            await write_items(engine, items[:together])
        for item in items[together:]:
            await write_items(engine, [item])
        async with driver_connection(engine) as conn:
            row = await conn.fetchrow(query, key)
        assert row is not None
        return dict(row)
    finally:
        await engine.dispose()


def iso(seconds: int | None) -> str | None:
    return None if seconds is None else (T0 + timedelta(seconds=seconds)).isoformat()


@st.composite
def run_payloads(draw: Any) -> list[dict[str, Any]]:
    count = draw(st.integers(2, 6))
    out = []
    for received in draw(st.permutations(range(1, count + 1))):
        status = draw(st.sampled_from(STATUSES))
        completed = draw(st.sampled_from(COMPLETED))
        out.append(
            {
                "status": status,
                "completed_at": completed,
                "client_ref": draw(st.sampled_from(WORDS)),
                "failure_code": draw(st.sampled_from(WORDS)),
                "flow_id": draw(st.sampled_from(WORDS)),
                "received": received,
                "rank": rank(status, completed, received),
            }
        )
    return out


@HYPOTHESIS
@given(payloads=run_payloads(), data=st.data())
def test_a_run_row_holds_each_field_from_its_best_ranked_payload(database_url, payloads, data):
    run_id = f"rank_{uuid.uuid4().hex}"
    bodies = []
    for p in payloads:
        doc = {
            "id": run_id,
            "status_code": p["status"],
            "completed_at": iso(p["completed_at"]),
            "client_ref": p["client_ref"],
            "failure_code": p["failure_code"],
            "flow_id": p["flow_id"],
            "nonce": uuid.uuid4().hex,  # distinct bytes: no payload is a duplicate
        }
        bodies.append((orjson.dumps(doc), p["received"]))
    together = data.draw(st.integers(0, len(bodies)))
    row = asyncio.run(
        write_in_order(
            database_url,
            bodies,
            together,
            "SELECT status, completed_at, client_ref, failure_code, flow_id, delivery_count"
            " FROM runs WHERE id = $1",
            run_id,
        )
    )
    want = expected(payloads, ["status", "completed_at", "client_ref", "failure_code", "flow_id"])
    want["completed_at"] = (
        None if want["completed_at"] is None else T0 + timedelta(seconds=want["completed_at"])
    )
    assert {k: row[k] for k in want} == want
    assert row["delivery_count"] == len(payloads)


BATCH_STATUSES = [None, "running", "succeeded", "failed", "partial_succeeded", "cancelled"]


@st.composite
def batch_payloads(draw: Any) -> list[dict[str, Any]]:
    count = draw(st.integers(2, 5))
    out = []
    for received in draw(st.permutations(range(1, count + 1))):
        status = draw(st.sampled_from(BATCH_STATUSES))
        completed = draw(st.sampled_from(COMPLETED))
        out.append(
            {
                "status": status,
                "completed_at": completed,
                "succeeded": draw(st.sampled_from([None, 1, 2])),
                "total": draw(st.sampled_from([None, 3, 4])),
                "duration_ms": draw(st.sampled_from([None, 100, 200])),
                "received": received,
                "rank": rank(status, completed, received),
            }
        )
    return out


@HYPOTHESIS
@given(payloads=batch_payloads(), data=st.data())
def test_a_batch_row_follows_the_same_rules(database_url, payloads, data):
    batch_id = f"batch_{uuid.uuid4().hex}"
    bodies = []
    for p in payloads:
        doc = {
            "batch_id": batch_id,
            "status": p["status"],
            "completed_at": iso(p["completed_at"]),
            "duration_ms": p["duration_ms"],
            "output": {"items": [], "succeeded": p["succeeded"], "total": p["total"]},
            "metadata": {"nonce": uuid.uuid4().hex},
        }
        bodies.append((orjson.dumps(doc), p["received"]))
    together = data.draw(st.integers(0, len(bodies)))
    row = asyncio.run(
        write_in_order(
            database_url,
            bodies,
            together,
            "SELECT status, completed_at, succeeded, total, duration_ms, delivery_count"
            " FROM batches WHERE id = $1",
            batch_id,
        )
    )
    fields = ["status", "completed_at", "succeeded", "total", "duration_ms"]
    want = expected(payloads, fields)
    want["completed_at"] = (
        None if want["completed_at"] is None else T0 + timedelta(seconds=want["completed_at"])
    )
    assert {k: row[k] for k in want} == want
    assert row["delivery_count"] == len(payloads)


@HYPOTHESIS
@given(payloads=run_payloads(), data=st.data())
def test_node_runs_and_logs_follow_the_same_rules(database_url, payloads, data):
    """One node run and one log in every Run object: the node ranks by its own status and
    completed_at, the log (no status) by arrival alone."""
    run_id = f"noderank_{uuid.uuid4().hex}"
    node_id, log_id = f"{run_id}_n", f"{run_id}_l"
    bodies = []
    for p in payloads:
        p["log_rank"] = rank(None, None, p["received"])
        doc = {
            "id": run_id,
            "status_code": "running",
            "node_runs": [
                {
                    "id": node_id,
                    "status_code": p["status"],
                    "completed_at": iso(p["completed_at"]),
                    "failure_code": p["failure_code"],
                    "node_type": p["flow_id"],
                }
            ],
            "logs": [{"id": log_id, "message": p["client_ref"], "level": p["failure_code"]}],
            "nonce": uuid.uuid4().hex,
        }
        bodies.append((orjson.dumps(doc), p["received"]))
    together = data.draw(st.integers(0, len(bodies)))
    node = asyncio.run(
        write_in_order(
            database_url,
            bodies,
            together,
            "SELECT n.status, n.completed_at, n.failure_code, n.node_type, n.data,"
            " l.message, l.level, l.data AS log_data"
            " FROM node_runs n JOIN run_logs l ON l.run_id = n.run_id WHERE n.id = $1",
            node_id,
        )
    )
    want = expected(payloads, ["status", "completed_at", "failure_code", "flow_id"])
    assert node["status"] == want["status"]
    assert node["completed_at"] == (
        None if want["completed_at"] is None else T0 + timedelta(seconds=want["completed_at"])
    )
    assert node["failure_code"] == want["failure_code"]
    assert node["node_type"] == want["flow_id"]
    by_arrival = [{**p, "rank": p["log_rank"]} for p in payloads]
    log_want = expected(by_arrival, ["client_ref", "failure_code"])
    assert (node["message"], node["level"]) == (log_want["client_ref"], log_want["failure_code"])
    # Stored once: the columns are not repeated in data.
    assert node["data"] is None and node["log_data"] is None
