"""Running Alembic from the receiver: upgrade to head, and tell whether a database is at head."""

from __future__ import annotations

import asyncio
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Literal

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from alembic import command

# alembic/ at the repository root, shipped inside the package (see pyproject.toml).
MIGRATIONS_PACKAGE = "receiver._migrations"


def migrations_dir() -> Path:
    """The shipped Alembic environment and revisions, wherever the package is installed."""
    shipped: Traversable = files(MIGRATIONS_PACKAGE)
    # A folder without __init__.py comes back as a MultiplexedPath; its files are real paths.
    return Path(str(shipped.joinpath("env.py"))).parent


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.attributes["database_url"] = database_url
    return config


SchemaState = Literal["current", "ahead", "behind"]


def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config("postgresql://unused"))


def head_revision() -> str | None:
    return _scripts().get_current_head()


def upgrade(database_url: str) -> None:
    """Bring the database at ``database_url`` to the newest revision (blocking)."""
    command.upgrade(alembic_config(database_url), "head")


async def upgrade_async(database_url: str) -> None:
    # env.py runs its own event loop, so migrations go to a thread when one is running.
    await asyncio.to_thread(upgrade, database_url)


def _current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def current_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as connection:
        return await connection.run_sync(_current)


async def schema_is_current(engine: AsyncEngine) -> bool:
    """True when the database's revision is this code's head revision."""
    return await current_revision(engine) == head_revision()


def state_of(revision: str | None) -> SchemaState:
    """Where a database at ``revision`` stands against this code's head.

    A revision this code's scripts do not know was written by a newer version: during a rollout
    its migration runs first, and the older pods still serving see the database ahead. A known
    revision other than head (or none at all) is behind: this code needs a migration first.
    """
    scripts = _scripts()
    if revision == scripts.get_current_head():
        return "current"
    if revision is None or revision in {rev.revision for rev in scripts.walk_revisions()}:
        return "behind"
    return "ahead"


async def schema_state(engine: AsyncEngine) -> SchemaState:
    """``state_of`` the database behind ``engine``."""
    return state_of(await current_revision(engine))
