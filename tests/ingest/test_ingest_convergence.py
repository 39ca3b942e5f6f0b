"""The merge rules end to end: deliveries for one run, posted in any order, give one row."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from receiver.settings import Settings
from tests.support.apps import running_app
from tests.support.builders import SIGNING_SECRET, T0, envelope, post_delivery, run_object
from tests.support.database import truncate_all

RANKS = [("queued", None), ("running", None), ("succeeded", 10), ("failed", 20), ("cancelled", 30)]
IGNORED = {"first_received_at", "last_received_at", "updated_at", "ranks"}  # ranks: bookkeeping


@st.composite
def run_deliveries(draw):
    """2-5 payloads for run "conv" with pairwise different precedence or completed_at."""
    chosen = draw(st.lists(st.sampled_from(RANKS), min_size=2, max_size=5, unique=True))
    optional = st.one_of(st.none(), st.sampled_from(["x", "y"]))
    docs = []
    for status, completed in chosen:
        completed_at = T0 + timedelta(seconds=completed) if completed else None
        if draw(st.booleans()):
            doc = envelope("conv", status=status, completed_at=completed_at, duration_ms=None)
            if draw(st.booleans()):
                doc["metadata"] = {"tag": draw(optional)}
        else:
            doc = run_object(
                "conv",
                status_code=status,
                completed_at=completed_at.isoformat() if completed_at else None,
                client_ref=draw(optional),
                failure_code=draw(optional),
                cost=draw(st.one_of(st.none(), st.sampled_from(["0.5", "1.25"]))),
                model=draw(st.one_of(st.none(), st.just({"id": "m1", "slug": "flux"}))),
                duration_ms=draw(st.one_of(st.none(), st.integers(0, 5000))),
            )
        docs.append(orjson.dumps(doc))
    return docs


async def _final_row(database_url: str, bodies: list[bytes]) -> tuple[dict, list[str]]:
    await truncate_all(database_url)
    async with running_app(
        Settings(signing_secrets=[SIGNING_SECRET]), database_url=database_url
    ) as (app, client):
        outcomes = [(await post_delivery(client, body)).json()["status"] for body in bodies]
        async with app.state.resources.engine.connect() as conn:
            row = (await conn.execute(text("SELECT * FROM runs WHERE id = 'conv'"))).one()
    return {k: v for k, v in row._mapping.items() if k not in IGNORED}, outcomes


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(bodies=run_deliveries(), data=st.data())
def test_any_arrival_order_converges_in_the_database(database_url, bodies, data):
    order_a = data.draw(st.permutations(bodies))
    order_b = data.draw(st.permutations(bodies))
    # Redeliver one payload byte for byte: it must be answered duplicate and change nothing.
    order_b = [*order_b, data.draw(st.sampled_from(bodies))]
    row_a, outcomes_a = asyncio.run(_final_row(database_url, order_a))
    row_b, outcomes_b = asyncio.run(_final_row(database_url, order_b))
    assert outcomes_a == ["stored"] * len(bodies)
    assert outcomes_b == ["stored"] * len(bodies) + ["duplicate"]
    assert row_a == row_b
    assert row_a["delivery_count"] == len(bodies)
    for name in ("client_ref", "failure_code", "cost", "model"):
        said = [orjson.loads(b).get(name) for b in bodies]
        if any(value is not None for value in said):
            assert row_a[name] is not None, f"a null erased {name}"
