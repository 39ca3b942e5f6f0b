"""Every row of the SPEC's ingest table, through the HTTP route, on the real database."""

from __future__ import annotations

import hashlib
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import text

from receiver.app import create_app
from receiver.settings import Settings
from tests.support.apps import running_app
from tests.support.builders import (
    SIGNING_SECRET,
    batch_envelope,
    body_of,
    envelope,
    failed_envelope,
    post_delivery,
    run_object,
)
from tests.support.database import received_bytes


async def rows(engine, sql, **params):
    async with engine.connect() as conn:
        return [dict(r._mapping) for r in (await conn.execute(text(sql), params)).all()]


async def deliveries(engine):
    """The archive, oldest first, each ``body`` as received (``stored`` is what the row holds)."""
    found = await rows(
        engine,
        "SELECT id, outcome, cause, run_id, batch_id, body AS stored, body_encoding, body_size,"
        " signature, duplicate_of, cause_detail FROM deliveries ORDER BY id",
    )
    return [{**r, "body": received_bytes(r["stored"], r["body_encoding"])} for r in found]


async def run_row(engine, run_id):
    found = await rows(engine, "SELECT * FROM runs WHERE id = :id", id=run_id)
    return found[0] if found else None


@pytest.fixture
async def client_with(db):
    """A client on an app built with custom settings."""
    clients = []

    async def make(**overrides):
        base: dict[str, Any] = {"database_url": None, "signing_secrets": [SIGNING_SECRET]}
        base.update(overrides)
        app = create_app(Settings(**base), database_url=db.url.render_as_string(False))
        ctx = app.router.lifespan_context(app)
        await ctx.__aenter__()
        c = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
        clients.append((ctx, c))
        return c

    yield make
    for ctx, c in clients:
        await c.aclose()
        await ctx.__aexit__(None, None, None)


async def test_new_delivery_is_stored_and_answered_with_ids(client, db):
    response = await post_delivery(client, failed_envelope("run_a", code="oom", stage="execution"))
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "stored" and body["run_id"] == "run_a"
    [kept] = await deliveries(db)
    assert kept["id"] == body["delivery_id"] and kept["outcome"] == "stored"
    assert orjson.loads(kept["body"])["run_id"] == "run_a"
    run = await run_row(db, "run_a")
    assert run["status"] == "failed" and run["failure_code"] == "oom"
    assert run["failure_stage"] == "execution" and run["delivery_count"] == 1


async def test_changed_redelivery_is_stored_again(client, db):
    await post_delivery(client, envelope("run_b", status="running", event=None))
    response = await post_delivery(client, envelope("run_b", status="succeeded"))
    assert response.json()["status"] == "stored"
    run = await run_row(db, "run_b")
    assert run["status"] == "succeeded" and run["delivery_count"] == 2


async def test_batch_callback_answers_batch_id_and_updates_item_runs(client, db):
    doc = batch_envelope(
        "batch_1",
        [
            {"run_id": "r1", "status_code": "succeeded", "client_ref": "c1"},
            {"run_id": "r2", "status_code": "failed", "client_ref": "c2"},
        ],
    )
    response = await post_delivery(client, doc)
    assert response.status_code == 200
    assert response.json()["batch_id"] == "batch_1" and "run_id" not in response.json()
    [batch] = await rows(db, "SELECT * FROM batches")
    assert batch["status"] == "succeeded" and batch["total"] == 2 and batch["failed"] == 1
    assert (await run_row(db, "r2"))["client_ref"] == "c2"
    assert (await run_row(db, "r2"))["batch_id"] == "batch_1"


async def test_exact_duplicate_is_kept_once_and_answered_duplicate(client, db):
    raw = body_of(envelope("run_d"))
    first = await post_delivery(client, raw)
    second = await post_delivery(client, raw)
    assert second.status_code == 200
    assert second.json()["status"] == "duplicate"
    assert second.json()["duplicate_of"] == first.json()["delivery_id"]
    kept = await deliveries(db)
    assert [d["outcome"] for d in kept] == ["stored", "duplicate"]
    assert kept[0]["body"] is not None and kept[1]["body"] is None
    assert (await run_row(db, "run_d"))["delivery_count"] == 1


async def test_wrong_signature_is_401_and_body_not_kept(client, db):
    response = await post_delivery(client, envelope("run_e"), secret="whsec_attacker")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_signature"
    # Anyone can send these: nothing is kept (SPEC section 6), /metrics counts them.
    assert await deliveries(db) == []
    assert await run_row(db, "run_e") is None


async def test_missing_signature_is_401(client, db):
    response = await post_delivery(client, envelope("run_f"), secret=None)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_signature"
    assert await deliveries(db) == []


async def test_no_secret_configured_and_unsigned_not_allowed_is_401(client_with, db):
    c = await client_with(signing_secrets=[], allow_unsigned=False)
    response = await post_delivery(c, envelope("run_g"), secret=None)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_signature"
    assert "no signing secret" in response.json()["error"]["message"]


async def test_unsigned_allowed_when_configured(client_with, db):
    c = await client_with(signing_secrets=[], allow_unsigned=True)
    response = await post_delivery(c, envelope("run_h"), secret=None)
    assert response.status_code == 200
    assert (await deliveries(db))[0]["signature"] == "unsigned"


async def test_both_secrets_accepted_during_rotation(client_with, db):
    c = await client_with(signing_secrets=["whsec_old", "whsec_new"])
    assert (await post_delivery(c, envelope("r_old"), secret="whsec_old")).status_code == 200
    assert (await post_delivery(c, envelope("r_new"), secret="whsec_new")).status_code == 200
    assert (await post_delivery(c, envelope("r_bad"), secret="whsec_x")).status_code == 401


async def test_body_over_the_limit_is_413_and_not_kept(client_with, db):
    c = await client_with(max_body_bytes=1024)
    doc = envelope("run_big", metadata={"blob": "x" * 4096})
    response = await post_delivery(c, doc)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert response.headers["connection"] == "close"
    assert await deliveries(db) == []


async def test_body_over_the_limit_without_content_length_is_413(client_with, db):
    c = await client_with(max_body_bytes=1024)
    raw = body_of(envelope("run_chunked", metadata={"blob": "y" * 4096}))

    async def chunks():
        for start in range(0, len(raw), 500):
            yield raw[start : start + 500]

    response = await c.post(
        "/webhooks/runflow", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


async def test_default_limit_is_five_mebibytes():
    assert Settings(database_url=None).max_body_bytes == 5 * 1024 * 1024


async def test_non_json_content_type_is_415_and_kept(client, db):
    response = await post_delivery(
        client, envelope("run_i"), headers={"content-type": "text/plain"}
    )
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_media_type"
    [kept] = await deliveries(db)
    assert kept["outcome"] == "rejected" and kept["cause"] == "unsupported_media_type"
    assert kept["body"] is not None


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'"text"', b""])
async def test_bad_json_is_400_and_kept_with_cause(client, db, raw):
    response = await post_delivery(client, raw)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"
    [kept] = await deliveries(db)
    assert kept["cause"] == "invalid_json" and bytes(kept["body"]) == raw
    assert response.json()["error"]["delivery_id"] == kept["id"]


async def test_schema_violation_is_422_and_kept_with_cause(client, db):
    response = await post_delivery(client, envelope("run_j", duration_ms="slow"))  # type: ignore[arg-type]
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_payload"
    assert any(d["loc"] == "duration_ms" for d in error["details"])
    [kept] = await deliveries(db)
    assert kept["outcome"] == "rejected" and kept["cause"] == "invalid_payload"
    assert kept["cause_detail"]["details"][0]["loc"] == "duration_ms"
    assert await run_row(db, "run_j") is None


async def test_unknown_shape_is_422(client, db):
    response = await post_delivery(client, {"hello": "world"})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_payload"
    assert (await deliveries(db))[0]["cause"] == "invalid_payload"


async def test_client_ref_only_payload_resolves_to_the_single_run(client, db):
    await post_delivery(client, run_object("run_k", client_ref="order-42", status_code="running"))
    response = await post_delivery(
        client, {"client_ref": "order-42", "status_code": "failed", "failure_code": "nsfw"}
    )
    assert response.status_code == 200 and response.json()["run_id"] == "run_k"
    run = await run_row(db, "run_k")
    assert run["status"] == "failed" and run["failure_code"] == "nsfw"


@pytest.mark.parametrize("stored_refs", [[], ["dup", "dup"]])
async def test_unresolved_client_ref_is_422_kept_and_replayable(client, db, stored_refs):
    for i, ref in enumerate(stored_refs):
        await post_delivery(client, run_object(f"run_l{i}", client_ref=ref))
    response = await post_delivery(client, {"client_ref": "dup", "status_code": "failed"})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_payload"
    rejected = [d for d in await deliveries(db) if d["outcome"] == "rejected"]
    assert len(rejected) == 1 and rejected[0]["body"] is not None
    assert "client_ref" in rejected[0]["cause_detail"]["message"]


async def test_storage_unavailable_is_503_with_retry_after(db):
    dead = "postgresql://postgres@127.0.0.1:1/nowhere"
    async with running_app(Settings(signing_secrets=[SIGNING_SECRET]), database_url=dead) as (
        _app,
        c,
    ):
        response = await post_delivery(c, envelope("run_m"))
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "unavailable"
    assert int(response.headers["retry-after"]) > 0


async def test_run_object_stores_node_runs_and_logs_as_rows(client, db):
    doc = run_object(
        "run_n",
        status_code="failed",
        failure_code="node_failed",
        node_runs=[
            {"id": "nr1", "node_id": "ksampler", "status_code": "succeeded"},
            {"id": "nr2", "node_id": "vae", "status_code": "failed", "failure_code": "oom"},
        ],
        logs=[{"id": "lg1", "level": "error", "message": "CUDA OOM", "node_run_id": "nr2"}],
    )
    assert (await post_delivery(client, doc)).status_code == 200
    nodes = await rows(db, "SELECT id, run_id, status, failure_code FROM node_runs ORDER BY id")
    assert nodes == [
        {"id": "nr1", "run_id": "run_n", "status": "succeeded", "failure_code": None},
        {"id": "nr2", "run_id": "run_n", "status": "failed", "failure_code": "oom"},
    ]
    [log] = await rows(db, "SELECT run_id, node_run_id, message FROM run_logs")
    assert log == {"run_id": "run_n", "node_run_id": "nr2", "message": "CUDA OOM"}


async def test_cost_is_exact_numeric(client, db):
    await post_delivery(client, run_object("run_o", cost="0.1000000000000000055511151231257827"))
    cost = (await run_row(db, "run_o"))["cost"]
    assert str(cost) == "0.1000000000000000055511151231257827"


async def test_stale_payload_never_moves_a_run_backwards(client, db):
    await post_delivery(client, envelope("run_p", status="succeeded"))
    await post_delivery(
        client, run_object("run_p", status_code="running", client_ref="late", completed_at=None)
    )
    run = await run_row(db, "run_p")
    assert run["status"] == "succeeded"
    assert run["client_ref"] == "late"  # the stale payload still fills what was empty


async def test_rejected_delivery_replays_after_its_run_appears(client, db):
    from receiver.ingest import replay

    response = await post_delivery(client, {"client_ref": "later", "status_code": "failed"})
    delivery_id = response.json()["error"]["delivery_id"]
    await post_delivery(client, run_object("run_q", client_ref="later", status_code="running"))
    result = await replay(db, delivery_id)
    assert result.outcome == "stored" and result.run_id == "run_q"
    assert (await run_row(db, "run_q"))["status"] == "failed"
    [kept] = [d for d in await deliveries(db) if d["id"] == delivery_id]
    assert kept["outcome"] == "stored" and kept["cause"] is None


async def test_body_hash_is_recorded_for_every_kept_request(client, db):
    raw = body_of(envelope("run_r"))
    await post_delivery(client, raw)
    [kept] = await rows(db, "SELECT body_sha256 FROM deliveries")
    assert bytes(kept["body_sha256"]) == hashlib.sha256(raw).digest()


async def test_dropped_database_connections_do_not_lose_deliveries(client, db):
    # Warm the pool, then have the server cut every connection of ours (as a restart would).
    assert (await post_delivery(client, envelope("run_s1"))).status_code == 200
    async with db.connect() as conn:
        await conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        )
    responses = [await post_delivery(client, envelope(f"run_s{i}")) for i in range(2, 8)]
    assert [r.status_code for r in responses] == [200] * 6
    await db.dispose()  # the test's own pooled connections were cut too
    stored = await rows(db, "SELECT id FROM runs ORDER BY id")
    assert [r["id"] for r in stored] == [f"run_s{i}" for i in range(1, 8)]


async def test_nul_characters_are_stored_as_replacement_characters(client, db):
    raw = b'{"id": "run_nul", "status_code": "failed", "failure_message": "bad\\u0000byte"}'
    response = await post_delivery(client, raw)
    assert response.status_code == 200
    assert (await run_row(db, "run_nul"))["failure_message"] == "bad\ufffdbyte"
    [kept] = await deliveries(db)
    assert bytes(kept["body"]) == raw  # the archive keeps the exact bytes
