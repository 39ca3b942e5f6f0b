"""The /runs filter indexes hold only the runs that have a value in their column.

A /runs filter is an equality (``column = $1``, ``= ANY($1::text[])`` past 20 values), which a
null never satisfies, so PostgreSQL proves the query implies ``column IS NOT NULL`` and reads
the partial index as it read the full one, with a value bound or in a generic plan
(tests/query/test_partial_indexes.py). The full indexes held an entry for every run, and a new
one for every non-HOT update of it, mostly nulls no query asks for: on the bench's realistic mix
failure_code and failure_stage are null in 89% of runs, batch_id in 92%, model, source and
org_id in 44% (runs heard of only by envelope), client_ref in 38% (bench/README.md).

Two stay full, for the queries that look for nulls: status (reconciliation's
``status IS NULL OR ...``, through the status index) and target_type (the enrichment sweep finds
runs not yet enriched by ``target_type IS NULL``: 0.06 ms at 1M runs through this index, a scan
of the table without it).

Revision ID: 0011
Revises: 0010
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PARTIAL = ("failure_code", "failure_stage", "model", "source", "client_ref", "batch_id", "org_id")


def _sort_index(column: str, where: str = "") -> None:
    op.execute(
        f"CREATE INDEX ix_runs_{column}_sort ON runs ({column}, sort_at DESC, id DESC){where}"
    )


def upgrade() -> None:
    for column in PARTIAL:
        op.drop_index(f"ix_runs_{column}_sort", table_name="runs")
        _sort_index(column, f" WHERE {column} IS NOT NULL")


def downgrade() -> None:
    for column in PARTIAL:
        op.drop_index(f"ix_runs_{column}_sort", table_name="runs")
        _sort_index(column)
