"""The path past one primary stays open: every unique key of a per-run table has the run id.

Citus (docs/scale-out.md) distributes the per-run tables by run id and can only enforce a
unique key that contains the distribution column; a table that holds rows per run and a key
without the run id would close that path.
"""

from __future__ import annotations

import asyncpg

from tests.support.database import connect

# Table -> the column holding the run id. Stated here, not read from the code under test.
PER_RUN = {
    "runs": "id",
    "node_runs": "run_id",
    "run_logs": "run_id",
    "run_deliveries": "run_id",
    "enrichment_queue": "run_id",
    "reconciliation_checks": "run_id",
}
# Tables with a run id column that are not distributed by it, and why.
NOT_PER_RUN = {
    "deliveries": "the archive: keyed (id, received_at), partitioned by time, kept local or"
    " distributed by its own id",
}

UNIQUE_KEYS = """
SELECT t.relname AS table_name, i.relname AS index_name,
       array_agg(a.attname::text ORDER BY k.ord) AS columns
FROM pg_index x
JOIN pg_class t ON t.oid = x.indrelid
JOIN pg_class i ON i.oid = x.indexrelid
JOIN pg_namespace n ON n.oid = t.relnamespace
CROSS JOIN LATERAL unnest(x.indkey) WITH ORDINALITY AS k(attnum, ord)
LEFT JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum
WHERE n.nspname = 'public' AND x.indisunique AND NOT t.relispartition
GROUP BY t.relname, i.relname
"""
RUN_ID_COLUMNS = """
SELECT c.table_name FROM information_schema.columns c
JOIN pg_class t ON t.relname = c.table_name
WHERE c.table_schema = 'public' AND c.column_name = 'run_id' AND NOT t.relispartition
"""


async def _fetch(url: str, sql: str) -> list[asyncpg.Record]:
    conn = await connect(url)
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


async def test_every_unique_key_of_a_per_run_table_includes_the_run_id(database_url: str) -> None:
    keys = await _fetch(database_url, UNIQUE_KEYS)
    seen = {row["table_name"] for row in keys}
    present = {table for table in PER_RUN if table in seen}
    assert {"runs", "node_runs", "run_logs"} <= present
    wrong = [
        f"{row['table_name']}.{row['index_name']} {row['columns']}"
        for row in keys
        if row["table_name"] in PER_RUN and PER_RUN[row["table_name"]] not in row["columns"]
    ]
    assert wrong == [], "unique keys without the run id: " + ", ".join(wrong)


async def test_every_table_with_a_run_id_is_checked_or_exempted_for_a_reason(
    database_url: str,
) -> None:
    tables = {row["table_name"] for row in await _fetch(database_url, RUN_ID_COLUMNS)}
    unaccounted = tables - PER_RUN.keys() - NOT_PER_RUN.keys()
    assert unaccounted == set(), f"per-run tables to add to PER_RUN: {sorted(unaccounted)}"
