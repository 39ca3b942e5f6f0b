"""The ingest write path: archive, fingerprint and the merged rows, for many deliveries at once.

PostgreSQL-specific SQL lives here and nowhere else. Everything runs on the raw asyncpg
connection, inside a transaction the caller holds (``receiver.ingest.batcher`` groups the
deliveries in flight into one). A batch costs a fixed number of set-based statements whatever
its size: claim fingerprints and allocate ids, insert archive rows, lock, read the touched
rows' ranks, upsert runs, node runs, logs and batches, link batch items, queue enrichment.

Merge: each row keeps which rank supplied each non-null field (``ranks``, see
``receiver.ingest.merge``); a payload's field overwrites exactly when the payload outranks the
field's owner, so a delivery reads and writes only the rows it touches, never their history.

Locking: the runs and batches a transaction touches are locked with transaction-scoped
advisory locks on a bounded number of hash buckets (``LOCK_BUCKETS``), taken in ascending
order before the rows are read, so ingest transactions cannot deadlock one another and a
10,000-item batch takes at most ``LOCK_BUCKETS`` locks. Any other path that writes runs
takes the same bucket locks first (``lock_runs``). Nothing session-level: fit for PgBouncer
transaction pooling.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from receiver.ingest.archive import ArchiveEntry
from receiver.ingest.merge import RankEntries, merge_fields, owned_fields, payload_rank
from receiver.ingest.payloads import RUN_FIELDS, ParsedPayload
from receiver.vocabulary import TERMINAL_RANK, DeliveryOutcome, precedence

LOCK_BUCKETS = 1024
_LOCK_SPACE = 0x52554E53  # advisory lock namespace ("RUNS") of the bucket locks


def json_text(value: Any) -> str | None:
    """JSON text for a jsonb parameter: the jsonb codec SQLAlchemy installs takes text."""
    if value is None:
        return None
    return orjson.dumps(value, default=str).decode()


def byte_order(keys: Iterable[str]) -> list[str]:
    """Distinct keys in byte order (``COLLATE "C"``): the one lock order of every path."""
    return sorted(set(keys), key=lambda key: key.encode())


@dataclass
class StoreResult:
    outcome: DeliveryOutcome
    delivery_id: int
    run_id: str | None = None
    batch_id: str | None = None
    duplicate_of: int | None = None
    cause: str | None = None
    cause_detail: dict[str, Any] | None = None
    reached_terminal: list[str] = field(default_factory=list)


@dataclass
class Item:
    """One delivery to store: its archive entry and parsed payload."""

    entry: ArchiveEntry
    parsed: ParsedPayload
    replay_of: int | None = None  # update that archive row instead of inserting one
    enrich: bool = False  # queue envelope-only runs for enrichment


# Bit positions in ``ranks`` masks: APPEND ONLY (stored rows refer to them; see 0008).
RUN_BITS: Mapping[str, int] = {name: i for i, name in enumerate(RUN_FIELDS)}
NODE_FIELDS = (
    "node_id",
    "node_type",
    "status",
    "failure_code",
    "failure_message",
    "created_at",
    "started_at",
    "completed_at",
    "duration_ms",
    "data",
)
NODE_BITS: Mapping[str, int] = {name: i for i, name in enumerate(NODE_FIELDS)}
LOG_FIELDS = ("node_run_id", "level", "message", "logged_at", "data")
LOG_BITS: Mapping[str, int] = {name: i for i, name in enumerate(LOG_FIELDS)}
BATCH_FIELDS = (
    "event",
    "status",
    "succeeded",
    "failed",
    "cancelled",
    "total",
    "duration_ms",
    "created_at",
    "completed_at",
    "metadata",
)
BATCH_BITS: Mapping[str, int] = {name: i for i, name in enumerate(BATCH_FIELDS)}
# What the wire keys of a node run / log already stored as columns are called in ``data``.
_NODE_DATA_KEYS = frozenset({"id", "status_code", *NODE_FIELDS})
_LOG_DATA_KEYS = frozenset({"id", "created_at", "timestamp", *LOG_FIELDS})

# Fields only a Run object carries: a run with none of them has only been seen in envelopes.
RUN_OBJECT_FIELDS = ("target_type", "source", "org_id", "model_id")

# SQL types of the columns, for unnest arrays (jsonb goes as text and is cast).
_JSON = "jsonb"
_RUN_TYPES: Mapping[str, str] = {
    **dict.fromkeys(RUN_FIELDS, "text"),
    "duration_ms": "bigint",
    "cost": "numeric",
    "cost_breakdown": _JSON,
    "input": _JSON,
    "output": _JSON,
    "metadata": _JSON,
    "created_at": "timestamptz",
    "started_at": "timestamptz",
    "completed_at": "timestamptz",
}
_NODE_TYPES: Mapping[str, str] = {
    **dict.fromkeys(NODE_FIELDS, "text"),
    "created_at": "timestamptz",
    "started_at": "timestamptz",
    "completed_at": "timestamptz",
    "duration_ms": "bigint",
    "data": _JSON,
}
_LOG_TYPES: Mapping[str, str] = {
    **dict.fromkeys(LOG_FIELDS, "text"),
    "logged_at": "timestamptz",
    "data": _JSON,
}
_BATCH_TYPES: Mapping[str, str] = {
    **dict.fromkeys(BATCH_FIELDS, "integer"),
    "event": "text",
    "status": "text",
    "duration_ms": "bigint",
    "created_at": "timestamptz",
    "completed_at": "timestamptz",
    "metadata": _JSON,
}


def _unnest(columns: Sequence[tuple[str, str]]) -> tuple[str, str]:
    """``unnest($1::t1[], ...) AS u(c1, ...)`` and the select list casting jsonb back."""
    args = ", ".join(
        f"${i}::{'text' if kind == _JSON else kind}[]" for i, (_, kind) in enumerate(columns, 1)
    )
    names = ", ".join(name for name, _ in columns)
    select = ", ".join(
        f"u.{name}::jsonb" if kind == _JSON else f"u.{name}" for name, kind in columns
    )
    return f"unnest({args}) AS u({names})", select


def _upsert_sql(
    table: str,
    columns: Sequence[tuple[str, str]],
    merged: Sequence[str],
    extra_sets: Sequence[str],
) -> str:
    """INSERT ... SELECT FROM unnest ON CONFLICT (id): merged columns keep the stored value
    where the batch sent null (a field the delivery did not win), others as ``extra_sets``."""
    source, select = _unnest(columns)
    sets = [f"{name} = COALESCE(EXCLUDED.{name}, {table}.{name})" for name in merged]
    return (
        f"INSERT INTO {table} ({', '.join(name for name, _ in columns)})"
        f" SELECT {select} FROM {source}"
        f" ON CONFLICT (id) DO UPDATE SET {', '.join([*sets, *extra_sets])}"
    )


_RUN_COLUMNS = (
    ("id", "text"),
    *((name, _RUN_TYPES[name]) for name in RUN_FIELDS),
    ("first_received_at", "timestamptz"),
    ("last_received_at", "timestamptz"),
    ("delivery_count", "integer"),
    ("ranks", _JSON),
)
_UPSERT_RUNS = _upsert_sql(
    "runs",
    _RUN_COLUMNS,
    RUN_FIELDS,
    (
        "first_received_at = LEAST(runs.first_received_at, EXCLUDED.first_received_at)",
        "last_received_at = GREATEST(runs.last_received_at, EXCLUDED.last_received_at)",
        "delivery_count = runs.delivery_count + EXCLUDED.delivery_count",
        "ranks = EXCLUDED.ranks",
        "updated_at = now()",
    ),
)
_NODE_COLUMNS = (
    ("id", "text"),
    ("run_id", "text"),
    *((name, _NODE_TYPES[name]) for name in NODE_FIELDS),
    ("ranks", _JSON),
)
_UPSERT_NODES = _upsert_sql(
    "node_runs", _NODE_COLUMNS, NODE_FIELDS, ("ranks = EXCLUDED.ranks", "updated_at = now()")
)
_LOG_COLUMNS = (
    ("id", "text"),
    ("run_id", "text"),
    *((name, _LOG_TYPES[name]) for name in LOG_FIELDS),
    ("ranks", _JSON),
)
_UPSERT_LOGS = _upsert_sql("run_logs", _LOG_COLUMNS, LOG_FIELDS, ("ranks = EXCLUDED.ranks",))
_BATCH_COLUMNS = (
    ("id", "text"),
    *((name, _BATCH_TYPES[name]) for name in BATCH_FIELDS),
    ("precedence", "smallint"),
    ("first_received_at", "timestamptz"),
    ("last_received_at", "timestamptz"),
    ("delivery_count", "integer"),
    ("ranks", _JSON),
)
_UPSERT_BATCHES = _upsert_sql(
    "batches",
    _BATCH_COLUMNS,
    BATCH_FIELDS,
    (
        "precedence = GREATEST(batches.precedence, EXCLUDED.precedence)",
        "first_received_at = LEAST(batches.first_received_at, EXCLUDED.first_received_at)",
        "last_received_at = GREATEST(batches.last_received_at, EXCLUDED.last_received_at)",
        "delivery_count = batches.delivery_count + EXCLUDED.delivery_count",
        "ranks = EXCLUDED.ranks",
    ),
)

# Fingerprints and ids for a whole batch in one statement. ``u`` is materialised (it calls
# nextval), so each item keeps one id; the same bytes twice in the batch: the first claims.
# ``f`` reads the snapshot before this statement: the owner of bytes accepted earlier.
_CLAIM = """
WITH u AS MATERIALIZED (
    SELECT ord, sha, recv, COALESCE(rid, nextval('deliveries_id_seq')) AS id
    FROM unnest($1::bytea[], $2::timestamptz[], $3::bigint[]) WITH ORDINALITY AS u(sha, recv, rid, ord)
), ins AS (
    INSERT INTO delivery_fingerprints (body_sha256, delivery_id, received_at)
    SELECT sha, id, recv FROM u WHERE sha IS NOT NULL ORDER BY ord
    ON CONFLICT (body_sha256) DO NOTHING
    RETURNING body_sha256, delivery_id
)
SELECT u.id, COALESCE(ins.delivery_id = u.id, false) AS claimed,
    COALESCE(f.delivery_id, ins.delivery_id) AS owner
FROM u
LEFT JOIN ins ON ins.body_sha256 = u.sha
LEFT JOIN delivery_fingerprints f ON f.body_sha256 = u.sha
ORDER BY u.ord
"""  # noqa: E501

_DELIVERY_COLUMNS = (
    ("id", "bigint"),
    ("received_at", "timestamptz"),
    ("request_id", "text"),
    ("headers", _JSON),
    ("content_type", "text"),
    ("body", "bytea"),
    ("body_sha256", "bytea"),
    ("body_size", "bigint"),
    ("signature", "text"),
    ("outcome", "text"),
    ("cause", "text"),
    ("cause_detail", _JSON),
    ("kind", "text"),
    ("run_id", "text"),
    ("batch_id", "text"),
    ("duplicate_of", "bigint"),
    ("source", "text"),
)
_source, _select = _unnest(_DELIVERY_COLUMNS)
_INSERT_DELIVERIES = (
    f"INSERT INTO deliveries ({', '.join(name for name, _ in _DELIVERY_COLUMNS)})"
    f" SELECT {_select} FROM {_source}"
)

_INSERT_DELIVERY = """
INSERT INTO deliveries (
    id, received_at, request_id, headers, content_type, body, body_sha256, body_size,
    signature, outcome, cause, cause_detail, kind, run_id, batch_id, duplicate_of, source
) VALUES (
    COALESCE($1, nextval('deliveries_id_seq')), $2, $3, $4, $5, $6, $7, $8,
    $9, $10, $11, $12, $13, $14, $15, $16, $17
)
RETURNING id
"""

_UPDATE_DELIVERY = """
UPDATE deliveries
SET outcome = $2, cause = $3, cause_detail = $4, kind = $5, run_id = $6, batch_id = $7,
    duplicate_of = $8, replay_count = replay_count + 1, replayed_at = now()
WHERE id = $1
"""

_LOCK = (
    "SELECT count(pg_advisory_xact_lock($1::int, b)) FROM unnest($2::int[]) WITH ORDINALITY"
    " AS u(b, ord)"
)

# What the merge needs of the touched rows: their ranks (and a run's status, to tell a
# terminal transition). One statement for the four tables.
_LOAD = """
SELECT 'r' AS t, id, status, ranks FROM runs WHERE id = ANY($1::text[])
UNION ALL SELECT 'n', id, NULL, ranks FROM node_runs WHERE id = ANY($2::text[])
UNION ALL SELECT 'l', id, NULL, ranks FROM run_logs WHERE id = ANY($3::text[])
UNION ALL SELECT 'b', id, NULL, ranks FROM batches WHERE id = ANY($4::text[])
"""

_LINK = """
INSERT INTO run_deliveries (run_id, received_at, delivery_id)
SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::bigint[])
ON CONFLICT DO NOTHING
"""

_ENQUEUE = (
    "INSERT INTO enrichment_queue (run_id) SELECT unnest($1::text[])"
    " ON CONFLICT (run_id) DO NOTHING"
)


def lock_buckets(keys: Iterable[str]) -> list[int]:
    """The sorted bucket numbers of some lock keys (run ids, ``batch:<id>``)."""
    return sorted({zlib.crc32(key.encode()) % LOCK_BUCKETS for key in keys})


async def lock_runs(conn: Any, run_ids: Iterable[str], batch_ids: Iterable[str] = ()) -> None:
    """Take the bucket locks of these runs and batches, in the one shared order."""
    buckets = lock_buckets([*run_ids, *(f"batch:{b}" for b in batch_ids)])
    if buckets:
        await conn.fetchval(_LOCK, _LOCK_SPACE, buckets)


async def insert_delivery(
    conn: Any,
    entry: ArchiveEntry,
    *,
    outcome: str,
    delivery_id: int | None = None,
    keep_body: bool = True,
    cause: str | None = None,
    cause_detail: dict[str, Any] | None = None,
    kind: str | None = None,
    run_id: str | None = None,
    batch_id: str | None = None,
    duplicate_of: int | None = None,
) -> int:
    new_id: int = await conn.fetchval(
        _INSERT_DELIVERY,
        delivery_id,
        entry.received_at,
        entry.request_id,
        json_text(entry.headers),
        entry.content_type,
        entry.body if keep_body else None,
        entry.body_sha256,
        entry.body_size,
        entry.signature,
        outcome,
        cause,
        json_text(cause_detail),
        kind,
        run_id,
        batch_id,
        duplicate_of,
        entry.source,
    )
    return new_id


async def update_delivery(
    conn: Any, delivery_id: int, result: StoreResult, kind: str | None
) -> None:
    await conn.execute(
        _UPDATE_DELIVERY,
        delivery_id,
        result.outcome,
        result.cause,
        json_text(result.cause_detail),
        kind,
        result.run_id,
        result.batch_id,
        result.duplicate_of,
    )


async def replayable_rejections(conn: Any) -> list[int]:
    rows = await conn.fetch(
        "SELECT id FROM deliveries WHERE outcome = 'rejected' AND body IS NOT NULL"
        " ORDER BY received_at, id"
    )
    return [row["id"] for row in rows]


async def runs_with_client_ref(conn: Any, client_ref: str) -> list[str]:
    rows = await conn.fetch("SELECT id FROM runs WHERE client_ref = $1 LIMIT 2", client_ref)
    return [row["id"] for row in rows]


def _unresolved(lookup: str, matches: list[str]) -> StoreResult:
    from receiver.errors import InvalidPayload

    why = "no stored run has" if not matches else "several stored runs have"
    return StoreResult(
        DeliveryOutcome.REJECTED,
        0,
        cause=InvalidPayload.code,
        cause_detail={
            "message": f"payload has no id and {why} client_ref {lookup!r}",
            "details": [{"loc": "client_ref", "msg": "unresolved client_ref"}],
        },
    )


@dataclass
class _Row:
    """A touched row being merged: what the batch won for it, and its new ranks."""

    ranks: RankEntries | None
    status: str | None = None
    values: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None  # node runs and logs
    first: datetime | None = None
    last: datetime | None = None
    count: int = 0
    top: int = -1  # batches: highest precedence seen in this batch

    def merge(
        self, fields: Mapping[str, Any], rank: tuple[int, int, int, int, int], bits: Any
    ) -> dict[str, Any]:
        won, self.ranks = merge_fields(self.ranks, fields, rank, bits)
        self.values.update(won)
        return won

    def seen(self, received_at: datetime) -> None:
        self.first = received_at if self.first is None else min(self.first, received_at)
        self.last = received_at if self.last is None else max(self.last, received_at)
        self.count += 1


def _extras(data: Any, kept: frozenset[str]) -> dict[str, Any] | None:
    """The part of a node run's or log's wire object that no column holds."""
    if not isinstance(data, dict):
        return None
    rest = {key: value for key, value in data.items() if key not in kept}
    return rest or None


def _as_json(kind: str, value: Any) -> Any:
    return json_text(value) if kind == _JSON else value


def _column_arrays(
    columns: Sequence[tuple[str, str]], rows: Sequence[Mapping[str, Any]]
) -> list[list[Any]]:
    return [[_as_json(kind, row.get(name)) for row in rows] for name, kind in columns]


async def store_items(conn: Any, items: Sequence[Item]) -> list[StoreResult]:
    """Archive and merge deliveries in the caller's transaction; one result per item."""
    results: list[StoreResult | None] = [None] * len(items)
    # 1. A Run object with only a client_ref names the run through the stored runs.
    for index, item in enumerate(items):
        patch = item.parsed.runs[0] if item.parsed.kind == "run_object" else None
        if patch is not None and patch.client_ref_lookup is not None:
            matches = await runs_with_client_ref(conn, patch.client_ref_lookup)
            if len(matches) == 1:
                patch.run_id = matches[0]
            else:
                results[index] = _unresolved(patch.client_ref_lookup, matches)

    # 2. Fingerprints and delivery ids, the whole batch in one statement.
    claims = await conn.fetch(
        _CLAIM,
        [None if results[i] else item.entry.body_sha256 for i, item in enumerate(items)],
        [item.entry.received_at for item in items],
        [item.replay_of for item in items],
    )
    stored: list[int] = []
    for index, (item, claim) in enumerate(zip(items, claims, strict=True)):
        parsed = item.parsed
        result = results[index]
        if result is not None:
            result.delivery_id = claim["id"]
        elif claim["claimed"]:
            result = StoreResult(
                DeliveryOutcome.STORED,
                claim["id"],
                run_id=parsed.run_id,
                batch_id=parsed.batch_id,
            )
            stored.append(index)
        else:
            result = StoreResult(
                DeliveryOutcome.DUPLICATE,
                claim["id"],
                run_id=parsed.run_id,
                batch_id=parsed.batch_id,
                duplicate_of=claim["owner"],
            )
        results[index] = result
    done = [result for result in results if result is not None]
    assert len(done) == len(items)

    # 3. The archive rows: new ones in one statement, replays update theirs.
    fresh = [i for i, item in enumerate(items) if item.replay_of is None]
    if fresh:
        rows = []
        for i in fresh:
            entry, result = items[i].entry, done[i]
            # A duplicate's bytes are already kept once: its row records the request only.
            keep = result.outcome != DeliveryOutcome.DUPLICATE
            rows.append(
                {
                    "id": result.delivery_id,
                    "received_at": entry.received_at,
                    "request_id": entry.request_id,
                    "headers": entry.headers,
                    "content_type": entry.content_type,
                    "body": entry.body if keep else None,
                    "body_sha256": entry.body_sha256,
                    "body_size": entry.body_size,
                    "signature": entry.signature,
                    "outcome": result.outcome,
                    "cause": result.cause,
                    "cause_detail": result.cause_detail,
                    "kind": items[i].parsed.kind,
                    "run_id": result.run_id,
                    "batch_id": result.batch_id,
                    "duplicate_of": result.duplicate_of,
                    "source": entry.source,
                }
            )
        await conn.execute(_INSERT_DELIVERIES, *_column_arrays(_DELIVERY_COLUMNS, rows))
    for i, item in enumerate(items):
        if item.replay_of is not None:
            await update_delivery(conn, item.replay_of, done[i], item.parsed.kind)
            done[i].delivery_id = item.replay_of

    if stored:
        await _merge(conn, [(items[i], done[i]) for i in stored])
    return done


async def _merge(conn: Any, batch: Sequence[tuple[Item, StoreResult]]) -> None:
    """Fold the stored deliveries of a batch into their runs, node runs, logs and batches."""
    # Per delivery, one patch per run: the same run twice in one batch callback, the later
    # item wins, as it would on the wire.
    patches: list[dict[str, dict[str, Any]]] = []
    for item, _ in batch:
        by_run: dict[str, dict[str, Any]] = {}
        for patch in item.parsed.runs:
            if patch.run_id:
                by_run.setdefault(patch.run_id, {}).update(patch.fields)
        patches.append(by_run)
    run_ids = byte_order(run_id for by_run in patches for run_id in by_run)
    node_ids = byte_order(n["id"] for item, _ in batch for n in item.parsed.node_runs)
    log_ids = byte_order(log["id"] for item, _ in batch for log in item.parsed.logs)
    batch_ids = byte_order(
        item.parsed.batch["id"] for item, _ in batch if item.parsed.batch is not None
    )
    await lock_runs(conn, run_ids, batch_ids)

    runs: dict[str, _Row] = {}
    nodes: dict[str, _Row] = {}
    logs: dict[str, _Row] = {}
    batches: dict[str, _Row] = {}
    tables = {"r": runs, "n": nodes, "l": logs, "b": batches}
    for row in await conn.fetch(_LOAD, run_ids, node_ids, log_ids, batch_ids):
        tables[row["t"]][row["id"]] = _Row(ranks=row["ranks"], status=row["status"])

    links: list[tuple[str, datetime, int]] = []
    for (item, result), by_run in zip(batch, patches, strict=True):
        received, delivery_id = item.entry.received_at, result.delivery_id
        parsed = item.parsed
        for run_id, fields in by_run.items():
            row = runs.setdefault(run_id, _Row(ranks=None))
            before = row.status
            rank = payload_rank(
                fields.get("status"), fields.get("completed_at"), received, delivery_id
            )
            won = row.merge(fields, rank, RUN_BITS)
            row.seen(received)
            if "status" in won:
                row.status = won["status"]
                if precedence(row.status) == TERMINAL_RANK and row.status != before:
                    result.reached_terminal.append(str(row.status))
            if parsed.kind == "batch_envelope":
                links.append((run_id, received, delivery_id))
        owner = parsed.run_id
        if owner is not None:
            for node in parsed.node_runs:
                fields = {**node, "data": _extras(node.get("data"), _NODE_DATA_KEYS)}
                row = nodes.setdefault(node["id"], _Row(ranks=None))
                row.run_id = row.run_id or owner
                rank = payload_rank(
                    node.get("status"), node.get("completed_at"), received, delivery_id
                )
                row.merge(fields, rank, NODE_BITS)
            for log in parsed.logs:
                fields = {**log, "data": _extras(log.get("data"), _LOG_DATA_KEYS)}
                row = logs.setdefault(log["id"], _Row(ranks=None))
                row.run_id = row.run_id or owner
                row.merge(fields, payload_rank(None, None, received, delivery_id), LOG_BITS)
        if parsed.batch is not None:
            info = parsed.batch
            row = batches.setdefault(info["id"], _Row(ranks=None))
            rank = payload_rank(info.get("status"), info.get("completed_at"), received, delivery_id)
            row.merge(info, rank, BATCH_BITS)
            row.seen(received)
            row.top = max(row.top, precedence(info.get("status")))

    await _write(conn, runs, run_ids, _UPSERT_RUNS, _RUN_COLUMNS, _run_values)
    if links:
        await conn.execute(_LINK, *map(list, zip(*links, strict=True)))
    await _write(conn, nodes, node_ids, _UPSERT_NODES, _NODE_COLUMNS, _child_values)
    await _write(conn, logs, log_ids, _UPSERT_LOGS, _LOG_COLUMNS, _child_values)
    await _write(conn, batches, batch_ids, _UPSERT_BATCHES, _BATCH_COLUMNS, _batch_values)

    # Runs still lacking every Run-object field are queued for a fetch from Runflow's API.
    enrich = any(item.enrich for item, _ in batch)
    if enrich:
        wanted = {
            run_id
            for (item, _), by_run in zip(batch, patches, strict=True)
            if item.enrich
            for run_id in by_run
        }
        envelope_only = [
            run_id
            for run_id in run_ids
            if run_id in wanted
            and not owned_fields(runs[run_id].ranks, RUN_BITS) & set(RUN_OBJECT_FIELDS)
        ]
        if envelope_only:
            await conn.execute(_ENQUEUE, envelope_only)


def _run_values(key: str, row: _Row) -> dict[str, Any]:
    return {
        **row.values,
        "id": key,
        "first_received_at": row.first,
        "last_received_at": row.last,
        "delivery_count": row.count,
        "ranks": row.ranks,
    }


def _child_values(key: str, row: _Row) -> dict[str, Any]:
    return {**row.values, "id": key, "run_id": row.run_id, "ranks": row.ranks}


def _batch_values(key: str, row: _Row) -> dict[str, Any]:
    return {
        **row.values,
        "id": key,
        "precedence": row.top,
        "first_received_at": row.first,
        "last_received_at": row.last,
        "delivery_count": row.count,
        "ranks": row.ranks,
    }


async def _write(
    conn: Any,
    rows: Mapping[str, _Row],
    keys: Sequence[str],
    sql: str,
    columns: Sequence[tuple[str, str]],
    values: Any,
) -> None:
    """Upsert the rows in byte order of their keys (one statement)."""
    if keys:
        await conn.execute(sql, *_column_arrays(columns, [values(k, rows[k]) for k in keys]))
