"""The ingest write path: archive, fingerprint, run patches and the folded run row.

PostgreSQL-specific SQL lives here and nowhere else. Everything runs on the raw asyncpg
connection inside one transaction per delivery (the benchmark showed the ORM session and even
Core statement compilation to be the largest per-request cost). Concurrency: every run a
delivery touches is locked with a transaction-scoped advisory lock (in sorted order, so two
batches cannot deadlock), then its row is recomputed from all of its stored patches by the
pure ``fold_run``; a concurrent delivery for the same run waits and then folds both.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from receiver.ingest.archive import ArchiveEntry
from receiver.ingest.merge import MergedRun, StoredPatch, fold_run
from receiver.ingest.payloads import RUN_FIELDS, ParsedPayload
from receiver.responses import dumps
from receiver.vocabulary import PRECEDENCE, TERMINAL_RANK, DeliveryOutcome, precedence

# Column types of run fields that need converting between JSON patches and SQL values.
_DATETIME_FIELDS = frozenset({"created_at", "started_at", "completed_at"})
_DECIMAL_FIELDS = frozenset({"cost"})
_JSON_FIELDS = frozenset({"cost_breakdown", "input", "output", "metadata"})


def json_text(value: Any) -> str | None:
    """JSON text for a jsonb parameter: the jsonb codec SQLAlchemy installs takes text."""
    if value is None:
        return None
    return dumps(value).decode()


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

_CLAIM_FINGERPRINT = """
INSERT INTO delivery_fingerprints (body_sha256, delivery_id, received_at)
VALUES ($1, COALESCE($2, nextval('deliveries_id_seq')), $3)
ON CONFLICT (body_sha256) DO NOTHING
RETURNING delivery_id
"""

_INSERT_PATCHES = """
INSERT INTO run_patches (run_id, delivery_id, received_at, precedence, patch)
SELECT r, $2, $3, p, j FROM unnest($1::text[], $4::smallint[], $5::jsonb[]) AS u(r, p, j)
ON CONFLICT (run_id, delivery_id) DO UPDATE SET patch = EXCLUDED.patch,
    precedence = EXCLUDED.precedence
"""

_LOCK_RUNS = """
SELECT pg_advisory_xact_lock(hashtextextended(r, 0)) FROM unnest($1::text[]) AS u(r)
"""

_SELECT_PATCHES = """
SELECT run_id, delivery_id, received_at, patch FROM run_patches WHERE run_id = ANY($1::text[])
"""

_RUN_COLUMNS = ("id", *RUN_FIELDS, "first_received_at", "last_received_at", "delivery_count")
_UPSERT_RUN = "INSERT INTO runs ({cols}, updated_at) VALUES ({vals}, now()) ON CONFLICT (id) DO UPDATE SET {sets}, updated_at = now()".format(  # noqa: E501
    cols=", ".join(_RUN_COLUMNS),
    vals=", ".join(f"${i}" for i in range(1, len(_RUN_COLUMNS) + 1)),
    sets=", ".join(f"{col} = EXCLUDED.{col}" for col in _RUN_COLUMNS[1:]),
)

_NODE_COLUMNS = (
    "id",
    "run_id",
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


def _precedence_sql(column: str) -> str:
    """SQL for :func:`receiver.merge.precedence` of a (normalised) status column."""
    cases = " ".join(f"WHEN '{status}' THEN {rank}" for status, rank in PRECEDENCE.items())
    return f"(CASE {column} {cases} ELSE -1 END)"


# Node runs follow the merge rules by their own status: a payload whose node status ranks at
# least as high overwrites non-null fields, a lower one (a stale Run object) only fills nulls.
_NODE_WINS = f"{_precedence_sql('EXCLUDED.status')} >= {_precedence_sql('node_runs.status')}"
_UPSERT_NODE_RUN = "INSERT INTO node_runs ({cols}) VALUES ({vals}) ON CONFLICT (id, run_id) DO UPDATE SET {sets}, updated_at = now()".format(  # noqa: E501
    cols=", ".join(_NODE_COLUMNS),
    vals=", ".join(f"${i}" for i in range(1, len(_NODE_COLUMNS) + 1)),
    sets=", ".join(
        f"{c} = CASE WHEN {_NODE_WINS} THEN COALESCE(EXCLUDED.{c}, node_runs.{c})"
        f" ELSE COALESCE(node_runs.{c}, EXCLUDED.{c}) END"
        for c in _NODE_COLUMNS[1:]
    ),
)

_LOG_COLUMNS = ("id", "run_id", "node_run_id", "level", "message", "logged_at", "data")
_UPSERT_LOG = "INSERT INTO run_logs ({cols}) VALUES ({vals}) ON CONFLICT (id, run_id) DO UPDATE SET {sets}".format(  # noqa: E501
    cols=", ".join(_LOG_COLUMNS),
    vals=", ".join(f"${i}" for i in range(1, len(_LOG_COLUMNS) + 1)),
    sets=", ".join(f"{c} = COALESCE(EXCLUDED.{c}, run_logs.{c})" for c in _LOG_COLUMNS[1:]),
)

_BATCH_FIELDS = (
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
# Batches merge incrementally: a payload of equal or higher precedence overwrites non-null
# fields, a lower one only fills nulls.
_UPSERT_BATCH = """
INSERT INTO batches (id, {cols}, precedence, first_received_at, last_received_at, delivery_count)
VALUES ($1, {vals}, ${p}, ${r}, ${r}, 1)
ON CONFLICT (id) DO UPDATE SET {sets},
    precedence = GREATEST(batches.precedence, EXCLUDED.precedence),
    first_received_at = LEAST(batches.first_received_at, EXCLUDED.first_received_at),
    last_received_at = GREATEST(batches.last_received_at, EXCLUDED.last_received_at),
    delivery_count = batches.delivery_count + 1
""".format(
    cols=", ".join(_BATCH_FIELDS),
    vals=", ".join(f"${i}" for i in range(2, len(_BATCH_FIELDS) + 2)),
    p=len(_BATCH_FIELDS) + 2,
    r=len(_BATCH_FIELDS) + 3,
    sets=", ".join(
        f"{c} = CASE WHEN EXCLUDED.precedence >= batches.precedence "
        f"THEN COALESCE(EXCLUDED.{c}, batches.{c}) ELSE COALESCE(batches.{c}, EXCLUDED.{c}) END"
        for c in _BATCH_FIELDS
    ),
)


def patch_to_json(fields: dict[str, Any]) -> dict[str, Any]:
    """A run patch as JSON-safe values (datetimes ISO 8601, decimals as strings)."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if isinstance(value, datetime):
            out[key] = value.isoformat()
        elif isinstance(value, Decimal):
            out[key] = str(value)
        else:
            out[key] = value
    return out


def patch_from_json(data: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`patch_to_json`."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if value is not None and key in _DATETIME_FIELDS:
            out[key] = datetime.fromisoformat(value)
        elif value is not None and key in _DECIMAL_FIELDS:
            out[key] = Decimal(value)
        else:
            out[key] = value
    return out


def _run_row(run_id: str, merged: MergedRun) -> tuple[Any, ...]:
    values: list[Any] = [run_id]
    for name in RUN_FIELDS:
        value = merged.fields.get(name)
        values.append(json_text(value) if name in _JSON_FIELDS else value)
    values += [merged.first_received_at, merged.last_received_at, merged.delivery_count]
    return tuple(values)


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


async def claim_fingerprint(
    conn: Any, body_sha256: bytes, received_at: datetime, delivery_id: int | None = None
) -> int | None:
    """Record the body's hash; None when the same bytes were already accepted."""
    claimed: int | None = await conn.fetchval(
        _CLAIM_FINGERPRINT, body_sha256, delivery_id, received_at
    )
    return claimed


async def fingerprint_owner(conn: Any, body_sha256: bytes) -> int | None:
    owner: int | None = await conn.fetchval(
        "SELECT delivery_id FROM delivery_fingerprints WHERE body_sha256 = $1", body_sha256
    )
    return owner


async def replayable_rejections(conn: Any) -> list[int]:
    rows = await conn.fetch(
        "SELECT id FROM deliveries WHERE outcome = 'rejected' AND body IS NOT NULL"
        " ORDER BY received_at, id"
    )
    return [row["id"] for row in rows]


async def runs_with_client_ref(conn: Any, client_ref: str) -> list[str]:
    rows = await conn.fetch("SELECT id FROM runs WHERE client_ref = $1 LIMIT 2", client_ref)
    return [row["id"] for row in rows]


# Fields only a Run object carries: a run with none of them has only been seen in envelopes.
RUN_OBJECT_FIELDS = ("target_type", "source", "org_id", "model_id")


@dataclass
class MergeOutcome:
    """What a merge changed that others care about."""

    envelope_only: list[str]  # runs still lacking every Run-object field (to enrich)
    reached_terminal: list[str]  # terminal statuses newly reached (one per run)


async def merge_patches(
    conn: Any,
    *,
    delivery_id: int,
    received_at: datetime,
    patches: Sequence[tuple[str, dict[str, Any]]],
) -> MergeOutcome:
    """Store one delivery's patches and re-fold every run they touch (in this transaction)."""
    by_run: dict[str, dict[str, Any]] = {}
    for run_id, fields in patches:
        # The same run twice in one batch: later items win, as they would on the wire.
        by_run.setdefault(run_id, {}).update(fields)
    run_ids = sorted(by_run)
    await conn.execute(
        _INSERT_PATCHES,
        run_ids,
        delivery_id,
        received_at,
        [precedence(by_run[r].get("status")) for r in run_ids],
        [json_text(patch_to_json(by_run[r])) for r in run_ids],
    )
    await conn.execute(_LOCK_RUNS, run_ids)
    stored: dict[str, list[StoredPatch]] = {run_id: [] for run_id in run_ids}
    for row in await conn.fetch(_SELECT_PATCHES, run_ids):
        stored[row["run_id"]].append(
            StoredPatch(
                fields=patch_from_json(row["patch"]),
                received_at=row["received_at"],
                delivery_id=row["delivery_id"],
            )
        )
    merged = {run_id: fold_run(stored[run_id]) for run_id in run_ids}
    rows = [_run_row(run_id, run) for run_id, run in merged.items()]
    if len(rows) == 1:
        await conn.execute(_UPSERT_RUN, *rows[0])
    else:
        await conn.executemany(_UPSERT_RUN, rows)
    reached = []
    for run_id, run in merged.items():
        status = run.fields.get("status")
        if precedence(status) == TERMINAL_RANK:
            before = [p for p in stored[run_id] if p.delivery_id != delivery_id]
            if not before or fold_run(before).fields.get("status") != status:
                reached.append(str(status))
    envelope_only = [
        run_id
        for run_id, run in merged.items()
        if not any(run.fields.get(name) is not None for name in RUN_OBJECT_FIELDS)
    ]
    return MergeOutcome(envelope_only, reached)


async def enqueue_enrichment(conn: Any, run_ids: Sequence[str]) -> None:
    """Queue runs for a fetch from Runflow's API; runs already queued or done stay as they are."""
    await conn.execute(
        "INSERT INTO enrichment_queue (run_id) SELECT unnest($1::text[])"
        " ON CONFLICT (run_id) DO NOTHING",
        list(run_ids),
    )


async def upsert_children(conn: Any, run_id: str, parsed: ParsedPayload) -> None:
    """Node runs and logs of a Run object, upserted by id (null never erases)."""
    if parsed.node_runs:
        await conn.executemany(
            _UPSERT_NODE_RUN,
            [_child_row(_NODE_COLUMNS, {**node, "run_id": run_id}) for node in parsed.node_runs],
        )
    if parsed.logs:
        await conn.executemany(
            _UPSERT_LOG,
            [_child_row(_LOG_COLUMNS, {**log, "run_id": run_id}) for log in parsed.logs],
        )


def _child_row(columns: Iterable[str], values: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(
        json_text(values.get(col)) if col == "data" else values.get(col) for col in columns
    )


async def upsert_batch(conn: Any, batch: dict[str, Any], received_at: datetime) -> None:
    values = [json_text(batch.get(c)) if c == "metadata" else batch.get(c) for c in _BATCH_FIELDS]
    await conn.execute(
        _UPSERT_BATCH, batch["id"], *values, precedence(batch.get("status")), received_at
    )
