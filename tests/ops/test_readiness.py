"""/readyz during a rollout: ready at head or ahead of it (a newer version migrated), not behind.

On a scratch database of its own, created and dropped here: the session's database is shared
by every test and stays at head.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from receiver.app import create_app
from receiver.db import plain_url
from receiver.migrations import head_revision, state_of, upgrade
from receiver.settings import Settings
from tests.builders import API_TOKEN, SIGNING_SECRET


async def _admin(server_url: str, sql: str) -> None:
    conn = await asyncpg.connect(plain_url(server_url))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
async def scratch_url(server_url: str) -> AsyncIterator[str]:
    """A migrated database for this test alone, dropped afterwards."""
    name = f"rfready_{uuid.uuid4().hex[:12]}"
    await _admin(server_url, f'CREATE DATABASE "{name}"')
    base, sep, query = plain_url(server_url).partition("?")
    url = base.rsplit("/", 1)[0] + "/" + name + (sep + query if sep else "")
    try:
        await asyncio.to_thread(upgrade, url)
        yield url
    finally:
        await _admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _stamp(url: str, revision: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("UPDATE alembic_version SET version_num = $1", revision)
    finally:
        await conn.close()


def test_state_of_revisions():
    head = head_revision()
    assert head is not None
    assert state_of(head) == "current"
    assert state_of("0004") == "behind"
    assert state_of(None) == "behind"
    assert state_of("9999_from_a_newer_version") == "ahead"


async def test_readyz_accepts_a_schema_ahead_and_refuses_one_behind(scratch_url):
    settings = Settings(
        database_url=scratch_url,
        signing_secrets=[SIGNING_SECRET],
        api_tokens=[API_TOKEN],
        runflow_api_key=None,
    )
    app = create_app(settings, run_worker=False)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://receiver.test") as c:
            at_head = await c.get("/readyz")
            assert at_head.status_code == 200, at_head.text
            assert at_head.json()["schema"] == head_revision()

            # The next version's migration Job ran first: this (older) code keeps serving.
            await _stamp(scratch_url, "9999_from_a_newer_version")
            ahead = await c.get("/readyz")
            assert ahead.status_code == 200, ahead.text
            assert ahead.json() == {
                "status": "ok",
                "database": "ok",
                "schema": "9999_from_a_newer_version",
                "schema_state": "ahead",
                "head": head_revision(),
            }

            # This code is newer than the database: not ready until its migration has run.
            await _stamp(scratch_url, "0004")
            behind = await c.get("/readyz")
            assert behind.status_code == 503, behind.text
            assert behind.json()["schema"] == "0004"
            assert behind.json()["head"] == head_revision()
