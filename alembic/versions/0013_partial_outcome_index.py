"""The archive's outcome index holds only the deliveries that were not stored.

``GET /deliveries?outcome=`` reads ``ix_deliveries_outcome`` to page through one outcome, newest
first. Almost every delivery is ``stored`` (on the bench's realistic mix 96 %, the rest exact
duplicates), and a ``stored`` page is read as well from ``ix_deliveries_received`` with the
outcome as a filter, since nearly every row it meets passes. The index earns its keep for the
rare outcomes, ``rejected`` and ``duplicate``: the replay sweep and reconciliation look for
rejected rows, and an operator pages through them. Holding only those, it is about 4 % of its
full size on the mix (80 KB against 2.2 MB for 30,000 deliveries), and a stored delivery no
longer writes an entry to it.

A query reads a partial index only when its WHERE clause implies the index's predicate, which
``outcome = $1`` does not when ``$1`` is unknown (a generic plan). ``receiver.queries`` adds
``outcome <> 'stored'`` to a list that asks only for other outcomes; the sweeps name their
outcome as a literal.

Deliveries are partitioned by day. The index is made on the parent, so every partition made later
gets it too; each existing partition's is built CONCURRENTLY (``_replace_outcome_index``), so
ingest goes on writing while the upgrade reads the archive. That runs outside a transaction,
so each revision now commits on its own (alembic/env.py).

Revision ID: 0013
Revises: 0012
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLUMNS = "(outcome, received_at DESC, id DESC)"


def _replace_outcome_index(where: str, suffix: str) -> None:
    """Swap ix_deliveries_outcome for one with ``where``, without blocking ingest for the build.

    A plain CREATE INDEX on the archive would hold off every insert until it had read every
    partition. Instead the new index is made on the parent alone (ON ONLY: invalid until each
    partition has one), each partition's is built CONCURRENTLY and attached, and only then is
    the old one dropped (a short exclusive lock) and the new one given its name.
    """
    # What an interrupted run of this left behind (with the partitions' indexes attached to
    # it) goes first, so the revision can simply run again.
    op.execute("DROP INDEX IF EXISTS ix_deliveries_outcome_new")
    op.execute(f"CREATE INDEX ix_deliveries_outcome_new ON ONLY deliveries {_COLUMNS}{where}")
    partitions = (
        op.get_bind()
        .execute(
            sa.text(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                " WHERE i.inhparent = 'deliveries'::regclass ORDER BY c.relname"
            )
        )
        .scalars()
        .all()
    )
    with op.get_context().autocommit_block():
        for partition in partitions:
            index = f"{partition}_{suffix}"
            # A build cut short leaves an invalid index, not attached to any parent.
            op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {index}")
            op.execute(f"CREATE INDEX CONCURRENTLY {index} ON {partition} {_COLUMNS}{where}")
            op.execute(f"ALTER INDEX ix_deliveries_outcome_new ATTACH PARTITION {index}")
    op.execute("DROP INDEX ix_deliveries_outcome")
    op.execute("ALTER INDEX ix_deliveries_outcome_new RENAME TO ix_deliveries_outcome")


def upgrade() -> None:
    _replace_outcome_index(" WHERE outcome <> 'stored'", "rare_outcome_idx")


def downgrade() -> None:
    _replace_outcome_index("", "outcome_idx")
