"""Node runs and logs converge like the run row: a stale Run object never regresses them."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from tests.support.builders import post_delivery, run_object

TERMINAL = run_object(
    "run_nodes",
    status_code="failed",
    failure_code="node_failed",
    failure_stage_code="execution",
    node_runs=[
        {"id": "nr_a", "node_id": "ksampler", "status_code": "succeeded", "duration_ms": 900},
        {
            "id": "nr_b",
            "node_id": "vae",
            "status_code": "failed",
            "failure_code": "out_of_memory",
            "failure_message": "CUDA OOM",
            "duration_ms": 300,
        },
    ],
    logs=[
        {"id": "lg_0", "level": "info", "message": "dispatched"},
        {"id": "lg_1", "level": "error", "message": "CUDA OOM", "node_run_id": "nr_b"},
    ],
)
# Runflow's view of the same run while it was still running, delivered late.
STALE = run_object(
    "run_nodes",
    status_code="running",
    completed_at=None,
    duration_ms=None,
    cost=None,
    node_runs=[
        {"id": "nr_a", "node_id": "ksampler", "status_code": "running"},
        {"id": "nr_b", "node_id": "vae", "status_code": "running"},
    ],
    logs=[{"id": "lg_0", "level": "info", "message": "dispatched"}],
)


async def children(db):
    async with db.connect() as conn:
        nodes = (
            await conn.execute(
                text("SELECT id, status, failure_code, duration_ms FROM node_runs ORDER BY id")
            )
        ).all()
        logs = (
            await conn.execute(text("SELECT id, level, message FROM run_logs ORDER BY id"))
        ).all()
    return [tuple(n) for n in nodes], [tuple(log) for log in logs]


@pytest.mark.parametrize("order", ["terminal_first", "stale_first"])
async def test_a_stale_run_object_never_moves_node_runs_or_logs_backwards(client, db, order):
    docs = [TERMINAL, STALE] if order == "terminal_first" else [STALE, TERMINAL]
    for doc in docs:
        assert (await post_delivery(client, doc)).json()["status"] == "stored"
    nodes, logs = await children(db)
    assert nodes == [
        ("nr_a", "succeeded", None, 900),
        ("nr_b", "failed", "out_of_memory", 300),
    ]
    assert logs == [("lg_0", "info", "dispatched"), ("lg_1", "error", "CUDA OOM")]
