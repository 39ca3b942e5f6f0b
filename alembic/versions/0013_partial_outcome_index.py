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

Deliveries are partitioned by day: the index is made on the parent and so on every partition,
including those made later.

Revision ID: 0013
Revises: 0012
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _outcome_index(where: str = "") -> None:
    op.execute(
        "CREATE INDEX ix_deliveries_outcome ON deliveries (outcome, received_at DESC, id DESC)"
        + where
    )


def upgrade() -> None:
    op.drop_index("ix_deliveries_outcome", table_name="deliveries")
    _outcome_index(" WHERE outcome <> 'stored'")


def downgrade() -> None:
    op.drop_index("ix_deliveries_outcome", table_name="deliveries")
    _outcome_index()
