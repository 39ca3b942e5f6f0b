"""Query indexes: a sort key for runs, and one index per /runs filter and analytics path.

``runs.sort_at`` is created_at, or when Runflow never said (batch items, bare envelopes) the
time the receiver first heard of the run. It orders /runs and bounds every analytics window,
so runs without created_at are neither lost from listings nor from counts.

Each filterable column gets (column, sort_at DESC, id DESC): a single-filter /runs page is
then a range read of one index in order, whatever the page. The status index carries the
columns the failure breakdown groups by, so that breakdown is an index-only scan.

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FILTERED = (
    "failure_code",
    "failure_stage",
    "model",
    "target_type",
    "source",
    "client_ref",
    "batch_id",
    "org_id",
)


def upgrade() -> None:
    op.add_column(
        "runs",
        sa.Column(
            "sort_at",
            sa.DateTime(timezone=True),
            sa.Computed("COALESCE(created_at, first_received_at)", persisted=True),
            nullable=False,
        ),
    )
    op.drop_index("ix_runs_created_at_id", table_name="runs")
    op.drop_index("ix_runs_client_ref", table_name="runs")
    op.drop_index("ix_runs_batch_id", table_name="runs")
    op.execute("CREATE INDEX ix_runs_sort ON runs (sort_at DESC, id DESC) INCLUDE (status)")
    op.execute(
        "CREATE INDEX ix_runs_status_sort ON runs (status, sort_at DESC, id DESC)"
        " INCLUDE (failure_code, failure_stage, model, duration_ms)"
    )
    for column in FILTERED:
        op.execute(f"CREATE INDEX ix_runs_{column}_sort ON runs ({column}, sort_at DESC, id DESC)")


def downgrade() -> None:
    for column in FILTERED:
        op.drop_index(f"ix_runs_{column}_sort", table_name="runs")
    op.drop_index("ix_runs_status_sort", table_name="runs")
    op.drop_index("ix_runs_sort", table_name="runs")
    op.drop_column("runs", "sort_at")
    op.create_index("ix_runs_batch_id", "runs", ["batch_id"])
    op.create_index("ix_runs_client_ref", "runs", ["client_ref"])
    op.execute("CREATE INDEX ix_runs_created_at_id ON runs (created_at DESC, id DESC)")
