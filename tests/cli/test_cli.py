"""The operator commands that act on an existing database: replay, alerts, bad configuration."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from datetime import UTC, datetime

import httpx

from receiver.alerts.evaluate import evaluate_once
from receiver.alerts.notify import send_one
from receiver.alerts.store import upsert_rule
from tests.support.builders import post_delivery, rule, run_object
from tests.support.hook_server import HookServer, serve_hook
from tests.support.processes import receiver_env, run_cli


async def test_replay_all_rejected_after_the_missing_run_arrives(
    client, db, database_url, tmp_path
):
    rejected = await post_delivery(client, {"client_ref": "late-ref", "status_code": "failed"})
    assert rejected.status_code == 422
    env = receiver_env(RECEIVER_DATABASE_URL=database_url)
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "receiver", "replay", "--all-rejected"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1 and "0 accepted, 1 not" in out.stdout
    await post_delivery(client, run_object("late", client_ref="late-ref", status_code="running"))
    printed = await asyncio.to_thread(run_cli, "replay", "--all-rejected", env=env, cwd=tmp_path)
    assert "stored late" in printed and "1 accepted, 0 not" in printed
    run = (
        await client.get("/runs/late", headers={"authorization": "Bearer test-token-abcdef"})
    ).json()
    assert run["status"] == "failed"


async def test_alerts_test_sends_a_signed_sample_and_list_prints_states(
    client, settings, db, database_url, tmp_path
):
    hook = HookServer()
    with serve_hook(hook) as url:
        await upsert_rule(db, rule(name="cli-rule", targets=[{"url": url, "secret": "s3"}]))
        # Another rule firing, whose hook (port 9) refuses: its notification waits to be retried.
        await upsert_rule(db, rule(name="cli-firing", threshold=0))
        await post_delivery(client, run_object("cli-failed", status_code="failed"))
        await evaluate_once(settings, db, datetime.now(UTC))
        async with httpx.AsyncClient() as http:
            assert await send_one(settings, db, http)
        env = receiver_env(
            RECEIVER_DATABASE_URL=database_url, RECEIVER_ALERT_ALLOW_PRIVATE_TARGETS="true"
        )
        out = await asyncio.to_thread(run_cli, "alerts", "test", "cli-rule", env=env, cwd=tmp_path)
        listed = await asyncio.to_thread(run_cli, "alerts", "list", env=env, cwd=tmp_path)
    assert "HTTP 200" in out
    [sample] = hook.received
    assert sample["body"]["rule"] == "cli-rule" and sample["body"]["state"] == "test"
    assert "receiver-signature" in sample["headers"]
    assert "cli-rule: failure_count" in listed
    firing = listed.split("cli-firing")[1].splitlines()[1].split()
    assert firing[:3] == ["all", "runs", "firing"]
    assert "notifications pending: 1 (an error: refused)" in listed


def test_bad_configuration_stops_with_one_line(tmp_path):
    env = receiver_env(RECEIVER_PORT="eighty", RECEIVER_DATA_DIR=str(tmp_path))
    done = subprocess.run(
        [sys.executable, "-m", "receiver", "serve"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3  # configuration or environment, not a usage error
    assert done.stderr.strip().splitlines() == [
        "runflow-receiver: bad configuration: RECEIVER_PORT: Input should be a valid integer,"
        " unable to parse string as an integer"
    ]


def test_serve_refuses_an_external_database_not_at_head(server_url, tmp_path):
    from tests.support.database import admin_sql, with_database

    name = f"rf_behind_{uuid.uuid4().hex[:8]}"
    admin_sql(server_url, f'CREATE DATABASE "{name}"')
    try:
        env = receiver_env(
            RECEIVER_DATABASE_URL=with_database(server_url, name), RECEIVER_DATA_DIR=str(tmp_path)
        )
        done = subprocess.run(
            [sys.executable, "-m", "receiver", "serve"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        admin_sql(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    assert done.returncode == 3  # configuration or environment, not a usage error
    assert "schema is at nothing" in done.stderr and "runflow-receiver migrate" in done.stderr
