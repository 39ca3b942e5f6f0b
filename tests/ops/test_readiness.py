"""/readyz during a rollout: ready at head or ahead of it (a newer version migrated), not behind.

On a scratch database of its own, created and dropped here: the session's database is shared
by every test and stays at head.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import asyncpg
import httpx
import pytest

from receiver.migrations import head_revision, state_of
from receiver.settings import Settings
from tests.support.apps import running_app
from tests.support.builders import API_TOKEN, SIGNING_SECRET
from tests.support.database import migrated_database
from tests.support.processes import receiver_env, serving


@pytest.fixture
def scratch_url(server_url: str) -> Iterator[str]:
    """A migrated database for this test alone, dropped afterwards."""
    with migrated_database(server_url, "rfready") as url:
        yield url


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
    async with running_app(settings, run_worker=False) as (_, c):
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


@pytest.mark.slow
def test_serve_starts_and_is_ready_on_a_schema_ahead(scratch_url, tmp_path):
    """An old pod restarting mid-rollout (its database migrated ahead) starts and serves."""
    asyncio.run(_stamp(scratch_url, "9999_from_a_newer_version"))
    env = receiver_env(
        RECEIVER_DATABASE_URL=scratch_url,
        RECEIVER_SIGNING_SECRETS=SIGNING_SECRET,
        RECEIVER_DATA_DIR=str(tmp_path / "data"),
    )
    with serving(env, tmp_path, workers=1) as (base, _):  # waits for /readyz 200
        assert httpx.get(f"{base}/readyz", timeout=5).json()["schema_state"] == "ahead"
