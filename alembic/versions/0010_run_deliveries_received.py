"""``run_deliveries`` indexed by ``received_at``, so retention sweeps the links with the archive.

A link row names a delivery by ``(delivery_id, received_at)``; once the archive's day is
dropped the link names nothing. Its key leads with ``run_id``, so finding the old links meant
reading the whole table. With this B-tree, ``receiver.retention`` deletes links older than the
archive's retention in bounded batches, like the fingerprints.

Measured against the alternatives (3M links over 30 days, inserted in batches of 500, swept
in chunks of 10,000; docs/scale-out.md): the B-tree's insert cost was inside the run-to-run
noise (the key grows at its right edge) for 23.5 MiB, and the statement that finds nothing
left to delete takes 0.4 ms. Without it, or with a BRIN index (which the planner barely used
here, and whose ranges widen as freed pages are reused), that statement took 157-181 ms: a
scan of the whole table, growing with it.

Revision ID: 0010
Revises: 0009
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_run_deliveries_received", "run_deliveries", ["received_at"])


def downgrade() -> None:
    op.drop_index("ix_run_deliveries_received", table_name="run_deliveries")
