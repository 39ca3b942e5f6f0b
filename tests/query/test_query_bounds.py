"""The read side is bounded: windows, time-series size, pages, cursors and statement time."""

from __future__ import annotations

import asyncio
import base64
import json
from datetime import timedelta

import asyncpg
import pytest

from receiver.db import plain_url
from receiver.settings import Settings
from tests.support.apps import running_app
from tests.support.builders import (
    API_TOKEN,
    SIGNING_SECRET,
    T0,
    auth,
    envelope,
    iso,
    post_delivery,
    run_object,
)

ANALYTICS = ("failures", "timeseries", "durations", "costs")


def window(after, before) -> str:
    return f"created_after={iso(after)}&created_before={iso(before)}".replace("+", "%2B")


def cursor_of(*values: object) -> str:
    """A cursor spelled by hand: URL-safe base64 of a JSON array, unpadded."""
    return base64.urlsafe_b64encode(json.dumps(list(values)).encode()).decode().rstrip("=")


async def test_an_analytics_window_longer_than_366_days_is_refused(client):
    too_long = window(T0 - timedelta(days=367), T0)
    longest = window(T0 - timedelta(days=366), T0)
    for route in ANALYTICS:
        extra = "&bucket=day" if route == "timeseries" else ""
        refused = await client.get(f"/analytics/{route}?{too_long}{extra}", headers=auth())
        assert refused.status_code == 422, route
        assert refused.json()["error"]["code"] == "invalid_query"
        accepted = await client.get(f"/analytics/{route}?{longest}{extra}", headers=auth())
        assert accepted.status_code == 200, (route, accepted.text)
    # One bound in 1970 and the other "now" is a 56-year window too.
    since_1970 = await client.get(
        "/analytics/failures?created_after=1970-01-01T00:00:00Z", headers=auth()
    )
    assert since_1970.status_code == 422
    assert since_1970.json()["error"]["code"] == "invalid_query"


async def test_a_timeseries_of_more_than_50000_points_is_refused(client):
    # 35 models x 1440 minute buckets = 50,400 points; by hour, 35 x 24 = 840.
    for i in range(35):
        doc = run_object(f"ts_{i}", model={"id": f"m{i}", "slug": f"model-{i}"})
        assert (await post_delivery(client, doc)).status_code == 200
    day = window(T0 - timedelta(hours=12), T0 + timedelta(hours=12))
    by_minute = await client.get(
        f"/analytics/timeseries?{day}&bucket=minute&group_by=model", headers=auth()
    )
    assert by_minute.status_code == 422
    assert by_minute.json()["error"]["code"] == "invalid_query"
    by_hour = await client.get(
        f"/analytics/timeseries?{day}&bucket=hour&group_by=model", headers=auth()
    )
    assert by_hour.status_code == 200
    series = by_hour.json()["series"]
    assert len(series) == 35 and all(len(s["points"]) == 24 for s in series)
    # The same minute buckets without the grouping are one series: allowed.
    ungrouped = await client.get(f"/analytics/timeseries?{day}&bucket=minute", headers=auth())
    assert ungrouped.status_code == 200


async def test_run_deliveries_are_paged_oldest_first(client):
    ids = []
    for i in range(7):
        doc = envelope("paged", status="running" if i < 6 else "succeeded", duration_ms=100 + i)
        ids.append((await post_delivery(client, doc)).json()["delivery_id"])
    whole = (await client.get("/runs/paged/deliveries", headers=auth())).json()
    # The page's keys, plus what retention adds (aged_out, retained_since: tests/lifecycle).
    assert {"items", "next_cursor"} <= set(whole) and whole["next_cursor"] is None
    assert whole["aged_out"] is False
    assert [d["id"] for d in whole["items"]] == ids
    seen: list[int] = []
    pages = 0
    url = "/runs/paged/deliveries?limit=3"
    while url and pages < 10:
        page = (await client.get(url, headers=auth())).json()
        assert len(page["items"]) <= 3
        seen += [d["id"] for d in page["items"]]
        pages += 1
        url = (
            f"/runs/paged/deliveries?limit=3&cursor={page['next_cursor']}"
            if page["next_cursor"]
            else ""
        )
    assert seen == ids and pages == 3
    bad = await client.get("/runs/paged/deliveries?limit=0", headers=auth())
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_query"


@pytest.mark.parametrize(
    "cursor",
    [
        cursor_of("2026-11-28T12:00:00+00:00", 2**63),
        cursor_of("2026-11-28T12:00:00+00:00", -(2**63) - 1),
        cursor_of("2026-11-28T12:00:00+00:00", 10**30),
        cursor_of("0001-01-01T00:00:00+01:00", 1),
        cursor_of("2026-11-28T12:00:00", 1),  # no offset: never issued
        cursor_of("9999-12-31T23:59:59-01:00", 1),
        cursor_of(12, 1),
        "WyJcdWQ4MDAiLDFd",  # a JSON lone surrogate
    ],
)
async def test_cursors_out_of_range_are_invalid_queries_not_500(client, cursor):
    await post_delivery(client, envelope("cursor_run"))
    for path in ("/deliveries", "/runs/cursor_run/deliveries"):
        answer = await client.get(f"{path}?cursor={cursor}", headers=auth())
        assert answer.status_code == 422, (path, answer.text)
        assert answer.json()["error"]["code"] == "invalid_query"
    # /runs takes (datetime, run id).
    answer = await client.get(
        f"/runs?cursor={cursor_of('0001-01-01T00:00:00+01:00', 'x')}", headers=auth()
    )
    assert answer.status_code == 422


async def test_odd_datetimes_in_filters_are_invalid_queries(client):
    for value in ("0001-01-01T00:00:00%2B01:00", "9999-12-31T23:59:59-01:00", "2026-13-01"):
        for path in ("/runs", "/analytics/failures"):
            answer = await client.get(f"{path}?created_after={value}", headers=auth())
            assert answer.status_code == 422, (path, value, answer.text)
            assert answer.json()["error"]["code"] == "invalid_query"


async def test_a_read_past_the_statement_timeout_is_a_503_and_leaves_no_session_setting(
    db, database_url
):
    settings = Settings(
        database_url=database_url,
        signing_secrets=[SIGNING_SECRET],
        api_tokens=[API_TOKEN],
        query_statement_timeout_seconds=0.3,
    )
    async with running_app(settings, run_worker=False) as (app, client):
        await post_delivery(client, envelope("slow_1"))
        locker = await asyncpg.connect(plain_url(database_url))
        try:
            # Reads wait for this lock; the statement timeout ends the wait.
            tx = locker.transaction()
            await tx.start()
            await locker.execute("LOCK TABLE runs, deliveries IN ACCESS EXCLUSIVE MODE")
            for path in (
                "/runs",
                "/runs/slow_1",
                "/deliveries",
                "/analytics/failures",
                "/analytics/durations",
            ):
                answer = await asyncio.wait_for(client.get(path, headers=auth()), timeout=60)
                assert answer.status_code == 503, (path, answer.text)
                assert answer.json()["error"]["code"] == "unavailable"
                assert "cancelled" in answer.json()["error"]["message"]
                assert int(answer.headers["retry-after"]) > 0
            await tx.rollback()
        finally:
            await locker.close()
        assert (await client.get("/runs", headers=auth())).status_code == 200
        # SET LOCAL: the pooled connections carry no statement_timeout of their own.
        engine = app.state.resources.engine
        for _ in range(3):
            async with engine.connect() as conn:
                raw = await conn.get_raw_connection()
                driver = raw.driver_connection
                assert driver is not None
                assert await driver.fetchval("SHOW statement_timeout") == "0"
