"""Deliveries say where they came from in their own column, apart from the signature verdict.

``signature`` held a verdict (``valid``, ``unsigned``, ...) for webhook requests and a source
(``enrichment``, ``backfill``) for Run objects fetched from Runflow's API. ``source`` now names
the origin (``webhook`` for everything posted to the endpoint) and ``signature`` keeps only
verdicts; fetched rows get ``not_applicable``.

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "deliveries",
        sa.Column("source", sa.Text(), nullable=False, server_default="webhook"),
    )
    op.execute(
        "UPDATE deliveries SET source = signature, signature = 'not_applicable'"
        " WHERE signature IN ('enrichment', 'backfill')"
    )


def downgrade() -> None:
    op.execute(
        "UPDATE deliveries SET signature = source WHERE source IN ('enrichment', 'backfill')"
    )
    op.drop_column("deliveries", "source")
