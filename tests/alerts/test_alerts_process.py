"""Alerting end to end: a real hook server and the real receiver with two workers."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import httpx
import orjson

from receiver.db import plain_url
from tests.support.builders import SIGNING_SECRET, post_delivery, run_object
from tests.support.database import truncate_all
from tests.support.hook_server import HookServer, serve_hook
from tests.support.processes import receiver_env, serving

RULES = """
rules:
  - name: model-failures
    metric: failure_count
    group_by: model
    window: 3s
    threshold: 3
    cooldown: 120s
    targets:
      - url: {url}
        secret: hook-secret
"""


async def burst(base: str, tag: str) -> None:
    async with httpx.AsyncClient(base_url=base) as client:
        docs = [
            run_object(f"{tag}_flux_{i}", status_code="failed", failure_code="oom")
            for i in range(6)
        ]
        # A group that fails too, but stays below the threshold even when both bursts fall in
        # one window (a loaded machine may answer the first burst's last requests late).
        docs.append(
            run_object(f"{tag}_sdxl", status_code="failed", model={"id": "m2", "slug": "sdxl"})
        )
        docs += [run_object(f"{tag}_ok_{i}") for i in range(4)]
        answers = await asyncio.gather(*(post_delivery(client, doc) for doc in docs))
    assert all(a.status_code == 200 for a in answers)


async def events(url: str) -> list[dict]:
    conn = await asyncpg.connect(plain_url(url))
    try:
        rows = await conn.fetch(
            "SELECT group_key, from_state, to_state, notified FROM alert_events ORDER BY id"
        )
    finally:
        await conn.close()
    return [{**dict(r), "group": orjson.loads(r["group_key"])} for r in rows]


def wait_for(check, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_one_firing_one_resolved_and_silence_inside_the_cooldown(database_url, tmp_path):
    asyncio.run(truncate_all(database_url))
    hook = HookServer()
    with serve_hook(hook) as hook_url:
        rules = tmp_path / "rules.yaml"
        rules.write_text(RULES.format(url=hook_url))
        env = receiver_env(
            RECEIVER_DATABASE_URL=database_url,
            RECEIVER_SIGNING_SECRETS=SIGNING_SECRET,
            RECEIVER_DATA_DIR=str(tmp_path / "data"),
            RECEIVER_ALERT_RULES_FILE=str(rules),
            RECEIVER_ALERT_INTERVAL_SECONDS="0.25",
            RECEIVER_ALERT_POLL_SECONDS="0.1",
            RECEIVER_ALERT_ALLOW_PRIVATE_TARGETS="true",
        )
        with serving(env, tmp_path, workers=2) as (base, _):
            asyncio.run(burst(base, "one"))
            wait_for(lambda: len(hook.received) >= 1, 30, "the firing notification")
            wait_for(lambda: len(hook.received) >= 2, 30, "the resolved notification")
            asyncio.run(burst(base, "two"))
            flux = {"model": "flux-dev"}

            def refired() -> bool:
                found = asyncio.run(events(database_url))
                return (
                    sum(1 for e in found if e["to_state"] == "firing" and e["group"] == flux) == 2
                )

            wait_for(refired, 30, "the second firing transition")
            time.sleep(1.0)  # room for a notification that must not come
    assert hook.notices() == [("firing", flux), ("resolved", flux)]
    firing = [e for e in asyncio.run(events(database_url)) if e["to_state"] == "firing"]
    assert [(e["group"], e["notified"]) for e in firing] == [(flux, True), (flux, False)]
    # Above the threshold; how far depends on how much of the burst one evaluation saw.
    assert 3 < hook.received[0]["body"]["value"] <= 6
