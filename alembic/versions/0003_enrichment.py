"""Enrichment: a queue of runs to fetch from Runflow's API, backfill progress, run state.

The queue is claimed with FOR UPDATE SKIP LOCKED and a lease (locked_until), so several worker
processes share it and an item claimed by a process that died is taken again once its lease
runs out. Revision 0003.

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "enrichment_queue",
        sa.Column("run_id", sa.Text(), primary_key=True),
        sa.Column("state", sa.Text(), nullable=False, server_default="pending"),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column(
            "next_attempt_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.text("now()"),
        ),
        sa.Column("locked_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column(
            "enqueued_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.text("now()"),
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.text("now()"),
        ),
    )
    op.execute(
        "CREATE INDEX ix_enrichment_queue_due ON enrichment_queue (next_attempt_at)"
        " WHERE state = 'pending'"
    )
    op.create_table(
        "backfill_progress",
        sa.Column("key", sa.Text(), primary_key=True),
        sa.Column("cursor", sa.Text(), nullable=True),
        sa.Column("imported", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("finished", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.text("now()"),
        ),
    )
    op.add_column("runs", sa.Column("enriched_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("runs", sa.Column("enrichment_error", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("runs", "enrichment_error")
    op.drop_column("runs", "enriched_at")
    op.drop_table("backfill_progress")
    op.drop_index("ix_enrichment_queue_due", table_name="enrichment_queue")
    op.drop_table("enrichment_queue")
