"""Incremental merge: per-field winner ranks on the row, no copy of every payload.

Until 0007 each stored delivery added a ``run_patches`` row holding its whole payload again
(input and output included), and every delivery re-read and re-folded all of a run's patches.
From here a row (``runs``, ``batches``, ``node_runs``, ``run_logs``) carries ``ranks``: which
rank supplied each of its non-null fields, as a short jsonb list of
``[level, has_completed, completed_us, received_us, delivery_id, mask]`` entries (``mask``:
bits of the fields that entry owns, in the order of the field tuples below, which are
append-only). A delivery compares its rank with the owners of the fields it carries: bounded
work whatever the history (see ``receiver.ingest.merge``).

``run_deliveries`` remembers which deliveries touched a run when the delivery row itself does
not say so (batch callbacks touch many runs; a run envelope or Run object names its run on its
own ``deliveries`` row). It holds ``received_at`` beside the delivery id so a lookup can prune
a ``deliveries`` table partitioned by received time; nothing references ``deliveries`` by
foreign key.

``ingest_lock_and_load`` takes a batch's bucket locks and reads the ranks of the rows it
touches in one round trip (see ``receiver.ingest.store``).

Node runs and logs kept their fields twice, as columns and again in ``data``; ``data`` now
holds only what no column holds.

``ix_deliveries_batch_id`` goes: no query reads the archive by batch id.

Existing runs get their ranks from their stored patches (the fold, done here once); batches
and node runs from their current status, completed_at and last change; logs start without
ranks (any later delivery is later received, so it wins, as the rules say).

Revision ID: 0008
Revises: 0007
"""

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the field tuples at this revision (bit i = position i).
RUN_FIELDS = (
    "org_id", "status", "event", "target_type", "model", "model_id", "flow_id",
    "comfyui_workflow_id", "batch_id", "client_ref", "source", "failure_code",
    "failure_message", "failure_stage", "duration_ms", "cost", "cost_breakdown", "created_at",
    "started_at", "completed_at", "input", "output", "metadata",
)  # fmt: skip
NODE_FIELDS = (
    "node_id", "node_type", "status", "failure_code", "failure_message", "created_at",
    "started_at", "completed_at", "duration_ms", "data",
)  # fmt: skip
BATCH_FIELDS = (
    "event", "status", "succeeded", "failed", "cancelled", "total", "duration_ms",
    "created_at", "completed_at", "metadata",
)  # fmt: skip
NODE_DATA_KEYS = (
    "id", "node_id", "node_type", "status_code", "status", "failure_code", "failure_message",
    "created_at", "started_at", "completed_at", "duration_ms",
)  # fmt: skip
LOG_DATA_KEYS = ("id", "level", "message", "node_run_id", "created_at", "timestamp")
PRECEDENCE = {
    "queued": 0,
    "dispatching": 1,
    "running": 2,
    "succeeded": 3,
    "failed": 3,
    "cancelled": 3,
    "partial_succeeded": 3,
}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _micros_sql(column: str) -> str:
    return f"(floor(extract(epoch FROM {column}) * 1000000))::bigint"


def _level_sql(column: str) -> str:
    cases = " ".join(f"WHEN '{s}' THEN {r}" for s, r in PRECEDENCE.items())
    return f"(CASE {column} {cases} ELSE -1 END)"


def _mask_sql(fields: Sequence[str]) -> str:
    return " + ".join(
        f"(CASE WHEN {name} IS NULL THEN 0 ELSE {1 << i} END)" for i, name in enumerate(fields)
    )


def _ranks_from_row_sql(fields: Sequence[str], changed: str) -> str:
    terminal = f"{_level_sql('status')} = 3 AND completed_at IS NOT NULL"
    return (
        f"jsonb_build_array(jsonb_build_array({_level_sql('status')},"
        f" CASE WHEN {terminal} THEN 1 ELSE 0 END,"
        f" CASE WHEN {terminal} THEN {_micros_sql('completed_at')} ELSE 0 END,"
        f" {_micros_sql(changed)}, 0, {_mask_sql(fields)}))"
    )


def _micros(value: datetime) -> int:
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _run_ranks(patches: list[tuple[int, datetime, dict[str, Any]]]) -> list[list[int]]:
    """Per-field owners of one run from its patches (the fold of receiver.ingest.merge)."""
    owners: dict[str, tuple[int, int, int, int, int]] = {}
    for delivery_id, received_at, patch in patches:
        level = PRECEDENCE.get(patch.get("status") or "", -1)
        completed = patch.get("completed_at")
        if level == 3 and completed:
            done = (1, _micros(datetime.fromisoformat(completed)))
        else:
            done = (0, 0)
        rank = (level, *done, _micros(received_at), delivery_id)
        for name, value in patch.items():
            if value is not None and name in RUN_FIELDS and owners.get(name, rank) <= rank:
                owners[name] = rank
    masks: dict[tuple[int, int, int, int, int], int] = {}
    for name, rank in owners.items():
        masks[rank] = masks.get(rank, 0) | (1 << RUN_FIELDS.index(name))
    return [[*rank, mask] for rank, mask in sorted(masks.items())]


def upgrade() -> None:
    op.create_table(
        "run_deliveries",
        sa.Column("run_id", sa.Text(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivery_id", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("run_id", "received_at", "delivery_id"),
    )
    for table in ("runs", "batches", "node_runs", "run_logs"):
        op.add_column(table, sa.Column("ranks", JSONB(), nullable=True))

    bind = op.get_bind()
    # Links for the deliveries whose own row names another run (batch callbacks).
    bind.execute(
        sa.text(
            "INSERT INTO run_deliveries (run_id, received_at, delivery_id)"
            " SELECT p.run_id, p.received_at, p.delivery_id FROM run_patches p"
            " WHERE NOT EXISTS (SELECT 1 FROM deliveries d"
            "  WHERE d.id = p.delivery_id AND d.run_id = p.run_id)"
            " ON CONFLICT DO NOTHING"
        )
    )
    # Runs: ranks from their patches, one run at a time (bounded memory).
    run_ids = [row[0] for row in bind.execute(sa.text("SELECT DISTINCT run_id FROM run_patches"))]
    for run_id in run_ids:
        patches = [
            (row[0], row[1], row[2])
            for row in bind.execute(
                sa.text(
                    "SELECT delivery_id, received_at, patch FROM run_patches"
                    " WHERE run_id = :r ORDER BY received_at, delivery_id"
                ),
                {"r": run_id},
            )
        ]
        bind.execute(
            sa.text("UPDATE runs SET ranks = CAST(:ranks AS jsonb) WHERE id = :r"),
            {"r": run_id, "ranks": _json(_run_ranks(patches))},
        )
    op.drop_table("run_patches")

    op.execute(
        f"UPDATE batches SET ranks = {_ranks_from_row_sql(BATCH_FIELDS, 'last_received_at')}"
    )
    node_keys = ", ".join(f"'{key}'" for key in NODE_DATA_KEYS)
    log_keys = ", ".join(f"'{key}'" for key in LOG_DATA_KEYS)
    op.execute(
        f"UPDATE node_runs SET data = NULLIF(data - ARRAY[{node_keys}], '{{}}'::jsonb)"
        " WHERE data IS NOT NULL"
    )
    op.execute(f"UPDATE node_runs SET ranks = {_ranks_from_row_sql(NODE_FIELDS, 'updated_at')}")
    op.execute(
        f"UPDATE run_logs SET data = NULLIF(data - ARRAY[{log_keys}], '{{}}'::jsonb)"
        " WHERE data IS NOT NULL"
    )
    op.execute(LOCK_AND_LOAD)
    # No query reads deliveries by batch id (a batch's runs carry batch_id; /deliveries lists
    # by outcome and time): one index less to maintain on every archived delivery.
    op.drop_index("ix_deliveries_batch_id", table_name="deliveries")


# Locks, then reads, in one round trip. A VOLATILE function takes a fresh snapshot for each
# statement, so the read sees whatever the previous holders of these locks committed.
LOCK_AND_LOAD = """
CREATE FUNCTION ingest_lock_and_load(
    space int, buckets int[], run_ids text[], node_ids text[], log_ids text[], batch_ids text[]
) RETURNS TABLE (t text, id text, owner text, status text, ranks jsonb)
LANGUAGE plpgsql VOLATILE
-- Plan for the ids at hand: a generic plan cached while the tables were small scans them.
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    bucket int;
BEGIN
    FOREACH bucket IN ARRAY buckets LOOP
        PERFORM pg_advisory_xact_lock(space, bucket);
    END LOOP;
    RETURN QUERY
        SELECT 'r'::text, r.id, NULL::text, r.status, r.ranks FROM runs r
        WHERE r.id = ANY(run_ids)
        UNION ALL
        SELECT 'n'::text, n.id, n.run_id, NULL::text, n.ranks FROM node_runs n
        WHERE n.id = ANY(node_ids)
        UNION ALL
        SELECT 'l'::text, l.id, l.run_id, NULL::text, l.ranks FROM run_logs l
        WHERE l.id = ANY(log_ids)
        UNION ALL
        SELECT 'b'::text, b.id, NULL::text, NULL::text, b.ranks FROM batches b
        WHERE b.id = ANY(batch_ids);
END
$$
"""


def _json(value: Any) -> str:
    import json

    return json.dumps(value)


def downgrade() -> None:
    op.create_index("ix_deliveries_batch_id", "deliveries", ["batch_id", "received_at"])
    op.execute("DROP FUNCTION ingest_lock_and_load(int, int[], text[], text[], text[], text[])")
    op.create_table(
        "run_patches",
        sa.Column("run_id", sa.Text(), nullable=False),
        sa.Column("delivery_id", sa.BigInteger(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("precedence", sa.SmallInteger(), nullable=False),
        sa.Column("patch", JSONB(), nullable=False),
        sa.PrimaryKeyConstraint("run_id", "delivery_id"),
    )
    # The payloads themselves are in the archive; a downgrade keeps the links, not the copies.
    op.execute(
        "INSERT INTO run_patches (run_id, delivery_id, received_at, precedence, patch)"
        " SELECT run_id, delivery_id, received_at, -1, '{}'::jsonb FROM run_deliveries"
    )
    for table in ("run_logs", "node_runs", "batches", "runs"):
        op.drop_column(table, "ranks")
    op.drop_table("run_deliveries")
