"""Table models: the whole schema, declared in SQLModel beside the revisions that create it.

The Alembic revisions in ``alembic/versions`` are the only source of DDL; they are reviewed by
hand and never generated from here. These models must declare the same schema: every table,
column (type, nullability, server default, identity, computed column) in the database's column
order, key, constraint and index, with the names the revisions use. ``tests/test_schema.py``
proves the two agree: Alembic's comparison against a database migrated to head, and the catalog
(index definitions, columns, constraints) of a database built by ``create_all`` from these
models against that migrated one. A revision that adds a column appends it to the table here.

The ingest hot path writes these with SQLAlchemy Core (see ``receiver.store``); the ORM view is
for ordinary queries. ``deliveries`` is keyed by ``(id, received_at)`` and range-partitioned
by received time (revision 0009); its partitions are made and dropped by ``receiver.retention``
and are no part of this declaration (the drift gate leaves partitions out).
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Computed,
    DateTime,
    Float,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    Numeric,
    PrimaryKeyConstraint,
    SmallInteger,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel


def _ts(*, nullable: bool = True, default_now: bool = False) -> Any:
    return Field(
        default=None,
        sa_column=Column(
            DateTime(timezone=True),
            nullable=nullable,
            server_default=text("now()") if default_now else None,
        ),
    )


def _json() -> Any:
    return Field(default=None, sa_column=Column(JSONB, nullable=True))


# 0002: each /runs filter column gets (column, sort_at DESC, id DESC).
_RUNS_FILTERED = (
    "failure_code",
    "failure_stage",
    "model",
    "target_type",
    "source",
    "client_ref",
    "batch_id",
    "org_id",
)
# 0011: a filter is an equality, which implies IS NOT NULL: their indexes hold only the runs with
# a value, but for target_type (the enrichment sweep looks for target_type IS NULL).
_RUNS_FILTERED_PARTIAL = tuple(c for c in _RUNS_FILTERED if c != "target_type")
# 0005: what the window index carries so every analytics route is an index-only scan.
_RUNS_WINDOW_COVERED = (
    "status",
    "model",
    "target_type",
    "source",
    "org_id",
    "failure_code",
    "failure_stage",
    "duration_ms",
    "cost",
)
_NEWEST_FIRST = (text("sort_at DESC"), text("id DESC"))


class Run(SQLModel, table=True):
    """The current state of one Runflow run, folded from every delivery that touched it."""

    __tablename__ = "runs"
    __table_args__ = (
        Index("ix_runs_window", *_NEWEST_FIRST, postgresql_include=list(_RUNS_WINDOW_COVERED)),
        Index(
            "ix_runs_status_sort",
            "status",
            *_NEWEST_FIRST,
            postgresql_include=["failure_code", "failure_stage", "model", "duration_ms"],
        ),
        *(
            Index(
                f"ix_runs_{column}_sort",
                column,
                *_NEWEST_FIRST,
                postgresql_where=(
                    text(f"{column} IS NOT NULL") if column in _RUNS_FILTERED_PARTIAL else None
                ),
            )
            for column in _RUNS_FILTERED
        ),
        # 0004: alerts look at what the receiver heard recently, whenever the run was created.
        Index("ix_runs_last_received", "last_received_at", postgresql_include=["status"]),
    )

    id: str = Field(sa_column=Column(Text, primary_key=True))
    org_id: str | None = Field(default=None, sa_column=Column(Text))
    status: str | None = Field(default=None, sa_column=Column(Text))
    event: str | None = Field(default=None, sa_column=Column(Text))
    target_type: str | None = Field(default=None, sa_column=Column(Text))
    model: str | None = Field(default=None, sa_column=Column(Text))
    model_id: str | None = Field(default=None, sa_column=Column(Text))
    flow_id: str | None = Field(default=None, sa_column=Column(Text))
    comfyui_workflow_id: str | None = Field(default=None, sa_column=Column(Text))
    batch_id: str | None = Field(default=None, sa_column=Column(Text))
    client_ref: str | None = Field(default=None, sa_column=Column(Text))
    source: str | None = Field(default=None, sa_column=Column(Text))
    failure_code: str | None = Field(default=None, sa_column=Column(Text))
    failure_message: str | None = Field(default=None, sa_column=Column(Text))
    failure_stage: str | None = Field(default=None, sa_column=Column(Text))
    duration_ms: int | None = Field(default=None, sa_column=Column(BigInteger))
    cost: Decimal | None = Field(default=None, sa_column=Column(Numeric))
    cost_breakdown: Any = _json()
    created_at: datetime | None = _ts()
    started_at: datetime | None = _ts()
    completed_at: datetime | None = _ts()
    input: Any = _json()
    output: Any = _json()
    metadata_: Any = Field(default=None, sa_column=Column("metadata", JSONB, nullable=True))
    first_received_at: datetime | None = _ts(nullable=False, default_now=True)
    last_received_at: datetime | None = _ts(nullable=False, default_now=True)
    delivery_count: int = Field(
        default=0, sa_column=Column(Integer, nullable=False, server_default="0")
    )
    updated_at: datetime | None = _ts(nullable=False, default_now=True)
    # Columns a later revision added come in the order the revisions added them.
    # 0002:
    sort_at: datetime | None = Field(
        default=None,
        sa_column=Column(
            DateTime(timezone=True),
            Computed("COALESCE(created_at, first_received_at)", persisted=True),
            nullable=False,
        ),
    )
    # 0003:
    enriched_at: datetime | None = _ts()
    enrichment_error: str | None = Field(default=None, sa_column=Column(Text))
    # 0008: which rank supplied each non-null field (receiver.ingest.merge).
    ranks: Any = _json()


class Delivery(SQLModel, table=True):
    """Every request to the webhook: the archive that makes replays and audits possible."""

    __tablename__ = "deliveries"
    __table_args__ = (
        Index("ix_deliveries_run_id", "run_id", "received_at"),
        # 0013: only the rare outcomes; a stored page reads ix_deliveries_received.
        Index(
            "ix_deliveries_outcome",
            "outcome",
            text("received_at DESC"),
            text("id DESC"),
            postgresql_where=text("outcome <> 'stored'"),
        ),
        Index("ix_deliveries_received", text("received_at DESC"), text("id DESC")),
        {"postgresql_partition_by": "RANGE (received_at)"},
    )

    # 0009: a bigserial (a sequence the column owns), not an identity: PostgreSQL before 17
    # has no identity columns on partitioned tables.
    id: int = Field(
        sa_column=Column(BigInteger, primary_key=True, nullable=False, autoincrement=True)
    )
    received_at: datetime = Field(
        sa_column=Column(
            DateTime(timezone=True), primary_key=True, nullable=False, server_default=text("now()")
        )
    )
    request_id: str | None = Field(default=None, sa_column=Column(Text))
    headers: Any = _json()
    content_type: str | None = Field(default=None, sa_column=Column(Text))
    body: bytes | None = Field(default=None, sa_column=Column(LargeBinary))
    body_sha256: bytes | None = Field(default=None, sa_column=Column(LargeBinary))
    body_size: int | None = Field(default=None, sa_column=Column(BigInteger))
    signature: str = Field(sa_column=Column(Text, nullable=False))
    outcome: str = Field(sa_column=Column(Text, nullable=False))
    cause: str | None = Field(default=None, sa_column=Column(Text))
    cause_detail: Any = _json()
    kind: str | None = Field(default=None, sa_column=Column(Text))
    run_id: str | None = Field(default=None, sa_column=Column(Text))
    batch_id: str | None = Field(default=None, sa_column=Column(Text))
    duplicate_of: int | None = Field(default=None, sa_column=Column(BigInteger))
    replay_count: int = Field(
        default=0, sa_column=Column(Integer, nullable=False, server_default="0")
    )
    replayed_at: datetime | None = _ts()
    # Added by 0006, so last.
    source: str = Field(
        default="webhook", sa_column=Column(Text, nullable=False, server_default="webhook")
    )
    # 0012: how ``body`` is kept: null as received, ``zlib`` compressed
    # (receiver.ingest.archive.decode_body).
    body_encoding: str | None = Field(default=None, sa_column=Column(Text))


class DeliveryFingerprint(SQLModel, table=True):
    """The SHA-256 of every accepted body: how the same bytes twice are told apart."""

    __tablename__ = "delivery_fingerprints"
    # 0009: retention deletes fingerprints past the archive's window in bounded batches.
    __table_args__ = (Index("ix_delivery_fingerprints_received", "received_at"),)

    body_sha256: bytes = Field(sa_column=Column(LargeBinary, primary_key=True))
    delivery_id: int = Field(sa_column=Column(BigInteger, nullable=False))
    received_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class RunDelivery(SQLModel, table=True):
    """A delivery that touched a run its own row does not name (batch callbacks); 0008."""

    __tablename__ = "run_deliveries"
    # 0010: retention deletes links past the archive's window in bounded batches.
    __table_args__ = (Index("ix_run_deliveries_received", "received_at"),)

    run_id: str = Field(sa_column=Column(Text, primary_key=True))
    received_at: datetime = Field(sa_column=Column(DateTime(timezone=True), primary_key=True))
    delivery_id: int = Field(sa_column=Column(BigInteger, primary_key=True))


class NodeRun(SQLModel, table=True):
    __tablename__ = "node_runs"
    # 0009: every unique key of a per-run table includes the run id (docs/scale-out.md).
    __table_args__ = (
        PrimaryKeyConstraint("id", "run_id", name="node_runs_pkey"),
        Index("ix_node_runs_run_id", "run_id"),
    )

    id: str = Field(sa_column=Column(Text, nullable=False))
    run_id: str = Field(sa_column=Column(Text, nullable=False))
    node_id: str | None = Field(default=None, sa_column=Column(Text))
    node_type: str | None = Field(default=None, sa_column=Column(Text))
    status: str | None = Field(default=None, sa_column=Column(Text))
    failure_code: str | None = Field(default=None, sa_column=Column(Text))
    failure_message: str | None = Field(default=None, sa_column=Column(Text))
    created_at: datetime | None = _ts()
    started_at: datetime | None = _ts()
    completed_at: datetime | None = _ts()
    duration_ms: int | None = Field(default=None, sa_column=Column(BigInteger))
    data: Any = _json()
    updated_at: datetime | None = _ts(nullable=False, default_now=True)
    ranks: Any = _json()  # 0008


class RunLog(SQLModel, table=True):
    __tablename__ = "run_logs"
    __table_args__ = (
        PrimaryKeyConstraint("id", "run_id", name="run_logs_pkey"),
        Index("ix_run_logs_run_id", "run_id", "logged_at"),
    )

    id: str = Field(sa_column=Column(Text, nullable=False))
    run_id: str = Field(sa_column=Column(Text, nullable=False))
    node_run_id: str | None = Field(default=None, sa_column=Column(Text))
    level: str | None = Field(default=None, sa_column=Column(Text))
    message: str | None = Field(default=None, sa_column=Column(Text))
    logged_at: datetime | None = _ts()
    data: Any = _json()
    ranks: Any = _json()  # 0008


class Batch(SQLModel, table=True):
    __tablename__ = "batches"

    id: str = Field(sa_column=Column(Text, primary_key=True))
    event: str | None = Field(default=None, sa_column=Column(Text))
    status: str | None = Field(default=None, sa_column=Column(Text))
    succeeded: int | None = Field(default=None, sa_column=Column(Integer))
    failed: int | None = Field(default=None, sa_column=Column(Integer))
    cancelled: int | None = Field(default=None, sa_column=Column(Integer))
    total: int | None = Field(default=None, sa_column=Column(Integer))
    duration_ms: int | None = Field(default=None, sa_column=Column(BigInteger))
    created_at: datetime | None = _ts()
    completed_at: datetime | None = _ts()
    metadata_: Any = Field(default=None, sa_column=Column("metadata", JSONB, nullable=True))
    precedence: int = Field(
        default=-1, sa_column=Column(SmallInteger, nullable=False, server_default="-1")
    )
    first_received_at: datetime | None = _ts(nullable=False, default_now=True)
    last_received_at: datetime | None = _ts(nullable=False, default_now=True)
    delivery_count: int = Field(
        default=0, sa_column=Column(Integer, nullable=False, server_default="0")
    )
    ranks: Any = _json()  # 0008


class EnrichmentItem(SQLModel, table=True):
    """A run waiting to be fetched from Runflow's API (see receiver.enrichment)."""

    __tablename__ = "enrichment_queue"
    __table_args__ = (
        Index(
            "ix_enrichment_queue_due",
            "next_attempt_at",
            postgresql_where=text("state = 'pending'"),
        ),
    )

    run_id: str = Field(sa_column=Column(Text, primary_key=True))
    state: str = Field(sa_column=Column(Text, nullable=False, server_default="pending"))
    attempts: int = Field(default=0, sa_column=Column(Integer, nullable=False, server_default="0"))
    next_attempt_at: datetime | None = _ts(nullable=False, default_now=True)
    locked_until: datetime | None = _ts()
    last_error: str | None = Field(default=None, sa_column=Column(Text))
    enqueued_at: datetime | None = _ts(nullable=False, default_now=True)
    updated_at: datetime | None = _ts(nullable=False, default_now=True)


class BackfillProgress(SQLModel, table=True):
    """Where a backfill stopped, so an interrupted one resumes instead of starting over."""

    __tablename__ = "backfill_progress"

    key: str = Field(sa_column=Column(Text, primary_key=True))
    cursor: str | None = Field(default=None, sa_column=Column(Text))
    imported: int = Field(
        default=0, sa_column=Column(BigInteger, nullable=False, server_default="0")
    )
    finished: bool = Field(
        default=False, sa_column=Column(Boolean, nullable=False, server_default=text("false"))
    )
    updated_at: datetime | None = _ts(nullable=False, default_now=True)


class AlertRule(SQLModel, table=True):
    """An alert rule; ``definition`` is the validated ``receiver.alerts.rules.Rule``."""

    __tablename__ = "alert_rules"

    id: int | None = Field(default=None, sa_column=Column(BigInteger, Identity(), primary_key=True))
    name: str = Field(sa_column=Column(Text, nullable=False, unique=True))
    definition: dict[str, Any] = Field(sa_column=Column(JSONB, nullable=False))
    created_at: datetime | None = _ts(nullable=False, default_now=True)
    updated_at: datetime | None = _ts(nullable=False, default_now=True)


class AlertState(SQLModel, table=True):
    """The state of one rule for one group (``group_key``: the group as sorted-key JSON)."""

    __tablename__ = "alert_states"

    rule_id: int = Field(
        sa_column=Column(
            BigInteger,
            ForeignKey("alert_rules.id", ondelete="CASCADE"),
            primary_key=True,
        )
    )
    group_key: str = Field(sa_column=Column(Text, primary_key=True))
    state: str = Field(sa_column=Column(Text, nullable=False))
    value: float | None = Field(default=None, sa_column=Column(Float))
    pending_since: datetime | None = _ts()
    last_fired_notice_at: datetime | None = _ts()
    notified_firing: bool = Field(
        default=False, sa_column=Column(Boolean, nullable=False, server_default=text("false"))
    )
    updated_at: datetime | None = _ts(nullable=False, default_now=True)


class AlertEvent(SQLModel, table=True):
    """One state transition of one rule and group (``GET /alerts/events``)."""

    __tablename__ = "alert_events"
    __table_args__ = (Index("ix_alert_events_rule", "rule_id", "id"),)

    id: int | None = Field(default=None, sa_column=Column(BigInteger, Identity(), primary_key=True))
    rule_id: int = Field(sa_column=Column(BigInteger, nullable=False))
    rule_name: str = Field(sa_column=Column(Text, nullable=False))
    group_key: str = Field(sa_column=Column(Text, nullable=False))
    from_state: str = Field(sa_column=Column(Text, nullable=False))
    to_state: str = Field(sa_column=Column(Text, nullable=False))
    value: float | None = Field(default=None, sa_column=Column(Float))
    threshold: float = Field(sa_column=Column(Float, nullable=False))
    notified: bool = Field(sa_column=Column(Boolean, nullable=False))
    at: datetime | None = _ts(nullable=False, default_now=True)


class AlertNotification(SQLModel, table=True):
    """One POST owed to one hook target: the outbox ``receiver.alerts.notify`` sends from."""

    __tablename__ = "alert_notifications"
    __table_args__ = (
        Index(
            "ix_alert_notifications_due",
            "next_attempt_at",
            postgresql_where=text("state = 'pending'"),
        ),
    )

    id: int | None = Field(default=None, sa_column=Column(BigInteger, Identity(), primary_key=True))
    event_id: int | None = Field(default=None, sa_column=Column(BigInteger))
    url: str = Field(sa_column=Column(Text, nullable=False))
    secret: str | None = Field(default=None, sa_column=Column(Text))
    format: str = Field(sa_column=Column(Text, nullable=False))
    body: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    state: str = Field(sa_column=Column(Text, nullable=False, server_default="pending"))
    attempts: int = Field(default=0, sa_column=Column(Integer, nullable=False, server_default="0"))
    next_attempt_at: datetime | None = _ts(nullable=False, default_now=True)
    locked_until: datetime | None = _ts()
    last_error: str | None = Field(default=None, sa_column=Column(Text))
    created_at: datetime | None = _ts(nullable=False, default_now=True)
    sent_at: datetime | None = _ts()


class ReconciliationState(SQLModel, table=True):
    """The reconciler's lease, watermark and figures (see receiver.reconciliation)."""

    __tablename__ = "reconciliation_state"

    name: str = Field(sa_column=Column(Text, primary_key=True))
    lease_owner: str | None = Field(default=None, sa_column=Column(Text))
    lease_until: datetime | None = _ts()
    watermark: datetime | None = _ts()
    last_started_at: datetime | None = _ts()
    last_finished_at: datetime | None = _ts()
    last_success_at: datetime | None = _ts()
    last_error: str | None = Field(default=None, sa_column=Column(Text))
    runs_imported: int = Field(
        default=0, sa_column=Column(BigInteger, nullable=False, server_default="0")
    )
    runs_refetched: int = Field(
        default=0, sa_column=Column(BigInteger, nullable=False, server_default="0")
    )
    passes: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, server_default="0"))
    updated_at: datetime | None = _ts(nullable=False, default_now=True)


class ReconciliationCheck(SQLModel, table=True):
    """When a stale run was last re-fetched from Runflow, and what came of it."""

    __tablename__ = "reconciliation_checks"

    run_id: str = Field(sa_column=Column(Text, primary_key=True))
    checked_at: datetime | None = _ts(nullable=False)
    outcome: str | None = Field(default=None, sa_column=Column(Text))


class MaintenanceState(SQLModel, table=True):
    """The lease and last outcome of the daily partition maintenance and pruning (0009)."""

    __tablename__ = "maintenance_state"

    name: str = Field(sa_column=Column(Text, primary_key=True))
    lease_owner: str | None = Field(default=None, sa_column=Column(Text))
    lease_until: datetime | None = _ts()
    last_started_at: datetime | None = _ts()
    last_success_at: datetime | None = _ts()
    last_error: str | None = Field(default=None, sa_column=Column(Text))
    last_summary: Any = _json()
    updated_at: datetime | None = _ts(nullable=False, default_now=True)
