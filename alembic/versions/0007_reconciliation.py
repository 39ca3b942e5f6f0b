"""Reconciliation: a state row (lease, watermark, figures) and when each stale run was checked.

``reconciliation_state`` holds one row per reconciler (``name``, today only ``runflow``): the
lease (``lease_owner`` until ``lease_until``) that lets one process at a time run a pass, the
watermark (runs created before it have been listed), the last pass's start, end, success and
error, and running totals of runs imported and re-fetched. ``reconciliation_checks`` keeps when
a stale run was last re-fetched, so one that Runflow still reports as running is asked again
only once per stale period.

Revision ID: 0007
Revises: 0006
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "reconciliation_state",
        sa.Column("name", sa.Text(), primary_key=True),
        sa.Column("lease_owner", sa.Text(), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("watermark", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_success_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("runs_imported", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("runs_refetched", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("passes", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.text("now()"),
        ),
    )
    op.create_table(
        "reconciliation_checks",
        sa.Column("run_id", sa.Text(), primary_key=True),
        sa.Column("checked_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("outcome", sa.Text(), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("reconciliation_checks")
    op.drop_table("reconciliation_state")
