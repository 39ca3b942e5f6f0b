"""Alert rules: the state machine, evaluation, notifications, and the API."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest

from receiver.alerts.evaluate import GroupState, evaluate_once, step
from receiver.alerts.notify import send_one
from receiver.alerts.store import upsert_rule
from receiver.errors import InvalidRule
from receiver.settings import Settings
from tests.support.apps import running_app
from tests.support.builders import API_TOKEN, SIGNING_SECRET, auth, post_delivery, rule, run_object
from tests.support.database import connect
from tests.support.hook_server import HookServer, serve_hook

T = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def test_rule_durations_and_validation():
    parsed = rule(window="2h", **{"for": "90s"}, cooldown=600)
    assert (parsed.window, parsed.for_, parsed.cooldown) == (7200, 90, 600)
    bad: dict[str, Any]
    for bad in (
        {"metric": "latency"},
        {"filters": {"client_ref": ["x"]}},
        {"group_by": "client_ref"},
        {"window": "soon"},
        {"targets": []},
        {"metric": "no_callbacks", "group_by": "model"},
    ):
        with pytest.raises(InvalidRule):
            rule(**bad)


def test_state_machine_fires_once_resolves_once_and_honours_cooldown():
    r = rule(cooldown=600)
    s = GroupState()
    fired = step(r, s, True, T)
    assert (fired.state.state, fired.notify) == ("firing", "firing")
    still = step(r, fired.state, True, T + timedelta(seconds=30))
    assert (still.state.state, still.notify, still.transition) == ("firing", None, None)
    resolved = step(r, still.state, False, T + timedelta(seconds=60))
    assert (resolved.state.state, resolved.notify) == ("resolved", "resolved")
    again = step(r, resolved.state, True, T + timedelta(seconds=120))
    assert again.state.state == "firing" and again.notify is None  # inside the cooldown
    quiet = step(r, again.state, False, T + timedelta(seconds=180))
    assert quiet.state.state == "resolved" and quiet.notify is None  # it never announced
    later = step(r, quiet.state, True, T + timedelta(seconds=700))
    assert later.notify == "firing"


def test_for_duration_holds_pending_first():
    r = rule(**{"for": "60s"})
    pending = step(r, GroupState(), True, T)
    assert pending.state.state == "pending" and pending.notify is None
    assert step(r, pending.state, True, T + timedelta(seconds=30)).state.state == "pending"
    assert step(r, pending.state, False, T + timedelta(seconds=30)).state.state == "ok"
    assert step(r, pending.state, True, T + timedelta(seconds=61)).notify == "firing"


@pytest.fixture
async def quiet_app(db, database_url):
    """The receiver with no background tasks: tests evaluate and send by hand."""
    settings = Settings(
        database_url=database_url,
        signing_secrets=[SIGNING_SECRET],
        api_tokens=[API_TOKEN],
        alert_backoff_seconds=0.01,
        alert_backoff_max_seconds=0.05,
        alert_allow_private_targets=True,
    )
    async with running_app(settings, run_worker=False) as (app, client):
        yield client, settings, app.state.resources.engine


async def rows(url: str, sql: str):
    conn = await connect(url)
    try:
        return [dict(r) for r in await conn.fetch(sql)]
    finally:
        await conn.close()


async def test_min_runs_keeps_one_failure_from_firing_a_rate_alert(quiet_app, database_url):
    client, settings, engine = quiet_app
    await upsert_rule(engine, rule(metric="failure_rate", threshold=0.5, min_runs=5))
    await post_delivery(client, run_object("lonely", status_code="failed", failure_code="x"))
    assert await evaluate_once(settings, engine, datetime.now(UTC))
    assert await rows(database_url, "SELECT * FROM alert_notifications") == []
    assert await rows(database_url, "SELECT * FROM alert_events") == []
    for i in range(5):
        await post_delivery(client, run_object(f"many_{i}", status_code="failed"))
    await evaluate_once(settings, engine, datetime.now(UTC))
    [event] = await rows(database_url, "SELECT from_state, to_state, value FROM alert_events")
    assert event == {"from_state": "ok", "to_state": "firing", "value": 1.0}


async def test_no_callbacks_fires_after_the_configured_silence(quiet_app, database_url):
    client, settings, engine = quiet_app
    await upsert_rule(engine, rule(name="silence", metric="no_callbacks", threshold=0, window=60))
    await post_delivery(client, run_object("heard"))
    now = datetime.now(UTC)
    await evaluate_once(settings, engine, now)
    assert await rows(database_url, "SELECT * FROM alert_events") == []
    await evaluate_once(settings, engine, now + timedelta(seconds=61))
    [event] = await rows(database_url, "SELECT rule_name, to_state FROM alert_events")
    assert event == {"rule_name": "silence", "to_state": "firing"}
    assert len(await rows(database_url, "SELECT * FROM alert_notifications")) == 1


async def test_hook_answering_500_then_200_gets_the_notification_once(quiet_app, database_url):
    client, settings, engine = quiet_app
    hook = HookServer(statuses=[500])
    with serve_hook(hook) as url:
        await upsert_rule(
            engine,
            rule(threshold=1, group_by="model", targets=[{"url": url, "secret": "hook-secret"}]),
        )
        for i in range(3):
            await post_delivery(
                client, run_object(f"f{i}", status_code="failed", failure_code="oom")
            )
        await evaluate_once(settings, engine, datetime.now(UTC))
        async with httpx.AsyncClient() as http:
            assert await send_one(settings, engine, http)  # answered 500
            [event] = (await client.get("/alerts/events", headers=auth())).json()["items"]
            [notice] = event["notifications"]
            assert (notice["state"], notice["attempts"], notice["last_error"]) == (
                "pending",
                1,
                "http_error",
            )
            deadline = time.monotonic() + 10
            while not hook.received:
                assert time.monotonic() < deadline
                await send_one(settings, engine, http)
                await asyncio.sleep(0.02)
            for _ in range(5):  # nothing more is due
                assert not await send_one(settings, engine, http)
    assert hook.attempts == 2 and len(hook.received) == 1
    [delivered] = hook.received
    body = delivered["body"]
    assert body["state"] == "firing" and body["group"] == {"model": "flux-dev"}
    assert body["value"] == 3.0 and body["threshold"] == 1
    assert sorted(body["sample_run_ids"]) == ["f0", "f1", "f2"]
    assert "/runs?" in body["link"] and "model=flux-dev" in body["link"]
    expected = hmac.new(b"hook-secret", delivered["raw"], hashlib.sha256).hexdigest()
    assert delivered["headers"]["receiver-signature"] == expected
    [event] = (await client.get("/alerts/events", headers=auth())).json()["items"]
    [notice] = event["notifications"]
    assert notice["url"] == url.split("/hook")[0] + "/***" and notice["sent_at"] is not None
    assert (notice["state"], notice["attempts"], notice["last_error"]) == ("sent", 2, None)


async def test_ingest_answers_while_the_hook_target_hangs(db, database_url):
    hook = HookServer(hold=threading.Event())
    with serve_hook(hook) as url:
        settings = Settings(
            database_url=database_url,
            signing_secrets=[SIGNING_SECRET],
            api_tokens=[API_TOKEN],
            alert_interval_seconds=0.1,
            alert_poll_seconds=0.05,
            alert_allow_private_targets=True,
        )
        async with running_app(settings) as (app, client):
            engine = app.state.resources.engine
            await upsert_rule(engine, rule(threshold=0, targets=[{"url": url}]))
            await post_delivery(client, run_object("trigger", status_code="failed"))
            deadline = time.monotonic() + 10
            while hook.waiting == 0:  # the sender is now stuck inside the hook's POST
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            answers = [
                (await post_delivery(client, run_object(f"during_{i}"))).status_code
                for i in range(20)
            ]
            assert hook.waiting == 1 and not hook.received
            assert answers == [200] * 20
            assert hook.hold is not None
            hook.hold.set()


async def test_rules_api_create_list_patch_delete_and_events(quiet_app):
    client, settings, engine = quiet_app
    definition = {
        "name": "oom",
        "metric": "failure_count",
        "filters": {"failure_code": ["oom"]},
        "group_by": "model",
        "window": "10m",
        "threshold": 0,
        "targets": [{"url": "http://127.0.0.1:9/hook", "format": "slack"}],
    }
    created = await client.post("/alerts/rules", json=definition, headers=auth())
    assert created.status_code == 201 and created.json()["rule"]["window"] == 600
    assert (await client.post("/alerts/rules", json=definition, headers=auth())).status_code == 409
    bad = await client.post(
        "/alerts/rules", json={**definition, "name": "x", "metric": "?"}, headers=auth()
    )
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_rule"
    patched = await client.patch("/alerts/rules/oom", json={"threshold": 5}, headers=auth())
    assert patched.json()["rule"]["threshold"] == 5
    await post_delivery(client, run_object("o1", status_code="failed", failure_code="oom"))
    patched = await client.patch("/alerts/rules/oom", json={"threshold": 0}, headers=auth())
    await evaluate_once(settings, engine, datetime.now(UTC))
    listed = (await client.get("/alerts/rules", headers=auth())).json()["items"]
    assert listed[0]["states"][0]["state"] == "firing"
    assert listed[0]["states"][0]["group"] == {"model": "flux-dev"}
    events = (await client.get("/alerts/events?rule=oom", headers=auth())).json()["items"]
    assert [(e["from_state"], e["to_state"], e["group"]) for e in events] == [
        ("ok", "firing", {"model": "flux-dev"})
    ]
    assert (await client.delete("/alerts/rules/oom", headers=auth())).status_code == 204
    assert (await client.get("/alerts/rules/oom", headers=auth())).status_code == 404
    assert (await client.get("/alerts/rules", headers=auth())).json() == {"items": []}
    assert (await client.get("/alerts/rules")).status_code == 401


def test_the_example_rules_file_in_deploy_is_valid():
    from pathlib import Path

    from receiver.alerts.rules import load_rules_file

    example = Path(__file__).resolve().parents[2] / "deploy" / "alert-rules.example.yaml"
    names = [r.name for r in load_rules_file(example)]
    assert names == [
        "model-failure-burst",
        "dispatch-failure-rate",
        "callbacks-stopped",
        "comfyui-slow",
    ]


async def test_resolved_waits_for_the_firing_notification_still_being_retried(
    quiet_app, database_url
):
    client, settings, engine = quiet_app
    slow_retry = settings.model_copy(
        update={"alert_backoff_seconds": 60.0, "alert_backoff_max_seconds": 60.0}
    )
    hook = HookServer(statuses=[500])
    with serve_hook(hook) as url:
        await upsert_rule(engine, rule(threshold=1, window=60, targets=[{"url": url}]))
        for i in range(2):
            await post_delivery(client, run_object(f"burst_{i}", status_code="failed"))
        now = datetime.now(UTC)
        await evaluate_once(settings, engine, now)
        async with httpx.AsyncClient() as http:
            assert await send_one(slow_retry, engine, http)  # the hook answers 500
            # Full jitter may draw any wait up to the minute; pin it, so the firing waits.
            conn = await connect(database_url)
            try:
                await conn.execute(
                    "UPDATE alert_notifications SET next_attempt_at = now() + interval '60 s'"
                )
            finally:
                await conn.close()
            # The runs leave the window: resolved is queued and due, firing waits a minute.
            await evaluate_once(settings, engine, now + timedelta(seconds=120))
            states = await rows(database_url, "SELECT state FROM alert_notifications ORDER BY id")
            assert states == [{"state": "pending"}, {"state": "pending"}]
            assert not await send_one(slow_retry, engine, http)
            assert hook.received == []
            conn = await connect(database_url)
            try:  # the back-off has passed
                await conn.execute("UPDATE alert_notifications SET next_attempt_at = now()")
            finally:
                await conn.close()
            assert await send_one(slow_retry, engine, http)
            assert await send_one(slow_retry, engine, http)
            assert not await send_one(slow_retry, engine, http)
    assert hook.notices() == [("firing", {}), ("resolved", {})]


async def test_a_hook_that_never_answers_is_given_up_on_and_retried(quiet_app, database_url):
    client, settings, engine = quiet_app
    hook = HookServer(hold=threading.Event())
    with serve_hook(hook) as url:
        await upsert_rule(engine, rule(threshold=0, targets=[{"url": url}]))
        await post_delivery(client, run_object("stuck", status_code="failed"))
        await evaluate_once(settings, engine, datetime.now(UTC))
        impatient = settings.model_copy(update={"alert_timeout_seconds": 0.3})
        async with httpx.AsyncClient(timeout=30) as http:
            assert await send_one(impatient, engine, http)
    [outbox] = await rows(
        database_url, "SELECT state, attempts, last_error, locked_until FROM alert_notifications"
    )
    assert outbox == {
        "state": "pending",
        "attempts": 1,
        "last_error": "timeout",
        "locked_until": None,
    }


async def test_the_api_never_shows_hook_secrets_and_a_round_trip_keeps_them(
    quiet_app, database_url
):
    client, _, _ = quiet_app
    definition = {
        "name": "secretive",
        "metric": "failure_count",
        "threshold": 0,
        "targets": [
            {"url": "http://127.0.0.1:9/a", "secret": "hook-secret-a"},
            {"url": "http://127.0.0.1:9/b", "format": "slack"},
        ],
    }
    created = await client.post("/alerts/rules", json=definition, headers=auth())
    assert created.status_code == 201
    for answer in (
        created,
        await client.get("/alerts/rules/secretive", headers=auth()),
        await client.get("/alerts/rules", headers=auth()),
    ):
        assert "hook-secret-a" not in answer.text
    shown = created.json()["rule"]["targets"]
    assert [t["secret"] for t in shown] == ["********", None]
    # What GET showed, sent back with one more target, keeps the stored secret.
    more = [*shown, {"url": "http://127.0.0.1:9/c", "secret": "hook-secret-c"}]
    patched = await client.patch("/alerts/rules/secretive", json={"targets": more}, headers=auth())
    assert patched.status_code == 200
    [stored] = await rows(database_url, "SELECT definition FROM alert_rules")
    secrets = [t["secret"] for t in orjson.loads(stored["definition"])["targets"]]
    assert secrets == ["hook-secret-a", None, "hook-secret-c"]
    # A redacted secret for a URL that has none stored cannot be kept.
    moved = [{"url": "http://127.0.0.1:9/elsewhere", "secret": "********"}]
    refused = await client.patch("/alerts/rules/secretive", json={"targets": moved}, headers=auth())
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "invalid_rule"
    fresh = await client.post(
        "/alerts/rules", json={**definition, "name": "copy", "targets": moved}, headers=auth()
    )
    assert fresh.status_code == 422


async def test_duration_p95_fires_for_the_slow_model_with_enough_runs(quiet_app, database_url):
    client, settings, engine = quiet_app
    await upsert_rule(
        engine,
        rule(metric="duration_p95_ms", group_by="model", threshold=15000, min_runs=10),
    )
    flux = [1000 * i for i in range(1, 21)]
    for i, ms in enumerate(flux):
        await post_delivery(client, run_object(f"flux_{i}", duration_ms=ms))
    # Still running: its duration so far is not a run's duration.
    await post_delivery(
        client, run_object("flux_running", status_code="running", duration_ms=10**7)
    )
    sdxl = {"id": "mdl_sdxl", "slug": "sdxl"}
    for i in range(5):  # far slower, but too few runs to judge
        await post_delivery(client, run_object(f"sdxl_{i}", model=sdxl, duration_ms=60000))
    await evaluate_once(settings, engine, datetime.now(UTC))
    nearest_rank = sorted(flux)[math.ceil(0.95 * len(flux)) - 1]
    events = await rows(database_url, "SELECT group_key, to_state, value FROM alert_events")
    assert events == [
        {"group_key": '{"model":"flux-dev"}', "to_state": "firing", "value": nearest_rank}
    ]


async def test_a_quiet_group_is_forgotten_once_its_cooldown_has_passed(quiet_app, database_url):
    client, settings, engine = quiet_app
    await upsert_rule(engine, rule(threshold=1, window=60, cooldown=300, group_by="model"))
    for i in range(2):
        await post_delivery(client, run_object(f"q{i}", status_code="failed"))
    now = datetime.now(UTC)
    await evaluate_once(settings, engine, now)
    states = "SELECT group_key, state FROM alert_states"
    assert await rows(database_url, states) == [
        {"group_key": '{"model":"flux-dev"}', "state": "firing"}
    ]
    await evaluate_once(settings, engine, now + timedelta(seconds=120))  # no runs in the window
    await evaluate_once(settings, engine, now + timedelta(seconds=180))  # inside the cooldown
    assert await rows(database_url, states) == [
        {"group_key": '{"model":"flux-dev"}', "state": "resolved"}
    ]
    await evaluate_once(settings, engine, now + timedelta(seconds=301))
    assert await rows(database_url, states) == []
    events = await rows(database_url, "SELECT to_state FROM alert_events ORDER BY id")
    assert [e["to_state"] for e in events] == ["firing", "resolved"]
