"""Analytics routes against answers computed here, in Python, from the payloads sent."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from tests.support.builders import T0, auth, iso, post_delivery, run_object, varied_runs

TERMINAL = ("succeeded", "failed", "cancelled", "partial_succeeded")


def window(after: datetime, before: datetime) -> str:
    return f"created_after={iso(after)}&created_before={iso(before)}".replace("+", "%2B")


def created(doc) -> datetime:
    return datetime.fromisoformat(doc["created_at"])


def nearest_rank(values: list[int], fraction: float) -> int:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


@pytest.fixture
async def loaded(client):
    runs = varied_runs(80, seed=3)
    for doc in runs:
        assert (await post_delivery(client, doc)).status_code == 200
    return runs


WHOLE = window(T0 - timedelta(hours=1), T0 + timedelta(days=3))


async def get(client, path):
    response = await client.get(path, headers=auth())
    assert response.status_code == 200, response.text
    return response.json()


async def test_failures_by_code_and_stage(client, loaded):
    body = await get(client, f"/analytics/failures?{WHOLE}")
    failed = [d for d in loaded if d["status_code"] == "failed"]
    counts = Counter((d["failure_code"], d["failure_stage_code"]) for d in failed)
    assert body["total_runs"] == len(loaded)
    assert body["failed_runs"] == len(failed)
    got = {
        (g["failure_code"], g["failure_stage"]): (g["count"], g["share"]) for g in body["groups"]
    }
    assert got == {key: (n, pytest.approx(n / len(failed))) for key, n in counts.items()}
    assert [g["count"] for g in body["groups"]] == sorted(counts.values(), reverse=True)


async def test_failures_grouped_by_model_with_a_filter(client, loaded):
    body = await get(client, f"/analytics/failures?{WHOLE}&group_by=model&source=api")
    in_scope = [d for d in loaded if d["source_code"] == "api"]
    failed = [d for d in in_scope if d["status_code"] == "failed"]
    assert body["total_runs"] == len(in_scope) and body["failed_runs"] == len(failed)
    expected = Counter(d["model"]["slug"] for d in failed)
    assert {g["model"]: g["count"] for g in body["groups"]} == dict(expected)
    assert all(set(g) == {"model", "count", "share"} for g in body["groups"])


async def test_window_edges_are_after_inclusive_before_exclusive(client, loaded):
    after, before = created(loaded[5]), created(loaded[25])
    body = await get(client, f"/analytics/failures?{window(after, before)}")
    assert body["total_runs"] == 20


async def test_empty_window_is_zero_not_an_error(client, loaded):
    empty = window(T0 - timedelta(days=10), T0 - timedelta(days=9))
    assert await get(client, f"/analytics/failures?{empty}") == {
        "total_runs": 0,
        "failed_runs": 0,
        "groups": [],
    }
    assert (await get(client, f"/analytics/durations?{empty}")) == {"groups": []}
    assert (await get(client, f"/analytics/costs?{empty}")) == {"total": "0", "groups": []}
    series = (await get(client, f"/analytics/timeseries?{empty}&bucket=hour"))["series"]
    assert len(series) == 1 and len(series[0]["points"]) == 24
    assert all(p["total"] == 0 and p["failure_rate"] is None for p in series[0]["points"])


async def test_default_window_is_the_last_24_hours(client):
    now = datetime.now(UTC)
    for i, hours_ago in enumerate((1, 23, 25, 48)):
        doc = run_object(
            f"recent_{i}",
            status_code="failed",
            failure_code="x",
            created_at=iso(now - timedelta(hours=hours_ago)),
        )
        await post_delivery(client, doc)
    body = await get(client, "/analytics/failures")
    assert body["total_runs"] == 2 and body["failed_runs"] == 2


async def test_hourly_timeseries_zero_fills_and_counts_statuses(client, loaded):
    after = T0 - timedelta(minutes=30)
    before = T0 + timedelta(hours=10)
    body = await get(client, f"/analytics/timeseries?{window(after, before)}&bucket=hour")
    assert body["bucket"] == "hour"
    [series] = body["series"]
    assert series["key"] == {}
    starts = [after.replace(minute=0) + timedelta(hours=h) for h in range(11)]
    assert [datetime.fromisoformat(p["ts"]) for p in series["points"]] == starts
    by_hour: dict[datetime, Counter] = defaultdict(Counter)
    for doc in loaded:
        moment = created(doc)
        if after <= moment < before:
            by_hour[moment.replace(minute=0, second=0)][doc["status_code"]] += 1
    for point in series["points"]:
        expected = by_hour[datetime.fromisoformat(point["ts"])]
        assert point["total"] == sum(expected.values())
        for status in TERMINAL:
            assert point[status] == expected[status]
        terminal = sum(expected[s] for s in TERMINAL)
        assert point["failure_rate"] == (
            pytest.approx(expected["failed"] / terminal) if terminal else None
        )


async def test_timeseries_zero_buckets_inside_the_data(client):
    for i, hour in enumerate((0, 3)):
        await post_delivery(
            client, run_object(f"ts_{i}", created_at=iso(T0 + timedelta(hours=hour)))
        )
    body = await get(
        client, f"/analytics/timeseries?{window(T0, T0 + timedelta(hours=4))}&bucket=hour"
    )
    assert [p["total"] for p in body["series"][0]["points"]] == [1, 0, 0, 1]


async def test_daily_timeseries_grouped_by_model(client, loaded):
    after, before = T0.replace(hour=0), T0.replace(hour=0) + timedelta(days=2)
    body = await get(
        client, f"/analytics/timeseries?{window(after, before)}&bucket=day&group_by=model"
    )
    expected: dict[str, Counter] = defaultdict(Counter)
    for doc in loaded:
        if after <= created(doc) < before:
            expected[doc["model"]["slug"]][created(doc).date().isoformat()] += 1
    got = {
        s["key"]["model"]: {p["ts"][:10]: p["total"] for p in s["points"] if p["total"]}
        for s in body["series"]
    }
    assert got == {model: dict(days) for model, days in expected.items()}
    assert all(len(s["points"]) == 2 for s in body["series"])


async def test_too_many_buckets_is_422(client):
    response = await client.get(
        f"/analytics/timeseries?{window(T0, T0 + timedelta(days=7))}&bucket=minute", headers=auth()
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_query"


async def test_duration_percentiles_are_exact_nearest_rank(client, loaded):
    body = await get(client, f"/analytics/durations?{WHOLE}")
    durations: dict[str, list[int]] = defaultdict(list)
    for doc in loaded:
        if doc["status_code"] in TERMINAL and doc["duration_ms"] is not None:
            durations[doc["model"]["slug"]].append(doc["duration_ms"])
    got = {g["model"]: g for g in body["groups"]}
    assert set(got) == set(durations)
    for model, values in durations.items():
        group = got[model]
        assert group["count"] == len(values)
        for name, fraction in (
            ("p50_ms", 0.5),
            ("p90_ms", 0.9),
            ("p95_ms", 0.95),
            ("p99_ms", 0.99),
        ):
            assert group[name] == nearest_rank(values, fraction), (model, name)
        assert group["max_ms"] == max(values)


async def test_costs_are_exact_decimal_strings(client, loaded):
    body = await get(client, f"/analytics/costs?{WHOLE}&group_by=target_type")
    runs: Counter = Counter()
    cost: dict[str, Decimal] = defaultdict(Decimal)
    for doc in loaded:
        runs[doc["target_type"]] += 1
        if doc["cost"] is not None:
            cost[doc["target_type"]] += Decimal(doc["cost"])
    assert {g["target_type"]: (g["runs"], Decimal(g["cost"])) for g in body["groups"]} == {
        t: (runs[t], cost[t]) for t in runs
    }
    assert Decimal(body["total"]) == sum(cost.values())
    assert all(isinstance(g["cost"], str) for g in body["groups"])


@pytest.mark.parametrize(
    "query",
    [
        "group_by=colour",
        "group_by=client_ref",
        "group_by=id",
        "group_by=model,model",
        "bucket=week",
        "created_after=nope",
        "created_after=1900-01-01T00:00:00Z",
        "limit=5",
    ],
)
async def test_bad_analytics_parameters_are_422(client, query):
    path = "/analytics/timeseries" if "bucket" in query else "/analytics/failures"
    response = await client.get(f"{path}?{query}", headers=auth())
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_query"


async def test_timeseries_takes_one_dimension(client):
    response = await client.get("/analytics/timeseries?group_by=model,source", headers=auth())
    assert response.status_code == 422


async def test_long_windows_read_in_halves_give_the_same_answers(client):
    # 30 hours from 11:30: read as two halves split at 02:30, inside the 02:00 bucket.
    after = T0 - timedelta(minutes=30)
    before = after + timedelta(hours=30)
    split = after + timedelta(hours=15)
    stamps = [
        split - timedelta(minutes=20),
        split + timedelta(minutes=20),
        after,
        before - timedelta(seconds=1),
    ]
    for i, moment in enumerate(stamps):
        doc = run_object(
            f"half_{i}",
            status_code="failed" if i % 2 else "succeeded",
            duration_ms=1000 * (i + 1),
            created_at=iso(moment),
        )
        await post_delivery(client, doc)
    body = await get(client, f"/analytics/timeseries?{window(after, before)}&bucket=hour")
    points = {datetime.fromisoformat(p["ts"]): p for p in body["series"][0]["points"]}
    cut = points[split.replace(minute=0)]
    assert (cut["total"], cut["succeeded"], cut["failed"]) == (2, 1, 1)
    assert sum(p["total"] for p in points.values()) == 4
    durations = await get(client, f"/analytics/durations?{window(after, before)}")
    assert durations["groups"][0]["count"] == 4
    assert durations["groups"][0]["p50_ms"] == 2000 and durations["groups"][0]["max_ms"] == 4000


FIELD = {
    "status": lambda d: d["status_code"],
    "failure_code": lambda d: d["failure_code"],
    "failure_stage": lambda d: d["failure_stage_code"],
    "model": lambda d: d["model"]["slug"],
    "target_type": lambda d: d["target_type"],
    "source": lambda d: d["source_code"],
    "client_ref": lambda d: d["client_ref"],
    "batch_id": lambda d: d["batch_id"],
    "org_id": lambda d: d["org_id"],
}


@pytest.mark.parametrize(
    ("param", "values"),
    [
        ("status", ["failed", "running"]),
        ("failure_code", ["oom"]),
        ("failure_stage", ["dispatch", "execution"]),
        ("model", ["llama"]),
        ("target_type", ["flow"]),
        ("source", ["playground"]),
        ("client_ref", ["ref-1", "ref-4"]),
        ("batch_id", ["batch_3"]),
        ("org_id", ["org_b"]),
    ],
)
async def test_every_filter_narrows_every_analytics_route(client, loaded, param, values):
    scope = [d for d in loaded if FIELD[param](d) in values]
    assert scope, "the fixture must exercise this filter"
    query = f"{WHOLE}&{param}={','.join(values)}"

    failures = await get(client, f"/analytics/failures?{query}")
    failed = [d for d in scope if d["status_code"] == "failed"]
    assert (failures["total_runs"], failures["failed_runs"]) == (len(scope), len(failed))

    series = await get(client, f"/analytics/timeseries?{query}&bucket=day")
    points = series["series"][0]["points"]
    assert sum(p["total"] for p in points) == len(scope)
    for status in TERMINAL:
        assert sum(p[status] for p in points) == sum(d["status_code"] == status for d in scope)

    durations = await get(client, f"/analytics/durations?{query}&group_by=source")
    timed: dict[str, list[int]] = defaultdict(list)
    for doc in scope:
        if doc["status_code"] in TERMINAL and doc["duration_ms"] is not None:
            timed[doc["source_code"]].append(doc["duration_ms"])
    got = {g["source"]: (g["count"], g["p90_ms"], g["max_ms"]) for g in durations["groups"]}
    assert got == {s: (len(v), nearest_rank(v, 0.9), max(v)) for s, v in timed.items()}

    costs = await get(client, f"/analytics/costs?{query}&group_by=status")
    spent: dict[str, Decimal] = defaultdict(Decimal)
    for doc in scope:
        spent[doc["status_code"]] += Decimal(doc["cost"] or 0)
    counted = Counter(d["status_code"] for d in scope)
    assert {g["status"]: (g["runs"], Decimal(g["cost"])) for g in costs["groups"]} == {
        s: (counted[s], spent[s]) for s in counted
    }
    assert Decimal(costs["total"]) == sum(spent.values())


async def test_minute_buckets_over_a_short_window(client):
    stamps = [T0, T0 + timedelta(seconds=59), T0 + timedelta(minutes=2, seconds=30)]
    for i, moment in enumerate(stamps):
        await post_delivery(
            client,
            run_object(
                f"min_{i}", status_code="failed" if i else "cancelled", created_at=iso(moment)
            ),
        )
    after, before = T0 - timedelta(seconds=30), T0 + timedelta(minutes=3)
    body = await get(client, f"/analytics/timeseries?{window(after, before)}&bucket=minute")
    points = body["series"][0]["points"]
    assert [datetime.fromisoformat(p["ts"]) for p in points] == [
        T0 - timedelta(minutes=1) + timedelta(minutes=m) for m in range(4)
    ]
    assert [(p["total"], p["failed"], p["cancelled"]) for p in points] == [
        (0, 0, 0),
        (2, 1, 1),
        (0, 0, 0),
        (1, 1, 0),
    ]
    assert [p["failure_rate"] for p in points] == [None, 0.5, None, 1.0]


async def test_failures_grouped_by_status_and_stage_shares_sum_to_one(client, loaded):
    body = await get(client, f"/analytics/failures?{WHOLE}&group_by=failure_stage,status")
    failed = [d for d in loaded if d["status_code"] == "failed"]
    expected = Counter(d["failure_stage_code"] for d in failed)
    assert {(g["failure_stage"], g["status"]): g["count"] for g in body["groups"]} == {
        (stage, "failed"): n for stage, n in expected.items()
    }
    assert sum(g["share"] for g in body["groups"]) == pytest.approx(1.0)


async def test_costs_add_up_exactly_beyond_28_significant_digits(client):
    tiny, large = "0.000000000000000000000000000001", "1000000000.5"
    # 30 hours: read as two halves; the halves' sums are added at full precision too.
    for i, (cost, hours) in enumerate(((tiny, 1), (large, 2), (tiny, 20))):
        doc = run_object(f"cost_{i}", cost=cost, created_at=iso(T0 + timedelta(hours=hours)))
        await post_delivery(client, doc)
    body = await get(client, f"/analytics/costs?{window(T0, T0 + timedelta(hours=30))}")
    assert body["total"] == "1000000000.500000000000000000000000000002"
    assert [(g["model"], g["runs"], g["cost"]) for g in body["groups"]] == [
        ("flux-dev", 3, "1000000000.500000000000000000000000000002")
    ]
