"""/runs, /runs/{id}, /runs/{id}/deliveries, /deliveries and replay, against independent answers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from tests.support.builders import (
    T0,
    auth,
    batch_envelope,
    envelope,
    iso,
    post_delivery,
    run_object,
    varied_runs,
)

ROUTES = [
    ("GET", "/runs"),
    ("GET", "/runs/x"),
    ("GET", "/runs/x/deliveries"),
    ("GET", "/deliveries"),
    ("GET", "/deliveries/1"),
    ("POST", "/deliveries/1/replay"),
    ("GET", "/analytics/failures"),
    ("GET", "/analytics/timeseries"),
    ("GET", "/analytics/durations"),
    ("GET", "/analytics/costs"),
]


@pytest.fixture
async def loaded(client):
    runs = varied_runs(60)
    for doc in runs:
        assert (await post_delivery(client, doc)).status_code == 200
    return runs


def created(doc) -> datetime:
    return datetime.fromisoformat(doc["created_at"])


def newest_first(docs):
    return [d["id"] for d in sorted(docs, key=lambda d: (created(d), d["id"]), reverse=True)]


async def all_pages(client, query: str, limit: int):
    ids, cursor, pages = [], None, 0
    while True:
        url = f"/runs?{query}&limit={limit}" + (f"&cursor={cursor}" if cursor else "")
        response = await client.get(url, headers=auth())
        assert response.status_code == 200, response.text
        body = response.json()
        ids += [item["id"] for item in body["items"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            return ids, pages


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_every_query_route_needs_a_valid_bearer_token(client, method, path):
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic x"}):
        response = await client.request(method, path, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"


async def test_runs_newest_first_with_the_spec_representation(client, loaded):
    response = await client.get("/runs?limit=500", headers=auth())
    items = response.json()["items"]
    assert [i["id"] for i in items] == newest_first(loaded)
    first = next(i for i in items if i["id"] == loaded[0]["id"])
    assert set(first) == {
        "id",
        "org_id",
        "status",
        "event",
        "target_type",
        "model",
        "model_id",
        "flow_id",
        "comfyui_workflow_id",
        "batch_id",
        "client_ref",
        "source",
        "failure_code",
        "failure_message",
        "failure_stage",
        "duration_ms",
        "cost",
        "created_at",
        "started_at",
        "completed_at",
        "input",
        "output",
        "metadata",
        "first_received_at",
        "last_received_at",
        "delivery_count",
        "enriched_at",
        "enrichment_error",
    }
    assert first["model"] == loaded[0]["model"]["slug"]
    assert first["cost"] == loaded[0]["cost"]
    assert isinstance(first["cost"], str | None)
    assert response.json()["next_cursor"] is None


@pytest.mark.parametrize(
    ("param", "field", "values"),
    [
        ("status", "status_code", ["failed"]),
        ("status", "status_code", ["failed", "cancelled"]),
        ("failure_code", "failure_code", ["oom"]),
        ("failure_stage", "failure_stage_code", ["dispatch"]),
        ("model", "model", ["sdxl"]),
        ("target_type", "target_type", ["comfyui", "flow"]),
        ("source", "source_code", ["playground"]),
        ("client_ref", "client_ref", ["ref-3"]),
        ("batch_id", "batch_id", ["batch_1"]),
        ("org_id", "org_id", ["org_b"]),
    ],
)
async def test_each_filter_alone_comma_separated_and_repeated(client, loaded, param, field, values):
    def value_of(doc):
        return doc["model"]["slug"] if field == "model" else doc[field]

    expected = newest_first([d for d in loaded if value_of(d) in values])
    assert expected, "the fixture must exercise this filter"
    for query in (f"{param}={','.join(values)}", "&".join(f"{param}={v}" for v in values)):
        response = await client.get(f"/runs?{query}&limit=500", headers=auth())
        assert [i["id"] for i in response.json()["items"]] == expected


async def test_filters_combine_with_and(client, loaded):
    expected = newest_first(
        [d for d in loaded if d["status_code"] == "failed" and d["model"]["slug"] == "llama"]
    )
    response = await client.get("/runs?status=failed&model=llama&limit=500", headers=auth())
    assert [i["id"] for i in response.json()["items"]] == expected


async def test_created_window_is_inclusive_after_exclusive_before(client, loaded):
    after, before = created(loaded[10]), created(loaded[20])
    query = f"created_after={iso(after)}&created_before={iso(before)}".replace("+", "%2B")
    response = await client.get(f"/runs?{query}&limit=500", headers=auth())
    ids = [i["id"] for i in response.json()["items"]]
    assert ids == newest_first(loaded[10:20])


async def test_paging_walks_every_run_once_in_order(client, loaded):
    ids, pages = await all_pages(client, "status=succeeded", 4)
    expected = newest_first([d for d in loaded if d["status_code"] == "succeeded"])
    assert ids == expected
    assert pages == -(-len(expected) // 4)  # no trailing empty page


async def test_paging_is_stable_while_new_runs_arrive(client, loaded):
    first = await client.get("/runs?limit=10", headers=auth())
    seen = [i["id"] for i in first.json()["items"]]
    cursor = first.json()["next_cursor"]
    newest = max(created(d) for d in loaded)
    for n in range(5):
        # Newer runs land above the first page; the pages after the cursor must not shift.
        await post_delivery(
            client, run_object(f"new_{n}", created_at=iso(newest + timedelta(hours=n + 1)))
        )
    while cursor:
        page = await client.get(f"/runs?limit=10&cursor={cursor}", headers=auth())
        seen += [i["id"] for i in page.json()["items"]]
        cursor = page.json()["next_cursor"]
    assert seen == newest_first(loaded)
    assert len(set(seen)) == len(seen)


async def test_run_detail_has_node_runs_and_unknown_run_is_404(client):
    doc = run_object(
        "detail_1",
        node_runs=[
            {"id": "n_a", "node_id": "load", "status_code": "succeeded", "started_at": iso(T0)},
            {
                "id": "n_b",
                "node_id": "sample",
                "status_code": "failed",
                "failure_code": "oom",
                "started_at": iso(T0 + timedelta(seconds=1)),
            },
        ],
    )
    await post_delivery(client, doc)
    body = (await client.get("/runs/detail_1", headers=auth())).json()
    assert [(n["id"], n["status"], n["failure_code"]) for n in body["node_runs"]] == [
        ("n_a", "succeeded", None),
        ("n_b", "failed", "oom"),
    ]
    missing = await client.get("/runs/nope", headers=auth())
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    missing = await client.get("/runs/nope/deliveries", headers=auth())
    assert missing.status_code == 404


async def test_run_deliveries_oldest_first_including_batches_and_duplicates(client):
    ids = []
    for doc in (
        envelope("del_1", status="running", event=None),
        batch_envelope("b_x", [{"run_id": "del_1", "status_code": "succeeded"}]),
        envelope("del_1", status="succeeded"),
        envelope("del_1", status="succeeded"),
        envelope("other", status="succeeded"),
    ):
        ids.append((await post_delivery(client, doc)).json()["delivery_id"])
    body = (await client.get("/runs/del_1/deliveries", headers=auth())).json()
    assert [d["id"] for d in body["items"]] == ids[:4]
    assert [d["outcome"] for d in body["items"]] == ["stored", "stored", "stored", "duplicate"]


async def test_deliveries_by_outcome_paged_newest_first(client):
    outcomes = []
    for i in range(7):
        response = await post_delivery(client, envelope(f"d_{i}") if i % 3 else {"junk": i})
        outcomes.append(
            (
                response.json().get("delivery_id") or response.json()["error"]["delivery_id"],
                "stored" if i % 3 else "rejected",
            )
        )
    for outcome in ("stored", "rejected"):
        expected = sorted((d for d, o in outcomes if o == outcome), reverse=True)
        seen, cursor = [], None
        while True:
            url = f"/deliveries?outcome={outcome}&limit=2" + (f"&cursor={cursor}" if cursor else "")
            body = (await client.get(url, headers=auth())).json()
            assert all(item["outcome"] == outcome for item in body["items"])
            seen += [item["id"] for item in body["items"]]
            cursor = body["next_cursor"]
            if not cursor:
                break
        assert seen == expected
    both = (
        await client.get("/deliveries?outcome=stored,rejected&limit=500", headers=auth())
    ).json()
    assert len(both["items"]) == 7


async def test_replay_route_reprocesses_a_rejected_delivery(client):
    rejected = await post_delivery(client, {"client_ref": "later-ref", "status_code": "failed"})
    delivery_id = rejected.json()["error"]["delivery_id"]
    again = await client.post(f"/deliveries/{delivery_id}/replay", headers=auth())
    assert again.status_code == 200
    assert again.json()["status"] == "rejected" and again.json()["cause"] == "invalid_payload"
    await post_delivery(
        client, run_object("replayed", client_ref="later-ref", status_code="running")
    )
    fixed = await client.post(f"/deliveries/{delivery_id}/replay", headers=auth())
    assert fixed.json() == {"status": "stored", "delivery_id": delivery_id, "run_id": "replayed"}
    run = (await client.get("/runs/replayed", headers=auth())).json()
    assert run["status"] == "failed"
    detail = (await client.get(f"/deliveries/{delivery_id}", headers=auth())).json()
    assert detail["replay_count"] == 2 and detail["outcome"] == "stored"
    assert (await client.post("/deliveries/999999/replay", headers=auth())).status_code == 404


async def test_replay_of_a_delivery_without_body_is_409(client, db):
    # Earlier versions kept bad-signature requests as rejected rows without a body; such rows
    # are still in older archives (today's refusals leave no row at all).
    async with db.begin() as conn:
        delivery_id = (
            await conn.execute(
                text(
                    "INSERT INTO deliveries (received_at, signature, outcome, cause)"
                    " VALUES (now(), 'invalid', 'rejected', 'invalid_signature') RETURNING id"
                )
            )
        ).scalar_one()
    conflict = await client.post(f"/deliveries/{delivery_id}/replay", headers=auth())
    assert conflict.status_code == 409
    assert conflict.json()["error"]["code"] == "not_replayable"


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=501",
        "limit=ten",
        "created_after=yesterday",
        "created_before=2026-13-01T00:00:00Z",
        "created_after=2026-11-02T00:00:00Z&created_before=2026-11-01T00:00:00Z",
        "cursor=not-a-cursor",
        "colour=blue",
        "status=%00",
    ],
)
async def test_bad_runs_parameters_are_422_invalid_query(client, query):
    response = await client.get(f"/runs?{query}", headers=auth())
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_query"


async def test_bad_deliveries_parameters_are_422(client):
    for query in ("outcome=lost", "limit=0", "cursor=abc"):
        response = await client.get(f"/deliveries?{query}", headers=auth())
        assert response.status_code == 422, query


async def test_runs_without_created_at_sort_and_window_by_first_receipt(client, loaded):
    before = datetime.now(UTC)
    await post_delivery(client, envelope("no_created", status="failed", created_at=None))
    after = datetime.now(UTC)
    items = (await client.get("/runs?limit=3", headers=auth())).json()["items"]
    assert items[0]["id"] == "no_created" and items[0]["created_at"] is None
    assert before <= datetime.fromisoformat(items[0]["first_received_at"]) <= after
    recent = f"created_after={iso(before - timedelta(seconds=1))}".replace("+", "%2B")
    assert [
        i["id"] for i in (await client.get(f"/runs?{recent}", headers=auth())).json()["items"]
    ] == ["no_created"]
    # The analytics window counts it by the same time, so it is neither lost nor counted twice.
    failures = (await client.get(f"/analytics/failures?{recent}", headers=auth())).json()
    assert (failures["total_runs"], failures["failed_runs"]) == (1, 1)


async def test_multi_valued_filters_page_in_order_with_other_filters(client, loaded):
    # Two values of one filter are read as two index ranges and merged: check the merge keeps
    # the global order across pages, honours the other filters and the window, and never
    # repeats a run when the same value is named twice.
    window_start = created(loaded[5])
    expected = newest_first(
        [
            d
            for d in loaded
            if d["model"]["slug"] in ("sdxl", "llama")
            and d["org_id"] == "org_a"
            and created(d) >= window_start
        ]
    )
    assert len(expected) > 6
    query = f"model=sdxl,llama&model=sdxl&org_id=org_a&created_after={iso(window_start)}"
    ids, pages = await all_pages(client, query.replace("+", "%2B"), 3)
    assert ids == expected
    assert pages == -(-len(expected) // 3)


async def test_status_filter_takes_runflow_spelling_and_refuses_unknown_words(client, loaded):
    cancelled = newest_first([d for d in loaded if d["status_code"] == "cancelled"])
    assert cancelled
    for spelling in ("cancelled", "canceled", "CANCELED"):
        response = await client.get(f"/runs?status={spelling}&limit=500", headers=auth())
        assert [i["id"] for i in response.json()["items"]] == cancelled
    typo = await client.get("/runs?status=faild", headers=auth())
    assert typo.status_code == 422 and "faild" in typo.json()["error"]["message"]


async def test_an_unencoded_plus_in_a_datetime_is_read_as_the_offset(client, loaded):
    after = created(loaded[50])
    encoded = await client.get(
        f"/runs?created_after={iso(after).replace('+', '%2B')}&limit=500", headers=auth()
    )
    # A "+" left unencoded in a query string arrives as a space.
    raw = await client.get(f"/runs?created_after={iso(after)}&limit=500", headers=auth())
    assert raw.status_code == 200
    assert raw.json()["items"] == encoded.json()["items"]
    assert [i["id"] for i in raw.json()["items"]] == newest_first(loaded[50:])


async def test_a_cursor_from_one_listing_is_refused_by_the_other(client, loaded):
    runs_cursor = (await client.get("/runs?limit=2", headers=auth())).json()["next_cursor"]
    response = await client.get(f"/deliveries?limit=2&cursor={runs_cursor}", headers=auth())
    assert response.status_code == 422
    deliveries_cursor = (await client.get("/deliveries?limit=2", headers=auth())).json()[
        "next_cursor"
    ]
    response = await client.get(f"/runs?limit=2&cursor={deliveries_cursor}", headers=auth())
    assert response.status_code == 422


async def test_deliveries_filtered_to_duplicates(client):
    doc = envelope("dup_1")
    first = (await post_delivery(client, doc)).json()["delivery_id"]
    second = (await post_delivery(client, doc)).json()["delivery_id"]
    third = (await post_delivery(client, doc)).json()["delivery_id"]
    body = (await client.get("/deliveries?outcome=duplicate", headers=auth())).json()
    assert [d["id"] for d in body["items"]] == [third, second]
    assert {d["duplicate_of"] for d in body["items"]} == {first}
    assert body["next_cursor"] is None
