"""The partial filter indexes of revision 0011: /runs filters still read them, and they hold only
the runs that have a value. The archive's outcome index of revision 0013 likewise: lists of
the rare outcomes read it, and it holds only the deliveries that were not stored.

The plans are taken of the SQL ``receiver.queries.list_runs`` builds and binds, on enough rows
that an index is worth reading, both as PostgreSQL plans that statement for its values and as
the generic plan a prepared statement falls back to (where the value is unknown).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest

import receiver.queries as queries
from alembic import command
from receiver.migrations import alembic_config
from receiver.queryparams import RunFilters
from tests.support.database import connect, migrated_database

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


async def load(database_url: str, fill: str, table: str) -> str:
    """Run ``fill`` and ANALYZE ``table``, so the planner knows the rows it made."""
    conn = await connect(database_url)
    try:
        await conn.execute(fill)
        await conn.execute(f"ANALYZE {table}")
    finally:
        await conn.close()
    return database_url


@pytest.fixture
async def filled(db, database_url: str) -> str:
    return await load(database_url, FILL, "runs")


def index_names(plan: dict[str, Any]) -> set[str]:
    names = {plan["Index Name"]} if "Index Name" in plan else set()
    for child in plan.get("Plans", ()):
        names |= index_names(child)
    return names


async def plans_of(database_url: str, filters: RunFilters, monkeypatch) -> list[set[str]]:
    """The indexes each plan of the runs page query reads: custom plan, then generic plan."""
    built = capture_pages(monkeypatch)
    await queries.list_runs(None, filters, limit=50, after=None)  # type: ignore[arg-type]
    ((sql, args),) = built
    return await plans_of_sql(database_url, sql, args)


def capture_pages(monkeypatch) -> list[tuple[str, list[Any]]]:
    """The SQL and arguments of every page query the list functions build, not run."""
    built: list[tuple[str, list[Any]]] = []

    async def capture(engine, sql, args, key, limit):
        built.append((sql, list(args)))
        return [], None

    monkeypatch.setattr(queries, "_page", capture)
    return built


def literal(value: Any) -> str:
    """``value`` (text, or a list of texts) as an SQL literal."""
    if isinstance(value, list):
        return f"ARRAY[{', '.join(literal(v) for v in value)}]::text[]"
    assert isinstance(value, str)
    return "'" + value.replace("'", "''") + "'"


async def plans_of_sql(database_url: str, sql: str, args: list[Any]) -> list[set[str]]:
    """The indexes ``sql`` reads: custom plan, then generic plan.

    A prepared statement of the SQL, run with EXECUTE: ``plan_cache_mode`` applies only there.
    (EXPLAIN of the statement with bound parameters plans it for the values every time.)
    """
    conn = await connect(database_url)
    try:
        found = []
        values = ", ".join(literal(arg) for arg in args)
        for mode in ("force_custom_plan", "force_generic_plan"):
            # One transaction: behind PgBouncer, one server connection for all four.
            async with conn.transaction():
                await conn.execute(f"SET LOCAL plan_cache_mode = {mode}")
                await conn.execute(f"PREPARE page AS {sql}")
                explained = await conn.fetchval(
                    f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE page{f'({values})' if args else ''}"
                )
                await conn.execute("DEALLOCATE page")
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


# --- the archive's outcome index (0013) -------------------------------------------------------

DELIVERIES = 20_000
# One delivery in 50 rejected, one in 40 a duplicate (never both: 50 and 40 share 200, which
# goes to rejected); the rest stored. All on one day in 2025, so in the default partition.
FILL_DELIVERIES = f"""
INSERT INTO deliveries (received_at, signature, outcome)
SELECT TIMESTAMPTZ '2025-03-01 00:00:00+00' + g * INTERVAL '1 second', 'valid',
       CASE WHEN g % 50 = 0 THEN 'rejected' WHEN g % 40 = 0 THEN 'duplicate' ELSE 'stored' END
FROM generate_series(1, {DELIVERIES}) AS g
"""
REJECTED = DELIVERIES // 50
DUPLICATE = DELIVERIES // 40 - DELIVERIES // 200


@pytest.fixture
async def archived(db, database_url: str) -> str:
    return await load(database_url, FILL_DELIVERIES, "deliveries")


async def outcome_page(database_url: str, outcomes: list[str], monkeypatch) -> tuple[str, list]:
    built = capture_pages(monkeypatch)
    await queries.list_deliveries(None, outcomes=outcomes, limit=50, after=None)  # type: ignore[arg-type]
    ((sql, args),) = built
    return sql, args


def reads_outcome_index(used: set[str]) -> bool:
    # The partition's own index carries a generated name; the parent's is ix_deliveries_outcome.
    return any("outcome" in name for name in used)


# Two outcomes at once are not in received order in the index: at these shares (4 % of the
# archive) walking ix_deliveries_received is cheaper, as it was with the full index.
@pytest.mark.parametrize("outcomes", [["rejected"], ["duplicate"]], ids=["rejected", "duplicate"])
async def test_a_list_of_one_rare_outcome_reads_the_partial_outcome_index(
    archived, monkeypatch, outcomes
):
    sql, args = await outcome_page(archived, outcomes, monkeypatch)
    for used in await plans_of_sql(archived, sql, args):
        assert reads_outcome_index(used), used


@pytest.mark.parametrize(
    ("outcomes", "expected"),
    [
        (["rejected"], REJECTED),
        (["duplicate"], DUPLICATE),
        (["stored"], DELIVERIES - REJECTED - DUPLICATE),
        (["stored", "rejected"], DELIVERIES - DUPLICATE),
        ([], DELIVERIES),
    ],
    ids=["rejected", "duplicate", "stored", "stored and rejected", "any"],
)
async def test_an_outcome_list_finds_every_delivery_with_that_outcome(
    archived, monkeypatch, outcomes, expected
):
    sql, args = await outcome_page(archived, outcomes, monkeypatch)
    unpaged = sql.rsplit(" LIMIT ", 1)[0]
    conn = await connect(archived)
    try:
        rows = await conn.fetch(unpaged, *args)
    finally:
        await conn.close()
    assert len(rows) == expected
    assert {row["outcome"] for row in rows} <= set(outcomes or ["stored", "rejected", "duplicate"])


async def test_the_outcome_index_holds_only_the_deliveries_not_stored(archived):
    conn = await connect(archived)
    try:
        assert (
            await conn.fetchval(
                "SELECT pg_get_expr(indpred, indrelid) FROM pg_index"
                " WHERE indexrelid = 'ix_deliveries_outcome'::regclass"
            )
            == "(outcome <> 'stored'::text)"
        )
        index = await conn.fetchval(
            "SELECT i.indexrelid::regclass::text FROM pg_index i"
            " JOIN pg_inherits h ON h.inhrelid = i.indexrelid"
            " WHERE h.inhparent = 'ix_deliveries_outcome'::regclass"
            " AND i.indrelid = 'deliveries_default'::regclass"
        )
        await conn.execute(f"REINDEX INDEX {index}")
        entries = await conn.fetchval(
            "SELECT reltuples FROM pg_class WHERE oid = $1::regclass", index
        )
    finally:
        await conn.close()
    assert entries == REJECTED + DUPLICATE


async def test_a_page_of_stored_deliveries_walks_the_received_index(archived, monkeypatch):
    sql, args = await outcome_page(archived, ["stored"], monkeypatch)
    for used in await plans_of_sql(archived, sql, args):
        assert any("received" in name for name in used), used


@pytest.fixture
def at_0012(server_url: str) -> Iterator[str]:
    with migrated_database(server_url, "rfoutcome", revision="0012") as url:
        yield url


async def test_an_interrupted_0013_runs_again_and_leaves_one_valid_partial_index(
    at_0012: str,
) -> None:
    """0013 builds outside a transaction, so a cut-short run leaves its work behind: the new
    parent index, a partition's index attached to it, another's built but not attached."""
    url = at_0012
    conn = await connect(url)
    try:
        columns = "(outcome, received_at DESC, id DESC) WHERE outcome <> 'stored'"
        await conn.execute(
            f"CREATE INDEX ix_deliveries_outcome_new ON ONLY deliveries {columns};"
            " CREATE INDEX deliveries_default_rare_outcome_idx"
            f" ON deliveries_default {columns};"
            " ALTER INDEX ix_deliveries_outcome_new"
            " ATTACH PARTITION deliveries_default_rare_outcome_idx;"
        )
        partition = await conn.fetchval(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'deliveries'::regclass AND c.relname <> 'deliveries_default'"
            " ORDER BY 1 LIMIT 1"
        )
        await conn.execute(f"CREATE INDEX {partition}_rare_outcome_idx ON {partition} {columns}")
        await asyncio.to_thread(command.upgrade, alembic_config(url), "head")
        indexes = await conn.fetch(
            "SELECT c.relname, i.indisvalid, pg_get_expr(i.indpred, i.indrelid) AS pred"
            " FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
            " WHERE c.relname LIKE '%outcome%'"
        )
        partitions = await conn.fetchval(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'deliveries'::regclass"
        )
    finally:
        await conn.close()
    names = {row["relname"] for row in indexes}
    assert "ix_deliveries_outcome" in names and "ix_deliveries_outcome_new" not in names
    assert len(indexes) == partitions + 1  # the parent's and one per partition, no leftovers
    assert all(row["indisvalid"] for row in indexes)
    assert {row["pred"] for row in indexes} == {"(outcome <> 'stored'::text)"}
