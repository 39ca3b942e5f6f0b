"""The schema declared once: the table models in receiver.tables agree with the revisions.

The revisions are the only source of DDL; the models must declare the same schema. Two checks:
Alembic's own comparison (what ``alembic revision --autogenerate`` and ``alembic check`` see),
and, because that comparison is blind to index details (INCLUDE columns, WHERE clauses, DESC
order), the catalog of a database built by ``create_all`` from the models against the catalog
of the session's database migrated to head.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import SQLModel

import receiver.tables  # noqa: F401  (registers the table models)
from receiver.db import create_engine, plain_url
from tests.support.database import admin_sql, with_database

# Partitions of a partitioned table (the archive's days, made and dropped by receiver.retention)
# are data, not schema: the models declare the partitioned parent only.
NOT_A_PARTITION = """
    NOT EXISTS (SELECT 1 FROM pg_class p JOIN pg_namespace pn ON pn.oid = p.relnamespace
                WHERE pn.nspname = 'public' AND p.relname = {table} AND p.relispartition)
"""
COLUMNS = f"""
    SELECT table_name, column_name, ordinal_position, data_type, character_maximum_length,
           numeric_precision, numeric_scale, datetime_precision, is_nullable, column_default,
           is_identity, identity_generation, identity_start, identity_increment,
           identity_maximum, identity_minimum, identity_cycle, is_generated,
           generation_expression
    FROM information_schema.columns
    WHERE table_schema = 'public' AND table_name <> 'alembic_version'
      AND {NOT_A_PARTITION.format(table="table_name")}
    ORDER BY table_name, ordinal_position
"""
INDEXES = f"""
    SELECT tablename, indexname, indexdef FROM pg_indexes
    WHERE schemaname = 'public' AND tablename <> 'alembic_version'
      AND {NOT_A_PARTITION.format(table="tablename")}
"""
CONSTRAINTS = """
    SELECT c.conrelid::regclass::text AS table_name, c.conname, c.contype::text AS contype,
           pg_get_constraintdef(c.oid) AS definition
    FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
    WHERE n.nspname = 'public' AND c.conrelid <> 0
      AND c.conrelid::regclass::text <> 'alembic_version'
      AND NOT (SELECT relispartition FROM pg_class WHERE oid = c.conrelid)
"""
PARTITIONS = "SELECT relname FROM pg_class WHERE relispartition"


def _differences(connection: Connection) -> list[Any]:
    # Alembic leaves its own alembic_version table out; partitions are left out here.
    partitions = {row[0] for row in connection.execute(text(PARTITIONS))}

    def include_name(name: str | None, type_: str, parent_names: Any) -> bool:
        return not (type_ == "table" and name in partitions)

    context = MigrationContext.configure(
        connection,
        opts={
            "compare_type": True,
            "compare_server_default": True,
            "include_name": include_name,
        },
    )
    return compare_metadata(context, SQLModel.metadata)


async def test_alembic_finds_no_difference_between_the_models_and_the_revisions(
    engine: AsyncEngine,
) -> None:
    async with engine.connect() as conn:
        found = await conn.run_sync(_differences)
    assert found == [], "the models and the revisions disagree:\n" + "\n".join(map(repr, found))


async def catalog(url: str) -> dict[str, Any]:
    """What a database holds, keyed so that two databases compare entry by entry."""
    conn = await asyncpg.connect(plain_url(url))
    try:
        columns = await conn.fetch(COLUMNS)
        indexes = await conn.fetch(INDEXES)
        constraints = await conn.fetch(CONSTRAINTS)
    finally:
        await conn.close()
    found: dict[str, Any] = {}
    order: dict[str, list[str]] = {}
    for row in columns:
        fields = {k: v for k, v in row.items() if k not in ("table_name", "ordinal_position")}
        found[f"column {row['table_name']}.{row['column_name']}"] = fields
        order.setdefault(row["table_name"], []).append(row["column_name"])
    for table, names in order.items():
        # Position, not attnum: a dropped column leaves a gap a fresh table does not have.
        found[f"column order of {table}"] = names
    for row in indexes:
        found[f"index {row['indexname']}"] = row["indexdef"]
    for row in constraints:
        found[f"constraint {row['table_name']}.{row['conname']}"] = (
            f"{row['contype']}: {row['definition']}"
        )
    return found


def disagreements(migrated: dict[str, Any], declared: dict[str, Any]) -> list[str]:
    lines = []
    for key in sorted(migrated.keys() | declared.keys()):
        revisions, models = migrated.get(key, "(absent)"), declared.get(key, "(absent)")
        if revisions == models:
            continue
        if isinstance(revisions, dict) and isinstance(models, dict):  # a column: what differs
            fields = [f for f in revisions if revisions[f] != models[f]]
            revisions = {f: revisions[f] for f in fields}
            models = {f: models[f] for f in fields}
        lines.append(f"{key}:\n    revisions: {revisions}\n    models:    {models}")
    return lines


@pytest.fixture
def scratch_url(server_url: str) -> Iterator[str]:
    """An empty database of its own, dropped at the end."""
    name = f"rfschema_{uuid.uuid4().hex[:12]}"
    admin_sql(server_url, f'CREATE DATABASE "{name}"')
    try:
        yield with_database(server_url, name)
    finally:
        admin_sql(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def test_a_database_built_from_the_models_is_the_database_the_revisions_build(
    database_url: str, scratch_url: str
) -> None:
    scratch = create_engine(scratch_url, pool_size=1)
    try:
        async with scratch.begin() as conn:
            await conn.run_sync(SQLModel.metadata.create_all)
    finally:
        await scratch.dispose()
    found = disagreements(await catalog(database_url), await catalog(scratch_url))
    assert found == [], (
        f"{len(found)} differences between the migrated database and create_all:\n"
        + "\n".join(found)
    )
