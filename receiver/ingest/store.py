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

from receiver.ingest.archive import ArchiveEntry, stored_headers
from receiver.ingest.merge import RankEntries, merge_fields, owned_fields, payload_rank
from receiver.ingest.payloads import RUN_FIELDS, ParsedPayload
from receiver.responses import dumps
from receiver.vocabulary import TERMINAL_RANK, DeliveryOutcome, precedence

LOCK_BUCKETS = 1024
_LOCK_SPACE = 0x52554E53  # advisory lock namespace ("RUNS") of the bucket locks


def json_text(value: Any) -> str | None:
    """JSON text for a jsonb parameter: the jsonb codec SQLAlchemy installs takes text."""
    if value is None:
        return None
    return dumps(value).decode()


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


def _recordset(columns: Sequence[tuple[str, str]], param: int, *, ordinality: bool = False) -> str:
    """The rows of JSON parameter ``$param`` (an array of objects) as ``u(c1, ...)``.

    A batch travels as one JSON text per table, not one array per column: the driver then
    encodes one string instead of checking and encoding every element of dozens of arrays
    (the largest Python cost of a batch before), and the nested jsonb values are written once,
    inside it. A key a row lacks is NULL, as a null is; keys no column names are ignored.
    ``ordinality`` numbers the rows (column ``ord``).
    """
    typed = ", ".join(f"{name} {kind}" for name, kind in columns)
    rows = f"json_to_recordset(${param}::json)"
    if not ordinality:
        return f"{rows} AS u({typed})"
    names = ", ".join([*(name for name, _ in columns), "ord"])
    return f"ROWS FROM ({rows} AS ({typed})) WITH ORDINALITY AS u({names})"


def _upsert_sql(
    table: str,
    columns: Sequence[tuple[str, str]],
    merged: Sequence[str],
    extra_sets: Sequence[str],
    param: int,
    key: str = "id",
) -> str:
    """INSERT ... SELECT FROM the JSON rows of ``$param`` ON CONFLICT (id): merged columns keep
    the stored value where the batch sent null (a field the delivery did not win), others as
    ``extra_sets``."""
    names = ", ".join(name for name, _ in columns)
    sets = [f"{name} = COALESCE(EXCLUDED.{name}, {table}.{name})" for name in merged]
    return (
        f"INSERT INTO {table} ({names})"
        f" SELECT {names} FROM {_recordset(columns, param)}"
        f" ON CONFLICT ({key}) DO UPDATE SET {', '.join([*sets, *extra_sets])}"
    )


_RUN_COLUMNS = (
    ("id", "text"),
    *((name, _RUN_TYPES[name]) for name in RUN_FIELDS),
    ("first_received_at", "timestamptz"),
    ("last_received_at", "timestamptz"),
    ("delivery_count", "integer"),
    ("ranks", _JSON),
)
_NODE_COLUMNS = (
    ("id", "text"),
    ("run_id", "text"),
    *((name, _NODE_TYPES[name]) for name in NODE_FIELDS),
    ("ranks", _JSON),
)
_LOG_COLUMNS = (
    ("id", "text"),
    ("run_id", "text"),
    *((name, _LOG_TYPES[name]) for name in LOG_FIELDS),
    ("ranks", _JSON),
)
_BATCH_COLUMNS = (
    ("id", "text"),
    *((name, _BATCH_TYPES[name]) for name in BATCH_FIELDS),
    ("precedence", "smallint"),
    ("first_received_at", "timestamptz"),
    ("last_received_at", "timestamptz"),
    ("delivery_count", "integer"),
    ("ranks", _JSON),
)
_LINK_COLUMNS = (("run_id", "text"), ("received_at", "timestamptz"), ("delivery_id", "bigint"))
# Every merged row of a batch in one statement: runs ($1), node runs ($2), logs ($3), batches
# ($4), batch-item links ($5), each an upsert over the JSON rows of its parameter (an empty
# array writes nothing), and the enrichment queue ($6, an array of run ids).
# Rows go in byte order of their keys; the bucket locks already order writers of one run.
_WRITE = f"""
WITH r AS ({
    _upsert_sql(
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
        1,
    )
}), n AS ({
    _upsert_sql(
        "node_runs",
        _NODE_COLUMNS,
        NODE_FIELDS,
        ("ranks = EXCLUDED.ranks", "updated_at = now()"),
        2,
        key="id, run_id",
    )
}), l AS ({
    _upsert_sql(
        "run_logs",
        _LOG_COLUMNS,
        LOG_FIELDS,
        ("ranks = EXCLUDED.ranks",),
        3,
        key="id, run_id",
    )
}), b AS ({
    _upsert_sql(
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
        4,
    )
}), k AS (
    INSERT INTO run_deliveries (run_id, received_at, delivery_id)
    SELECT run_id, received_at, delivery_id FROM {_recordset(_LINK_COLUMNS, 5)}
    ON CONFLICT DO NOTHING
), q AS (
    INSERT INTO enrichment_queue (run_id) SELECT unnest($6::text[])
    ON CONFLICT (run_id) DO NOTHING
)
SELECT 1
"""


# Fingerprints, ids and archive rows for a whole batch, then the bucket locks and what the
# merge needs of the touched rows, in one statement (one round trip). ``u`` is materialised
# (it calls nextval), so each item keeps one id. ``pre`` is an outcome decided before
# (``rejected``: an unresolved client_ref); the others claim their body's hash, and the same
# bytes twice in the batch: the first claims. ``f`` reads the snapshot before this statement:
# the owner of bytes accepted earlier. Replays (``rid``) keep their archive row.
#
# The locks come after the fingerprints, as they did when these were two statements: the
# lateral call depends on ``a``'s row count, so the batch claims every fingerprint before it
# asks for a lock. (Two batches that meet on the same bytes and the same runs can still
# deadlock; the batcher retries a deadlock.) ``ingest_lock_and_load`` (0008) takes the locks
# in the order given and reads with a snapshot taken after them. Rows: ``t = 'a'`` one per
# item (``ord``, ``did``, ``outcome``, ``duplicate_of``), then the loaded rows (``t``, ``id``,
# ``owner``, ``status``, ``ranks``).
_DELIVERY_COLUMNS = (
    ("sha", "bytea"),
    ("recv", "timestamptz"),
    ("rid", "bigint"),
    ("pre", "text"),
    ("request_id", "text"),
    ("headers", _JSON),
    ("content_type", "text"),
    ("body", "bytea"),
    ("body_encoding", "text"),
    ("body_size", "bigint"),
    ("signature", "text"),
    ("cause", "text"),
    ("cause_detail", _JSON),
    ("kind", "text"),
    ("run_id", "text"),
    ("batch_id", "text"),
    ("source", "text"),
)
_claim_source = _recordset(_DELIVERY_COLUMNS, 1, ordinality=True)
_ARCHIVE_AND_LOAD = f"""
WITH u AS MATERIALIZED (
    SELECT u.*, COALESCE(u.rid, nextval('deliveries_id_seq')) AS id
    FROM {_claim_source}
), ins AS (
    INSERT INTO delivery_fingerprints (body_sha256, delivery_id, received_at)
    SELECT sha, id, recv FROM u WHERE pre IS NULL ORDER BY ord
    ON CONFLICT (body_sha256) DO NOTHING
    RETURNING body_sha256, delivery_id
), v AS (
    SELECT u.*,
        CASE WHEN u.pre IS NOT NULL THEN u.pre
             WHEN ins.delivery_id = u.id THEN 'stored' ELSE 'duplicate' END AS outcome,
        CASE WHEN u.pre IS NULL AND ins.delivery_id IS DISTINCT FROM u.id THEN COALESCE(
            (SELECT f.delivery_id FROM delivery_fingerprints f WHERE f.body_sha256 = u.sha),
            ins.delivery_id) END AS owner
    FROM u
    LEFT JOIN ins ON u.pre IS NULL AND ins.body_sha256 = u.sha
), d AS (
    INSERT INTO deliveries (
        id, received_at, request_id, headers, content_type, body, body_encoding, body_sha256,
        body_size, signature, outcome, cause, cause_detail, kind, run_id, batch_id,
        duplicate_of, source
    )
    SELECT id, recv, request_id, headers, content_type,
        CASE WHEN outcome = 'duplicate' THEN NULL ELSE body END,
        CASE WHEN outcome = 'duplicate' THEN NULL ELSE body_encoding END, sha, body_size, signature,
        outcome, cause, CASE WHEN outcome = 'duplicate' THEN NULL ELSE cause_detail END,
        kind, run_id, batch_id,
        CASE WHEN outcome = 'duplicate' THEN owner END, source
    FROM v WHERE rid IS NULL
), a AS MATERIALIZED (
    SELECT ord, id, outcome, CASE WHEN outcome = 'duplicate' THEN owner END AS owner FROM v
)
SELECT 'a' AS t, ord, id AS did, outcome, owner AS duplicate_of, NULL::text AS id,
    NULL::text AS owner, NULL::text AS status, NULL::jsonb AS ranks
FROM a
UNION ALL
SELECT l.t, NULL, NULL, NULL, NULL, l.id, l.owner, l.status, l.ranks
FROM (SELECT count(*)::int AS n FROM a) AS c
CROSS JOIN LATERAL ingest_lock_and_load($2 + 0 * c.n, $3, $4, $5, $6, $7) AS l
"""

_INSERT_DELIVERY = """
INSERT INTO deliveries (
    id, received_at, request_id, headers, content_type, body, body_sha256, body_size,
    signature, outcome, cause, cause_detail, kind, run_id, batch_id, duplicate_of, source,
    body_encoding
) VALUES (
    COALESCE($1, nextval('deliveries_id_seq')), $2, $3, $4, $5, $6, $7, $8,
    $9, $10, $11, $12, $13, $14, $15, $16, $17, $18
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


def lock_buckets(run_ids: Iterable[str], batch_ids: Iterable[str] = ()) -> list[int]:
    """The sorted bucket numbers of these runs and batches (keyed ``<run id>``, ``batch:<id>``)."""
    keys = [*run_ids, *(f"batch:{b}" for b in batch_ids)]
    return sorted({zlib.crc32(key.encode()) % LOCK_BUCKETS for key in keys})


async def lock_runs(conn: Any, run_ids: Iterable[str], batch_ids: Iterable[str] = ()) -> None:
    """Take the bucket locks of these runs and batches, in the one shared order."""
    buckets = lock_buckets(run_ids, batch_ids)
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
    body, body_encoding = entry.stored_body() if keep_body else (None, None)
    new_id: int = await conn.fetchval(
        _INSERT_DELIVERY,
        delivery_id,
        entry.received_at,
        entry.request_id,
        json_text(stored_headers(entry)),
        entry.content_type,
        body,
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
        body_encoding,
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


def _set_aside(parsed: ParsedPayload) -> dict[str, Any] | None:
    return {"set_aside": parsed.set_aside} if parsed.set_aside else None


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


def _bytea(value: bytes | None) -> str | None:
    """bytea's hex input form, for a bytea column of a ``_recordset``."""
    return None if value is None else "\\x" + value.hex()


async def store_items(conn: Any, items: Sequence[Item]) -> list[StoreResult]:
    """Archive and merge deliveries in the caller's transaction; one result per item."""
    rejected: dict[int, StoreResult] = {}
    # 1. A Run object with only a client_ref names the run through the stored runs.
    for index, item in enumerate(items):
        patch = item.parsed.runs[0] if item.parsed.kind == "run_object" else None
        if patch is not None and patch.client_ref_lookup is not None:
            matches = await runs_with_client_ref(conn, patch.client_ref_lookup)
            if len(matches) == 1:
                patch.run_id = matches[0]
            else:
                rejected[index] = _unresolved(patch.client_ref_lookup, matches)

    # 2. Fingerprints, delivery ids and archive rows, then the locks and the touched rows,
    # the whole batch in one statement. Which items turn out duplicates is known only after
    # it: the locks and reads cover every item that may merge, a duplicate's rows unused.
    rows = []
    for index, item in enumerate(items):
        entry, parsed, refusal = item.entry, item.parsed, rejected.get(index)
        body, body_encoding = (None, None) if item.replay_of is not None else entry.stored_body()
        rows.append(
            {
                "sha": _bytea(entry.body_sha256),
                "recv": entry.received_at,
                "rid": item.replay_of,
                "pre": None if refusal is None else refusal.outcome,
                "request_id": entry.request_id,
                "headers": stored_headers(entry),
                "content_type": entry.content_type,
                "body": _bytea(body),
                "body_encoding": body_encoding,
                "body_size": entry.body_size,
                "signature": entry.signature,
                "cause": None if refusal is None else refusal.cause,
                "cause_detail": _set_aside(parsed) if refusal is None else refusal.cause_detail,
                "kind": parsed.kind,
                "run_id": None if refusal is not None else parsed.run_id,
                "batch_id": None if refusal is not None else parsed.batch_id,
                "source": entry.source,
            }
        )
    keys = _Keys.of([item for index, item in enumerate(items) if index not in rejected])
    buckets = lock_buckets(keys.run_ids, keys.batch_ids)
    fetched = await conn.fetch(
        _ARCHIVE_AND_LOAD,
        json_text(rows),
        _LOCK_SPACE,
        buckets,
        keys.run_ids,
        byte_order(key[1] for key in keys.node_keys),
        byte_order(key[1] for key in keys.log_keys),
        keys.batch_ids,
    )
    answers = sorted((row for row in fetched if row["t"] == "a"), key=lambda row: row["ord"])
    loaded = [row for row in fetched if row["t"] != "a"]
    done: list[StoreResult] = []
    stored: list[int] = []
    for index, (item, answer) in enumerate(zip(items, answers, strict=True)):
        result = rejected.get(index) or StoreResult(
            DeliveryOutcome(answer["outcome"]),
            answer["did"],
            run_id=item.parsed.run_id,
            batch_id=item.parsed.batch_id,
            duplicate_of=answer["duplicate_of"],
        )
        if result.outcome == DeliveryOutcome.STORED:
            # What the run left out (wrong-typed descriptive values); the archive has them.
            result.cause_detail = _set_aside(item.parsed)
        result.delivery_id = answer["did"]
        if result.outcome == DeliveryOutcome.STORED:
            stored.append(index)
        done.append(result)
    # Replays update the archive row they came from.
    for item, result in zip(items, done, strict=True):
        if item.replay_of is not None:
            await update_delivery(conn, item.replay_of, result, item.parsed.kind)

    if stored:
        await _merge(conn, [(items[i], done[i]) for i in stored], loaded)
    return done


def _run_patches(item: Item) -> dict[str, dict[str, Any]]:
    """A delivery's patch per run: the same run twice in one batch callback, the later item
    wins, as it would on the wire."""
    by_run: dict[str, dict[str, Any]] = {}
    for patch in item.parsed.runs:
        if patch.run_id:
            by_run.setdefault(patch.run_id, {}).update(patch.fields)
    return by_run


@dataclass
class _Keys:
    """The rows some deliveries touch, each kind in the one lock and write order."""

    run_ids: list[str]
    node_keys: list[tuple[str, str]]  # node runs and logs are keyed with their run (0009)
    log_keys: list[tuple[str, str]]
    batch_ids: list[str]

    @classmethod
    def of(cls, items: Iterable[Item]) -> _Keys:
        parsed = [item.parsed for item in items]
        return cls(
            run_ids=byte_order(patch.run_id for p in parsed for patch in p.runs if patch.run_id),
            node_keys=_pair_order((p.run_id, n["id"]) for p in parsed for n in p.node_runs),
            log_keys=_pair_order((p.run_id, log["id"]) for p in parsed for log in p.logs),
            batch_ids=byte_order(p.batch["id"] for p in parsed if p.batch is not None),
        )


async def _merge(
    conn: Any, batch: Sequence[tuple[Item, StoreResult]], loaded: Iterable[Mapping[str, Any]]
) -> None:
    """Fold the stored deliveries of a batch into their runs, node runs, logs and batches.

    ``loaded`` holds what the merge needs of the stored rows they touch (read under their
    locks), and perhaps rows only a duplicate of the batch touches.
    """
    patches = [_run_patches(item) for item, _ in batch]
    keys = _Keys.of(item for item, _ in batch)

    runs: dict[str, _Row] = {}
    nodes: dict[tuple[str, str], _Row] = {}
    logs: dict[tuple[str, str], _Row] = {}
    batches: dict[str, _Row] = {}
    for found in loaded:
        loaded_row = _Row(ranks=found["ranks"], status=found["status"], run_id=found["owner"])
        if found["t"] == "r":
            runs[found["id"]] = loaded_row
        elif found["t"] == "b":
            batches[found["id"]] = loaded_row
        else:
            (nodes if found["t"] == "n" else logs)[(found["owner"], found["id"])] = loaded_row

    links: list[dict[str, Any]] = []
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
                links.append(
                    {"run_id": run_id, "received_at": received, "delivery_id": delivery_id}
                )
        owner = parsed.run_id
        if owner is not None:
            for node in parsed.node_runs:
                fields = {**node, "data": _extras(node.get("data"), _NODE_DATA_KEYS)}
                row = nodes.setdefault((owner, node["id"]), _Row(ranks=None, run_id=owner))
                rank = payload_rank(
                    node.get("status"), node.get("completed_at"), received, delivery_id
                )
                row.merge(fields, rank, NODE_BITS)
            for log in parsed.logs:
                fields = {**log, "data": _extras(log.get("data"), _LOG_DATA_KEYS)}
                row = logs.setdefault((owner, log["id"]), _Row(ranks=None, run_id=owner))
                row.merge(fields, payload_rank(None, None, received, delivery_id), LOG_BITS)
        if parsed.batch is not None:
            info = parsed.batch
            row = batches.setdefault(info["id"], _Row(ranks=None))
            rank = payload_rank(info.get("status"), info.get("completed_at"), received, delivery_id)
            row.merge(info, rank, BATCH_BITS)
            row.seen(received)
            row.top = max(row.top, precedence(info.get("status")))

    # Runs still lacking every Run-object field are queued for a fetch from Runflow's API.
    wanted = {
        run_id
        for (item, _), by_run in zip(batch, patches, strict=True)
        if item.enrich
        for run_id in by_run
    }
    envelope_only = [
        run_id
        for run_id in keys.run_ids
        if run_id in wanted
        and not owned_fields(runs[run_id].ranks, RUN_BITS) & set(RUN_OBJECT_FIELDS)
    ]
    await conn.execute(
        _WRITE,
        json_text([_run_values(k, runs[k]) for k in keys.run_ids]),
        json_text([_child_values(k, nodes[k]) for k in keys.node_keys]),
        json_text([_child_values(k, logs[k]) for k in keys.log_keys]),
        json_text([_batch_values(k, batches[k]) for k in keys.batch_ids]),
        json_text(links),
        envelope_only,
    )


def _run_values(key: str, row: _Row) -> dict[str, Any]:
    return {
        **row.values,
        "id": key,
        "first_received_at": row.first,
        "last_received_at": row.last,
        "delivery_count": row.count,
        "ranks": row.ranks,
    }


def _child_values(key: tuple[str, str], row: _Row) -> dict[str, Any]:
    return {**row.values, "id": key[1], "run_id": key[0], "ranks": row.ranks}


def _pair_order(pairs: Iterable[tuple[str | None, str]]) -> list[tuple[str, str]]:
    """Distinct (run id, id) pairs with a run, in byte order."""
    distinct = {(run, key) for run, key in pairs if run is not None}
    return sorted(distinct, key=lambda pair: (pair[0].encode(), pair[1].encode()))


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
