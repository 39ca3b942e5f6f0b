"""Test fixtures on a real PostgreSQL.

Which server: ``RECEIVER_TEST_DATABASE_URL`` (or ``RECEIVER_DATABASE_URL``) when set, else an
embedded server started for the session. Either way the session creates a database of its own,
migrates it with Alembic, and empties every table before each test that asks for it.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette

from receiver.app import create_app
from receiver.db import EMBEDDED_DATABASE, create_engine, embedded_server, plain_url
from receiver.migrations import upgrade
from receiver.settings import Settings
from tests.support.builders import API_TOKEN, SIGNING_SECRET
from tests.support.database import admin_sql, behind_pgbouncer, truncate_all, with_database


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """A URL of a PostgreSQL server where this session may create a database."""
    url = os.environ.get("RECEIVER_TEST_DATABASE_URL") or os.environ.get("RECEIVER_DATABASE_URL")
    if url:
        yield plain_url(url)
        return
    with (
        tempfile.TemporaryDirectory(prefix="receiver-test-") as data_dir,
        embedded_server(Path(data_dir)) as server,
    ):
        # Stopped on leaving, before its directory is removed: once the data directory is
        # gone, nothing could stop the server any more.
        yield server.get_uri(EMBEDDED_DATABASE)


@pytest.fixture(scope="session")
def database_url(server_url: str) -> Iterator[str]:
    """A fresh, migrated database for this test session, dropped at the end."""
    name = f"rftest_{uuid.uuid4().hex[:12]}"
    admin_sql(server_url, f'CREATE DATABASE "{name}"')
    url = with_database(server_url, name)
    upgrade(url)
    yield url
    admin_sql(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    eng = create_engine(database_url, pool_size=5, pgbouncer=behind_pgbouncer())
    yield eng
    await eng.dispose()


@pytest.fixture
async def db(database_url: str, engine: AsyncEngine) -> AsyncEngine:
    """The session's engine on an empty database."""
    await truncate_all(database_url)
    return engine


@pytest.fixture
def settings(database_url: str) -> Settings:
    return Settings(
        database_url=database_url,
        signing_secrets=[SIGNING_SECRET],
        api_tokens=[API_TOKEN],
        runflow_api_key=None,
        # The tests' hook servers listen on 127.0.0.1.
        alert_allow_private_targets=True,
    )


@pytest.fixture
async def app(db: AsyncEngine, settings: Settings) -> AsyncIterator[Starlette]:
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://receiver.test") as c:
        yield c
