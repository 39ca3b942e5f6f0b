"""One window index that covers every analytics column, in place of the narrow sort index.

``ix_runs_sort (sort_at DESC, id DESC) INCLUDE (status)`` served /runs without filters and the
window counts, but costs (and any group_by outside the status index) read the heap: at 1M runs
over 30 days a 7-day cost breakdown touched every table page, slower than a sequential scan
(245 ms against 211 ms). The same key with every dimension, duration_ms and cost included makes
all four analytics routes index-only scans of their window (costs 7 d: 140 ms -> 43 ms; the
window count and timeseries cost 5-10% more for the wider tuples). One index is replaced by
one, so ingest maintains as many indexes as before. Size: about 107 MB at 1M runs.

Revision ID: 0005
Revises: 0004
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COVERED = (
    "status, model, target_type, source, org_id, failure_code, failure_stage, duration_ms, cost"
)


def upgrade() -> None:
    op.drop_index("ix_runs_sort", table_name="runs")
    op.execute(f"CREATE INDEX ix_runs_window ON runs (sort_at DESC, id DESC) INCLUDE ({COVERED})")


def downgrade() -> None:
    op.drop_index("ix_runs_window", table_name="runs")
    op.execute("CREATE INDEX ix_runs_sort ON runs (sort_at DESC, id DESC) INCLUDE (status)")
