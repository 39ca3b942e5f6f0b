"""Read queries for /runs and /deliveries: keyset pages on the indexes of revision 0002.

Every read the API serves runs in a transaction of its own whose statements are cancelled
after the request's statement timeout (``bounded_reads``; ``SET LOCAL``, so nothing outlives
the transaction on a pooled or PgBouncer-shared connection); a cancelled read is a 503.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from datetime import datetime
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from receiver.db import driver_connection
from receiver.errors import Unavailable
from receiver.ingest.archive import decode_body
from receiver.queryparams import FILTER_COLUMNS, RunFilters
from receiver.retention import retained_since
from receiver.vocabulary import DeliveryOutcome

# The statement timeout of the request being served (seconds); None outside API requests.
_STATEMENT_TIMEOUT: ContextVar[float | None] = ContextVar("statement_timeout", default=None)


@contextmanager
def bounded_reads(seconds: float) -> Iterator[None]:
    """Reads made inside (tasks started inside included) are cancelled after ``seconds``."""
    token = _STATEMENT_TIMEOUT.set(seconds)
    try:
        yield
    finally:
        _STATEMENT_TIMEOUT.reset(token)


@asynccontextmanager
async def read_connection(engine: AsyncEngine) -> AsyncIterator[Any]:
    """A driver connection in a transaction, under the request's statement timeout."""
    seconds = _STATEMENT_TIMEOUT.get()
    async with driver_connection(engine) as conn:
        try:
            async with conn.transaction():
                if seconds is not None:
                    await conn.execute(
                        f"SET LOCAL statement_timeout = {max(1, round(seconds * 1000))}"
                    )
                yield conn
        except asyncpg.exceptions.QueryCanceledError:
            raise Unavailable(
                f"the query took longer than {seconds} s and was cancelled;"
                " narrow the window or the filters, or retry later"
            ) from None


RUN_COLUMNS = (
    "id, org_id, status, event, target_type, model, model_id, flow_id, comfyui_workflow_id,"
    " batch_id, client_ref, source, failure_code, failure_message, failure_stage, duration_ms,"
    " cost, created_at, started_at, completed_at, input, output, metadata, first_received_at,"
    " last_received_at, delivery_count, enriched_at, enrichment_error, sort_at"
)
DELIVERY_COLUMNS = (
    "id, received_at, outcome, cause, cause_detail, kind, run_id, batch_id, signature, source,"
    " request_id, content_type, body_size, duplicate_of, replay_count, replayed_at,"
    # A webhook row stores the headers its columns already hold only in the columns
    # (receiver.ingest.archive.stored_headers); rows from before that keep both, the same.
    " CASE WHEN source = 'webhook' THEN jsonb_strip_nulls(jsonb_build_object("
    "'content-type', content_type, 'runflow-request-id', request_id)) || headers"
    " ELSE headers END AS headers"
)


class Where:
    """A WHERE clause built from whitelisted column names and numbered parameters."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.args: list[Any] = []

    def add(self, template: str, *values: Any) -> None:
        self.parts.append(template.format(*(self.param(value) for value in values)))

    def param(self, value: Any) -> str:
        """A placeholder bound to ``value``, for SQL written around this clause."""
        self.args.append(value)
        return f"${len(self.args)}"

    def raw(self, condition: str) -> None:
        self.parts.append(condition)

    def sql(self) -> str:
        return " AND ".join(self.parts) if self.parts else "TRUE"


def run_filters(filters: RunFilters, where: Where | None = None) -> Where:
    where = where or Where()
    for name, values in filters.values.items():
        column = FILTER_COLUMNS[name]
        if len(values) == 1:
            # A plain equality lets the planner walk (column, sort_at, id) in order.
            where.add(f"{column} = {{}}", values[0])
        else:
            where.add(f"{column} = ANY({{}}::text[])", values)
    if filters.created_after is not None:
        where.add("sort_at >= {}", filters.created_after)
    if filters.created_before is not None:
        where.add("sort_at < {}", filters.created_before)
    return where


def run_out(row: Any) -> dict[str, Any]:
    """The API's Run representation (SPEC section 3)."""
    out = {key: value for key, value in row.items() if key != "sort_at"}
    out["cost"] = None if row["cost"] is None else str(row["cost"])
    return out


# A multi-valued filter on its own makes PostgreSQL scan the whole sort index and filter it
# (90 ms at 1M runs for two rare models); read as one ordered index range per value and
# merged (Merge Append), the same page takes under 1 ms. Most selective columns first.
SPREAD_ORDER = (
    "client_ref",
    "batch_id",
    "failure_code",
    "model",
    "org_id",
    "failure_stage",
    "source",
    "target_type",
    "status",
)
SPREAD_MOST = 20


def _spread_filter(filters: RunFilters) -> str | None:
    """The multi-valued filter worth reading as one index range per value, if any."""
    for name in SPREAD_ORDER:
        if 1 < len(set(filters.values.get(name, ()))) <= SPREAD_MOST:
            return name
    return None


async def list_runs(
    engine: AsyncEngine, filters: RunFilters, *, limit: int, after: tuple[datetime, str] | None
) -> tuple[list[dict[str, Any]], tuple[datetime, str] | None]:
    select = f"SELECT {RUN_COLUMNS} FROM runs"
    spread = _spread_filter(filters)
    if spread is None:
        rows, last = await _keyset_page(
            engine, select, run_filters(filters), "sort_at", limit, after
        )
        return [run_out(row) for row in rows], last
    others = {name: values for name, values in filters.values.items() if name != spread}
    where = run_filters(RunFilters(others, filters.created_after, filters.created_before))
    if after is not None:
        where.add("(sort_at, id) < ({}, {})", *after)
    order = f"ORDER BY sort_at DESC, id DESC LIMIT {limit + 1}"
    branches = [
        f"({select} WHERE {FILTER_COLUMNS[spread]} = {where.param(value)}"
        f" AND {where.sql()} {order})"
        for value in dict.fromkeys(filters.values[spread])
    ]
    sql = f"SELECT * FROM ({' UNION ALL '.join(branches)}) AS page {order}"
    rows, last = await _page(engine, sql, where.args, "sort_at", limit)
    return [run_out(row) for row in rows], last


async def _keyset_page(
    engine: AsyncEngine, select: str, where: Where, key: str, limit: int, after: Any
) -> tuple[list[Any], Any]:
    """Rows after the cursor position, newest first on (``key``, id), and the next position."""
    if after is not None:
        where.add(f"({key}, id) < ({{}}, {{}})", *after)
    sql = f"{select} WHERE {where.sql()} ORDER BY {key} DESC, id DESC LIMIT {limit + 1}"
    return await _page(engine, sql, where.args, key, limit)


async def _page(
    engine: AsyncEngine, sql: str, args: list[Any], key: str, limit: int
) -> tuple[list[Any], Any]:
    """One page of ``sql`` (which reads one row more than the page, to know if more follow)."""
    async with read_connection(engine) as conn:
        rows = list(await conn.fetch(sql, *args))
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, ((rows[-1][key], rows[-1]["id"]) if more and rows else None)


async def get_run(engine: AsyncEngine, run_id: str) -> dict[str, Any] | None:
    async with read_connection(engine) as conn:
        row = await conn.fetchrow(f"SELECT {RUN_COLUMNS} FROM runs WHERE id = $1", run_id)
        if row is None:
            return None
        nodes = await conn.fetch(
            "SELECT id, node_id, node_type, status, failure_code, failure_message, created_at,"
            " started_at, completed_at, duration_ms FROM node_runs WHERE run_id = $1"
            " ORDER BY started_at NULLS LAST, id",
            run_id,
        )
    run = run_out(row)
    run["node_runs"] = [dict(node) for node in nodes]
    return run


def delivery_out(row: Any) -> dict[str, Any]:
    return dict(row)


async def run_deliveries(
    engine: AsyncEngine, run_id: str, *, limit: int, after: tuple[datetime, int] | None
) -> tuple[list[dict[str, Any]], tuple[datetime, int] | None]:
    """Requests that touched the run, batch callbacks included, oldest first: one page after
    the cursor position, and the position of the next page when more follow."""
    where = Where()
    run = where.param(run_id)
    where.raw(
        f"(run_id = {run} OR (id, received_at) IN"
        f" (SELECT delivery_id, received_at FROM run_deliveries WHERE run_id = {run}))"
    )
    if after is not None:
        where.add("(received_at, id) > ({}, {})", *after)
    sql = (
        f"SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE {where.sql()}"
        f" ORDER BY received_at, id LIMIT {limit + 1}"
    )
    rows, last = await _page(engine, sql, where.args, "received_at", limit)
    return [delivery_out(row) for row in rows], last


async def archive_retained_since(engine: AsyncEngine) -> datetime | None:
    """Where the archive begins: older deliveries have been pruned (receiver.retention)."""
    async with driver_connection(engine) as conn:
        return await retained_since(conn)


async def list_deliveries(
    engine: AsyncEngine, *, outcomes: list[str], limit: int, after: tuple[datetime, int] | None
) -> tuple[list[dict[str, Any]], tuple[datetime, int] | None]:
    where = Where()
    if len(outcomes) == 1:
        where.add("outcome = {}", outcomes[0])
    elif outcomes:
        where.add("outcome = ANY({}::text[])", outcomes)
    if outcomes and DeliveryOutcome.STORED not in outcomes:
        # ix_deliveries_outcome holds only these (0013): a generic plan, which does not know
        # the value bound, reads it only when the query says so itself.
        where.raw("outcome <> 'stored'")
    rows, last = await _keyset_page(
        engine, f"SELECT {DELIVERY_COLUMNS} FROM deliveries", where, "received_at", limit, after
    )
    return [delivery_out(row) for row in rows], last


async def get_delivery(engine: AsyncEngine, delivery_id: int) -> dict[str, Any] | None:
    async with read_connection(engine) as conn:
        row = await conn.fetchrow(
            f"SELECT {DELIVERY_COLUMNS}, body, body_encoding FROM deliveries WHERE id = $1",
            delivery_id,
        )
    if row is None:
        return None
    out = dict(row)
    body, encoding = out.pop("body"), out.pop("body_encoding")
    out["body"] = (
        None if body is None else decode_body(bytes(body), encoding).decode("utf-8", "replace")
    )
    return out
