"""The partial filter indexes of revision 0011: /runs filters still read them, and they hold only
the runs that have a value.

The plans are taken of the SQL ``receiver.queries.list_runs`` builds and binds, on enough rows
that an index is worth reading, both as PostgreSQL plans that statement for its values and as
the generic plan a prepared statement falls back to (where the value is unknown).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

import receiver.queries as queries
from receiver.queryparams import RunFilters
from tests.support.database import connect

ROWS = 20_000
# One run in 50 failed, with one of the codes; the others have none.
FILL = f"""
INSERT INTO runs (id, status, failure_code, created_at)
SELECT 'run_' || lpad(g::text, 6, '0'),
       CASE WHEN g % 50 = 0 THEN 'failed' ELSE 'succeeded' END,
       CASE WHEN g % 50 = 0 THEN 'code_' || lpad(((g / 50) % 12)::text, 2, '0') END,
       TIMESTAMPTZ '2026-01-01 00:00:00+00' + g * INTERVAL '1 minute'
FROM generate_series(1, {ROWS}) AS g
"""


@pytest.fixture
async def filled(db, database_url: str) -> str:
    conn = await connect(database_url)
    try:
        await conn.execute(FILL)
        await conn.execute("ANALYZE runs")
    finally:
        await conn.close()
    return database_url


def index_names(plan: dict[str, Any]) -> set[str]:
    names = {plan["Index Name"]} if "Index Name" in plan else set()
    for child in plan.get("Plans", ()):
        names |= index_names(child)
    return names


async def plans_of(database_url: str, filters: RunFilters, monkeypatch) -> list[set[str]]:
    """The indexes each plan of the page query reads: custom plan, then generic plan."""
    built: list[tuple[str, list[Any]]] = []

    async def capture(engine, sql, args, key, limit):
        built.append((sql, list(args)))
        return [], None

    monkeypatch.setattr(queries, "_page", capture)
    await queries.list_runs(None, filters, limit=50, after=None)  # type: ignore[arg-type]
    ((sql, args),) = built
    conn = await connect(database_url)
    try:
        found = []
        for mode in ("force_custom_plan", "force_generic_plan"):
            await conn.execute(f"SET plan_cache_mode = {mode}")
            explained = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", *args)
            found.append(index_names(json.loads(explained)[0]["Plan"]))
        return found
    finally:
        await conn.close()


async def predicate(database_url: str, index: str) -> str | None:
    conn = await connect(database_url)
    try:
        return await conn.fetchval(
            "SELECT pg_get_expr(indpred, indrelid) FROM pg_index WHERE indexrelid = $1::regclass",
            index,
        )
    finally:
        await conn.close()


@pytest.mark.parametrize(
    "values",
    [
        pytest.param(["code_03"], id="one value (column = $1)"),
        pytest.param(["code_03", "code_07"], id="a few values (one = $n branch each)"),
        pytest.param(["code_03", *(f"other_{i}" for i in range(20))], id="many values (= ANY($1))"),
    ],
)
async def test_a_runs_filter_on_a_sparse_column_reads_its_partial_index(
    filled, monkeypatch, values
):
    assert await predicate(filled, "ix_runs_failure_code_sort") == "(failure_code IS NOT NULL)"
    for used in await plans_of(filled, RunFilters({"failure_code": values}), monkeypatch):
        assert "ix_runs_failure_code_sort" in used, used


async def test_a_partial_filter_index_holds_only_the_runs_with_a_value(filled):
    conn = await connect(filled)
    try:
        # REINDEX counts the entries it builds into pg_class.reltuples, exactly.
        await conn.execute("REINDEX INDEX ix_runs_failure_code_sort")
        entries = await conn.fetchval(
            "SELECT reltuples FROM pg_class WHERE relname = 'ix_runs_failure_code_sort'"
        )
        with_code = await conn.fetchval("SELECT count(*) FROM runs WHERE failure_code IS NOT NULL")
    finally:
        await conn.close()
    assert with_code == ROWS // 50
    assert entries == with_code
