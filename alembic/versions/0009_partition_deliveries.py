"""The archive partitioned by day; node runs and logs keyed with their run; a maintenance lease.

``deliveries`` becomes ``PARTITION BY RANGE (received_at)`` with one partition per UTC day
(``deliveries_pYYYYMMDD``, bounds ``[day, day + 1)``) and a ``deliveries_default`` partition as
the safety net for rows no daily partition covers. The receiver creates the daily partitions
ahead of time and prunes by dropping whole ones (``receiver.retention``); this revision
creates the days the old table has rows for and today plus a week ahead.

Written so it does not depend on the column list of ``deliveries``: the new parent is
``CREATE TABLE ... (LIKE <old> INCLUDING DEFAULTS INCLUDING GENERATED ...)``, the primary key
and indexes are recreated from their catalog definitions, and the rows are copied with
``SELECT *``. PostgreSQL before 17 refuses identity columns on a partitioned table, so the
identity on ``deliveries.id`` becomes a plain sequence (same name, ``deliveries_id_seq``,
continuing where the identity stopped) as the column default; the write path already calls
``nextval('deliveries_id_seq')`` itself.

``delivery_fingerprints`` keep their single-column key (the duplicate check is one
``ON CONFLICT (body_sha256)``, which a partitioned table cannot offer because its unique keys
must include the partition key); they get an index on ``received_at`` so retention deletes them
in bounded batches. ``node_runs`` and ``run_logs`` get ``(id, run_id)`` primary keys, so every
unique key of a per-run table includes the run id (the distribution column, should the schema
move to Citus; see docs/scale-out.md). ``maintenance_state`` holds the lease that lets one
process at a time run the daily partition maintenance and pruning.

Revision ID: 0009
Revises: 0008
"""

from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD = "deliveries_unpartitioned"
DAYS_AHEAD = 7


def _scalar(sql: str) -> object:
    return op.get_bind().execute(sa.text(sql)).scalar()


def _rows(sql: str) -> list[Any]:
    return list(op.get_bind().execute(sa.text(sql)))


def _index_definitions(table: str) -> list[tuple[str, str]]:
    """(name, CREATE INDEX ...) of every index of ``table`` that is not a constraint's."""
    return [
        (row[0], row[1])
        for row in _rows(
            "SELECT i.relname, pg_get_indexdef(x.indexrelid) FROM pg_index x"
            " JOIN pg_class i ON i.oid = x.indexrelid"
            f" WHERE x.indrelid = '{table}'::regclass"
            " AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = x.indexrelid)"
            " ORDER BY i.relname"
        )
    ]


def _constraint_definitions(table: str) -> list[tuple[str, str]]:
    """(name, definition) of the table's primary key and unique/check constraints."""
    return [
        (row[0], row[1])
        for row in _rows(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint"
            f" WHERE conrelid = '{table}'::regclass AND contype IN ('p', 'u', 'c')"
            " ORDER BY contype DESC, conname"
        )
    ]


def _day_partition(day: date) -> None:
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    end = start + timedelta(days=1)
    op.execute(
        f"CREATE TABLE IF NOT EXISTS deliveries_p{day:%Y%m%d} PARTITION OF deliveries"
        f" FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"
    )


def upgrade() -> None:
    indexes = _index_definitions("deliveries")
    constraints = _constraint_definitions("deliveries")
    sequence = _scalar("SELECT pg_get_serial_sequence('deliveries', 'id')")
    state = _rows(f"SELECT last_value, is_called FROM {sequence}")[0] if sequence else None

    op.execute(f"ALTER TABLE deliveries RENAME TO {OLD}")
    for name, _ in indexes:
        op.execute(f'ALTER INDEX "{name}" RENAME TO "{name[:40]}_unpartitioned"')
    for name, _ in constraints:
        op.execute(f'ALTER TABLE {OLD} RENAME CONSTRAINT "{name}" TO "{name[:40]}_unpartitioned"')
    if sequence:
        op.execute(f"ALTER SEQUENCE {sequence} RENAME TO {OLD}_id_seq")

    op.execute(
        f"CREATE TABLE deliveries (LIKE {OLD} INCLUDING DEFAULTS INCLUDING GENERATED"
        " INCLUDING STORAGE INCLUDING COMMENTS) PARTITION BY RANGE (received_at)"
    )
    op.execute("CREATE SEQUENCE deliveries_id_seq AS bigint OWNED BY deliveries.id")
    if state is not None:
        op.execute(f"SELECT setval('deliveries_id_seq', {state[0]}, {str(state[1]).lower()})")
    op.execute("ALTER TABLE deliveries ALTER COLUMN id SET DEFAULT nextval('deliveries_id_seq')")
    for name, definition in constraints:
        op.execute(f'ALTER TABLE deliveries ADD CONSTRAINT "{name}" {definition}')
    for _, definition in indexes:
        # The definition names "ON public.deliveries", which is now the partitioned parent.
        op.execute(definition)

    op.execute("CREATE TABLE deliveries_default PARTITION OF deliveries DEFAULT")
    today = datetime.now(UTC).date()
    days = {today + timedelta(days=n) for n in range(DAYS_AHEAD + 1)}
    days |= {
        row[0]
        for row in _rows(
            f"SELECT DISTINCT (received_at AT TIME ZONE 'UTC')::date FROM {OLD}"
            " WHERE received_at IS NOT NULL"
        )
    }
    for day in sorted(days):
        _day_partition(day)
    op.execute(f"INSERT INTO deliveries SELECT * FROM {OLD}")
    op.execute(f"DROP TABLE {OLD}")

    op.create_index("ix_delivery_fingerprints_received", "delivery_fingerprints", ["received_at"])

    for table in ("node_runs", "run_logs"):
        op.execute(f"ALTER TABLE {table} DROP CONSTRAINT {table}_pkey")
        op.execute(f"ALTER TABLE {table} ADD CONSTRAINT {table}_pkey PRIMARY KEY (id, run_id)")

    op.create_table(
        "maintenance_state",
        sa.Column("name", sa.Text(), primary_key=True),
        sa.Column("lease_owner", sa.Text(), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_success_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("last_summary", sa.dialects.postgresql.JSONB(), nullable=True),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
    )


def downgrade() -> None:
    op.drop_table("maintenance_state")
    for table in ("node_runs", "run_logs"):
        op.execute(f"ALTER TABLE {table} DROP CONSTRAINT {table}_pkey")
        op.execute(f"ALTER TABLE {table} ADD CONSTRAINT {table}_pkey PRIMARY KEY (id)")
    op.drop_index("ix_delivery_fingerprints_received", table_name="delivery_fingerprints")

    indexes = _index_definitions("deliveries")
    constraints = _constraint_definitions("deliveries")
    state = _rows("SELECT last_value, is_called FROM deliveries_id_seq")[0]
    op.execute(f"ALTER TABLE deliveries RENAME TO {OLD}")
    for name, _ in indexes:
        op.execute(f'ALTER INDEX "{name}" RENAME TO "{name[:40]}_unpartitioned"')
    for name, _ in constraints:
        op.execute(f'ALTER TABLE {OLD} RENAME CONSTRAINT "{name}" TO "{name[:40]}_unpartitioned"')
    op.execute(f"ALTER TABLE {OLD} ALTER COLUMN id DROP DEFAULT")
    op.execute(f"ALTER SEQUENCE deliveries_id_seq RENAME TO {OLD}_id_seq")
    op.execute(
        f"CREATE TABLE deliveries (LIKE {OLD} INCLUDING DEFAULTS INCLUDING GENERATED"
        " INCLUDING STORAGE INCLUDING COMMENTS)"
    )
    op.execute("ALTER TABLE deliveries ALTER COLUMN id ADD GENERATED BY DEFAULT AS IDENTITY")
    op.execute(
        "SELECT setval(pg_get_serial_sequence('deliveries', 'id'),"
        f" {state[0]}, {str(state[1]).lower()})"
    )
    for name, definition in constraints:
        op.execute(f'ALTER TABLE deliveries ADD CONSTRAINT "{name}" {definition}')
    for _, definition in indexes:
        op.execute(definition.replace(" ON ONLY ", " ON "))
    op.execute(f"INSERT INTO deliveries SELECT * FROM {OLD}")
    op.execute(f"DROP TABLE {OLD}")
