"""Hostile and odd input on the webhook: never a 500, never unarchived, never a lever.

Each test is one class of input found to misbehave: what it is answered, with which error
code, and what the archive holds afterwards (for unauthenticated requests: nothing at all).
"""

from __future__ import annotations

import base64
import logging
import os
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import text

from receiver.app import create_app
from receiver.ingest.archive import ArchiveEntry
from receiver.ingest.payloads import parse_payload
from receiver.ingest.pipeline import store_parsed
from receiver.ingest.signature import sign
from receiver.routes import webhooks
from receiver.settings import Settings
from receiver.vocabulary import DeliverySource, SignatureVerdict
from tests.support.builders import (
    API_TOKEN,
    SIGNING_SECRET,
    auth,
    batch_envelope,
    envelope,
    post_delivery,
    run_object,
)
from tests.support.database import received_bytes


async def rows(engine, sql, **params) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        return [dict(r._mapping) for r in (await conn.execute(text(sql), params)).all()]


async def deliveries(engine) -> list[dict[str, Any]]:
    """The archive, oldest first, each ``body`` as received."""
    found = await rows(
        engine,
        "SELECT id, outcome, cause, cause_detail, run_id, body, body_encoding, signature,"
        " headers, request_id FROM deliveries ORDER BY id",
    )
    return [{**r, "body": received_bytes(r["body"], r["body_encoding"])} for r in found]


async def table_counts(engine) -> dict[str, int]:
    """Rows in every table of the schema (alembic's bookkeeping aside)."""
    names = [
        r["tablename"]
        for r in await rows(
            engine,
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            " AND tablename <> 'alembic_version' ORDER BY tablename",
        )
    ]
    counts = {}
    for name in names:
        [row] = await rows(engine, f'SELECT count(*) AS n FROM "{name}"')
        counts[name] = row["n"]
    return counts


async def run_row(engine, run_id) -> dict[str, Any] | None:
    found = await rows(engine, "SELECT * FROM runs WHERE id = :id", id=run_id)
    return found[0] if found else None


@pytest.fixture
async def client_with(db):
    """A client on an app built with custom settings."""
    opened = []

    async def make(**overrides):
        values: dict[str, Any] = {
            "database_url": None,
            "signing_secrets": [SIGNING_SECRET],
            "api_tokens": [API_TOKEN],
        }
        values.update(overrides)
        app = create_app(Settings(**values), database_url=db.url.render_as_string(False))
        ctx = app.router.lifespan_context(app)
        await ctx.__aenter__()
        c = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
        opened.append((ctx, c))
        return c

    yield make
    for ctx, c in opened:
        await c.aclose()
        await ctx.__aexit__(None, None, None)


def nested(depth: int, leaf: Any = 1) -> Any:
    """``{"a": {"a": ... leaf}}`` with ``depth`` objects."""
    value = leaf
    for _ in range(depth):
        value = {"a": value}
    return value


def deep_json(field: str, depth: int, leaf: str = "1", **outer: Any) -> bytes:
    """A Run object whose ``field`` nests ``depth`` objects, written as text (no recursion)."""
    head = orjson.dumps(run_object("run_deep", **outer))[:-1]
    return head + f',"{field}":'.encode() + b'{"a":' * depth + leaf.encode() + b"}" * depth + b"}"


def incompressible(size: int) -> str:
    """Random text: what PostgreSQL cannot compress under the btree row limit."""
    return base64.b64encode(os.urandom(size)).decode()[:size]


def assert_kept_rejected(kept: dict[str, Any], body: bytes, loc: str | None = None) -> None:
    assert kept["outcome"] == "rejected" and kept["cause"] == "invalid_payload"
    assert bytes(kept["body"]) == body
    if loc is not None:
        locs = [d["loc"] for d in kept["cause_detail"]["details"]]
        assert any(found == loc or found.startswith(loc + ".") for found in locs), locs


async def post_raw(client, body: bytes, **headers: str) -> httpx.Response:
    sent = {"content-type": "application/json", "runflow-signature": sign(body, SIGNING_SECRET)}
    sent.update(headers)
    return await client.post("/webhooks/runflow", content=body, headers=sent)


def error_of(response: httpx.Response) -> dict[str, Any]:
    error: dict[str, Any] = response.json()["error"]
    return error


# --- 1. no input class reaches a 500 --------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("created_at", "0001-01-01T00:00:00+01:00"),  # before year 1 once in UTC
        ("completed_at", "9999-12-31T23:30:00-01:00"),  # after 9999 once in UTC
        # In range for Python, but the driver would write them as -infinity / infinity.
        ("created_at", "0001-01-01T00:00:00+00:00"),
        ("completed_at", "9999-12-31T23:59:59.999999+00:00"),
        ("started_at", "2026-13-01T00:00:00+00:00"),
    ],
)
async def test_datetime_out_of_range_after_its_offset_is_422_and_kept(client, db, field, value):
    body = orjson.dumps(run_object("run_dt", **{field: value}))
    response = await post_raw(client, body)
    assert response.status_code == 422, response.text
    assert error_of(response)["code"] == "invalid_payload"
    [kept] = await deliveries(db)
    assert_kept_rejected(kept, body, field)
    assert await run_row(db, "run_dt") is None


async def test_datetime_at_the_edge_that_stays_in_range_is_stored(client, db):
    body = orjson.dumps(run_object("run_edge", created_at="0001-01-02T01:00:00+01:00"))
    response = await post_raw(client, body)
    assert response.status_code == 200, response.text
    [run] = await rows(
        db,
        "SELECT to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') AS t"
        " FROM runs WHERE id = 'run_edge'",
    )
    assert run["t"] == "0001-01-02 00:00:00"
    found = await client.get("/runs/run_edge", headers=auth())
    assert found.status_code == 200, found.text


@pytest.mark.parametrize(("field", "depth"), [("input", 300), ("output", 1000), ("metadata", 65)])
async def test_deep_nesting_is_422_naming_the_field_and_kept(client, db, field, depth):
    body = deep_json(field, depth)
    response = await post_raw(client, body)
    assert response.status_code == 422, response.text
    error = error_of(response)
    assert error["code"] == "invalid_payload"
    assert error["details"][0]["loc"] == field
    assert "64" in error["message"]
    [kept] = await deliveries(db)
    assert_kept_rejected(kept, body, field)


async def test_nesting_within_the_limit_is_stored_whole(client, db):
    # The document is level 1, the Run object's metadata level 2: 62 more objects fit in 64.
    doc = run_object("run_ok_deep", metadata=nested(62, "leaf"))
    response = await post_raw(client, orjson.dumps(doc))
    assert response.status_code == 200, response.text
    run = await run_row(db, "run_ok_deep")
    assert run is not None and run["metadata"] == nested(62, "leaf")


@pytest.mark.parametrize("brackets", ["[]", "{}"])
async def test_the_depth_limit_is_exact_for_arrays_and_objects(client, db, brackets):
    # The document is level 1; k containers under "metadata" reach level 1 + k, and the
    # limit is 64 levels: 63 containers are stored, 64 are refused.
    def body(k: int) -> bytes:
        opening, closing = ('{"a":', "}") if brackets == "{}" else ("[", "]")
        head = orjson.dumps(run_object(f"run_edge_{brackets}_{k}"))[:-1]
        return head + b',"metadata":' + (opening * k + "1" + closing * k).encode() + b"}"

    stored = await post_raw(client, body(63))
    assert stored.status_code == 200, stored.text
    refused = await post_raw(client, body(64))
    assert refused.status_code == 422, refused.text
    assert error_of(refused)["details"][0]["loc"] == "metadata"


async def test_nul_deep_inside_is_422_without_a_log_flood(client, db, caplog):
    body = deep_json("input", 600, leaf='"a\\u0000b"')
    with caplog.at_level(logging.INFO):
        response = await post_raw(client, body)
    assert response.status_code == 422, response.text
    assert error_of(response)["code"] == "invalid_payload"
    [kept] = await deliveries(db)
    assert_kept_rejected(kept, body, "input")
    assert len(caplog.records) < 10


async def test_nul_anywhere_within_the_limit_is_replaced_not_refused(client, db):
    doc = run_object("run_nul", metadata=nested(40, "a\u0000b"), failure_message="x\u0000y")
    doc["metadata"]["k\u0000ey"] = "v"
    response = await post_raw(client, orjson.dumps(doc))
    assert response.status_code == 200, response.text
    run = await run_row(db, "run_nul")
    assert run is not None
    assert run["metadata"]["k\ufffdey"] == "v"
    inner = run["metadata"]
    for _ in range(40):
        inner = inner["a"]
    assert inner == "a\ufffdb"
    assert run["failure_message"] == "x\ufffdy"


@pytest.mark.parametrize("count", [2**31, -1, 10**15])
async def test_batch_counts_beyond_int4_are_422_and_kept(client, db, count):
    doc = batch_envelope("batch_big", [{"run_id": "b_run_1", "status_code": "succeeded"}])
    doc["output"]["total"] = count
    body = orjson.dumps(doc)
    response = await post_raw(client, body)
    assert response.status_code == 422, response.text
    assert error_of(response)["code"] == "invalid_payload"
    [kept] = await deliveries(db)
    assert_kept_rejected(kept, body, "output.total")
    assert await rows(db, "SELECT id FROM batches") == []


async def test_batch_count_at_int4_max_is_stored(client, db):
    doc = batch_envelope("batch_max", [{"run_id": "b_run_2", "status_code": "succeeded"}])
    doc["output"]["total"] = 2**31 - 1
    response = await post_raw(client, orjson.dumps(doc))
    assert response.status_code == 200, response.text
    assert await rows(db, "SELECT total FROM batches") == [{"total": 2**31 - 1}]


@pytest.mark.parametrize(
    "cost", ["1e-20000", "1e20000", "NaN", "Infinity", "0." + "1" * 200, "9" * 500]
)
async def test_cost_numeric_cannot_hold_is_422_and_kept(client, db, cost):
    body = orjson.dumps(run_object("run_cost", cost=cost))
    response = await post_raw(client, body)
    assert response.status_code == 422, response.text
    assert error_of(response)["code"] == "invalid_payload"
    [kept] = await deliveries(db)
    assert_kept_rejected(kept, body, "cost")
    assert await run_row(db, "run_cost") is None


async def test_cost_within_bounds_is_stored_exactly(client, db):
    body = orjson.dumps(run_object("run_cost_ok", cost="1e-900"))
    assert (await post_raw(client, body)).status_code == 200
    run = await run_row(db, "run_cost_ok")
    assert run is not None and str(run["cost"]) == "1E-900"


@pytest.mark.parametrize(
    ("fields", "loc"),
    [
        ({"failure_code": incompressible(3000)}, "failure_code"),
        ({"failure_stage_code": incompressible(3000)}, "failure_stage_code"),
        ({"model": {"id": "m", "slug": incompressible(3000)}}, "model"),
        ({"model": incompressible(3000)}, "model"),
        ({"target_type": incompressible(600)}, "target_type"),
        ({"source_code": incompressible(600)}, "source_code"),
        ({"org_id": incompressible(600)}, "org_id"),
        ({"event": incompressible(600)}, "event"),
        ({"id": incompressible(300)}, "id"),
        # 200 characters, 800 bytes: the limit is in bytes, what the index holds.
        ({"failure_code": "\U0001f600" * 200}, "failure_code"),
    ],
)
async def test_indexed_text_over_the_limit_is_422_and_kept(client, db, fields, loc):
    body = orjson.dumps(run_object("run_long", **fields))
    response = await post_raw(client, body)
    assert response.status_code == 422, response.text
    assert error_of(response)["code"] == "invalid_payload"
    [kept] = await deliveries(db)
    assert_kept_rejected(kept, body, loc)
    assert await rows(db, "SELECT id FROM runs") == []


async def test_an_envelopes_error_code_over_the_limit_is_422_and_kept(client, db):
    doc = envelope("run_env_long", status="failed", output={"error": {"code": "c" * 3000}})
    body = orjson.dumps(doc)
    response = await post_raw(client, body)
    assert response.status_code == 422, response.text
    [kept] = await deliveries(db)
    assert_kept_rejected(kept, body, "output.failure_code")


async def test_indexed_text_at_the_limit_is_stored_and_queryable(client, db):
    code, slug = incompressible(255), incompressible(255)
    doc = run_object(
        "r" * 255,
        status_code="failed",
        failure_code=code,
        failure_stage_code=incompressible(255),
        model={"id": incompressible(255), "slug": slug},
        target_type=incompressible(255),
        source_code=incompressible(255),
        org_id=incompressible(255),
    )
    response = await post_raw(client, orjson.dumps(doc))
    assert response.status_code == 200, response.text
    found = await client.get("/runs", params={"failure_code": code}, headers=auth())
    assert found.status_code == 200
    assert [item["model"] for item in found.json()["items"]] == [slug]


@pytest.mark.parametrize(
    "doc",
    [{"id": None}, {"run_id": None}, {"batch_id": None}, {"id": None, "status_code": "failed"}],
)
async def test_null_identity_is_422_and_kept(client, db, doc):
    body = orjson.dumps(doc)
    response = await post_raw(client, body)
    assert response.status_code == 422, response.text
    error = error_of(response)
    assert error["code"] == "invalid_payload"
    [kept] = await deliveries(db)
    assert_kept_rejected(kept, body, next(iter(doc)))
    assert kept["run_id"] is None
    assert await rows(db, "SELECT id FROM runs") == []


async def test_an_unexpected_error_still_archives_the_delivery_for_replay(client, db, monkeypatch):
    from receiver.ingest import pipeline

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise ZeroDivisionError("a bug in the write path")

    body = orjson.dumps(run_object("run_bug"))
    with monkeypatch.context() as patched:
        patched.setattr(pipeline, "_store", broken)  # the webhook write (group commit)
        response = await post_raw(client, body)
    assert response.status_code == 500
    error = error_of(response)
    assert error["code"] == "internal_error"
    [kept] = await deliveries(db)
    assert kept["outcome"] == "rejected" and kept["cause"] == "internal_error"
    assert bytes(kept["body"]) == body and error["delivery_id"] == kept["id"]
    # After the fix, the kept delivery replays into its run.
    replayed = await client.post(f"/deliveries/{kept['id']}/replay", headers=auth())
    assert replayed.status_code == 200 and replayed.json()["status"] == "stored"
    assert (await run_row(db, "run_bug"))["status"] == "succeeded"  # type: ignore[index]


# --- 2. shapes that exist in the wild --------------------------------------------------------


async def test_the_sdk_shaped_run_object_is_stored_with_its_model_failure_and_completion(
    client, db
):
    # runflow-io/runflow-js packages/sdk/src/types.ts: model "owner/slug", finished_at,
    # error {code, message}.
    doc = {
        "id": "run_sdk_1",
        "status_code": "failed",
        "model": "runflow/background-removal",
        "created_at": "2026-11-01T12:00:00+00:00",
        "started_at": "2026-11-01T12:00:01+00:00",
        "finished_at": "2026-11-01T12:00:04.500+00:00",
        "output": None,
        "error": {"code": "model_error", "message": "the model crashed"},
    }
    response = await post_delivery(client, doc)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "stored"
    run = await run_row(db, "run_sdk_1")
    assert run is not None
    assert run["model"] == "runflow/background-removal" and run["model_id"] is None
    assert run["failure_code"] == "model_error"
    assert run["failure_message"] == "the model crashed"
    assert run["completed_at"] == datetime(2026, 11, 1, 12, 0, 4, 500000, tzinfo=UTC)
    assert run["duration_ms"] == 3500
    [kept] = await deliveries(db)
    assert kept["cause_detail"] is None


async def test_the_sdk_shape_with_canceled_and_a_null_error(client, db):
    doc = {"id": "run_sdk_2", "status_code": "canceled", "model": "acme/x", "error": None}
    assert (await post_delivery(client, doc)).status_code == 200
    run = await run_row(db, "run_sdk_2")
    assert run is not None and run["status"] == "cancelled" and run["failure_code"] is None


async def test_wrong_typed_descriptive_fields_are_set_aside_not_rejected(client, db):
    doc = run_object(
        "run_odd",
        model=["not", "a", "model"],
        failure_message={"text": "odd"},
        node_runs=[
            {"id": "node_1", "status_code": "succeeded", "node_type": {"x": 1}, "preview": 3},
        ],
        logs=[{"id": "log_1", "level": ["warn"], "message": "hello"}],
    )
    body = orjson.dumps(doc)
    response = await post_raw(client, body)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "stored"
    run = await run_row(db, "run_odd")
    assert run is not None
    assert run["model"] is None and run["failure_message"] is None
    assert run["status"] == "succeeded" and str(run["cost"]) == "0.0125"
    [kept] = await deliveries(db)
    assert kept["outcome"] == "stored" and bytes(kept["body"]) == body
    aside = {item["loc"] for item in kept["cause_detail"]["set_aside"]}
    assert aside == {"model", "failure_message", "node_runs.0.node_type", "logs.0.level"}
    [node] = await rows(db, "SELECT id, node_type, status FROM node_runs")
    assert node == {"id": "node_1", "node_type": None, "status": "succeeded"}
    [log_row] = await rows(db, "SELECT id, level, message FROM run_logs")
    assert log_row == {"id": "log_1", "level": None, "message": "hello"}


@pytest.mark.parametrize(
    ("fields", "loc"),
    [
        ({"status_code": ["succeeded"]}, "status_code"),
        ({"created_at": {"t": 1}}, "created_at"),
        ({"finished_at": "yesterday"}, "finished_at"),
        ({"id": ["run"]}, "id"),
        ({"batch_id": {"b": 1}}, "batch_id"),
        ({"model": [1], "status_code": "unknown_word"}, "status_code"),
    ],
)
async def test_identity_status_and_timestamps_still_validate_strictly(client, db, fields, loc):
    body = orjson.dumps(run_object("run_strict", **fields))
    response = await post_raw(client, body)
    assert response.status_code == 422, response.text
    assert error_of(response)["code"] == "invalid_payload"
    [kept] = await deliveries(db)
    assert_kept_rejected(kept, body, loc)


# --- 4/5. unauthenticated traffic and signatures ---------------------------------------------


GOOD = orjson.dumps(envelope("run_sig"))
HEX = sign(GOOD, SIGNING_SECRET)


@pytest.mark.parametrize(
    "header",
    [
        ("\u00e9" + HEX[1:]).encode("latin-1"),  # 64 characters, one not ASCII
        ("\u00ff" * 64).encode("latin-1"),
        (HEX[:32] + " " + HEX[33:]).encode(),  # whitespace inside
        HEX[:63].encode(),
        (HEX + "0").encode(),
        ("sha256=" + HEX[:-1] + "g").encode(),
        b"sha256=",
    ],
)
async def test_a_malformed_signature_is_401_and_leaves_no_row(client, db, header):
    before = await table_counts(db)
    response = await client.post(
        "/webhooks/runflow",
        content=GOOD,
        headers={"content-type": "application/json", "runflow-signature": header},
    )
    assert response.status_code == 401, response.text
    assert error_of(response)["code"] == "invalid_signature"
    assert await table_counts(db) == before


async def test_uppercase_hex_and_the_sha256_prefix_verify(client, db):
    spellings = [str.upper, lambda h: "sha256=" + h, lambda h: "SHA256=" + h.upper()]
    for i, spell in enumerate(spellings):
        body = orjson.dumps(envelope(f"run_spell_{i}"))
        header = spell(sign(body, SIGNING_SECRET))
        response = await post_raw(client, body, **{"runflow-signature": header})
        assert response.status_code == 200, (header, response.text)


@pytest.mark.parametrize("secrets", [[], [SIGNING_SECRET]])
async def test_a_wrong_signature_is_refused_even_when_unsigned_is_allowed(client_with, db, secrets):
    c = await client_with(signing_secrets=secrets, allow_unsigned=True)
    body = orjson.dumps(envelope("run_unsigned"))
    wrong = await post_raw(c, body, **{"runflow-signature": sign(body, "whsec_attacker")})
    assert wrong.status_code == 401 and error_of(wrong)["code"] == "invalid_signature"
    garbage = await post_raw(c, body, **{"runflow-signature": "not-a-signature"})
    assert garbage.status_code == 401
    assert await deliveries(db) == []
    # No header at all is what "unsigned" means.
    unsigned = await c.post(
        "/webhooks/runflow", content=body, headers={"content-type": "application/json"}
    )
    assert unsigned.status_code == 200
    [kept] = await deliveries(db)
    assert kept["signature"] == "unsigned"


async def test_replay_refuses_a_row_kept_unsigned_unless_unsigned_is_allowed_now(client_with, db):
    open_door = await client_with(signing_secrets=[], allow_unsigned=True)
    body = orjson.dumps({"id": None})
    response = await open_door.post(
        "/webhooks/runflow", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    [kept] = await deliveries(db)
    assert kept["signature"] == "unsigned" and kept["outcome"] == "rejected"
    closed = await client_with(allow_unsigned=False)
    refused = await closed.post(f"/deliveries/{kept['id']}/replay", headers=auth())
    assert refused.status_code == 409
    assert error_of(refused)["code"] == "not_replayable"
    assert "unsigned" in error_of(refused)["message"]
    [after] = await deliveries(db)
    assert after["outcome"] == "rejected"
    allowed = await open_door.post(f"/deliveries/{kept['id']}/replay", headers=auth())
    assert allowed.status_code == 200 and allowed.json()["status"] == "rejected"


def metric(text_: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    total = 0.0
    for line in text_.splitlines():
        if line.startswith("#"):
            continue
        key, _, number = line.rpartition(" ")
        if key.split("{")[0] != name:
            continue
        found = key.partition("{")[2].rstrip("}")
        if ",".join(sorted(found.split(","))) == wanted:
            total += float(number)
    return total


async def test_refused_requests_leave_no_row_are_counted_and_logged_sparingly(
    client_with, db, caplog, monkeypatch
):
    monkeypatch.setattr(webhooks, "REFUSAL_LOG", webhooks.RateLimitedLog(interval=600))
    c = await client_with(max_body_bytes=2048)
    before = await table_counts(db)
    scrape = (await c.get("/metrics")).text
    refused_before = {
        cause: metric(scrape, "runflow_receiver_refused_total", cause=cause)
        for cause in ("invalid_signature", "payload_too_large")
    }
    rejected_before = metric(
        scrape, "runflow_receiver_deliveries_total", outcome="rejected", cause="invalid_signature"
    )
    huge_id = "r" * 10_000  # under the 16 KB header limit, far over what a log line shows
    with caplog.at_level(logging.WARNING, logger="receiver.routes.webhooks"):
        for i in range(20):
            body = orjson.dumps(envelope(f"run_x{i}"))
            bad = await post_raw(
                c, body, **{"runflow-signature": "0" * 64, "runflow-request-id": huge_id}
            )
            assert bad.status_code == 401
            big = await post_raw(c, b"{" + b" " * 4096 + b"}")
            assert big.status_code == 413 and error_of(big)["code"] == "payload_too_large"
            assert big.headers["connection"] == "close"
    assert await table_counts(db) == before
    scrape = (await c.get("/metrics")).text
    for cause, was in refused_before.items():
        assert metric(scrape, "runflow_receiver_refused_total", cause=cause) == was + 20
    assert (
        metric(
            scrape,
            "runflow_receiver_deliveries_total",
            outcome="rejected",
            cause="invalid_signature",
        )
        == rejected_before + 20
    )
    lines = [r.getMessage() for r in caplog.records if r.name == "receiver.routes.webhooks"]
    # One line per cause per interval, the request id cut short.
    assert len(lines) == 2, lines
    assert all(len(line) < 400 for line in lines)


async def test_kept_headers_and_request_id_are_cut_short_on_every_row(client, db):
    body = orjson.dumps(envelope("run_headers"))
    response = await post_raw(
        client,
        body,
        **{"user-agent": "u" * 5000, "runflow-request-id": "q" * 5000, "x-junk": "j" * 4000},
    )
    assert response.status_code == 200
    [kept] = await deliveries(db)
    assert len(kept["request_id"]) <= 255
    assert all(len(value) <= 1024 for value in kept["headers"].values())
    assert "x-junk" not in kept["headers"]
    assert kept["headers"]["user-agent"].startswith("uuu")


async def test_headers_held_in_columns_are_stored_once_and_answered_as_sent(client, db):
    body = orjson.dumps(envelope("run_headers_once"))
    long_id = "q" * 5000
    sent = {
        "content-type": "application/json; charset=utf-8",
        "user-agent": "runflow-webhooks/1.0",
    }
    first = await post_raw(client, body, **sent, **{"runflow-request-id": "req_0001"})
    again = orjson.dumps({**envelope("run_headers_once"), "metadata": {"attempt": 2}})
    second = await post_raw(client, again, **sent, **{"runflow-request-id": long_id})
    assert first.status_code == second.status_code == 200

    # Each answers the headers it was sent, among those the archive keeps (SPEC: "selected
    # headers"), each value cut at 1024 characters.
    def answered(response: httpx.Response) -> dict[str, Any]:
        found = response.json()
        return {key: found["headers"].get(key) for key in (*sent, "runflow-request-id")}

    one = await client.get(f"/deliveries/{first.json()['delivery_id']}", headers=auth())
    two = await client.get(f"/deliveries/{second.json()['delivery_id']}", headers=auth())
    assert answered(one) == {**sent, "runflow-request-id": "req_0001"}
    assert answered(two) == {**sent, "runflow-request-id": "q" * 1023 + "\u2026"}
    assert two.json()["request_id"] == "q" * 254 + "\u2026"
    listed = await client.get("/runs/run_headers_once/deliveries", headers=auth())
    assert listed.status_code == 200, listed.text
    assert sorted(
        item["headers"]["runflow-request-id"] for item in listed.json()["items"]
    ) == sorted(["req_0001", "q" * 1023 + "\u2026"])

    # The row holds the content type and a request id that fits its column only there.
    kept = {row["request_id"]: row["headers"] for row in await deliveries(db)}
    assert "content-type" not in kept["req_0001"]
    assert "runflow-request-id" not in kept["req_0001"]
    assert kept["req_0001"]["user-agent"] == "runflow-webhooks/1.0"
    assert kept["q" * 254 + "\u2026"]["runflow-request-id"] == "q" * 1023 + "\u2026"


async def test_a_fetched_run_answers_only_the_headers_it_was_kept_with(client, db):
    # A backfilled run has a content type column but was never sent with such a header.
    body = orjson.dumps(run_object("run_fetched"))
    entry = ArchiveEntry.of(
        body,
        signature=SignatureVerdict.UNSIGNED,
        source=DeliverySource.BACKFILL,
        headers={"url": "https://api.runflow.io/v1/runs/run_fetched"},
    )
    result = await store_parsed(db, entry, parse_payload(orjson.loads(body)))
    found = await client.get(f"/deliveries/{result.delivery_id}", headers=auth())
    assert found.status_code == 200, found.text
    assert found.json()["headers"] == {"url": "https://api.runflow.io/v1/runs/run_fetched"}
    assert found.json()["content_type"] == "application/json"


async def test_a_slow_body_is_answered_408_and_leaves_no_row(client_with, db):
    c = await client_with(body_read_timeout_seconds=0.5)
    before = await table_counts(db)

    async def trickle():
        import asyncio

        yield b'{"run_id": "run_slow", '
        await asyncio.sleep(5)
        yield b'"status": "succeeded"}'

    response = await c.post(
        "/webhooks/runflow",
        content=trickle(),
        headers={"content-type": "application/json", "runflow-signature": "0" * 64},
    )
    assert response.status_code == 408
    assert error_of(response)["code"] == "request_timeout"
    assert await table_counts(db) == before


async def test_headers_over_the_limit_are_431_and_leave_no_row(client, db):
    before = await table_counts(db)
    body = orjson.dumps(envelope("run_fat"))
    response = await post_raw(client, body, **{"x-junk": "j" * 20_000})
    assert response.status_code == 431
    assert error_of(response)["code"] == "headers_too_large"
    assert await table_counts(db) == before


@pytest.mark.parametrize(
    "number", ["18446744073709551616", "-9223372036854775809", "1e20", "123456789e30"]
)
async def test_numbers_beyond_64_bits_in_json_fields_are_stored(client, db, number):
    # Found by the fuzz campaign: jsonb read back 1e20 as an integer orjson could not write.
    for attempt in range(2):  # the second delivery re-reads what the first one stored
        body = (
            f'{{"run_id": "big", "status": "running", "output": {{"n": {number}}},'
            f' "metadata": {{"attempt": {attempt}, "seed": {number}}}}}'
        ).encode()
        response = await post_delivery(client, body)
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "stored"
    run = (await client.get("/runs/big", headers=auth())).json()
    assert float(run["output"]["n"]) == float(number)
    assert run["metadata"]["attempt"] == 1
